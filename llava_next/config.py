"""Configs for the two towers and the glue, read from a llava-hf `config.json`.

Hub files omit every field that equals the transformers default for the sub-config's
`model_type`, so each tower's defaults are written out here per model_type and filled in
before the dataclass is built. Field names are transformers' so a config.json round-trips.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field

# transformers' defaults for the sub-configs a llava-hf checkpoint can name.
VISION_DEFAULTS = {
    "clip_vision_model": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=512,
    ),
}
# LlavaNextConfig builds a ViT-L/14-336 when `vision_config` is absent altogether.
VISION_WHEN_ABSENT = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
)
TEXT_DEFAULTS = {
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
        max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=None,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    ),
    "mistral": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
        max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    ),
}
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# Keys read into fields, or rewritten on save, that `extra` must not bring back (a sub-config's
# dtype names the original weights', stale once converted; save_pretrained writes the model's).
NOT_EXTRA = {"model_type", "dtype", "torch_dtype", "extra",
             "image_token_id", "rope_parameters", "rope_scaling"}


class ConfigError(ValueError):
    pass


class _ReadsExtra:
    """config.<key> for a config.json key no field models (initializer_range, use_cache, ...),
    as transformers' configs make every key an attribute."""

    def __getattr__(self, name):  # called only for names that are not real attributes
        extra = self.__dict__.get("extra")  # None mid-copy or mid-unpickle
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


@dataclass
class VisionConfig(_ReadsExtra):
    model_type: str = "clip_vision_model"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # see LlavaNextConfig.extra

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:  # 24 for ViT-L/14 at 336 px
        return self.image_size // self.patch_size


@dataclass
class TextConfig(_ReadsExtra):
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # see LlavaNextConfig.extra

    @property
    def attention_window(self) -> int | None:
        """The sliding window attention runs with: Mistral's. transformers' Llama attention has
        none and ignores a `sliding_window` in its config (kept here only to be saved back)."""
        return self.sliding_window if self.model_type == "mistral" else None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )


