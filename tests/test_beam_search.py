"""Beam search (generate(num_beams > 1)) against transformers' generate, token for token, and the
KV cache reordering it rests on."""

import pytest
import torch

from llava_next import KVCache
from tiny import hf_and_ours, image_inputs, prompt_ids


@pytest.fixture(scope="module", params=["mistral", "vicuna"])
def pair(request, tmp_path_factory):
    return hf_and_ours(tmp_path_factory.mktemp(request.param), request.param)


def batch(config):
    """A left-padded batch of two prompts, one image each."""
    ids, mask = prompt_ids(config, [[(45, 80)], [(150, 40)]], [3, 9])
    pv, sizes = image_inputs(config, [(45, 80), (150, 40)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)


def eos_ids(ours, inputs):
    """Two ids the model picks early when it runs free (row 0's 3rd and row 1's 5th new token),
    so that beams end on them."""
    free = ours.generate(**inputs, max_new_tokens=6, eos_token_id=[])
    T = inputs["input_ids"].shape[1]
    return [int(free[0, T + 2]), int(free[1, T + 4])]


class EndsOnMultipleOf7:  # a stopping criterion of the caller's, as transformers calls one
    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] % 7 == 0


CASES = {
    "plain": dict(num_beams=3),
    "eos_return_3_of_4": dict(num_beams=4, eos=True, num_return_sequences=3),
    "early_stopping_negative_penalty": dict(num_beams=3, eos=True, early_stopping=True, length_penalty=-0.5),
    # one prompt's finished list fills before the other's: what may join a full one
    "early_stopping_penalty_2": dict(num_beams=2, eos=True, early_stopping=True, length_penalty=2.0),
    "never_stop_early_penalty_2_repetition": dict(num_beams=3, eos=True, early_stopping="never", length_penalty=2.0,
                                                  repetition_penalty=1.3),
    "beam_sampling": dict(num_beams=2, eos=True, do_sample=True, top_k=5, temperature=0.8, top_p=0.9),
    "min_new_tokens_renormalized": dict(num_beams=3, eos=True, min_new_tokens=6, renormalize_logits=True),
    "callers_criterion": dict(num_beams=3, criterion=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_beam_search_matches_transformers(pair, case):
    """Sequences equal transformers' (eos and filler ids included), sequences_scores, per-step
    scores and logits to 1e-5, beam_indices equal, and compute_transition_scores with them; on a
    left-padded batch of two images. Beam sampling draws with the same torch.multinomial call on
    the same global generator as transformers, so its tokens agree too."""
    hf, ours = pair
    inputs = batch(hf.config)
    kw = {k: v for k, v in case.items() if k not in ("eos", "criterion")}
    kw.update(max_new_tokens=9, return_dict_in_generate=True, output_scores=True, output_logits=True)
    if case.get("eos"):
        kw["eos_token_id"] = eos_ids(ours, inputs)
    if case.get("criterion"):
        from transformers import StoppingCriteria, StoppingCriteriaList
        kw["stopping_criteria"] = StoppingCriteriaList([type("Ends", (StoppingCriteria,),
                                                             {"__call__": EndsOnMultipleOf7.__call__})()])
    kw.setdefault("do_sample", False)
    torch.manual_seed(3)
    want = hf.generate(**inputs, **kw)
    torch.manual_seed(3)
    got = ours.generate(**inputs, **kw)
    n = kw.get("num_return_sequences", 1)
    assert got.sequences.shape[0] == 2 * n
    assert torch.equal(got.sequences, want.sequences)
    assert got.beam_indices.dtype == want.beam_indices.dtype and torch.equal(got.beam_indices, want.beam_indices)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5, atol=1e-5)
    assert len(got.scores) == len(want.scores) and got.scores[0].shape == (2 * kw["num_beams"], want.scores[0].shape[1])
    for name in ("scores", "logits"):
        for g, w in zip(getattr(got, name), getattr(want, name)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.compute_transition_scores(got.sequences, got.scores, got.beam_indices),
                               hf.compute_transition_scores(want.sequences, want.scores, want.beam_indices),
                               rtol=1e-5, atol=1e-5)
    if case.get("num_return_sequences"):  # this case returns beams that ended (on eos) before others
        assert (got.beam_indices == -1).any()
    plain = ours.generate(**inputs, **{**kw, "return_dict_in_generate": False})
    if not kw["do_sample"]:
        assert torch.equal(plain, got.sequences)


def test_beams_without_eos_ids_fill_with_minus_one_as_transformers(pair):
    """transformers fills after a finished beam with the pad id (eos when the pad id is 0) and,
    when no eos id is set at all, with -1. A caller's criterion ends every candidate of the first
    prompt (the first half of the rows it is shown) at 3 new tokens; the second prompt goes on."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    hf, ours = pair
    inputs = batch(hf.config)
    T = inputs["input_ids"].shape[1]

    class FirstPromptEndsAt3(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            first = torch.arange(input_ids.shape[0]) < input_ids.shape[0] // 2
            return first & (input_ids.shape[1] == T + 3)

    saved = hf.generation_config.eos_token_id, ours.generation_config.eos_token_id
    hf.generation_config.eos_token_id = ours.generation_config.eos_token_id = None
    try:
        kw = dict(num_beams=3, max_new_tokens=8, do_sample=False)
        want = hf.generate(**inputs, **kw, stopping_criteria=StoppingCriteriaList([FirstPromptEndsAt3()]))
        got = ours.generate(**inputs, **kw, stopping_criteria=[FirstPromptEndsAt3()])
    finally:
        hf.generation_config.eos_token_id, ours.generation_config.eos_token_id = saved
    assert torch.equal(got, want)
    assert got.shape[1] == T + 8 and (got[0, T + 3:] == -1).all() and (got[1, T:] >= 0).all()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_max_time_as_transformers(pair, num_beams):
    """max_time=0 ends every row after the first new token (greedy) or step (beams: the best
    beams so far finish), as transformers' MaxTimeCriteria; a long one changes nothing."""
    hf, ours = pair
    inputs = batch(hf.config)
    T = inputs["input_ids"].shape[1]
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams)
    got = ours.generate(**inputs, **kw, max_time=0.0)
    assert got.shape[1] == T + 1 and torch.equal(got, hf.generate(**inputs, **kw, max_time=0.0))
    assert torch.equal(ours.generate(**inputs, **kw, max_time=600.0), ours.generate(**inputs, **kw))


