"""Generation: prefill the prompt into a preallocated KV cache, then decode one token at a time.

`prefill` and `decode_one_token` are plain functions so each can be compiled or captured on its
own; the decode step has static shapes (the cache position is a device tensor), so it can be
replayed as a CUDA graph. The logits settings are applied in transformers' order by
logits_process.py; beam search is in beam_search.py.
"""

from __future__ import annotations

import numbers
import os
import queue
import sys
import time
import unicodedata
import warnings

import torch

from .beam_search import beam_search
from .compat import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from .kv_cache import KVCache
from .logits_process import SETTINGS as LOGITS_SETTINGS, LogitsProcessing
from .language import runs_python_per_call


# Whatever the model's config asks for by default: generation's own forwards return the logits only.
NO_EXTRA_OUTPUTS = dict(output_hidden_states=False, output_attentions=False)


@torch.no_grad()
def prefill(model, input_ids, attention_mask, pixel_values, image_sizes, cache, keep=None, copies: int = 1):
    """Run the whole prompt; returns the last position's logits (B, vocab) in fp32. `keep`: a
    StepOutputs that keeps the forward's hidden states / attention weights, each row `copies` times."""
    options = keep.forward_options() if keep is not None else NO_EXTRA_OUTPUTS
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                image_sizes=image_sizes, cache=cache, cache_pos=0, logits_to_keep=1, **options)
    if keep is not None:
        keep.add(out, copies)
    return out.logits[:, -1].float()


@torch.no_grad()
def decode_one_token(model, token, cache, cache_pos):
    """token (B, 1), cache_pos 0-d long tensor -> logits (B, vocab) in fp32. Static shapes."""
    out = model(input_ids=token, cache=cache, cache_pos=cache_pos, **NO_EXTRA_OUTPUTS)
    return out.logits[:, -1].float()


class StepOutputs:
    """generate()'s output_hidden_states / output_attentions (with return_dict_in_generate): the
    hidden states and attention weights of each forward it runs, the prompt's first, as
    transformers' generate returns them: per new token a tuple over layers."""

    def __init__(self, hidden_states: bool, attentions: bool):
        self.hidden_states = [] if hidden_states else None  # per forward: num_layers + 1 of (N, t, C)
        self.attentions = [] if attentions else None  # per forward: num_layers of (N, heads, t, keys)

    def forward_options(self) -> dict:
        return dict(output_hidden_states=self.hidden_states is not None,
                    output_attentions=self.attentions is not None)

    def add(self, out, copies: int = 1) -> None:
        """Keep one forward's outputs, each row `copies` times (a prompt prefilled once for several rows)."""
        for kept, got in ((self.hidden_states, out.hidden_states), (self.attentions, out.attentions)):
            if kept is not None:
                kept.append(tuple(x.repeat_interleave(copies, 0) for x in got))

    def decode_step(self, model, cache):
        """A decode step (token (N, 1), pos) -> logits (N, vocab) that keeps its outputs. It writes at
        an int position (one host sync a step), so the weights span the keys written so far, as
        transformers' do, not the whole static cache; with a sliding window only the last `window`
        of them (the ones visible), as transformers' sliding-window cache holds."""
        window = model.config.text_config.attention_window

        def step(token, pos):
            out = model(input_ids=token, cache=cache, cache_pos=int(pos), **self.forward_options())
            if out.attentions is not None and window:
                out.attentions = tuple(a[..., -window:] for a in out.attentions)
            self.add(out)
            return out.logits[:, -1].float()
        return step