@dataclass
class LlavaNextConfig(_ReadsExtra):
    vision_config: VisionConfig = field(default_factory=lambda: VisionConfig(**VISION_WHEN_ABSENT))
    text_config: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int | list[int] = -2
    multimodal_projector_bias: bool = True
    image_grid_pinpoints: list[list[int]] = field(default_factory=lambda: [list(p) for p in DEFAULT_PINPOINTS])
    tie_word_embeddings: bool = False
    # The file's keys that no field above models (initializer_range, use_cache, dropout rates,
    # transformers_version, ...): nothing here reads them, save_pretrained writes them back.
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    model_type = "llava_next"  # a class attribute, not a field: not a setting
    use_return_dict = True  # forward() returns a CausalLMOutput unless told return_dict=False

    @property
    def image_token_id(self) -> int:
        return self.image_token_index

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> TextConfig:
        return self.text_config  # the only text model: the decoder

    @property
    def feature_layers(self) -> list[int]:
        layers = self.vision_feature_layer
        return [layers] if isinstance(layers, int) else list(layers)

    # ---- reading and writing -------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "LlavaNextConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: a config is a dict (config.json's contents), got {type(d).__name__}")
        for part in ("text_config", "vision_config"):
            rates = {k: v for k, v in (d.get(part) or {}).items()
                     if "dropout" in k and isinstance(v, (int, float)) and v > 0}
            if rates:  # the llava-hf checkpoints have none; train-mode dropout is not built here
                warnings.warn(f"{source}: {part} asks for dropout {rates}; llava-next has no dropout layers, "
                              "so training runs without it", stacklevel=2)
        if d.get("model_type", "llava_next") != "llava_next":
            raise ConfigError(f"{source}: model_type is {d['model_type']!r}, expected 'llava_next'")
        vision = _build(VisionConfig, d.get("vision_config"), VISION_DEFAULTS, "clip_vision_model",
                        VISION_WHEN_ABSENT, f"{source}: vision_config")
        text = _build(TextConfig, d.get("text_config"), TEXT_DEFAULTS, "llama", None, f"{source}: text_config")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls)
              if f.name in d and f.name not in ("vision_config", "text_config", "extra")}
        kw["extra"] = _unmodelled(cls, d, also=("vision_config", "text_config", "architectures"))
        if "image_token_index" not in d and "image_token_id" in d:  # transformers v5 spelling
            kw["image_token_index"] = d["image_token_id"]
        if kw.get("image_grid_pinpoints") is None:
            kw.pop("image_grid_pinpoints", None)
        return cls(vision_config=vision, text_config=text, **kw)

    @classmethod
    def from_json_file(cls, path: str) -> "LlavaNextConfig":
        from .hub import read_json

        return cls.from_dict(read_json(path), source=path)

    @classmethod
    def from_pretrained(cls, folder: str, revision: str | None = None) -> "LlavaNextConfig":
        """From a checkpoint folder or hub repo id (only config.json is fetched)."""
        from .hub import resolve_folder

        folder = resolve_folder(folder, ["config.json"], revision=revision, required=["config.json"])
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json in {folder}")
        return cls.from_json_file(path)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for part in (d, d["text_config"], d["vision_config"]):  # unmodelled keys first, fields win
            extra = part.pop("extra")
            part.update({k: v for k, v in extra.items() if k not in part})
        d["model_type"] = "llava_next"
        d["architectures"] = ["LlavaNextForConditionalGeneration"]
        # transformers v5 reads rope settings from `rope_parameters`; v4 from `rope_theta`.
        t = d["text_config"]
        t["rope_parameters"] = {"rope_type": "default", "rope_theta": t["rope_theta"]}
        return d

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    def validate_for_model(self) -> None:
        """Checks that only make sense once a model is built from the config."""
        if self.vision_feature_select_strategy == "full":
            raise ConfigError(
                "vision_feature_select_strategy='full' keeps the CLS token (one extra feature per tile), "
                "which cannot be packed into the anyres grid; transformers and the original LLaVA code fail "
                "on any multi-tile image with it. Use 'default'."
            )
        if self.vision_feature_select_strategy != "default":
            raise ConfigError(f"unknown vision_feature_select_strategy {self.vision_feature_select_strategy!r}; "
                              "expected 'default'")
        n = self.vision_config.num_hidden_layers
        for layer in self.feature_layers:
            if not -(n + 1) <= layer <= n:
                raise ConfigError(f"vision_feature_layer {layer} is outside the {n + 1} hidden states "
                                  f"(embeddings + {n} layers) of the vision tower")
        tile = self.vision_config.image_size
        for p in self.image_grid_pinpoints:
            if len(p) != 2 or p[0] % tile or p[1] % tile:
                raise ConfigError(f"image_grid_pinpoints entry {p} is not a (height, width) pair of "
                                  f"multiples of the vision image_size {tile}")
        if self.projector_hidden_act != "gelu":
            raise ConfigError(f"projector_hidden_act {self.projector_hidden_act!r} is not supported (only 'gelu')")
        if self.vision_config.hidden_act != "quick_gelu":
            raise ConfigError(f"vision hidden_act {self.vision_config.hidden_act!r} is not supported "
                              "(only 'quick_gelu', as in CLIP)")
        if self.text_config.hidden_act != "silu":
            raise ConfigError(f"text hidden_act {self.text_config.hidden_act!r} is not supported (only 'silu')")


def _build(klass, sub: dict | None, defaults_by_type: dict, default_type: str, when_absent: dict | None,
           where: str):
    """Sub-config from a hub dict: model_type's defaults, then the file's values."""
    if sub is None:
        sub = dict(when_absent or {})
    model_type = sub.get("model_type", default_type)
    if model_type not in defaults_by_type:
        raise ConfigError(f"{where}: unknown model_type {model_type!r}; supported: {sorted(defaults_by_type)}")
    values = dict(defaults_by_type[model_type], model_type=model_type)
    names = {f.name for f in dataclasses.fields(klass)} - {"extra"}
    values.update({k: v for k, v in sub.items() if k in names})
    values["extra"] = _unmodelled(klass, sub)
    rope = sub.get("rope_parameters") or sub.get("rope_scaling")
    if klass is TextConfig and rope:
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported (only 'default' RoPE)")
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
    return klass(**values)


def _unmodelled(klass, d: dict, also=()) -> dict:
    """d's keys that no field of klass models, minus those read elsewhere (NOT_EXTRA)."""
    names = {f.name for f in dataclasses.fields(klass)}
    return {k: v for k, v in d.items() if k not in names and k not in NOT_EXTRA and k not in also}
