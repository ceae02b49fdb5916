"""generate()'s logits settings, computed as transformers' logits processors and warpers compute them.

`LogitsProcessing(...)` is built once per generate() call from the settings and called at each
step as transformers calls its LogitsProcessorList: (ids (N, t), logits (N, V) fp32) -> scores.
The steps run in transformers' order (its `_get_logits_processor`), each off at its default:

    sequence_bias, repetition_penalty, no_repeat_ngram_size, bad_words_ids,
    the eos ban before min_new_tokens / min_length, prefix_allowed_tokens_fn, forced_bos_token_id,
    forced_eos_token_id, remove_invalid_values, exponential_decay_length_penalty,
    suppress_tokens, begin_suppress_tokens, a caller's logits_processor,
    with sampling only: temperature, top_h, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff,
    and last renormalize_logits (a log-softmax).

Beam search calls the same object on log-probabilities.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

INF = float("inf")
# generate()'s settings that LogitsProcessing takes under their own names (generate passes each
# as the call gives it, else as generation_config has it, else transformers' default)
SETTINGS = ("do_sample", "temperature", "top_h", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
            "eta_cutoff", "repetition_penalty", "no_repeat_ngram_size", "sequence_bias", "bad_words_ids",
            "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
            "exponential_decay_length_penalty", "renormalize_logits")


class LogitsProcessing:
    """The settings above as one callable (see the module docstring). Besides the settings:
    `eos_token_id`: the eos ids (a list), banned before `min_new_tokens` new tokens and the
    bad word that is an eos id alone is dropped, as transformers does; `prompt_length` T: where
    new tokens begin; `max_length`: T + max_new_tokens (forced_eos_token_id acts at its last
    step); `padding` (N, >= t) bool: each row's left padding, which the repetition penalty skips
    (transformers' prompt_ignore_length); `processors`: a caller's callables (ids, scores) ->
    scores; `prefix_allowed_tokens_fn(prompt index, row's ids) -> allowed ids`, with
    `rows_per_prompt` (its beams or copies), leaves only those ids; `min_tokens_to_keep`: what
    top-k, top-p, min-p, typical-p and the cutoffs keep at least (beam sampling keeps one more
    than there are eos ids, as transformers does).
    The logits passed in are never written to."""

    def __init__(self, *, do_sample: bool = False, temperature: float = 1.0, top_h: float | None = None,
                 top_k: int = 0, top_p: float = 1.0,
                 min_p: float | None = None, typical_p: float = 1.0, epsilon_cutoff: float = 0.0,
                 eta_cutoff: float = 0.0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 sequence_bias=None, bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
                 forced_bos_token_id=None, forced_eos_token_id=None, remove_invalid_values: bool = False,
                 exponential_decay_length_penalty=None, prefix_allowed_tokens_fn=None, rows_per_prompt: int = 1,
                 eos_token_id=(), prompt_length: int = 0, max_length: int | None = None,
                 min_new_tokens: int = 0, padding=None, processors=(), min_tokens_to_keep: int = 1,
                 renormalize_logits: bool = False):
        if top_k < 0:
            raise ValueError(f"top_k must be a positive int (or 0: no top-k), got {top_k}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0 <= top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1] (0: the most likely token only), got {top_p}")
        if top_h is not None and not 0 < top_h <= 1:
            raise ValueError(f"top_h must be in (0, 1], got {top_h}")
        if min_p is not None and not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        if not isinstance(no_repeat_ngram_size, numbers.Integral) or no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an int >= 0 (0: off), got {no_repeat_ngram_size!r}")
        if not 0 < typical_p <= 1:
            raise ValueError(f"typical_p must be in (0, 1] (1: off), got {typical_p}")
        for name, value in (("epsilon_cutoff", epsilon_cutoff), ("eta_cutoff", eta_cutoff)):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1) (0: off), got {value}")
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.top_h = top_h
        self.min_p = min_p
        self.typical_p, self.epsilon_cutoff, self.eta_cutoff = typical_p, epsilon_cutoff, eta_cutoff
        self.repetition_penalty, self.no_repeat_ngram_size = repetition_penalty, no_repeat_ngram_size
        self.eos = list(eos_token_id)
        self.sequence_bias = SequenceBias(sequence_bias, "sequence_bias") if sequence_bias is not None else None
        self.bad_words = None
        if bad_words_ids is not None:
            _check_id_lists(bad_words_ids, "bad_words_ids")
            words = [w for w in bad_words_ids if not (len(w) == 1 and w[0] in self.eos)]  # eos alone stays allowed
            self.bad_words = SequenceBias({tuple(w): -INF for w in words}, "bad_words_ids") if words else None
        self.suppress = _id_tensor(suppress_tokens, "suppress_tokens")
        self.begin_suppress = _id_tensor(begin_suppress_tokens, "begin_suppress_tokens")
        if forced_bos_token_id is not None and not _is_id(forced_bos_token_id):
            raise ValueError(f"forced_bos_token_id must be a token id (an int >= 0), got {forced_bos_token_id!r}")
        self.forced_bos = forced_bos_token_id
        self.forced_eos = _id_tensor(forced_eos_token_id, "forced_eos_token_id")
        if self.forced_eos is not None and not self.forced_eos.numel():
            raise ValueError("forced_eos_token_id must be a token id or a non-empty list of them, got []")
        if (self.forced_eos is not None and self.suppress is not None
                and set(self.forced_eos.tolist()) <= set(self.suppress.tolist())):  # transformers' rule
            raise ValueError(f"Every token in `forced_eos_token_id` ({sorted(self.forced_eos.tolist())}) is also in "
                             "`suppress_tokens`: forcing a token while suppressing it leaves no token at the last "
                             "step. Remove the overlapping token(s) from either (to prevent an early eos, use "
                             "min_new_tokens instead).")
        self.remove_invalid_values = remove_invalid_values is True  # as transformers: only True
        self.decay = exponential_decay_length_penalty
        if self.decay is not None:
            if (not isinstance(self.decay, (list, tuple)) or len(self.decay) != 2
                    or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in self.decay)):
                raise ValueError("exponential_decay_length_penalty must be (start_index, decay_factor), two numbers, "
                                 f"got {self.decay!r}")
            self.decay_start = self.decay[0] + prompt_length  # transformers' regulation_start
        if prefix_allowed_tokens_fn is not None and not callable(prefix_allowed_tokens_fn):
            raise TypeError(f"prefix_allowed_tokens_fn must be a callable, got {prefix_allowed_tokens_fn!r}")
        self.prefix_allowed_tokens_fn, self.rows_per_prompt = prefix_allowed_tokens_fn, rows_per_prompt
        self.T, self.max_length, self.min_new_tokens = prompt_length, max_length, min_new_tokens
        # as transformers: a one-token prompt with a forced bos starts the suppression one later
        self.begin_index = prompt_length + (prompt_length == 1 and forced_bos_token_id is not None)
        self.padding, self.processors = padding, list(processors)
        self.min_tokens_to_keep = min_tokens_to_keep
        self.renormalize = renormalize_logits is True  # as transformers: only True
        self.device = None  # where the id tensors are: moved once, at the first call

    def _move_to(self, device, V: int):
        """The id tensors on the logits' device, once (not a host-to-device copy every step)."""
        for name in ("suppress", "begin_suppress", "forced_eos"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        # the eos ban's ids; those outside the vocabulary are left out, as transformers' isin mask does
        self.eos_ban = torch.tensor([e for e in self.eos if 0 <= e < V], dtype=torch.long, device=device)
        self.eta = torch.tensor(self.eta_cutoff, device=device)
        self.device = device

    def __call__(self, ids, logits):
        t, V = ids.shape[1], logits.shape[-1]
        if self.device != logits.device:
            self._move_to(logits.device, V)
        scores = logits
        if self.sequence_bias is not None:
            scores = self.sequence_bias(ids, scores)
        if self.repetition_penalty != 1.0:
            scores = _repetition_penalty(ids, scores, self.repetition_penalty,
                                         self.padding[:, :t] if self.padding is not None else None)
        if self.no_repeat_ngram_size:
            scores = _ban_repeated_ngrams(ids, scores, self.no_repeat_ngram_size)
        if self.bad_words is not None:
            scores = self.bad_words(ids, scores)
        if self.min_new_tokens > 0 and t - self.T < self.min_new_tokens and self.eos_ban.numel():
            scores = scores.index_fill(1, self.eos_ban, -INF)
        if self.prefix_allowed_tokens_fn is not None:
            scores = self._allowed_only(ids, scores)
        if self.forced_bos is not None and t == 1:  # as transformers: only after a one-token prompt
            scores = torch.full_like(scores, -INF)
            scores[:, self.forced_bos] = 0
        if self.forced_eos is not None and self.max_length is not None and t == self.max_length - 1:
            scores = torch.full_like(scores, -INF)
            scores[:, self.forced_eos] = 0
        if self.remove_invalid_values:  # nan -> 0, +-inf -> the dtype's largest finite values
            finfo = torch.finfo(scores.dtype)
            scores = torch.where(scores != scores, 0.0, scores).clamp(finfo.min, finfo.max)
        if self.decay is not None and t > self.decay_start:
            scores = self._raise_eos(scores, t - self.decay_start)
        if self.suppress is not None:
            scores = _suppress(scores, self.suppress)
        if self.begin_suppress is not None and t == self.begin_index:
            scores = _suppress(scores, self.begin_suppress)
        for processor in self.processors:
            scores = processor(ids, scores.clone() if scores is logits else scores)  # it may write in place
        if self.do_sample:
            scores = self._warp(scores)
        return scores.log_softmax(-1) if self.renormalize else scores

    def _raise_eos(self, scores, steps: int):
        """exponential_decay_length_penalty, `steps` tokens past its start: each eos score grows by
        |score| * (factor ** steps - 1), an infinite one stays (transformers' ExponentialDecayLengthPenalty)."""
        eos = scores[:, self.eos_ban]
        raised = (eos.abs() * (pow(self.decay[1], steps) - 1)).masked_fill(~torch.isfinite(eos), 0.0)
        penalties = torch.zeros_like(scores)
        penalties[:, self.eos_ban] = raised
        return scores + penalties

    def _allowed_only(self, ids, scores):
        """prefix_allowed_tokens_fn: each row keeps only the ids the function allows it; a prompt
        whose rows all have nothing left gets the allowed ids at score 0, so the constraint holds
        (transformers' PrefixConstrainedLogitsProcessor)."""
        mask = torch.full_like(scores, -INF)
        n = self.rows_per_prompt
        for row in range(ids.shape[0]):
            allowed = self.prefix_allowed_tokens_fn(row // n, ids[row])
            if len(allowed) == 0:
                raise ValueError(f"prefix_allowed_tokens_fn returned no ids for prompt {row // n}: the constraint "
                                 "cannot be met")
            mask[row, allowed] = 0
        scores = scores + mask
        stuck = scores.amax(-1).isneginf().view(-1, n).all(-1, keepdim=True)  # (prompts, 1)
        return torch.where(stuck.repeat_interleave(n, 0), mask, scores)

    def _warp(self, scores):
        """Sampling's warpers, in transformers' order."""
        keep = self.min_tokens_to_keep
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_h is not None:
            scores = _top_h(scores, self.top_h)
        if self.top_k:
            kth = torch.topk(scores, min(max(self.top_k, keep), scores.shape[-1])).values[:, -1:]
            scores = scores.masked_fill(scores < kth, -INF)
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - self.top_p
            remove[:, -keep:] = False  # always keep the most likely token(s)
            scores = scores.masked_fill(remove.scatter(1, order, remove), -INF)
        if self.min_p is not None:  # drop tokens less likely than min_p times the likeliest
            probs = scores.softmax(-1)
            remove = probs < self.min_p * probs.amax(-1, keepdim=True)
            remove.scatter_(1, probs.topk(min(keep, probs.shape[-1])).indices, False)
            scores = scores.masked_fill(remove, -INF)
        if self.typical_p < 1.0:
            scores = _typical(scores, self.typical_p, keep)
        if self.epsilon_cutoff > 0:  # drop tokens below a fixed probability
            scores = _cut_below(scores, scores.softmax(-1) < self.epsilon_cutoff, keep)
        if self.eta_cutoff > 0:  # ... below one that falls as the distribution's entropy rises
            entropy = torch.distributions.Categorical(logits=scores).entropy()
            eta = torch.min(self.eta, torch.sqrt(self.eta) * torch.exp(-entropy))[..., None]
            scores = _cut_below(scores, scores.softmax(-1) < eta, keep)
        return scores


class SequenceBias:
    """transformers' sequence_bias: {tuple of ids: bias} (or [[ids, bias], ...]) adds the bias to
    a sequence's last id's score where the row ends in the rest of it. bad_words_ids is the same
    with -inf biases."""

    def __init__(self, biases, name: str):
        if isinstance(biases, list):  # transformers' list form
            if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in biases):
                raise ValueError(f"{name} must be a dict {{tuple of ids: bias}} or a list of [ids, bias], got {biases}")
            biases = {tuple(ids): bias for ids, bias in biases}
        if not isinstance(biases, dict) or not biases:
            raise ValueError(f"{name} must be a non-empty dict {{tuple of ids: bias}}, got {biases!r}")
        _check_id_lists([list(k) for k in biases], name)
        self.name, self.biases = name, {tuple(int(i) for i in k): float(v) for k, v in biases.items()}
        self.prepared = None

    def _prepare(self, V: int, device):
        """The biases as tensors, once the vocabulary size is known: one (V,) row for single ids,
        and (prefixes, last ids, biases) per prefix length."""
        past = sorted({i for ids in self.biases for i in ids if i >= V})
        if past:
            raise ValueError(f"{self.name}: the model's vocabulary has {V} ids, so these cannot occur: {past}")
        single = torch.zeros(V, device=device)
        groups = {}
        for ids, bias in self.biases.items():
            if len(ids) == 1:
                single[ids[0]] = bias
            else:
                groups.setdefault(len(ids) - 1, []).append((ids, bias))
        self.prepared = single, [(torch.tensor([ids[:-1] for ids, _ in g], device=device),
                                  torch.tensor([ids[-1] for ids, _ in g], device=device),
                                  torch.tensor([bias for _, bias in g], device=device)) for g in groups.values()]

    def __call__(self, ids, scores):
        if self.prepared is None:
            self._prepare(scores.shape[-1], scores.device)
        single, groups = self.prepared
        bias = torch.zeros_like(scores) + single
        for prefixes, last, values in groups:  # prefixes (S, n), last (S,), values (S,)
            n = prefixes.shape[1]
            if n > ids.shape[1]:
                continue
            follows = (ids[:, None, -n:] == prefixes).all(-1)  # (N, S) the row ends in the prefix
            bias.index_add_(1, last, torch.where(follows, values, 0.0).to(bias.dtype))
        return scores + bias


def _repetition_penalty(ids, scores, penalty: float, unseen=None):
    """Seen ids' scores divided by the penalty (multiplied, where negative); `unseen` (N, t)
    marks positions skipped (a row's left padding): they, and ids past the scores (an embedding
    larger than the head), point at a scratch column past V, as in transformers."""
    V = scores.shape[-1]
    ids = ids.clamp(max=V)
    if unseen is not None:
        ids = ids.masked_fill(unseen, V)
    scores = F.pad(scores, (0, 1))
    score = scores.gather(1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, ids, score)[:, :V]


def _ban_repeated_ngrams(ids, scores, n: int):
    """no_repeat_ngram_size=n, as transformers: a token that would complete an n-gram the row
    already holds (prompt and padding included) scores -inf. ids (N, t), scores (N, V)."""
    t, V = ids.shape[1], scores.shape[-1]
    if t < n:
        return scores
    windows = ids.unfold(1, n, 1)  # (N, t - n + 1, n) every n-gram so far
    follows = (windows[..., :-1] == ids[:, None, t - n + 1:]).all(-1)  # (N, t - n + 1) starts with the row's last n - 1
    # each matching n-gram bans its last token; the others (and ids past the scores) go to a spare column
    columns = torch.where(follows, windows[..., -1].clamp(max=V), V)
    ban = torch.zeros(ids.shape[0], V + 1, dtype=torch.bool, device=scores.device).scatter_(1, columns, True)
    return scores.masked_fill(ban[:, :V], -INF)


def _suppress(scores, ids):
    return torch.where(torch.isin(torch.arange(scores.shape[-1], device=scores.device), ids), -INF, scores)


def _top_h(scores, top_h: float, candidates: int = 100):
    """Top-H sampling (transformers' TopHLogitsWarper): of the `candidates` likeliest tokens, keep
    them likeliest first while their summed entropy terms -p log p stay within top_h times the
    entropy of those candidates' distribution; the likeliest always stays."""
    top, order = torch.topk(scores, min(candidates, scores.shape[-1]), dim=-1)  # (N, n) best first
    dist = torch.distributions.Categorical(logits=top)
    keep = torch.cumsum(-dist.probs * torch.log(dist.probs), dim=-1) <= (dist.entropy() * top_h)[:, None]
    keep[:, 0] = True
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, keep)
    return scores.masked_fill(~kept, -INF)


def _typical(scores, mass: float, keep: int):
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to
    `mass` of probability (transformers' TypicalLogitsWarper)."""
    log_p = scores.log_softmax(-1)
    entropy = -(log_p * log_p.exp()).nansum(-1, keepdim=True)
    distance, order = torch.sort((-log_p - entropy).abs(), descending=False)
    cum = scores.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cum < mass).sum(1).clamp_(max=distance.shape[-1] - 1)
    remove = distance > distance.gather(1, last.view(-1, 1))
    remove[..., :keep] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -INF)


def _cut_below(scores, low, keep: int):
    """Drop the tokens `low` marks, except the `keep` likeliest."""
    kth = torch.topk(scores, min(keep, scores.shape[-1])).values[..., -1, None]
    return scores.masked_fill(low & (scores < kth), -INF)


def _is_id(i) -> bool:
    """An int >= 0 (numpy's too), not a bool."""
    return isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0


def _check_id_lists(lists, name: str):
    if not isinstance(lists, list) or not lists or not all(
            isinstance(ids, list) and ids and all(_is_id(i) for i in ids)
            for ids in lists):
        raise ValueError(f"{name} must be a non-empty list of non-empty lists of token ids (ints >= 0), got {lists!r}")


def _id_tensor(ids, name: str):
    """An id or a list of ids as a 1-d long tensor; None stays None."""
    if ids is None:
        return None
    ids = [ids] if _is_id(ids) else list(ids)
    if not all(_is_id(i) for i in ids):
        raise ValueError(f"{name} must be a token id or a list of them (ints >= 0), got {ids!r}")
    return torch.tensor([int(i) for i in ids], dtype=torch.long)