class StopStringCriteria:
    """Stops a row once its text ends in one of `stop_strings`, as transformers' criterion of that
    name does (generate(..., stop_strings=..., tokenizer=...) builds one): a stop string counts
    when it ends inside the newest token, which may run on past it ("st" "opera" stops at "stop")
    or begin before it; one that ended in an earlier token had stopped the row then. Matching is on
    UTF-8 bytes, as transformers does for the checkpoints' byte-fallback tokenizers, so an emoji
    spelt as four byte tokens matches too. A token's text is what it decodes to after other text
    (its leading space kept), as transformers cleans the vocabulary; a byte token "<0xNN>" is its
    byte; ids the tokenizer lacks (the model's spare rows) have none."""

    PREFIX = "abcdef"  # decoded before each token, then cut off: transformers' static_prefix

    def __init__(self, tokenizer, stop_strings):
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not stops or not all(isinstance(x, str) and x for x in stops):
            raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}")
        self.tokenizer, self.stop_strings = tokenizer, stops
        self._stops = [x.encode("utf-8") for x in stops]
        self.longest = max(map(len, self._stops))
        self._prefix = tokenizer.convert_ids_to_tokens(tokenizer.encode(self.PREFIX, add_special_tokens=False))
        self._bytes = {}  # id -> its bytes, filled as ids are met

    def token_bytes(self, i: int) -> bytes | None:
        """The bytes id i stands for; None for an id the tokenizer lacks, which no match spans."""
        if i not in self._bytes:
            token = self.tokenizer.convert_ids_to_tokens(i)
            if token is None:
                self._bytes[i] = None
            elif (len(token) == 6 and token.startswith("<0x") and token.endswith(">")
                  and all(c in "0123456789abcdefABCDEF" for c in token[3:5])):
                self._bytes[i] = bytes([int(token[3:5], 16)])
            else:
                text = self.tokenizer.convert_tokens_to_string(self._prefix + [token])
                text = text[text.index(self.PREFIX) + len(self.PREFIX):] if self.PREFIX in text else ""
                self._bytes[i] = text.encode("utf-8")
        return self._bytes[i]

    def __call__(self, input_ids, scores=None):
        # Only the tail is read (a host copy of the whole sequence each step would grow with it):
        # longest + 1 tokens hold enough bytes unless some are empty, when the row is read whole.
        window = min(input_ids.shape[1], self.longest + 1)
        done = []
        for b, row in enumerate(input_ids[:, -window:].tolist()):
            last = self.token_bytes(row[-1])
            if not last:  # no bytes (or an unknown id): nothing ends inside it
                done.append(False)
                continue
            before, j = b"", len(row) - 2
            while len(before) < self.longest - 1:  # enough text for a string that ends in `last`
                if j < 0:
                    if len(row) == input_ids.shape[1]:
                        break
                    row = input_ids[b].tolist()  # empty tokens in the window: read the whole row
                    j = len(row) - 2 - (window - 1)
                    continue
                piece = self.token_bytes(row[j])
                if piece is None:  # an unknown id ends the match, as transformers' dummy row does
                    break
                before, j = piece + before, j - 1
            text, cut = before + last, len(before)
            # an occurrence ends inside `last` iff it starts at or after cut + 1 - len(stop)
            done.append(any(stop in text[max(0, cut + 1 - len(stop)):] for stop in self._stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class MaxTimeCriteria:
    """Ends every row once `max_time` seconds have passed since `start` (by default when it was
    made: generate(max_time=...) makes one before the prefill), as transformers' criterion of that
    name: what was generated by then is returned."""

    def __init__(self, max_time: float, start: float | None = None):
        self.max_time, self.start = max_time, time.time() if start is None else start

    def __call__(self, input_ids, scores=None):
        return torch.full((input_ids.shape[0],), time.time() - self.start > self.max_time, dtype=torch.bool,
                          device=input_ids.device)


def _callables(given, name: str) -> list:
    """A callable or a list of them (transformers' LogitsProcessorList / StoppingCriteriaList are
    both) as a list."""
    if given is None:
        return []
    items = list(given) if isinstance(given, (list, tuple)) else [given]
    if not all(callable(item) for item in items):
        raise TypeError(f"{name} must be a callable or a list of callables, got {given!r}")
    return items


def _new_token_count(max_new_tokens, max_length, gen, T: int) -> int:
    """How many tokens to generate, by transformers' rules (_prepare_generated_length): a
    max_new_tokens (the call's, else the config's) as given; else a max_length (the call's, else
    the config's), which counts the prompt too; else 20. (transformers would stop a model whose
    own config has max_position_embeddings at that context; LlavaNextConfig has none, so it does not.)"""
    if max_new_tokens is None:
        max_new_tokens = gen.max_new_tokens
    if max_new_tokens is not None:
        return max_new_tokens
    where = "max_length" if max_length is not None else "model.generation_config's max_length"
    max_length = max_length if max_length is not None else gen.max_length
    if max_length is None:
        return 20
    if T >= max_length:
        raise ValueError(f"the prompt has {T} tokens, which leaves none to generate within {where} "
                         f"({max_length}): pass max_new_tokens")
    return max_length - T


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel, from the function calling this, that names the first frame
    outside llava_next and torch's no_grad wrapper: the user's line that called generate."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and (frame.f_code.co_filename.startswith(_PACKAGE)
                                        or frame.f_code.co_filename.endswith(os.path.join("utils", "_contextlib.py"))):
        frame, level = frame.f_back, level + 1
    return level


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def choose(scores, do_sample, generator=None):
    if do_sample:
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
    return scores.argmax(-1)


@torch.no_grad()
def generate(model, input_ids=None, attention_mask=None, pixel_values=None, image_sizes=None, *,
             max_new_tokens: int | None = None, max_length: int | None = None, min_new_tokens: int | None = None,
             min_length: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
             top_h: float | None = None, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None,
             num_return_sequences: int | None = None, eos_token_id=None, pad_token_id=None, streamer=None,
             generator=None, use_cache: bool = True, num_beams: int | None = None,
             length_penalty: float | None = None, early_stopping=None, renormalize_logits: bool | None = None,
             no_repeat_ngram_size: int | None = None, min_p: float | None = None, max_time: float | None = None,
             typical_p: float | None = None, epsilon_cutoff: float | None = None, eta_cutoff: float | None = None,
             sequence_bias=None, bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
             forced_bos_token_id=None, forced_eos_token_id=None, remove_invalid_values: bool | None = None,
             exponential_decay_length_penalty=None, prefix_allowed_tokens_fn=None,
             return_dict_in_generate: bool | None = None, output_scores: bool | None = None,
             output_logits: bool | None = None, output_hidden_states: bool | None = None,
             output_attentions: bool | None = None, logits_processor=None, stopping_criteria=None,
             stop_strings=None, tokenizer=None, cuda_graph=None, fuse_projections: bool = True, **kwargs):
    """Greedy, sampled or beam-searched continuation of a (left-padded) batch; returns prompt + new
    ids (B * num_return_sequences, T + n), or with return_dict_in_generate an output object holding
    them.

    Settings left out or None come from `model.generation_config` (a checkpoint's
    generation_config.json), else transformers' defaults: greedy, temperature 1, top_k 50 (0: no
    top-k), top_p 1, no repetition penalty, 20 new tokens (a max_length, the call's or there, caps
    prompt + new tokens; max_new_tokens wins over it). The other logits settings (top_h, min_p,
    typical_p, epsilon_cutoff, eta_cutoff, no_repeat_ngram_size, sequence_bias, bad_words_ids,
    suppress_tokens, begin_suppress_tokens, forced_bos_token_id, forced_eos_token_id,
    remove_invalid_values, exponential_decay_length_penalty, renormalize_logits; the argument
    prefix_allowed_tokens_fn) act as transformers' processors of those names, in its order
    (llava_next.logits_process). (transformers 5.24 lets an explicit None override its config:
    top_k=None is no top-k there, do_sample=None greedy, max_new_tokens=None its default length;
    here None is the same as leaving the setting out.)
    Generation may run past the model's context, as in transformers, which does not warn;
    llava-next does.
    Each row stops at its eos; a finished row is filled with pad_token_id while others go on.
    Generation ends when every row is finished or after max_new_tokens. Before min_new_tokens new
    tokens (else a min_length, counting the prompt) the eos ids score -inf.
    num_return_sequences=n (sampling or beam search, as in transformers) returns n continuations
    of each prompt, rows b * n ... b * n + n - 1 for prompt b; the prompt and its images are
    prefilled once and the KV cache copied n times (num_beams times with beams).
    num_beams=k > 1: beam search as transformers runs it (llava_next.beam_search), with
    length_penalty and early_stopping; do_sample=True samples the beams' candidates. A beam that
    ends early is followed by the pad id (eos when the pad id is 0), or -1 without eos ids, as
    there. With return_dict_in_generate it returns a GenerateBeamDecoderOnlyOutput
    (.sequences_scores, .beam_indices, per-beam .scores). renormalize_logits=True ends the logits
    processing with a log-softmax, as in transformers.
    return_dict_in_generate=True returns a GenerateDecoderOnlyOutput (llava_next.compat):
    .sequences, and with output_scores / output_logits a tuple of one (B * n, vocab) fp32 tensor
    per new token: the scores tokens were chosen from (after every logits setting) / the model's
    logits; .cache is the KVCache decoded into (a GraphedDecode's own, which its
    next use resets, when one was passed). With output_hidden_states / output_attentions,
    .hidden_states / .attentions hold one tuple per new token, of the forward that chose it, as
    transformers gives them: the prompt's forward first (num_layers + 1 hidden states (N, T, C);
    num_layers attention weights (N, heads, T, T)), then each decode step's ((N, 1, C); (N, heads,
    1, keys so far), at most the sliding window's). Keeping them decodes eagerly (no CUDA graph;
    the attention runs written out, see forward), and a long prompt's weights are large: heads *
    T * T per layer and row.
    logits_processor / stopping_criteria: a callable or a list of callables, called as
    transformers calls its LogitsProcessorList / StoppingCriteriaList (whose objects work here):
    processor(input_ids (N, T + n), scores (N, vocab)) -> scores, where transformers runs it: after
    the built-in processors, before the sampling warpers; criterion(input_ids with the new token,
    scores) -> (N,) bool (N = B * num_return_sequences), True for rows that are done (the scores
    argument is the tuple of scores so far with return_dict_in_generate and output_scores, else
    None, as there). They run in addition to generate()'s own: transformers instead lets a
    caller's object replace its own one of the same class (a RepetitionPenaltyLogitsProcessor, an
    EosTokenCriteria); pass the setting (repetition_penalty=, eos_token_id=) here instead.
    stop_strings (with tokenizer=, as in transformers): a row stops once its text ends in one of
    them (StopStringCriteria); the stop string stays in the output. Without an
    attention_mask, the pad id marks padding where it occurs in the prompt and is no eos id (as in
    transformers), else every position counts.
    cuda_graph=True (CUDA only) replays the decode step as a CUDA graph captured for this call,
    after the first new token (two warm-up steps and the capture on the prompt's KV cache come
    between the first and the second token, so the first does not wait for them); pass a
    `GraphedDecode(model, batch_size, max_length)` instead to capture once and reuse it over calls
    (the caller owns it and its KV cache). None (the default) is True on CUDA with the Triton
    kernels (attn_implementation "auto" or "triton") unless a module of the model has a forward
    hook or a replaced forward (a replay runs no Python: they would see the capture only); a
    failed capture warns and decodes eagerly; else False. On an H100, 64 new tokens at batch 1
    took 5.9-7.7 ms a token with the graph, its capture included, and 21-31 eagerly (bench/NOTES.md).
    On CUDA it first calls `model.fuse_projections()` (q/k/v and gate/up as one product each):
    the weights move to new storage once, so a CUDA graph you captured of the model before then
    must be captured again, and later no-grad forwards round differently in the last bit.
    fuse_projections=False leaves the model as it is; so does passing a GraphedDecode, whose
    capture already fixed the layout.
    """
    given = dict(locals())  # the call's arguments by name (before any other local exists)
    if kwargs:
        raise TypeError(f"generate() does not support {sorted(kwargs)}")
    if not use_cache:
        raise ValueError("llava-next generates with a KV cache (use_cache=True) only")
    gen = model.generation_config
    gen.warn_unimplemented(stacklevel=_user_stacklevel())
    if input_ids is None:
        raise ValueError("generate() needs input_ids (the processor's output)")

    def setting(name):  # the call's value, else generation_config's, else transformers' default
        return gen.value(name, given[name])

    do_sample, num_beams, n_seq = setting("do_sample"), setting("num_beams"), setting("num_return_sequences")
    min_new_tokens, min_length, max_time = setting("min_new_tokens"), setting("min_length"), setting("max_time")
    length_penalty, early_stopping = setting("length_penalty"), setting("early_stopping")
    stop_strings, return_dict_in_generate = setting("stop_strings"), setting("return_dict_in_generate")
    output_scores, output_logits = setting("output_scores"), setting("output_logits")
    output_hidden_states, output_attentions = setting("output_hidden_states"), setting("output_attentions")
    # (the logits settings are read the same way where LogitsProcessing is built, below)
    cfg = model.config.text_config
    B, T = input_ids.shape
    max_new_tokens = _new_token_count(max_new_tokens, max_length, gen, T)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if (min_new_tokens or 0) < 0 or (min_length or 0) < 0:
        raise ValueError(f"min_new_tokens and min_length must be >= 0, got {min_new_tokens} and {min_length}")
    if not isinstance(n_seq, numbers.Integral) or n_seq < 1:
        raise ValueError(f"num_return_sequences must be an int >= 1, got {n_seq!r}")
    if not isinstance(num_beams, numbers.Integral) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    beams = num_beams > 1
    # transformers' rules, word for word
    if n_seq > 1 and not do_sample and not beams:
        raise ValueError("Greedy methods (do_sample != True) without beam search do not support "
                         f"`num_return_sequences` different than 1 (got {n_seq}).")
    if beams and n_seq > num_beams:
        raise ValueError(f"`num_return_sequences` ({n_seq}) has to be smaller or equal to `num_beams` ({num_beams}).")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"`early_stopping` must be a boolean or 'never', but is {early_stopping}.")
    if beams and streamer is not None:
        raise ValueError("`streamer` cannot be used with beam search (yet!). Make sure that `num_beams` is set to 1.")
    copies = num_beams if beams else n_seq  # rows per prompt: its beams, or its sampled continuations
    N = B * copies  # rows decoded
    # scores and logits are kept only for the output object, as in transformers
    keep_scores = bool(return_dict_in_generate and output_scores)
    keep_logits = bool(return_dict_in_generate and output_logits)
    for name, value in (("output_hidden_states", output_hidden_states), ("output_attentions", output_attentions)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    keep_steps = (StepOutputs(bool(output_hidden_states), bool(output_attentions))
                  if return_dict_in_generate and (output_hidden_states or output_attentions) else None)
    if keep_steps is not None:
        if cuda_graph:  # True or a GraphedDecode
            raise ValueError("output_hidden_states / output_attentions decode eagerly (a CUDA graph's replay "
                             "returns the logits only): leave cuda_graph unset or pass False")
        cuda_graph = False
    # transformers' MinNewTokensLength / MinLength processors ban eos until then; as there, a
    # min_new_tokens wins over a min_length (which counts the prompt)
    min_new = min_new_tokens if min_new_tokens is not None else (min_length or 0) - T
    eos = eos_token_id if eos_token_id is not None else gen.eos_token_id
    processors = _callables(logits_processor, "logits_processor")
    criteria = _callables(stopping_criteria, "stopping_criteria")
    # transformers fills finished rows with the pad id whenever an eos id is set (even an empty
    # list) or a criterion has one (its EosTokenCriteria); rows that only another criterion
    # finished go on generating otherwise
    pad_finished = eos is not None or any(hasattr(c, "eos_token_id") for c in criteria)
    if max_time is not None:
        criteria.append(MaxTimeCriteria(max_time))
    if stop_strings is not None:
        if tokenizer is None:  # transformers' rule
            raise ValueError("stop_strings (given or in model.generation_config) need the tokenizer: "
                             "generate(..., stop_strings=..., tokenizer=processor.tokenizer)")
        criteria.append(StopStringCriteria(tokenizer, stop_strings))
    eos_unset = eos is None
    if torch.is_tensor(eos):
        eos = eos.reshape(-1).tolist()
    eos = [int(eos)] if isinstance(eos, numbers.Integral) else [int(e) for e in (eos or [])]
    # transformers takes the pad id from generation_config.json when there is one (falling back to
    # eos when it names none), else from the model's config (GenerationConfig.from_model_config)
    pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
    pad_is_set = pad is not None  # only a configured pad id marks padding in a prompt without a mask
    if pad is None:
        pad = eos[0] if eos else 0
    # transformers' filler after a finished beam: the pad id unless it is 0, then eos; -1 without eos ids
    beam_fill = -1 if eos_unset else (pad or (eos[0] if eos else pad))

    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        # as transformers does: a pad id that occurs in the prompt and is no eos id marks padding
        if pad_is_set and pad not in eos and bool((input_ids == pad).any()):
            attention_mask = (input_ids != pad).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if attention_mask.shape == input_ids.shape and bool((attention_mask[:, -1] == 0).any()):
        warnings.warn("right padding detected (a row's last attention_mask entry is 0): generation continues after "
                      "the padding, not after the prompt; pad on the left (padding_side='left', the processor's "
                      "default)", stacklevel=_user_stacklevel())
    context = cfg.max_position_embeddings
    if T + max_new_tokens > context:
        warnings.warn(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) runs past the model's context ({context}): "
                      "positions beyond it were never trained, so expect the text to degrade there",
                      stacklevel=_user_stacklevel())
    # each row's left padding, which the repetition penalty skips (transformers: the positions
    # before the mask's first 1)
    first_real = (attention_mask[:, -T:] != 0).int().argmax(1).repeat_interleave(copies)  # (N,)
    padding = torch.arange(T + max_new_tokens, device=device)[None, :] < first_real[:, None]  # (N, T + max_new)
    process = LogitsProcessing(
        **{name: setting(name) for name in LOGITS_SETTINGS}, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        rows_per_prompt=copies, eos_token_id=eos, prompt_length=T, max_length=T + max_new_tokens,
        min_new_tokens=min_new, padding=padding, processors=processors,
        # beam sampling keeps one more token than there are eos ids (2 without any), as transformers
        min_tokens_to_keep=(2 if eos_unset else len(eos) + 1) if beams else 1)
    if streamer is not None and N != 1:
        raise ValueError("a streamer needs a batch of one prompt and num_return_sequences=1")
    required = cuda_graph is not None  # asked for explicitly: a failed capture raises
    if cuda_graph is None:
        cuda_graph = (device.type == "cuda" and model.attn_implementation in ("auto", "triton")
                      and not runs_python_per_call(model.modules()))
    try:
        if streamer is not None:
            streamer.put(input_ids.cpu())

        graphed = isinstance(cuda_graph, GraphedDecode)
        if device.type == "cuda" and fuse_projections and not graphed:
            model.fuse_projections()  # q/k/v and gate/up as one product each; a no-op once done
        if graphed:  # the caller's graph, captured before this call, and its cache
            step = cuda_graph
            if not step.fits(model, N, T + max_new_tokens):
                raise ValueError(f"the GraphedDecode was captured for batch {step.cache.batch_size} and "
                                 f"{step.cache.max_length} positions ({step.cache.k.dtype}, {step.cache.k.device}); "
                                 f"this call needs batch {N} and {T + max_new_tokens} positions")
            if not step.same_weights(model):
                raise ValueError("the model's weights moved since this GraphedDecode was captured (.to(), "
                                 "load_state_dict(assign=True), fuse_projections): capture a new one")
            if not step.same_path(model):
                raise ValueError("enable_decode_kernels() was switched since this GraphedDecode was captured, "
                                 "and the graph replays the path it captured: capture a new one")
            cache = step.cache
            cache.reset()
        else:
            cache = KVCache.for_model(model, N, T + max_new_tokens)
            if cuda_graph and device.type == "cuda":
                step = None  # captured on this cache after the first token, once the prompt is in it
            elif keep_steps is not None:
                step = keep_steps.decode_step(model, cache)
            else:
                step = eager_step(model, cache)
        out = torch.full((N, T + max_new_tokens), pad, dtype=torch.long, device=device)
        out[:, :T] = input_ids.repeat_interleave(copies, 0)
        eos_t = torch.tensor(eos, device=device, dtype=torch.long)
        unfinished = torch.ones(N, dtype=torch.bool, device=device)
        all_scores, all_logits = [], []

        if copies == 1:
            logits = prefill(model, input_ids, attention_mask, pixel_values, image_sizes, cache, keep_steps)
        else:  # the prompts (and their images) once, then each row's keys and values `copies` times
            prompt_cache = KVCache.for_model(model, B, T)
            logits = prefill(model, input_ids, attention_mask, pixel_values, image_sizes, prompt_cache, keep_steps,
                             copies)
            logits = logits.repeat_interleave(copies, 0)
            cache.fill_repeated(prompt_cache, copies)
            del prompt_cache
        cache_pos = torch.tensor(T, device=device)

        def advance(token):  # (N,) -> the logits after it: one decode step of every row
            nonlocal step
            if step is None:
                step = graphed_or_eager(model, N, T + max_new_tokens, fuse_projections, cache, required)
            next_logits = step(token[:, None], cache_pos)
            cache_pos.add_(1)
            return next_logits

        if beams:  # the same logits processing, on log-probabilities
            sequences, sequences_scores, kept_scores, kept_logits, beam_indices = beam_search(
                logits, advance, cache, out[:, :T], num_beams=num_beams, max_new_tokens=max_new_tokens,
                process=process, do_sample=do_sample, generator=generator, eos=eos, fill=beam_fill,
                length_penalty=length_penalty, early_stopping=early_stopping, criteria=criteria,
                keep_scores=keep_scores, keep_logits=keep_logits, num_return_sequences=n_seq)
            if return_dict_in_generate:
                return GenerateBeamDecoderOnlyOutput(
                    sequences=sequences, sequences_scores=sequences_scores if output_scores else None,
                    scores=kept_scores, logits=kept_logits, beam_indices=beam_indices, cache=cache,
                    **_kept_steps(keep_steps))
            return sequences
        n = 0
        while n < max_new_tokens:
            scores = process(out[:, :T + n], logits)
            if keep_logits:  # copies: a graph replay overwrites its logits in place
                all_logits.append(logits.clone())
            if keep_scores:
                all_scores.append(scores.clone())
            token = choose(scores, do_sample, generator)
            if pad_finished:
                token = torch.where(unfinished, token, torch.full_like(token, pad))
            out[:, T + n] = token
            n += 1
            if streamer is not None:
                streamer.put(token.cpu())
            if eos:
                unfinished &= ~torch.isin(token, eos_t)
            if criteria:  # as transformers' StoppingCriteriaList: (ids with the new token, scores) -> (N,) bool
                seen_scores = tuple(all_scores) if keep_scores else None
                for criterion in criteria:
                    unfinished &= ~torch.as_tensor(criterion(out[:, :T + n], seen_scores), device=device,
                                                   dtype=torch.bool)
            if (eos or criteria) and not unfinished.any():
                break
            if n == max_new_tokens:
                break
            logits = advance(token)
    except BaseException as e:
        if streamer is not None:  # a consumer reading it in another thread must not wait forever
            if hasattr(streamer, "error"):
                streamer.error(e)
            else:  # another library's streamer: end its stream
                streamer.end()
        raise
    if streamer is not None:
        streamer.end()
    if return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=out[:, :T + n], scores=tuple(all_scores) if keep_scores else None,
                                         logits=tuple(all_logits) if keep_logits else None, cache=cache,
                                         **_kept_steps(keep_steps))
    return out[:, :T + n]


