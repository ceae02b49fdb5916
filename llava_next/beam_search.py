"""Beam search, as transformers 5.24's generate(num_beams=...) does it, token for token.

Each prompt keeps `nb` running beams. A step scores every (beam, next token) pair by the beam's
summed log-probability plus the token's (after the logits processors), keeps the best K of those
candidates (K = max(2, 1 + number of eos ids) * nb, so that nb of them can go on even if the best
ones all end), and then:
  - candidates that end here (an eos token, the length limit, a stopping criterion) and rank in the
    first nb of the K are scored by sum / new_length ** length_penalty and compete for the nb
    places of the prompt's finished list;
  - the best nb candidates that do not end become the running beams, and the KV cache rows are
    copied from the beams they continue (KVCache.reorder).
A prompt's finished list stops taking beams once no running beam can beat its worst one
(transformers' heuristic, see `_can_improve`), or, with early_stopping=True, once it holds nb.
Its rows are still decoded until every prompt's list is closed (or the length limit): the batch
steps together.

Everything is one tensor per quantity over (prompts, beams) so a step costs a few kernels whatever
nb is. Scores are float32, and -1e9 (EXCLUDED) marks a place that holds no candidate, as in
transformers: the same arithmetic in the same order, so ties break the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXCLUDED = -1.0e9  # the score of a place that holds no candidate


def beam_search(first_logits, advance, cache, prompt, *, num_beams: int, max_new_tokens: int, process,
                do_sample: bool, generator, eos: list[int], fill: int, length_penalty: float, early_stopping,
                criteria, keep_scores: bool, keep_logits: bool, num_return_sequences: int):
    """Beam search over prompts whose KV cache rows are already prefilled, each prompt in nb rows.

    first_logits (B * nb, V) fp32: the logits after each row's prompt.
    advance(tokens (B * nb,)) -> logits (B * nb, V): one decode step of every row at the next
    position. The logits may be a buffer the next call overwrites (a CUDA graph's), so they are
    used before it.
    cache: the KVCache `advance` decodes into; its rows are reordered here after each step.
    prompt (B * nb, T): the prompt ids, each prompt's row nb times.
    process(ids (B * nb, t), log_probs (B * nb, V)) -> scores: the logits processors.
    criteria: callables (ids (B * K, t + 1): each candidate with its new token, scores so far or
    None) -> (B * K,) bool, True where a candidate ends; an eos token and the length limit end one
    anyway.
    fill: the id after a finished beam's end (transformers': the pad id, eos when that is 0, -1
    without eos ids).
    Returns sequences (B * n, T + new), their scores (B * n,), the per-step scores and logits
    (tuples of (B * nb, V), or None unless kept) and beam_indices (B * n, new): for each new
    token, the row (b * nb + beam) it was chosen from; -1 after a beam's end. n = num_return_sequences.
    """
    nb = num_beams
    N, T = prompt.shape
    B, L = N // nb, T + max_new_tokens
    device = prompt.device
    K = max(2, 1 + len(eos)) * nb  # candidates kept per prompt and step
    in_top_nb = torch.arange(K, device=device) < nb  # (K,) only these may join the finished lists
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    row_offset = torch.arange(B, device=device)[:, None] * nb  # (B, 1): beam j of prompt b is row b * nb + j

    # Running beams. The first beam of each prompt starts at 0 and the others at EXCLUDED, so the first
    # step expands one beam instead of nb copies of the same prompt.
    seqs = torch.full((B, nb, L), fill, dtype=torch.long, device=device)  # (B, nb, L)
    seqs[:, :, :T] = prompt.view(B, nb, T)
    sums = torch.zeros(B, nb, device=device)  # (B, nb) summed log-probabilities
    sums[:, 1:] = EXCLUDED
    src = torch.full((B, nb, max_new_tokens), -1, dtype=torch.int32, device=device)  # (B, nb, new) rows chosen from
    # Finished beams: the best nb per prompt so far, by length-penalised score.
    done_seqs, done_src = seqs.clone(), src.clone()
    done_scores = torch.full((B, nb), EXCLUDED, device=device)
    filled = torch.zeros(B, nb, dtype=torch.bool, device=device)  # (B, nb) which places hold a finished beam
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # (B, 1) can a running beam still win?
    all_scores, all_logits = [], []

    logits, t = first_logits, T  # t: the length of every running beam
    while True:
        n = t - T  # new tokens so far
        log_probs = process(seqs.view(N, L)[:, :t], F.log_softmax(logits, dim=-1))  # (N, V)
        if keep_logits:
            all_logits.append(logits.clone())
        if keep_scores:
            all_scores.append(log_probs.clone())
        V = log_probs.shape[-1]
        total = (log_probs.view(B, nb, V) + sums[:, :, None]).reshape(B, nb * V)  # (B, nb * V)

        # The K best candidates (or K drawn without replacement), best first.
        if do_sample:
            pick = torch.multinomial(F.softmax(total, dim=-1), K, generator=generator)  # (B, K)
            cand_scores, order = total.gather(1, pick).sort(dim=-1, descending=True)
            pick = pick.gather(1, order)
        else:
            cand_scores, pick = torch.topk(total, K)  # (B, K)
        beam, token = pick // V, pick % V  # (B, K) which running beam each continues, with which token
        cand_seqs = _gather(seqs, beam)  # (B, K, L)
        cand_seqs[:, :, t] = token
        cand_src = _gather(src, beam)  # (B, K, new)
        cand_src[:, :, n] = (beam + row_offset).to(cand_src.dtype)

        # Which candidates end here.
        ends = torch.isin(token, eos_t) | (t + 1 >= L)  # (B, K)
        scores_so_far = tuple(all_scores) if keep_scores else None
        for criterion in criteria:
            hit = criterion(cand_seqs.view(B * K, L)[:, :t + 1], scores_so_far)
            ends = ends | torch.as_tensor(hit, dtype=torch.bool, device=device).expand(B * K).view(B, K)

        # The running beams for the next step: the best nb candidates that do not end.
        alive = cand_scores + ends.to(torch.float32) * EXCLUDED  # (B, K)
        keep = torch.topk(alive, nb)[1]  # (B, nb)
        seqs, sums, src = _gather(cand_seqs, keep), _gather(alive, keep), _gather(cand_src, keep)

        # The finished lists: the best nb of what they held and the candidates that end here.
        finishing = ends & in_top_nb[None, :]  # (B, K) only the top nb of the K may finish
        final = cand_scores / ((t + 1 - T) ** length_penalty)  # (B, K) length-penalised
        full = filled.all(dim=-1, keepdim=True) & (early_stopping is True)  # (B, 1) nothing more may join
        final += full.to(torch.float32) * EXCLUDED
        final += (~improvable).to(torch.float32) * EXCLUDED
        final += (~finishing) * EXCLUDED
        best = torch.topk(torch.cat((done_scores, final), dim=1), nb)[1]  # (B, nb)
        done_seqs = _gather(torch.cat((done_seqs, cand_seqs), dim=1), best)
        done_scores = _gather(torch.cat((done_scores, final), dim=1), best)
        done_src = _gather(torch.cat((done_src, cand_src), dim=1), best)
        filled = _gather(torch.cat((filled, finishing), dim=1), best)

        t += 1
        improvable = _can_improve(improvable, sums, done_scores, filled, t - T, max_new_tokens, early_stopping,
                                  length_penalty)
        more = improvable.any() & ~(filled.all() & (early_stopping is True)) & ~ends.all()
        if not more:
            break
        # Each running beam's rows take the cache of the beam it continues (the t - 1 positions
        # written so far; the prompt's T are the same in all of a prompt's rows), then decode its
        # newest token at position t - 1.
        cache.reorder(src[:, :, n].reshape(N).long(), t - 1, start=T)
        logits = advance(seqs[:, :, t - 1].reshape(N))

    # The best n finished beams of each prompt, cut to the longest of them.
    n_out = num_return_sequences
    sequences = done_seqs[:, :n_out].reshape(B * n_out, L)
    beam_indices = done_src[:, :n_out].reshape(B * n_out, max_new_tokens)
    new = int((beam_indices != -1).sum(dim=1).max())
    return (sequences[:, :T + new], done_scores[:, :n_out].reshape(B * n_out),
            tuple(all_scores) if keep_scores else None, tuple(all_logits) if keep_logits else None,
            beam_indices[:, :new])


def _gather(x, index):
    """x (B, M, ...) and index (B, k) -> x[b, index[b, i], ...] as (B, k, ...)."""
    return torch.take_along_dim(x, index.view(*index.shape, *(1,) * (x.dim() - 2)), dim=1)


def _can_improve(improvable, sums, done_scores, filled, new: int, max_new: int, early_stopping, length_penalty):
    """(B, 1): whether the best running beam of a prompt might still beat its worst finished one
    (a prompt with a free place in its finished list always might). Once False it stays False.

    The best running beam's score can only fall as it grows, but dividing by length ** penalty can
    raise it: transformers estimates its best final score at today's length, or at the maximal
    length with early_stopping="never" and a positive penalty, and so does this."""
    length = max_new if early_stopping == "never" and length_penalty > 0.0 else new
    best_running = sums[:, :1] / (length ** length_penalty)  # the running beams are sorted, best first
    worst_done = torch.where(filled, torch.min(done_scores, dim=1, keepdim=True)[0], EXCLUDED)
    return improvable & torch.any(best_running > worst_done, dim=-1, keepdim=True)
