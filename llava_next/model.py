"""LLaVA-NeXT: CLIP vision tower -> MLP projector -> anyres packing -> Llama/Mistral/Yi decoder.

    pixel_values (N, tiles, 3, S, S) --vision_tower--> (tiles, 1 + p*p, C) --drop CLS, projector-->
    (tiles, p*p, H) --pack: base tile, then the unpadded tile grid with a newline per row-->
    (features, H) --written at the <image> positions of the embedded prompt--> decoder -> logits

Attribute names equal the legacy hub keys, so `state_dict()` is the checkpoint layout.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .anyres import num_tiles, tile_grid, unpadded_grid
from .attention import ATTENTION_FUNCTIONS, resolve_attn_implementation
from .compat import CausalLMOutput, check_transformers_options, output_requires_grad, to_legacy_keys
from .config import ConfigError, LlavaNextConfig
from .fused_linear import fuse_linears
from .generation_config import GenerationConfig
from .language import Checkpointing, LlamaForCausalLM, LlamaRMSNorm
from .kv_cache import KVCache
from .loading import CheckpointError, LazyCheckpoint, check_keys, save_state_dict, weight_files
from .vision import CLIPVisionModel, LlavaNextMultiModalProjector, VisionTowerGraphs

IGNORE_INDEX = -100
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _read_when_built(config: LlavaNextConfig) -> dict:
    """The settings transformers reads on every forward and this model only when it is built (the
    vision layers it runs and projects, the decoder's attention window); check_config_unchanged."""
    return {"vision_feature_layer": config.feature_layers,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "text_config.sliding_window": config.text_config.attention_window}


class LlavaNextForConditionalGeneration(nn.Module):
    """LLaVA-NeXT: CLIP vision tower, MLP projector, anyres feature packing and a Llama-family
    decoder, with the submodule names of the llava-hf checkpoints' keys (`vision_tower`,
    `multi_modal_projector`, `image_newline`, `language_model`).

        model = LlavaNextForConditionalGeneration.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf",
                                                                  torch_dtype=torch.float16, device_map="cuda")
        out = model.generate(**processor(text=prompt, images=image, return_tensors="pt").to("cuda"),
                             max_new_tokens=100)

    `forward` takes transformers' keyword arguments (input_ids, pixel_values, image_sizes,
    attention_mask, labels, ...) plus an explicit `cache=` / `cache_pos=` (kv_cache.py) and returns
    a CausalLMOutput (logits; the loss with labels). `attn_implementation` ("auto", "triton",
    "sdpa", "eager") picks the attention of this instance (README, "Attention implementations and
    kernels")."""

    def __init__(self, config: LlavaNextConfig, attn_implementation: str | None = None, device=None):
        super().__init__()
        config.validate_for_model()
        self.config = config
        self._built_with = _read_when_built(config)
        self.attn_implementation = resolve_attn_implementation(attn_implementation, device)
        attn_fn = ATTENTION_FUNCTIONS[self.attn_implementation]
        vc, tc = config.vision_config, config.text_config
        # The fused small kernels follow the attention choice: always with "triton", on CUDA with "auto".
        self.vision_tower = CLIPVisionModel(vc, config.feature_layers, attn_fn, kernels=self.attn_implementation)
        self.multi_modal_projector = LlavaNextMultiModalProjector(
            vc.hidden_size * len(config.feature_layers), tc.hidden_size, config.multimodal_projector_bias)
        self.image_newline = nn.Parameter(torch.empty(tc.hidden_size))
        self.language_model = LlamaForCausalLM(tc, attn_fn, kernels=self.attn_implementation)
        if config.tie_word_embeddings:  # one Parameter for both, as transformers ties them (top-level flag)
            self.language_model.lm_head.weight = self.language_model.model.embed_tokens.weight
        # generate()'s defaults: config.json's generation settings until from_pretrained reads a
        # checkpoint's generation_config.json, as transformers does.
        self.generation_config = GenerationConfig.from_model_config(config)
        # load_state_dict also takes the key layouts of transformers (model.language_model.*, ...).
        self._register_load_state_dict_pre_hook(to_legacy_keys)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @property
    def lm_head(self):
        return self.language_model.lm_head

    # ---- transformers' model accessors, which PEFT and training libraries call ----------------

    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # transformers' value for this class: its Trainer then counts num_items_in_batch over the
    # shifted labels (labels[..., 1:]), the ones the loss scores
    loss_type = "ForConditionalGeneration"

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.lm_head

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.model.embed_tokens = value
        self.tie_weights()

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.language_model.lm_head = value

    def tie_weights(self) -> None:
        """Point lm_head at the embedding again when the config ties them (after replacing either)."""
        if self.config.tie_word_embeddings:
            self.language_model.lm_head.weight = self.language_model.model.embed_tokens.weight

    def get_decoder(self) -> nn.Module:
        return self.language_model.model

    def can_generate(self) -> bool:
        return True

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (a tied lm_head is the embedding); exclude_embeddings
        leaves out every nn.Embedding's (the tokens' and the vision positions'), as transformers does."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if (p.requires_grad or not only_trainable) and id(p) not in skip)

    @property
    def is_activation_checkpointing(self) -> bool:
        return bool(self.language_model.model.gradient_checkpointing or self.vision_tower.vision_model.gradient_checkpointing)

    is_gradient_checkpointing = is_activation_checkpointing  # transformers' older name

    def enable_input_require_grads(self):
        """Make the token embeddings' output require grad, as transformers does for reentrant
        gradient checkpointing over a frozen embedding (PEFT calls it). The checkpoints here are
        non-reentrant and need no such thing; the hook is kept for callers that expect it."""
        self.disable_input_require_grads()  # one hook, however often it is called
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(output_requires_grad)

    def disable_input_require_grads(self):
        hook = self.__dict__.pop("_require_grads_hook", None)
        if hook is not None:
            hook.remove()

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def init_weights(self, std: float = 0.02):
        """Random weights for a model built from a config (training from scratch, tiny test models)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "padding_idx", None) is not None:
                    nn.init.zeros_(m.weight[m.padding_idx])
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, LlamaRMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.vision_tower.vision_model.embeddings.class_embedding, std=std)
        nn.init.normal_(self.image_newline, std=self.config.text_config.hidden_size ** -0.5)

    # ---- images -> features ----------------------------------------------------------------

    def get_image_features(self, pixel_values, image_sizes) -> list[torch.Tensor]:
        """One (num_features, H) tensor per image, packed as the processor counted its <image> ids."""
        cfg = self.config
        sizes = [tuple(int(x) for x in s) for s in (image_sizes.tolist() if torch.is_tensor(image_sizes)
                                                    else image_sizes)]
        tiles = [num_tiles(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]
        if isinstance(pixel_values, (list, tuple)):  # one (tiles, 3, S, S) tensor per image, unpadded
            if len(pixel_values) != len(sizes):
                raise ValueError(f"{len(pixel_values)} pixel_values tensors but image_sizes has {len(sizes)} entries")
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, tiles)])
        elif pixel_values.dim() == 5:  # (N, max_tiles, 3, S, S): drop each image's padding tiles
            if pixel_values.shape[0] != len(sizes):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes has "
                                 f"{len(sizes)} entries")
            for i, (n, s) in enumerate(zip(tiles, sizes)):
                if n > pixel_values.shape[1]:
                    raise ValueError(f"image {i} of size {s} needs {n} tiles, pixel_values has {pixel_values.shape[1]}")
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, tiles)])
        if pixel_values.dim() != 4 or pixel_values.shape[0] != sum(tiles):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected (images, tiles, 3, S, S) "
                             f"or ({sum(tiles)}, 3, S, S) for image_sizes {sizes}")
        feats = self.vision_tower(pixel_values.to(self.device, self.dtype))  # (tiles, 1 + p*p, C * layers)
        feats = self.multi_modal_projector(feats[:, 1:])  # drop CLS -> (tiles, p*p, H)
        return [self.pack_image_features(f, s) for f, s in zip(feats.split(tiles), sizes)]

    def pack_image_features(self, feats, image_size):
        """(1 + gh*gw, p*p, H) tile features -> (p*p + rows * (cols + 1), H): base tile first, then the
        tile grid reassembled, unpadded to the image's aspect, with `image_newline` ending each row."""
        cfg = self.config
        p = cfg.vision_config.patches_per_side
        gh, gw = tile_grid(image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        base, H = feats[0], feats.shape[-1]  # (p*p, H)
        grid = feats[1:].view(gh, gw, p, p, H).permute(4, 0, 2, 1, 3).reshape(H, gh * p, gw * p)
        top, bottom, left, right = unpadded_grid(image_size, gh * p, gw * p)
        grid = grid[:, top:bottom, left:right]  # (H, rows, cols)
        newline = self.image_newline.to(grid.dtype)[:, None, None].expand(H, grid.shape[1], 1)
        grid = torch.cat([grid, newline], dim=2)  # (H, rows, cols + 1)
        return torch.cat([base, grid.flatten(1).transpose(0, 1)])

    def embed(self, input_ids, pixel_values=None, image_sizes=None, first_chunk: bool = True):
        """Token embeddings with the image features written at the <image> positions."""
        embeds = self.language_model.model.embed_tokens(input_ids)  # (B, T, H)
        if pixel_values is not None and len(pixel_values) == 0:  # a batch of text-only prompts
            pixel_values = None
        if pixel_values is None and not first_chunk:  # a decode step: no host sync here
            return embeds
        image_mask = input_ids == self.config.image_token_index
        n_tokens = int(image_mask.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} <image> tokens (id {self.config.image_token_index}) "
                                 "but no pixel_values were given")
            return embeds
        if image_sizes is None:
            raise ValueError("pixel_values were given without image_sizes (the processor returns both)")
        features = torch.cat(self.get_image_features(pixel_values, image_sizes))  # (features, H)
        if n_tokens != features.shape[0]:
            raise ValueError(f"image features and <image> tokens do not match: {n_tokens} <image> tokens in "
                             f"input_ids, {features.shape[0]} image features from {len(image_sizes)} image(s). "
                             "Build the inputs with the processor of this checkpoint.")
        # Batch-major, then sequence order: masked_scatter fills positions in row-major order.
        return embeds.masked_scatter(image_mask[..., None], features.to(embeds.dtype))

    def check_config_unchanged(self) -> None:
        """Raise if a config setting that this model reads once, when it is built, was changed on
        `model.config` since: transformers reads these on every call (vision_feature_layer,
        vision_feature_select_strategy, Mistral's sliding_window), so code written for it expects
        an edit to take effect, and here it would silently not (and save_pretrained would write a
        config.json that does not describe the weights' model)."""
        now = _read_when_built(self.config)
        if now != self._built_with:
            changed = [f"{name}: built with {self._built_with[name]!r}, now {value!r}"
                       for name, value in now.items() if value != self._built_with[name]]
            raise ConfigError(
                f"model.config was changed after the model was built ({'; '.join(changed)}), and the model "
                "reads these settings only when it is built. Build one from the changed config instead: "
                "config = LlavaNextConfig.from_pretrained(path); config.<setting> = ...; "
                "LlavaNextForConditionalGeneration.from_pretrained(path, config=config)")

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None,
                position_ids=None, cache=None, inputs_embeds=None, *, cache_pos=None, labels=None,
                logits_to_keep: int | torch.Tensor = 0, num_items_in_batch=None, return_dict: bool = True,
                output_hidden_states: bool | int | list[int] | None = None, output_attentions: bool | None = None,
                **transformers_options):
        """Logits for every position (or those `logits_to_keep` picks), and the loss when labels are given.

        The positional order is transformers'. attention_mask (B, T) or, with a cache, (B, past + T):
        0 marks left padding. Positions come from it (cumsum - 1), so a left-padded row computes as
        if it were alone. cache: a KVCache; cache_pos: where the T tokens go (int, default
        cache.length), or a 0-d tensor for a static-shape decode step of one token.
        logits_to_keep: an int k keeps the last k positions (0: all; with labels, the loss scores
        the labels they predict), a tensor of indices those positions. num_items_in_batch (as
        transformers' Trainer passes it with gradient accumulation): the loss is the sum over the
        scored labels divided by it, not their mean. output_hidden_states=True (None or left out:
        config.text_config's, else False, as transformers 5.24 reads it, which ignores the top-level
        config's and reads an explicit None as False) adds
        `hidden_states`, the language model's num_layers + 1 hidden states (B, T, C) as
        transformers gives them: the embeddings with the image features written in, each layer's
        output, the last one after the final norm, all positions whatever logits_to_keep says; an
        int or a list of ints keeps those indices (negative ones count from the end) and puts None
        at the others, as transformers 5.24 does (which drops an index out of range, where this
        raises). output_attentions=True (None: config.text_config's, else False) adds `attentions`, one
        (B, num_heads, T, Tk) tensor per layer: the softmax weights as transformers' eager attention
        gives them (a left-pad query spreads evenly over every key), Tk the keys attended to
        (past + T with an int cache_pos; the cache's max_length for a tensor one, unwritten keys 0).
        To form them the layers run their attention written out, whatever attn_implementation
        (transformers' sdpa returns none). return_dict=False gives the set fields as a tuple:
        (loss, logits, hidden_states, attentions) or fewer. transformers' options that ask for
        nothing different are accepted; the others (a returned cache) raise.
        """
        self.check_config_unchanged()
        check_transformers_options(self.config, transformers_options)
        if "num_logits_to_keep" in transformers_options:  # the older name
            if not isinstance(logits_to_keep, int) or logits_to_keep:
                raise TypeError("pass logits_to_keep or num_logits_to_keep, not both")
            logits_to_keep = transformers_options.pop("num_logits_to_keep")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a llava_next KVCache (KVCache.for_model(model, batch, max_length)), "
                            f"not {type(cache).__name__}")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be (batch, length) with 0 at padding; got shape "
                             f"{tuple(attention_mask.shape)} (4-d masks, e.g. for packed sequences, are not supported)")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None and pixel_values is not None:
            raise ValueError("pixel_values need input_ids (their <image> positions); with inputs_embeds, write the "
                             "image features (model.embed(input_ids, pixel_values, image_sizes)) into them yourself")
        if cache is not None and cache_pos is None:
            if cache.length is None:
                raise ValueError("the cache's length is unknown after decode steps with a tensor cache_pos: "
                                 "pass cache_pos explicitly")
            cache_pos = cache.length
        first_chunk = cache is None or (not torch.is_tensor(cache_pos) and cache_pos == 0)
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes, first_chunk)
        B, T = inputs_embeds.shape[:2]

        if cache is None:
            kv_mask = attention_mask.bool() if attention_mask is not None else None
            if position_ids is None:
                position_ids = _positions(kv_mask, B, T, inputs_embeds.device)
        else:
            cache.check(self, B, T, cache_pos)
            cache.mark(cache_pos, T, attention_mask)
            kv_mask = cache.visible_mask(cache_pos, T)
            if position_ids is None:
                if torch.is_tensor(cache_pos):  # one token per row: its position is the real tokens so far - 1
                    position_ids = kv_mask.sum(-1, keepdim=True) - 1
                else:
                    position_ids = _positions(kv_mask, B, cache_pos + T, inputs_embeds.device)[:, cache_pos:]

        if not torch.is_tensor(cache_pos) and kv_mask is not None and bool(kv_mask.all()):
            kv_mask = None  # no padding: lets attention take its plain causal path
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config.text_config, "output_hidden_states", False)
        states = [] if output_hidden_states is not False and output_hidden_states is not None else None
        if output_attentions is None:
            output_attentions = getattr(self.config.text_config, "output_attentions", False)
        if not isinstance(output_attentions, bool):  # not an index, as output_hidden_states takes
            raise ValueError(f"output_attentions must be True or False, got {output_attentions!r}")
        attentions = [] if output_attentions else None
        hidden = self.language_model.model(inputs_embeds, position_ids, cache, cache_pos, kv_mask, states,
                                           attentions)  # (B, T, H)
        keep = logits_to_keep
        if torch.is_tensor(keep):
            if labels is not None:
                raise ValueError("labels with a tensor logits_to_keep: the loss needs consecutive positions "
                                 "(pass an int, the last k, or no logits_to_keep)")
            hidden = hidden[:, keep.to(hidden.device)]
        elif keep:
            if labels is not None and keep < 2:
                raise ValueError(f"logits_to_keep={keep} with labels leaves no label to score (k positions "
                                 "predict the last k - 1 labels)")
            hidden = hidden[:, -keep:]
        logits = self.lm_head(hidden)  # (B, T, vocab)
        loss = None
        if labels is not None:
            # the new tokens' columns of the mask (with a cache it may also cover the past ones)
            mask = attention_mask[:, -T:] if attention_mask is not None and attention_mask.shape[1] >= T else None
            if keep:  # only the last positions have logits: score the labels they predict
                labels = labels[:, -keep:]
                mask = mask[:, -keep:] if mask is not None else None
            # Next-token prediction: position t predicts label t + 1; mean over labels != -100. A
            # padding position predicts nothing (with left padding, the last pad would otherwise be
            # scored on the row's first token, from a query that sees no real key).
            targets = labels[:, 1:].to(logits.device)
            if mask is not None:
                targets = targets.masked_fill(mask[:, :-1].to(targets.device) == 0, IGNORE_INDEX)
            per_label = "mean" if num_items_in_batch is None else "sum"
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction=per_label)
            if num_items_in_batch is not None:
                loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                               else num_items_in_batch)
        out = CausalLMOutput(logits=logits, loss=loss,
                             hidden_states=_select_states(states, output_hidden_states) if states is not None else None,
                             attentions=tuple(attentions) if attentions is not None else None)
        return out if return_dict is None or return_dict else out.to_tuple()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Grow (or shrink) the embedding table and lm_head to `new_num_tokens` rows, e.g. when
        `tokenizer.add_tokens(...)` outgrows the table: `model.resize_token_embeddings(max(len(tokenizer),
        model.config.text_config.vocab_size))` (the llava-hf tables have spare rows past the
        tokenizer, which `len(tokenizer)` alone would cut off). Old rows are
        kept; new rows are the mean of the old ones (mean_resizing, transformers' default, which
        samples around that mean instead) or drawn as init_weights does. The Parameters are new:
        build the optimizer after resizing. Returns the embedding."""
        lm = self.language_model
        old_emb, old_head = lm.model.embed_tokens, lm.lm_head
        n = new_num_tokens if new_num_tokens is not None else old_emb.num_embeddings
        if pad_to_multiple_of:
            n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        if n == old_emb.num_embeddings:
            return old_emb
        tied = old_head.weight is old_emb.weight
        keep = min(n, old_emb.num_embeddings)

        def grown(old: torch.Tensor) -> torch.Tensor:
            new = old.new_empty((n, old.shape[1]))
            with torch.no_grad():
                new[:keep] = old[:keep]
                if n > keep:
                    if mean_resizing:
                        new[keep:] = old.float().mean(0).to(old.dtype)
                    else:
                        new[keep:].normal_(0.0, 0.02)  # init_weights' std
            return new

        pad = old_emb.padding_idx if old_emb.padding_idx is not None and old_emb.padding_idx < n else None
        emb = nn.Embedding(n, old_emb.embedding_dim, padding_idx=pad, device=old_emb.weight.device,
                           dtype=old_emb.weight.dtype)
        emb.weight = nn.Parameter(grown(old_emb.weight), requires_grad=old_emb.weight.requires_grad)
        lm.model.embed_tokens = emb
        if tied:
            lm.lm_head.weight = emb.weight
        else:
            lm.lm_head.weight = nn.Parameter(grown(old_head.weight), requires_grad=old_head.weight.requires_grad)
        lm.lm_head.out_features = n
        self.config.text_config.vocab_size = n
        return emb

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False, *,
                                        vision: bool = True, language: bool = True):
        """Recompute each decoder layer's / vision layer's activations in backward instead of storing
        them (training only: it is off under no_grad and in eval mode), with non-reentrant
        torch.utils.checkpoint, as transformers 5.24's method of this name (which its Trainer
        calls for `gradient_checkpointing=True`): `every_n_layers` checkpoints only every n-th layer
        of each tower (from its first), trading memory back for speed; `offload` keeps the saved
        layer inputs in (pinned, on CUDA) host memory. `activation_checkpointing_kwargs` may only
        say {"use_reentrant": False}. vision= / language= pick the towers."""
        kwargs = activation_checkpointing_kwargs
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError("the first argument is activation_checkpointing_kwargs (a dict), as in transformers; "
                            "choose the towers with vision= / language=")
        for key, value in (kwargs or {}).items():
            if key != "use_reentrant":
                raise TypeError(f"activation_checkpointing_kwargs: {key!r} is not supported (only use_reentrant=False)")
            if value:
                raise ValueError("use_reentrant=True is not supported: the checkpoints are non-reentrant")
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be an int >= 1, got {every_n_layers!r}")
        ckpt = Checkpointing(every_n_layers, bool(offload))
        self.vision_tower.vision_model.gradient_checkpointing = ckpt if vision else False
        self.language_model.model.gradient_checkpointing = ckpt if language else False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      every_n_layers: int = 1, offload: bool = False, *,
                                      vision: bool = True, language: bool = True):
        """activation_checkpointing_enable under its older name (transformers' Trainer and PEFT call it)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload,
                                             vision=vision, language=language)

    def activation_checkpointing_disable(self):
        self.activation_checkpointing_enable(vision=False, language=False)

    gradient_checkpointing_disable = activation_checkpointing_disable

    def fuse_projections(self):
        """Lay the q/k/v weights of every attention layer (both towers), and the decoder's
        gate/up weights, back to back in one storage, so that each group runs as one matrix
        product when no gradient is needed (llava_next/fused_linear.py). Decode at batch 1 on an
        H200 went from 5.32 to 4.67 ms/token (decoder groups; runs on two machines, see
        bench/NOTES.md). Nothing else changes: same Parameters, values and state_dict keys, no
        extra memory. generate() calls it on CUDA unless told fuse_projections=False. `.to()`
        undoes it (the layers then run one by one): call it again after moving the model, and
        before capturing a CUDA graph of the model yourself, since it moves the weights; no-grad
        forwards round differently in the last bit afterwards. Returns self."""
        for layer in self.language_model.model.layers:
            fuse_linears((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
            fuse_linears((layer.mlp.gate_proj, layer.mlp.up_proj))
        for layer in self.vision_tower.vision_model.encoder.layers:
            fuse_linears((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
        return self

    def enable_decode_kernels(self, enabled: bool | None = True):
        """Run the decoder's few-row, no-gradient forwards (decode steps) through `decode_forward`:
        the q/k/v, o, gate/up and down products as decode_linear Triton kernels with the SiLU-mul
        and both residual adds folded into their outputs (kernels/decode_linear.py), and a
        one-token step's rotary, cache write and attention as one rope_decode_attention kernel.
        It needs the Triton kernels (attn_implementation "triton", or "auto" on CUDA) and the
        fused projections. None, the default a model starts with: on CUDA, for steps of at most 8
        rows (where it was timed faster than cuBLAS: 5.86 vs 6.25 ms/token at batch 1 on an H100,
        bench/NOTES.md), once generate() has fused the projections. True: up to 64 rows, and
        calls fuse_projections() now. False: never (the cuBLAS products). Returns self."""
        if enabled not in (None, True, False):
            raise TypeError(f"enable_decode_kernels takes True, False or None, got {enabled!r}")
        if enabled:
            self.fuse_projections()
        for layer in self.language_model.model.layers:
            layer.decode_kernels = None if enabled is None else bool(enabled)
        return self

    def enable_vision_cuda_graphs(self, enabled: bool = True, max_graphs: int = 4, max_tiles: int = 16):
        """Replay the vision tower's no-gradient CUDA forwards (generate()'s prefill, forward under
        no_grad) from CUDA graphs, one per number of tiles, captured on first use (a warm-up run
        and a capture: the first call for each shape is slower). Its eager forward is bound by the
        CPU that launches its ~300 short kernels (vision.VisionTowerGraphs says when it steps
        aside and what it keeps): calls of more than `max_tiles` tiles (five an image at most,
        for the llava-hf checkpoints) run eagerly, where the GPU's work outlasts the launching.
        Off by default: never yet run on a GPU (`scripts/bench.py --vision-graph`). False drops
        the graphs. Returns self."""
        if enabled not in (True, False):
            raise TypeError(f"enable_vision_cuda_graphs takes True or False, got {enabled!r}")
        self.vision_tower.cuda_graphs = VisionTowerGraphs(max_graphs, max_tiles) if enabled else None
        return self

    def set_attn_implementation(self, attn_implementation: str | None) -> None:
        """transformers' method: this instance's attention from now on ("auto", "triton", "sdpa",
        "eager"; None: the default), in every layer of both towers, with the fused small kernels
        that follow it. Vision CUDA graphs captured so far are dropped (they replay the old path);
        a GraphedDecode captured before must be captured again."""
        if not isinstance(attn_implementation, (str, type(None))):
            raise TypeError(f"set_attn_implementation takes one name for both towers, got {attn_implementation!r}")
        name = resolve_attn_implementation(attn_implementation, self.device)
        for module in self.modules():
            if type(module).__module__.startswith("llava_next."):  # our layers, not a wrapper's
                if hasattr(module, "attn_fn"):
                    module.attn_fn = ATTENTION_FUNCTIONS[name]
                if hasattr(module, "kernels"):
                    module.kernels = name
        self.attn_implementation = name
        graphs = self.vision_tower.cuda_graphs
        if graphs is not None:
            self.vision_tower.cuda_graphs = VisionTowerGraphs(graphs.max_graphs, graphs.max_tiles)

    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, image_sizes=None, **kwargs):
        """transformers-shaped generation; see `llava_next.generation.generate` for the arguments."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, pixel_values, image_sizes, **kwargs)

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits: bool = False):
        """transformers' method: the score of each new token (N, new tokens) from generate(...,
        return_dict_in_generate=True, output_scores=True)'s .sequences and .scores, and for beam
        search its .beam_indices (which row's scores each token was chosen from; 0 after a beam's
        end, as there). normalize_logits=True gives log-probabilities (a log-softmax of each
        step's scores first)."""
        steps = torch.stack(tuple(scores), 1)  # (rows, steps, vocab)
        if normalize_logits:
            steps = steps.log_softmax(-1)
        if beam_indices is None:  # greedy or sampled: row i's token came from row i's scores
            beam_indices = torch.arange(steps.shape[0], device=sequences.device)[:, None].expand(-1, steps.shape[1])
        ended = beam_indices < 0  # (N, steps)
        new = int((~ended).sum(-1).max())
        ended, rows = ended[:, :new], beam_indices[:, :new].clamp(min=0).long()
        picked = steps[rows.to(steps.device), torch.arange(new, device=steps.device)]  # (N, new, vocab)
        out = picked.gather(2, sequences[:, sequences.shape[-1] - new:, None].to(steps.device)).squeeze(2)
        return out.masked_fill(ended.to(out.device), 0.0)

    # ---- loading and saving ----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, torch_dtype=None, dtype=None, low_cpu_mem_usage: bool = True,
                        attn_implementation: str | None = None, device_map=None, device=None,
                        revision: str | None = None, progress: bool = False, config: LlavaNextConfig | None = None,
                        **kwargs):
        """Load a llava-hf checkpoint folder (or hub repo id) from its safetensors files.

        The model is built on the meta device and each tensor is read from the memory-mapped
        file, cast and moved to its device before being assigned, so host memory stays near one
        copy of the weights. `low_cpu_mem_usage` is accepted for transformers compatibility; this
        is always the behaviour. `progress=True` shows a progress bar on stderr. The dtype defaults
        to the one config.json names. generation_config.json, when the folder has one, becomes
        `model.generation_config` (else config.json's generation settings, as in transformers).
        `config`: a LlavaNextConfig to build the model from instead of the folder's config.json
        (e.g. that config with another vision_feature_layer); the weights must still fit it. With
        it the folder needs no config.json: a folder of weights alone (transformers' Trainer saves
        only a state dict for a model that is not its own class) loads as
        `from_pretrained(folder, config=LlavaNextConfig.from_pretrained(base))`.
        """
        from .hub import resolve_folder

        if kwargs:
            raise TypeError(f"from_pretrained() got unexpected arguments: {sorted(kwargs)}")
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one (torch_dtype is "
                             "transformers' older name for dtype)")
        folder = resolve_folder(name_or_path, ["config.json", "generation_config.json", "*.safetensors",
                                              "*.safetensors.index.json"],
                                revision=revision,
                                required=["*.safetensors"] + ([] if config is not None else ["config.json"]))
        config_path = os.path.join(folder, "config.json")
        if not os.path.exists(config_path):
            if config is None:
                weights_alone = glob.glob(os.path.join(folder, "*.safetensors"))
                hint = (" (for a folder of weights alone, pass the config they were trained with: "
                        "config=LlavaNextConfig.from_pretrained(base))") if weights_alone else ""
                raise CheckpointError(f"no config.json in {folder}{hint}")
            config_path = None
        if config is None:
            config = LlavaNextConfig.from_json_file(config_path)
        elif not isinstance(config, LlavaNextConfig):
            raise TypeError(f"config must be llava_next's LlavaNextConfig (llava_next.LlavaNextConfig.from_pretrained"
                            f"(folder)), got {type(config).__module__}.{type(config).__name__}")
        else:
            config = copy.deepcopy(config)  # the model's own: loading may untie its embeddings
        ckpt = LazyCheckpoint(weight_files(folder))
        dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, config_path, ckpt)
        device = torch.device(_resolve_device(device if device is not None else device_map))

        with torch.device("meta"):
            model = cls(config, attn_implementation=attn_implementation, device=device)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        # Tied embeddings (as transformers reads them): the file holds the embedding, lm_head or
        # both; one of them is read for both, unless the file's two differ (then both, untied).
        tied_from = unread = None
        if config.tie_word_embeddings:
            keys = set(ckpt.keys())
            if EMBED in keys and LM_HEAD in keys and not torch.equal(ckpt.get(EMBED), ckpt.get(LM_HEAD)):
                warnings.warn(f"{folder}: config.json ties lm_head to the embedding, but the file holds two "
                              "different matrices; both are loaded, untied (as transformers does)")
                # load_state_dict(assign=True) below gives each its own Parameter; save_pretrained keeps both
                config.tie_word_embeddings = False
            else:
                tied_from, unread = (EMBED, LM_HEAD) if EMBED in keys or LM_HEAD not in keys else (LM_HEAD, EMBED)
                del expected[unread]
        check_keys(expected, ckpt, folder, optional=[unread] if unread else ())
        state = {}
        for key in _progress(expected, progress, f"loading {os.path.basename(os.path.normpath(folder))}"):
            t = ckpt.get(key)
            state[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        if tied_from:
            state[unread] = state[tied_from]
        model.load_state_dict(state, assign=True, strict=True)
        if tied_from:  # assign=True made two Parameters: make them one again
            model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
        gen_path = os.path.join(folder, "generation_config.json")
        if os.path.exists(gen_path):
            model.generation_config = GenerationConfig.from_json_file(gen_path)
        return model.eval()

    def save_pretrained(self, folder, max_shard_size="5GB", state_dict=None) -> None:
        """config.json, generation_config.json (model.generation_config, every setting in it) and
        safetensors in the legacy hub layout (sharded past max_shard_size).

        `state_dict`: tensors to write instead of `self.state_dict()`, e.g. a full state dict
        gathered from an FSDP-sharded model."""
        self.check_config_unchanged()  # else the saved config.json would describe another model
        os.makedirs(folder, exist_ok=True)
        d = self.config.to_dict()
        d["torch_dtype"] = str(self.dtype).replace("torch.", "")
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2)
        self.generation_config.save_pretrained(folder)
        state = dict(state_dict if state_dict is not None else self.state_dict())
        if self.config.tie_word_embeddings:
            state.pop(LM_HEAD, None)  # tied to the embedding, which is saved: transformers leaves it out too
        save_state_dict(state, folder, max_shard_size)


LM_HEAD = "language_model.lm_head.weight"
EMBED = "language_model.model.embed_tokens.weight"


def _progress(items, show: bool, desc: str):
    if not show:
        return items
    try:
        from tqdm.auto import tqdm  # installed with huggingface_hub
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=" tensors", file=sys.stderr, leave=False)