def _kept_steps(keep) -> dict:
    """The output object's hidden_states and attentions fields from a StepOutputs (or None)."""
    if keep is None:
        return {}
    return {name: tuple(kept) for name, kept in (("hidden_states", keep.hidden_states),
                                                 ("attentions", keep.attentions)) if kept is not None}


def graphed_or_eager(model, batch_size: int, max_length: int, fuse_projections: bool, cache, required: bool):
    """The decode step for generate(): a GraphedDecode captured on the prefilled `cache`, or, when
    the capture fails and the graph was not asked for (`required` False: generate's default),
    eager steps after a warning. The failed capture ran no kernel (a capture only records them),
    so the cache holds the prompt as before; the warm-up steps' scratch slot is cleared again."""
    try:
        return GraphedDecode(model, batch_size, max_length, fuse_projections, cache=cache)
    except Exception as e:
        if required:
            raise
        cache.kv_mask[:, -1] = False  # the scratch slot (warm_up_on_scratch), whatever step failed
        warnings.warn(f"capturing the decode step as a CUDA graph failed ({type(e).__name__}: {e}); decoding "
                      "eagerly, which is several times slower at small batches. generate(cuda_graph=False) skips "
                      "the attempt; cuda_graph=True raises instead.", stacklevel=_user_stacklevel())
        return eager_step(model, cache)