def test_beam_settings_from_the_generation_config(pair, recwarn):
    """num_beams, length_penalty and early_stopping in model.generation_config are used (and not
    warned about); a call's value wins over them."""
    hf, ours = pair
    inputs = batch(hf.config)
    call = ours.generate(**inputs, max_new_tokens=5, num_beams=3, length_penalty=0.5)
    saved = ours.generation_config.to_dict()
    ours.generation_config.update(num_beams=3, length_penalty=0.5)
    try:
        from_config = ours.generate(**inputs, max_new_tokens=5)
        greedy = ours.generate(**inputs, max_new_tokens=5, num_beams=1)
    finally:
        ours.generation_config = type(ours.generation_config)(**saved)
    assert torch.equal(from_config, call)
    assert torch.equal(greedy, ours.generate(**inputs, max_new_tokens=5))
    assert not [w for w in recwarn if "does not implement" in str(w.message)]


def test_beam_search_errors(pair):
    hf, ours = pair
    inputs = batch(hf.config)
    with pytest.raises(ValueError, match=r"`num_return_sequences` \(4\) has to be smaller or equal to `num_beams`"):
        ours.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=4)
    with pytest.raises(ValueError, match="`early_stopping` must be a boolean or 'never'"):
        ours.generate(**inputs, max_new_tokens=3, num_beams=3, early_stopping="always")
    with pytest.raises(ValueError, match="num_beams must be an int >= 1"):
        ours.generate(**inputs, max_new_tokens=3, num_beams=0)
    with pytest.raises(ValueError, match="`streamer` cannot be used with beam search"):
        ours.generate(**{k: v[:1] for k, v in inputs.items()}, max_new_tokens=3, num_beams=2,
                      streamer=lambda *a: None)


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 1.0, 2.0])
def test_can_improve_is_transformers_heuristic(early_stopping, length_penalty):
    """When a prompt's search may stop, on random scores, as transformers' _check_early_stop_heuristic."""
    from transformers.generation.utils import GenerationMixin

    from llava_next.beam_search import _can_improve

    g = torch.Generator().manual_seed(0)
    outcomes = []
    for new in (1, 4, 9):
        scores = -torch.rand(8, 3, generator=g).sort(dim=1).values * 30  # running beams, best first
        done_scores = -torch.rand(8, 3, generator=g) * 3
        done = torch.rand(8, 3, generator=g) < 0.8
        improvable = torch.rand(8, 1, generator=g) < 0.9
        want = GenerationMixin._check_early_stop_heuristic(
            improvable, scores, done_scores, done, cur_len=20 + new, max_length=30, decoder_prompt_len=20,
            early_stopping=early_stopping, length_penalty=length_penalty)
        got = _can_improve(improvable, scores, done_scores, done, new, 10, early_stopping, length_penalty)
        assert torch.equal(got, want)
        outcomes += want.flatten().tolist()
    assert len(set(outcomes)) == 2  # both occur


