"""generate()'s logits settings (llava_next/logits_process.py) against transformers' own processor
and warper classes, one setting at a time on random logits, then together through generate()."""

import pytest
import torch

from llava_next.logits_process import LogitsProcessing
from tiny import hf_and_ours, prompt_ids

INF = float("inf")
V = 12
# rows with repeats, so that multi-token sequences match somewhere; the last row is shortest-lived
IDS = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2], [5, 5, 5, 5, 5, 5, 5, 5], [0, 4, 9, 4, 9, 11, 4, 9]])


def transformers_processor(name, value, keep):
    from transformers.generation import logits_process as lp

    return {
        "sequence_bias": lambda: lp.SequenceBiasLogitsProcessor(value),
        "bad_words_ids": lambda: lp.NoBadWordsLogitsProcessor(value, eos_token_id=[2]),
        "suppress_tokens": lambda: lp.SuppressTokensLogitsProcessor(value),
        "begin_suppress_tokens": lambda: lp.SuppressTokensAtBeginLogitsProcessor(value, begin_index=8),
        "forced_eos_token_id": lambda: lp.ForcedEOSTokenLogitsProcessor(9, value),
        "typical_p": lambda: lp.TypicalLogitsWarper(value, min_tokens_to_keep=keep),
        "top_h": lambda: lp.TopHLogitsWarper(value),
        "epsilon_cutoff": lambda: lp.EpsilonLogitsWarper(value, min_tokens_to_keep=keep),
        "eta_cutoff": lambda: lp.EtaLogitsWarper(value, min_tokens_to_keep=keep),
    }[name]()


WARPERS = [("typical_p", 0.5), ("typical_p", 0.95), ("epsilon_cutoff", 0.05), ("eta_cutoff", 0.02), ("top_h", 0.4),
           ("top_h", 0.9)]
CASES = [
    ("sequence_bias", {(3,): -2.0, (2, 3): 4.0, (5, 5, 7): 1.5, (9, 4): -1.0, (4, 9, 11): 0.5}, 1),
    ("sequence_bias", [[[2, 1], 3.0], [[7], 10.0]], 1),  # transformers' list form
    ("bad_words_ids", [[2], [3], [2, 3, 1], [5, 5, 6], [4, 9, 8], [10, 11]], 1),  # [2] is the eos: stays allowed
    ("suppress_tokens", [0, 7, 11], 1),
    ("begin_suppress_tokens", [1, 4], 1),
    ("forced_eos_token_id", [6, 8], 1),
] + [(name, value, keep) for name, value in WARPERS for keep in (1, 3)]  # 3: beam sampling's min_tokens_to_keep


@pytest.mark.parametrize("name, value, keep", CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_each_setting_as_transformers(name, value, keep):
    """Bit for bit, on logits spread wide enough that the cutoffs remove some tokens and keep
    others; the sampling warpers also with min_tokens_to_keep 3."""
    warper = (name, value) in WARPERS
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=g) * 3
    ours = LogitsProcessing(do_sample=warper, eos_token_id=[2], prompt_length=8, max_length=9,
                            min_tokens_to_keep=keep, **{name: value})
    want = transformers_processor(name, value, keep)(IDS, logits.clone())
    got = ours(IDS, logits)
    assert torch.equal(got, want)
    assert not torch.equal(got, logits)  # the setting acted on these inputs
    if name in ("sequence_bias", "bad_words_ids"):  # rows shorter than some sequences' prefixes
        assert torch.equal(ours(IDS[:, :1], logits), transformers_processor(name, value, keep)(IDS[:, :1], logits))
    if name in ("begin_suppress_tokens", "forced_eos_token_id"):  # only at their step: not one token later
        longer = torch.cat([IDS, IDS[:, :1]], 1)
        assert torch.equal(ours(longer, logits), logits)