def eager_step(model, cache):
    """The decode step as plain calls, token (B, 1) and cache_pos -> logits: what a GraphedDecode replays."""
    return lambda token, pos: decode_one_token(model, token, cache, pos)


class GraphedDecode:
    """decode_one_token captured in a CUDA graph and replayed: one launch per new token instead of
    one per kernel. It owns its KV cache, since the graph reads and writes those exact buffers.
    It fuses the model's projections first (see generate), unless fuse_projections=False.

    `cache`: capture on this cache, which may already hold a prompt (generate(cuda_graph=True)
    passes the one it prefilled); see warm_up_on_scratch for why that leaves the prompt intact."""

    def __init__(self, model, batch_size: int, max_length: int, fuse_projections: bool = True, cache=None):
        device = model.device
        if fuse_projections:
            model.fuse_projections()  # before capture: it moves the weights the graph will read
        if cache is not None and (cache.batch_size != batch_size or cache.max_length != max_length):
            raise ValueError(f"the cache is for batch {cache.batch_size} and {cache.max_length} positions, "
                             f"not {batch_size} and {max_length}")
        live = cache is not None
        self.cache = cache if live else KVCache.for_model(model, batch_size, max_length)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.pos = torch.tensor(max_length - 1, device=device)  # a scratch slot for warm-up and capture
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(stream):  # compiles the Triton kernels and settles the allocator before capture
                warm_up_on_scratch(model, self.token, self.cache, self.pos, steps=2)
        finally:  # also when a warm-up step fails: a caller may go on eagerly with the same cache
            torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # Captured on the warm-up's stream, with the model's device current: torch.cuda.graph's
        # own default stream is one per process, made on whichever device was current first, and
        # its synchronize() is the current device's. The outer stream context puts the current
        # stream back even if the capture fails (the graph context would leave its stream
        # current); thread_local lets other threads (a TextIteratorStreamer's consumer) use CUDA
        # meanwhile.
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.current_stream(device)):
            with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
                self.logits = decode_one_token(model, self.token, self.cache, self.pos)
        if not live:
            self.cache.reset()
        self.weights = _weight_addresses(model)  # the graph reads these exact buffers
        self.decode_kernels = _decode_kernels(model)  # and runs the path chosen at capture

    def fits(self, model, batch_size: int, length: int) -> bool:
        k = self.cache.k
        return (self.cache.batch_size == batch_size and self.cache.max_length >= length
                and k.dtype == model.dtype and k.device == model.device)

    def same_weights(self, model) -> bool:
        return _weight_addresses(model) == self.weights

    def same_path(self, model) -> bool:
        """Whether the model's decode path (enable_decode_kernels) is the one captured."""
        return _decode_kernels(model) == self.decode_kernels

    def __call__(self, token, pos):
        self.token.copy_(token)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits  # overwritten by the next replay