def _select_states(states: list, selection) -> tuple:
    """output_hidden_states: True keeps every hidden state; an int or a list of ints the ones at
    those indices (negative: from the end), None in the other places (transformers 5.24's form)."""
    if selection is True:
        return tuple(states)
    picked = [selection] if isinstance(selection, int) and not isinstance(selection, bool) else list(selection)
    n = len(states)
    if not all(isinstance(i, int) and not isinstance(i, bool) and -n <= i < n for i in picked):
        raise ValueError(f"output_hidden_states must be True, or indices into the {n} hidden states "
                         f"(-{n} to {n - 1}), got {selection!r}")
    keep = {i % n for i in picked}
    return tuple(h if i in keep else None for i, h in enumerate(states))


def _positions(kv_mask, B: int, T: int, device):
    """Position ids from the attention mask: real tokens count 0, 1, 2, ...; pads get 0."""
    if kv_mask is None:
        return torch.arange(T, device=device).expand(B, T)
    return (kv_mask.long().cumsum(-1) - 1).clamp(min=0)


def _resolve_dtype(dtype, config_path, ckpt):
    """The dtype asked for; for None / "auto", the one config.json names, else the file's."""
    if dtype is None or dtype == "auto":
        if config_path is None:
            return ckpt.float_dtype()
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
        named = raw.get("dtype") or raw.get("torch_dtype")
        return DTYPES.get(named, ckpt.float_dtype()) if isinstance(named, str) else ckpt.float_dtype()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)} or 'auto'")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating torch dtype")
    return dtype


def _resolve_device(device_map):
    """device_map as transformers takes it for one device: None, 'auto', a device, or {'': device}."""
    if isinstance(device_map, dict):
        devices = {torch.device(_resolve_device(d)) for d in device_map.values()}  # "cpu" == torch.device("cpu")
        if len(devices) != 1:
            raise ValueError(f"device_map {device_map} spreads the model over several devices; llava-next runs "
                             "on one device")
        device_map = devices.pop()
    if device_map is None:
        return "cpu"
    if device_map in ("auto", "sequential", "balanced", "balanced_low_0"):  # one device: all the same here
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, int):
        return f"cuda:{device_map}"
    return device_map
