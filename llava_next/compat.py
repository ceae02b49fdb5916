"""What lets code written for transformers' LlavaNextForConditionalGeneration use ours unchanged:
its output object, the forward options it passes that change nothing here, and its state_dict key
names. The model itself (model.py) does not depend on any of it to compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .loading import legacy_key


class ModelOutput:
    """Read like transformers' ModelOutput: out.name, out["name"], out[0], "name" in out, and
    keys() / to_tuple() over the fields that are set (not None), in the order of FIELDS."""
    FIELDS: tuple = ()

    def keys(self) -> list[str]:
        return [k for k in self.FIELDS if getattr(self, k) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys())

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key, default=None):
        return getattr(self, key) if key in self.keys() else default

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):  # a dict's iteration: the keys
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class CausalLMOutput(ModelOutput):
    """forward()'s output: loss, logits, hidden_states, attentions."""
    FIELDS = ("loss", "logits", "hidden_states", "attentions")
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: tuple | None = None  # with output_hidden_states: num_layers + 1 tensors (B, T, C)
    attentions: tuple | None = None  # with output_attentions: num_layers tensors (B, num_heads, T, Tk)


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """generate(..., return_dict_in_generate=True)'s output, transformers' fields: sequences (B * n,
    T + new), with output_scores / output_logits one (B * n, vocab) fp32 tensor per new token
    (processed / raw), with output_attentions / output_hidden_states one tuple over layers per
    new token (generate's docstring), and the KVCache decoded into."""
    FIELDS = ("sequences", "scores", "logits", "attentions", "hidden_states", "cache")
    sequences: torch.Tensor
    scores: tuple | None = None
    logits: tuple | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: object = None


@dataclass
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """generate(..., num_beams > 1, return_dict_in_generate=True)'s output, transformers' fields:
    sequences (B * n, T + new), with output_scores their length-penalised scores (B * n,) as
    sequences_scores and one (B * num_beams, vocab) tensor of processed log-probabilities per step
    as scores, with output_logits the raw logits per step, beam_indices (B * n, new) int32: the
    row (b * num_beams + beam) each new token was chosen from, -1 after a beam's end; attentions /
    hidden_states per step of the B * num_beams rows as decoded; and the KVCache decoded into."""
    FIELDS = ("sequences", "sequences_scores", "scores", "logits", "beam_indices", "attentions", "hidden_states",
              "cache")
    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None
    scores: tuple | None = None
    logits: tuple | None = None
    beam_indices: torch.Tensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: object = None


def output_requires_grad(module, inputs, output):  # a forward hook (module-level: the model pickles)
    output.requires_grad_(True)


def to_legacy_keys(state_dict, prefix, *args):
    """load_state_dict pre-hook (the private API, which torch 2.4 has too): rename transformers
    v5's keys (its state_dict()) to ours."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        ours = prefix + legacy_key(key[len(prefix):])
        if ours != key:
            if ours in state_dict:
                raise KeyError(f"the state dict holds both {key!r} and {ours!r}, two names of one tensor")
            state_dict[ours] = state_dict.pop(key)


# transformers' forward options that ask for what forward() does anyway, with the values that do.
NO_OP_FORWARD = {"use_cache": (None, True, False), "past_key_values": (None,), "cache_position": (None,),
                 "mm_encoder_outputs": (None,)}


def check_transformers_options(config, options: dict) -> None:
    """Accept transformers' forward options that change nothing here; name the others."""
    vision = ("vision_feature_layer", "vision_feature_select_strategy")
    unknown = sorted(k for k in options if k not in NO_OP_FORWARD and k not in vision and k != "num_logits_to_keep")
    if unknown:
        raise TypeError(f"forward() got unexpected arguments: {unknown}")
    asked = [k for k in vision if k in options and options[k] not in (None, getattr(config, k))]
    for name, value in options.items():
        # `is` first: a tensor or cache object must not be compared with ==
        if name in NO_OP_FORWARD and not any(value is v or (v is not None and value == v) for v in NO_OP_FORWARD[name]):
            asked.append(name)
    if asked:
        raise TypeError(f"forward() does not support {sorted(asked)} as given (a returned cache "
                        "is not implemented; a KVCache passed as cache= is filled in place; vision "
                        "feature settings come from the config)")