@torch.no_grad()
def warm_up_on_scratch(model, token, cache, pos, steps: int = 2) -> None:
    """Decode steps at the cache's scratch slot `pos` (its last) that leave a prefilled cache as
    later steps need it: the slot's keys and values are never attended to before a real step
    overwrites them (a step sees keys up to its own position only), and its kv_mask entry, which
    the steps count positions from, is cleared again afterwards."""
    if int(pos) != cache.max_length - 1:
        raise ValueError(f"the scratch slot is the cache's last ({cache.max_length - 1}), not {int(pos)}")
    for _ in range(steps):
        decode_one_token(model, token, cache, pos)
    cache.kv_mask.index_fill_(1, pos.reshape(1), False)


def _weight_addresses(model) -> list[int]:
    return [p.data_ptr() for p in model.parameters()]


def _decode_kernels(model) -> list[bool]:
    return [layer.decode_kernels for layer in model.language_model.model.layers]


class TextStreamer:
    """Prints text as it is generated: `generate(..., streamer=TextStreamer(tokenizer))`.

    Text is decoded from all new ids each time and only the stable part is emitted: never a
    trailing U+FFFD (a character whose bytes are split over tokens); letters, digits and spaces
    as they come (as transformers 5.24 does); after a symbol, only up to the last space, since
    the next token can still change how it decodes.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs):
        self.tokenizer, self.skip_prompt, self.decode_kwargs = tokenizer, skip_prompt, decode_kwargs
        self.ids, self.printed, self.next_is_prompt = [], 0, True

    def put(self, value):
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("TextStreamer only supports a batch of one")
            value = value[0]
        if self.skip_prompt and self.next_is_prompt:
            self.next_is_prompt = False
            return
        self.next_is_prompt = False
        self.ids.extend(value.tolist())
        text = self.tokenizer.decode(self.ids, **self.decode_kwargs)
        if text.endswith("\n"):
            # Start over after a line, keeping its last token as context: decoded alone, the next
            # token would lose its leading space (sentencepiece drops it at the start of a text),
            # and the next line's indentation with it. The context must decode to some text: a
            # skipped special token decodes to none, so keep back to the last token that does.
            start = len(self.ids) - 1
            while start > 0 and not self.tokenizer.decode(self.ids[start:start + 1], **self.decode_kwargs):
                start -= 1
            piece, self.ids = text[self.printed:], self.ids[start:]
            self.printed = len(self.tokenizer.decode(self.ids, **self.decode_kwargs))
        elif text.endswith("\ufffd"):
            return
        elif text and _is_cjk(text[-1]):  # no spaces between such characters: emit each as it comes, as transformers
            piece, self.printed = text[self.printed:], len(text)
        elif all(c.isspace() or unicodedata.category(c)[0] in "LMN" for c in text[self.printed:]):
            # letters (with their combining marks), digits and spaces stream as they come, as in
            # transformers 5.24, so long words and text without spaces (Thai, kana) do too; symbols
            # wait for a space (they may open some formatting)
            piece, self.printed = text[self.printed:], len(text)
            if not piece:
                return
        else:
            stable = text.rfind(" ") + 1
            if stable <= self.printed:
                return
            piece, self.printed = text[self.printed:stable], stable
        self.on_text(piece, stream_end=False)

    def end(self):
        text = self.tokenizer.decode(self.ids, **self.decode_kwargs) if self.ids else ""
        piece = text[self.printed:]
        self.ids, self.printed, self.next_is_prompt = [], 0, True
        self.on_text(piece, stream_end=True)

    def error(self, exc: BaseException):
        """generate() failed mid-stream: forget this stream, so the streamer can serve the next."""
        self.ids, self.printed, self.next_is_prompt = [], 0, True

    def on_text(self, text: str, stream_end: bool = False):
        print(text, flush=True, end="" if not stream_end else None)


# CJK ideographs (transformers' TextStreamer._is_chinese_char ranges): text without spaces.
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(char: str) -> bool:
    return any(lo <= ord(char) <= hi for lo, hi in CJK_RANGES)


class TextIteratorStreamer(TextStreamer):
    """Yields text pieces from another thread: start generate in a Thread, iterate this."""

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.queue, self.timeout, self._stop = queue.Queue(), timeout, object()

    def on_text(self, text: str, stream_end: bool = False):
        if text:
            self.queue.put(text, timeout=self.timeout)
        if stream_end:
            self.queue.put(self._stop, timeout=self.timeout)

    def __iter__(self):
        return self

    def error(self, exc: BaseException):  # the consumer gets generate()'s exception instead of waiting
        super().error(exc)
        self.queue.put(exc, timeout=self.timeout)

    def __next__(self):
        value = self.queue.get(timeout=self.timeout)
        if value is self._stop:
            raise StopIteration
        if isinstance(value, BaseException):
            raise value
        return value


__all__ = ["generate", "prefill", "decode_one_token", "StopStringCriteria", "MaxTimeCriteria", "TextStreamer",
           "TextIteratorStreamer"]