def test_sequence_bias_ids_past_the_vocabulary_and_bad_arguments():
    with pytest.raises(ValueError, match="vocabulary has 12 ids, so these cannot occur: \\[12\\]"):
        LogitsProcessing(sequence_bias={(3, 12): 1.0})(IDS, torch.zeros(3, V))
    with pytest.raises(ValueError, match="bad_words_ids must be a non-empty list of non-empty lists"):
        LogitsProcessing(bad_words_ids=[3, 4])
    for bad, message in ((dict(top_k=-1), "top_k must be"), (dict(do_sample=True, temperature=0.0), "temperature"),
                         (dict(top_p=1.5), "top_p must be in"), (dict(min_p=2.0), "min_p must be in"),
                         (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
                         (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be"),
                         (dict(typical_p=0.0), "typical_p must be in"), (dict(top_h=0.0), "top_h must be in")):
        with pytest.raises(ValueError, match=message):
            LogitsProcessing(**bad)
    with pytest.raises(ValueError, match="eta_cutoff must be in"):
        LogitsProcessing(eta_cutoff=1.0)
    with pytest.raises(ValueError, match="suppress_tokens must be a token id or a list"):
        LogitsProcessing(suppress_tokens=[-1])
    with pytest.raises(ValueError, match=r"`forced_eos_token_id` \(\[7\]\) is also in `suppress_tokens`"):
        LogitsProcessing(forced_eos_token_id=7, suppress_tokens=[7, 8])
    import numpy as np  # numpy ids are ids

    process = LogitsProcessing(bad_words_ids=[[np.int64(3)]], forced_eos_token_id=np.int64(4), max_length=10)
    assert torch.isinf(process(IDS, torch.zeros(3, V))[:, 3]).all()  # the bad word
    assert (process(torch.cat([IDS, IDS[:, :1]], 1), torch.zeros(3, V)).argmax(-1) == 4).all()  # the forced eos


def test_forced_bos_invalid_values_and_length_decay_as_transformers():
    """forced_bos_token_id (only after a one-token prompt, where begin_suppress_tokens then starts
    a token later), remove_invalid_values and exponential_decay_length_penalty (negative and
    infinite eos scores included) bit for bit against transformers' processors, and not before
    their step."""
    from transformers.generation import logits_process as lp

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=g) * 3
    logits[0, 2], logits[1, 5], logits[2, 2] = -4.0, -INF, INF
    # the length penalty: from the 3rd new token on (prompt 3, so ids longer than 5) the eos scores grow
    ours = LogitsProcessing(eos_token_id=[2, 5], prompt_length=3, exponential_decay_length_penalty=(2, 1.5))
    want = lp.ExponentialDecayLengthPenalty((2, 1.5), [2, 5], 3)
    for t in (5, 6, 8):
        assert torch.equal(ours(IDS[:, :t], logits), want(IDS[:, :t], logits.clone()))
    assert torch.equal(ours(IDS[:, :5], logits), logits) and not torch.equal(ours(IDS, logits), logits)
    # invalid values
    bad = logits.clone()
    bad[0, 0], bad[1, 1] = float("nan"), -INF
    got = LogitsProcessing(remove_invalid_values=True)(IDS, bad)
    assert torch.equal(got, lp.InfNanRemoveLogitsProcessor()(IDS, bad.clone())) and torch.isfinite(got).all()
    # a forced bos after a one-token prompt; begin_suppress_tokens then acts at the second new token
    ours = LogitsProcessing(prompt_length=1, forced_bos_token_id=4, begin_suppress_tokens=[7])
    first = ours(IDS[:, :1], logits)
    assert torch.equal(first, lp.ForcedBOSTokenLogitsProcessor(4)(IDS[:, :1], logits.clone()))
    assert torch.equal(ours(IDS[:, :2], logits), lp.SuppressTokensAtBeginLogitsProcessor([7], 2)(IDS[:, :2], logits))
    assert torch.equal(LogitsProcessing(prompt_length=8, forced_bos_token_id=4)(IDS, logits), logits)
    # a float start, and no eos ids at all (generate passes them as a long tensor), run in transformers too
    for start, eos in ((1.5, [2]), (1, [])):
        ours = LogitsProcessing(eos_token_id=eos, prompt_length=3, exponential_decay_length_penalty=(start, 1.5))
        want = lp.ExponentialDecayLengthPenalty((start, 1.5), torch.tensor(eos, dtype=torch.long), 3)
        assert torch.equal(ours(IDS, logits), want(IDS, logits.clone()))
    with pytest.raises(ValueError, match="exponential_decay_length_penalty must be"):
        LogitsProcessing(eos_token_id=[2], exponential_decay_length_penalty=1.5)
    with pytest.raises(ValueError, match="forced_bos_token_id must be a token id"):
        LogitsProcessing(forced_bos_token_id=[1])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return hf_and_ours(tmp_path_factory.mktemp("mistral"), "mistral")


def test_a_bad_setting_fails_before_the_model_runs(pair, monkeypatch):
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[]], [5])
    monkeypatch.setattr(ours, "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match="top_p must be in"):
        ours.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=2.0)