def toy_logits(rows, V):
    """A stand-in model: each row's next-token logits are a function of its whole sequence so far
    (random, from a seed made of it), so any implementation that tracks the sequences right sees
    the same ones. Small vocabularies make ties in the sums, eos hits and early ends frequent."""
    out = []
    for row in rows.tolist():
        g = torch.Generator().manual_seed(hash(tuple(row)) % (2 ** 31))
        out.append(torch.randn(V, generator=g) * 2)
    return torch.stack(out)


def transformers_beam_search(prompt, V, nb, max_new, eos, length_penalty, early_stopping, do_sample):
    """transformers 5.24's _beam_search loop, step for step, assembled from its own helpers, over
    toy_logits instead of a model (no logits processors, no cache). Also returns how many steps ran."""
    from transformers.generation.utils import GenerationMixin

    h = type("Helpers", (GenerationMixin,), {})()
    B, T = prompt.shape[0] // nb, prompt.shape[1]
    L, cur_len = T + max_new, T
    K = max(2, 1 + len(eos)) * nb
    top_nb = torch.arange(K) < nb
    eos_t = torch.tensor(eos, dtype=torch.long)
    running = torch.full((B, nb, L), -1, dtype=torch.long)
    running[:, :, :T] = prompt.view(B, nb, T)
    sequences = running.clone()
    running_scores = torch.zeros(B, nb)
    running_scores[:, 1:] = -1e9
    beam_scores = torch.full((B, nb), -1e9)
    finished = torch.zeros(B, nb, dtype=torch.bool)
    unsatisfied = torch.ones(B, 1, dtype=torch.bool)
    running_idx = torch.full((B, nb, max_new), -1, dtype=torch.int32)
    beam_idx = running_idx.clone()
    steps = 0
    while True:
        steps += 1
        log_probs = torch.log_softmax(toy_logits(running[:, :, :cur_len].reshape(B * nb, cur_len), V), -1)
        log_probs = (log_probs.view(B, nb, V) + running_scores[:, :, None]).reshape(B, -1)
        topk_lp, topk_seq, topk_idx = h._get_top_k_continuations(
            log_probs, running, running_idx, cur_len, T, do_sample, K, nb, B)
        hits = torch.isin(topk_seq[:, :, cur_len], eos_t) | (cur_len + 1 >= L)
        running, running_scores, running_idx = h._get_running_beams_for_next_iteration(
            topk_lp, topk_seq, topk_idx, hits, nb)
        sequences, beam_scores, beam_idx, finished = h._update_finished_beams(
            sequences, topk_seq, beam_scores, topk_lp, beam_idx, topk_idx, unsatisfied, finished, hits, top_nb,
            nb, cur_len, T, length_penalty, early_stopping)
        cur_len += 1
        unsatisfied = h._check_early_stop_heuristic(unsatisfied, running_scores, beam_scores, finished, cur_len, L, T,
                                                    early_stopping, length_penalty)
        if not h._beam_search_has_unfinished_sequences(unsatisfied, finished, hits, early_stopping):
            break
    return sequences.reshape(B * nb, L), beam_scores.reshape(-1), beam_idx.reshape(B * nb, max_new), steps


