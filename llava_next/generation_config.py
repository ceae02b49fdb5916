"""A checkpoint's generation settings (`generation_config.json`), read as transformers reads them.

Every setting is an attribute, None when unset: `model.generation_config.pad_token_id = 0`.
generate() takes the settings it implements (SETTINGS) as the defaults of the arguments a call
leaves out, then transformers' own defaults. A setting it does not implement is warned about
when it would change the output, never dropped in silence.
"""

from __future__ import annotations

import json
import os
import warnings

from .hub import read_json

# What generate() reads from here (eos/pad ids, lengths, logits processing, copies per prompt, outputs).
SETTINGS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
            "top_p", "repetition_penalty", "num_return_sequences", "eos_token_id", "pad_token_id", "bos_token_id",
            "return_dict_in_generate", "output_scores", "output_logits", "stop_strings", "num_beams", "length_penalty",
            "early_stopping", "renormalize_logits", "no_repeat_ngram_size", "min_p", "max_time",
            "typical_p", "epsilon_cutoff", "eta_cutoff", "sequence_bias", "bad_words_ids", "suppress_tokens",
            "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
            "exponential_decay_length_penalty", "output_hidden_states", "output_attentions", "top_h")
# transformers' values for settings nobody set (GenerationConfig._get_default_generation_params,
# 5.24); an unimplemented setting holding its default changes nothing.
HF_DEFAULTS = dict(
    max_length=20, min_length=0, do_sample=False, use_cache=True, early_stopping=False, num_beams=1,
    temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, length_penalty=1.0,
    no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, num_return_sequences=1, output_scores=False,
    return_dict_in_generate=False, remove_invalid_values=False, epsilon_cutoff=0.0, eta_cutoff=0.0,
    encoder_repetition_penalty=1.0, num_beam_groups=1, diversity_penalty=0.0,
)
# Settings that never change the tokens generate() returns, whatever their value: bookkeeping,
# caching.
NO_EFFECT = {"transformers_version", "_from_model_config", "decoder_start_token_id", "use_cache",
             "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
             "low_memory", "prefill_chunk_size", "output_logits",
             "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
             "assistant_lookbehind", "target_lookbehind"}
# Other names transformers' GenerationConfig has (all None until set): read as None here too.
OTHER_NAMES = {"force_words_ids", "token_healing", "guidance_scale", "watermarking_config",
               "penalty_alpha", "dola_layers", "constraints"}
KNOWN = set(SETTINGS) | set(HF_DEFAULTS) | NO_EFFECT | OTHER_NAMES


class GenerationConfig:
    """generation_config.json's settings as attributes (see the module docstring)."""

    def __init__(self, **settings):
        object.__setattr__(self, "_settings", dict(settings))

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        """What transformers uses for a checkpoint without generation_config.json: the generation
        settings config.json holds, a top-level value before the text config's."""
        text = config.text_config
        text = {**text.extra, **{k: getattr(text, k) for k in SETTINGS if hasattr(text, k)}}  # its ids are fields
        found = {}
        for name in sorted(KNOWN - NO_EFFECT):
            value = config.extra.get(name)
            found[name] = value if value is not None else text.get(name)
        return cls(**{k: v for k, v in found.items() if v is not None})

    @classmethod
    def from_json_file(cls, path: str) -> "GenerationConfig":
        settings = read_json(path)
        if not isinstance(settings, dict):
            raise ValueError(f"{path} holds {type(settings).__name__}, not a dict of settings")
        return cls(**settings)

    def __getattr__(self, name):  # called only for names that are not real attributes
        settings = self.__dict__.get("_settings")
        if settings is None:  # mid-copy or mid-unpickle, before __dict__ is filled: not a setting
            raise AttributeError(name)
        if name in settings or name in KNOWN:
            return settings.get(name)
        raise AttributeError(f"GenerationConfig has no setting {name!r} (a setting generate() knows reads as None "
                             "until set; to_dict() gives the ones set)")

    def get(self, name: str, default=None):
        value = self._settings.get(name)
        return default if value is None else value

    def __setattr__(self, name, value):
        self._settings[name] = value

    def __copy__(self):  # its own settings: changing the copy leaves the original as it was
        return GenerationConfig(**self._settings)

    def __eq__(self, other):
        return isinstance(other, GenerationConfig) and self._settings == other._settings

    def __repr__(self):
        return f"GenerationConfig({json.dumps(self._settings, sort_keys=True)})"

    def to_dict(self) -> dict:
        return dict(self._settings)

    def update(self, **settings) -> None:
        self._settings.update(settings)

    def save_pretrained(self, folder: str) -> None:
        with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(self._settings, f, indent=2)

    def value(self, name: str, given):
        """A call's value for setting `name`: the call's, else this config's, else transformers' default."""
        if given is not None:
            return given
        mine = self._settings.get(name)
        return mine if mine is not None else HF_DEFAULTS.get(name)

    def unimplemented(self) -> dict:
        """The settings generate() does not implement that would change its output."""
        return {k: v for k, v in self._settings.items() if k not in SETTINGS and k not in NO_EFFECT
                and v not in (None, {}, []) and v != HF_DEFAULTS.get(k, False)}

    def warn_unimplemented(self, stacklevel: int = 2) -> None:
        ignored = self.unimplemented()
        if ignored:
            warnings.warn(f"the generation config sets {ignored}, which llava-next's generate() does not implement: "
                          "generating without them (remove them from model.generation_config to silence this)",
                          stacklevel=stacklevel + 1)