def test_settings_together_in_generate_as_transformers(pair):
    """All of them at once through generate(), greedy and sampled and with beams, on a left-padded
    batch: each sits at transformers' place in the order. The ids come from the model's own free
    run, so that the settings meet tokens it would produce."""
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[], []], [5, 12])
    T = ids.shape[1]
    free = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])[:, T:].tolist()
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[free[1][5]],
                  sequence_bias={(free[0][2],): -3.0, (free[0][0], free[0][1]): -5.0},
                  bad_words_ids=[[free[1][1]], [free[0][3], free[0][4]]], suppress_tokens=[free[1][3]],
                  begin_suppress_tokens=[free[0][0]], forced_eos_token_id=free[1][0])
    for kw in (dict(do_sample=False), dict(num_beams=3, do_sample=False),
               dict(do_sample=True, temperature=0.3, top_h=0.95, top_k=0, typical_p=0.9, epsilon_cutoff=3e-5,
                    eta_cutoff=3e-4)):
        torch.manual_seed(1)
        want = hf.generate(**common, **kw)
        torch.manual_seed(1)
        got = ours.generate(**common, **kw)
        assert torch.equal(got, want), kw
        assert got[0, T] != free[0][0] and got[0, -1] == free[1][0], kw  # begin-suppressed; forced eos last


def test_length_decay_and_invalid_values_in_generate_as_transformers(pair):
    """exponential_decay_length_penalty ends the rows earlier than they would end, greedy and with
    beams, as in transformers; remove_invalid_values rides along."""
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[], []], [5, 12])
    T = ids.shape[1]
    free = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])[:, T:]
    eos = int(free[0, 10])  # a token the model picks late, which the penalty brings forward
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, remove_invalid_values=True,
                  exponential_decay_length_penalty=(1, 4.0))
    for kw in (dict(do_sample=False), dict(num_beams=2, do_sample=False)):
        want, got = hf.generate(**common, **kw), ours.generate(**common, **kw)
        assert torch.equal(got, want), kw
        undecayed = ours.generate(**{**common, "exponential_decay_length_penalty": None}, **kw)
        print(kw, "new tokens with the penalty:", got.shape[1] - T, "without:", undecayed.shape[1] - T)
        assert got.shape[1] < undecayed.shape[1]  # it acted


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(num_beams=3, num_return_sequences=2, do_sample=False),
                                dict(do_sample=True, num_return_sequences=2)], ids=["greedy", "beams", "sampled"])
def test_prefix_allowed_tokens_fn_as_transformers(pair, kw):
    """Each row may only continue with the ids a function of (prompt index, row's ids) allows; the
    prompt index counts prompts, not rows (beams and copies share theirs), as transformers."""
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[], []], [5, 12])
    T = ids.shape[1]
    calls = []

    def allowed(prompt, row):  # a growing menu of ids, different per prompt
        calls.append(prompt)
        return [100 + prompt, 200 + len(row) % 3, 300, 7 * len(row)]

    torch.manual_seed(2)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, prefix_allowed_tokens_fn=allowed, **kw)
    seen_by_hf, calls[:] = list(calls), []
    torch.manual_seed(2)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, prefix_allowed_tokens_fn=allowed, **kw)
    assert torch.equal(got, want) and calls == seen_by_hf
    for r, row in enumerate(got[:, T:].tolist()):
        prompt = r // kw.get("num_return_sequences", 1)
        assert all(tok in (100 + prompt, 200 + (T + i) % 3, 300, 7 * (T + i)) for i, tok in enumerate(row))
    with pytest.raises(ValueError, match="returned no ids for prompt 0"):
        ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, prefix_allowed_tokens_fn=lambda b, r: [])


def test_prefix_allowed_tokens_fn_forces_its_ids_when_all_are_banned():
    """transformers: when every row of a prompt has nothing allowed left (here the allowed id is a
    bad word), the allowed ids come back at score 0 so that the constraint holds."""
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor, PrefixConstrainedLogitsProcessor

    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    ids = torch.cat([IDS, IDS[:1]])
    fn = lambda prompt, row: [3] if prompt == 0 else [3, 4]  # noqa: E731
    want = NoBadWordsLogitsProcessor([[3]])(ids, logits.clone())
    want = PrefixConstrainedLogitsProcessor(fn, num_beams=2)(ids, want)
    got = LogitsProcessing(bad_words_ids=[[3]], prefix_allowed_tokens_fn=fn, rows_per_prompt=2)(ids, logits)
    assert torch.equal(got, want)
    assert (got[:2, 3] == 0).all() and torch.isinf(got[2:, 3]).all() and (got[2:, 4] == logits[2:, 4]).all()