class ToyCache:
    """What beam_search asks of a KVCache, over the rows' token histories: reorder copies rows'
    histories in [start, length), as KVCache.reorder copies their keys and values."""

    def __init__(self, prompt):
        self.rows = prompt.clone()

    def reorder(self, rows, length, start=0):
        assert length == self.rows.shape[1]  # every written position, no more
        self.rows[:, start:length] = self.rows[rows, start:length]


def test_beam_search_steps_as_transformers_on_a_toy_model():
    """Our beam_search against transformers' loop (its own helper functions) on a stand-in model
    whose logits depend on each row's history, over 300 random settings: batch 1-3, 2-4 beams,
    vocabularies of 4-9 tokens with 0-2 eos ids, every early_stopping value, length penalties
    -1..2, a third of them sampled. The stand-in reads the histories our KV cache rows would hold (ToyCache), so a wrong
    reorder shows too."""
    from llava_next.beam_search import beam_search

    rng = torch.Generator().manual_seed(0)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=rng))]
    for case in range(300):
        B, nb, V = pick([1, 2, 3]), pick([2, 3, 4]), pick(list(range(4, 10)))
        T, max_new = pick([1, 3]), pick([1, 2, 4, 7])
        eos = torch.randperm(V, generator=rng)[:pick([0, 1, 1, 2])].tolist()
        length_penalty, early_stopping = pick([-1.0, 0.0, 1.0, 2.0]), pick([False, True, "never"])
        do_sample = pick([False, False, True])  # beam sampling: both draw from the global generator
        prompt = torch.randint(V, (B, T), generator=rng).repeat_interleave(nb, 0)
        cache = ToyCache(prompt)

        def advance(tokens):
            cache.rows = torch.cat([cache.rows, tokens[:, None]], 1)
            return toy_logits(cache.rows, V)

        def process(ids, log_probs):
            assert torch.equal(ids, cache.rows)  # the cache holds each running beam's own history
            return log_probs

        torch.manual_seed(case)
        got = beam_search(toy_logits(prompt, V), advance, cache, prompt, num_beams=nb, max_new_tokens=max_new,
                          process=process, do_sample=do_sample, generator=None, eos=eos, fill=-1,
                          length_penalty=length_penalty, early_stopping=early_stopping, criteria=[],
                          keep_scores=False, keep_logits=False, num_return_sequences=nb)
        torch.manual_seed(case)
        seqs, scores, indices, steps = transformers_beam_search(prompt, V, nb, max_new, eos, length_penalty,
                                                                early_stopping, do_sample)
        new = got[4].shape[1]
        where = f"case {case}: B={B} nb={nb} V={V} eos={eos} lp={length_penalty} es={early_stopping} {do_sample=}"
        assert torch.equal(got[0], seqs[:, :T + new]), where
        assert torch.equal(got[1], scores), where
        assert torch.equal(got[4], indices[:, :new]) and (indices[:, new:] == -1).all(), where
        assert cache.rows.shape[1] == T + steps - 1, where  # stopped at the same step (one decode fewer)


@pytest.mark.parametrize("start", [0, 2])
def test_kv_cache_reorder(start):
    """Row i takes row rows[i]'s keys, values and mask in [start, length); rows may repeat; other
    positions (the prompt before start, unwritten ones, a graph's scratch slot) stay as they were."""
    cache = KVCache(num_layers=2, batch_size=3, max_length=6, num_kv_heads=2, head_dim=4)
    cache.k.normal_()
    cache.v.normal_()
    cache.kv_mask[:, :4] = True
    cache.kv_mask[1, 2] = False
    k, v, mask = cache.k.clone(), cache.v.clone(), cache.kv_mask.clone()
    rows = torch.tensor([1, 1, 0])
    cache.reorder(rows, 4, start=start)
    for got, was in ((cache.k, k), (cache.v, v)):
        assert torch.equal(got[:, :, :, start:4], was[:, rows, :, start:4])
        assert torch.equal(got[:, :, :, :start], was[:, :, :, :start])
        assert torch.equal(got[:, :, :, 4:], was[:, :, :, 4:])
    assert torch.equal(cache.kv_mask[:, start:4], mask[rows, start:4])
    assert torch.equal(cache.kv_mask[:, :start], mask[:, :start]) and torch.equal(cache.kv_mask[:, 4:], mask[:, 4:])
