"""Greedy generation token for token against transformers' generate; sampling and stopping rules."""

import warnings

import pytest
import torch

from llava_next import KVCache, LlavaNextForConditionalGeneration
from llava_next.logits_process import LogitsProcessing
from tiny import SMALL, hf_and_ours, hf_checkpoint, hf_config, image_inputs, prompt_ids


def process_logits(logits, ids, unseen=None, **settings):
    """One step of generate()'s logits processing; `unseen`: the left padding in ids' columns."""
    return LogitsProcessing(padding=unseen, **settings)(ids, logits)


def both_generate(hf, ours, image_sizes_per_row, text_lens, **kw):
    ids, mask = prompt_ids(hf.config, image_sizes_per_row, text_lens)
    flat = [s for row in image_sizes_per_row for s in row]
    inputs = dict(input_ids=ids, attention_mask=mask)
    if flat:
        pv, sizes = image_inputs(hf.config, flat)
        inputs.update(pixel_values=pv, image_sizes=sizes)
    want = hf.generate(**inputs, do_sample=False, **kw)
    got = ours.generate(**inputs, **kw)
    return want, got, ids.shape[1]


@pytest.fixture(scope="module", params=["mistral", "vicuna"])
def pair(request, tmp_path_factory):
    return hf_and_ours(tmp_path_factory.mktemp(request.param), request.param)


def test_greedy_single_prompt(pair):
    want, got, _ = both_generate(*pair, [[(45, 80)]], [6], max_new_tokens=24)
    assert torch.equal(got, want)


def test_greedy_left_padded_batch_of_two_images(pair):
    want, got, T = both_generate(*pair, [[(45, 80)], [(150, 40)]], [3, 9], max_new_tokens=24)
    assert torch.equal(got, want)


def test_greedy_text_only(pair):
    want, got, _ = both_generate(*pair, [[], []], [5, 12], max_new_tokens=16)
    assert torch.equal(got, want)


def test_left_padded_row_equals_row_alone(pair):
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[(45, 80)], [(150, 40)]], [3, 9])
    pv, sizes = image_inputs(hf.config, [(45, 80), (150, 40)])
    batch = ours.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes,
                          max_new_tokens=12)
    real = mask[0].bool()
    alone = ours.generate(input_ids=ids[:1, real], pixel_values=pv[:1, :3], image_sizes=sizes[:1], max_new_tokens=12)
    assert torch.equal(batch[0, ids.shape[1]:], alone[0, real.sum():])


def test_repetition_penalty_matches_transformers(pair):
    want, got, _ = both_generate(*pair, [[(45, 80)]], [6], max_new_tokens=16, repetition_penalty=1.3)
    assert torch.equal(got, want)


def test_eos_stops_each_row_and_pads_it(pair):
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[], []], [5, 12])
    free = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    T = ids.shape[1]
    eos = int(free[0, T + 2])  # make row 0's third new token its eos
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=5)
    assert out[0, T + 2] == eos and (out[0, T + 3:] == 5).all()
    row1 = free[1, T:]
    stop = (row1 == eos).nonzero()
    end = int(stop[0]) + 1 if len(stop) else 10
    assert torch.equal(out[1, T:T + end], row1[:end])
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                       pad_token_id=5)
    assert torch.equal(out, want)


def test_sampling_is_reproducible_with_a_seed(pair):
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[], []], [5, 12])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=0.9, top_k=40,
              top_p=0.9, eos_token_id=[])
    torch.manual_seed(123)
    a = ours.generate(**kw)
    torch.manual_seed(123)
    b = ours.generate(**kw)
    torch.manual_seed(7)
    c = ours.generate(**kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("top_k, top_p, keep", [(10, 0.8, 1), (1, 1.0, 3), (0, 0.05, 3)])
def test_sampling_warpers_match_transformers(top_k, top_p, keep):
    """`keep`: min_tokens_to_keep, which beam sampling raises to one more than the eos ids."""
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    seen = torch.randint(0, 50, (3, 7))
    want = logits.clone()
    procs = [RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7)]
    procs += [TopKLogitsWarper(top_k, min_tokens_to_keep=keep)] if top_k else []
    procs += [TopPLogitsWarper(top_p, min_tokens_to_keep=keep)] if top_p < 1 else []
    for proc in procs:
        want = proc(seen, want)
    got = process_logits(logits, seen, do_sample=True, temperature=0.7, top_k=top_k, top_p=top_p,
                         repetition_penalty=1.2, min_tokens_to_keep=keep)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert (~torch.isinf(got)).sum(-1).min() >= keep
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_no_repeat_ngram_and_min_p_match_transformers_processors():
    """Against transformers' NoRepeatNGramLogitsProcessor and MinPLogitsWarper on rows with
    repeats, for n = 1, 2, 3 and a row shorter than n; min_p with min_tokens_to_keep."""
    from transformers.generation.logits_process import MinPLogitsWarper, NoRepeatNGramLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=g) * 3
    seen = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2], [5, 5, 5, 5, 5, 5, 5, 5], [0, 4, 9, 4, 9, 11, 4, 9]])
    off = dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    for n in (1, 2, 3):
        for ids in (seen, seen[:, :2]):
            want = NoRepeatNGramLogitsProcessor(n)(ids, logits.clone())
            got = process_logits(logits, ids, no_repeat_ngram_size=n, **off)
            assert torch.equal(got, want), (n, ids.shape)
    # banned: 3 after 2, 5 after 5, 4 and 11 after 9
    assert torch.isinf(process_logits(logits, seen, no_repeat_ngram_size=2, **off)).sum() == 4
    for min_p, keep in ((0.1, 1), (0.5, 1), (0.99, 3)):
        want = MinPLogitsWarper(min_p, min_tokens_to_keep=keep)(seen, logits.clone())
        got = process_logits(logits, seen, **{**off, "do_sample": True}, min_p=min_p, min_tokens_to_keep=keep)
        assert torch.equal(got, want)
        assert (~torch.isinf(got)).sum(-1).min() >= keep


@pytest.mark.parametrize("kw", [dict(no_repeat_ngram_size=2, do_sample=False),
                                dict(no_repeat_ngram_size=1, num_beams=3, do_sample=False),
                                dict(min_p=0.2, do_sample=True, top_k=0, temperature=0.05)],
                         ids=["ngram", "ngram_beams", "min_p"])
def test_no_repeat_ngram_and_min_p_generate_as_transformers(pair, kw):
    """As transformers, n-grams count the prompt and its left padding too: row 0's padding is made
    to hold (its last prompt token, the first token of its answer without the setting), an n-gram
    (n <= 2) the setting then forbids to repeat; padding is masked, so nothing else changes."""
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[], []], [5, 12])
    T, pad = ids.shape[1], int((mask[0] == 0).sum())
    free = {**kw, "no_repeat_ngram_size": 0}
    ids[0, pad - 2:pad] = torch.stack([ids[0, -1], ours.generate(input_ids=ids, attention_mask=mask,
                                                                  max_new_tokens=12, **free)[0, T]])
    torch.manual_seed(4)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, **kw)
    torch.manual_seed(4)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, **kw)
    assert torch.equal(got, want)
    off = {**kw, "min_p": None} if "min_p" in kw else free
    torch.manual_seed(4)  # the setting acted: the same call (and draws) without it differs
    assert not torch.equal(got, ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, **off))


def test_repetition_penalty_skips_left_padding_as_transformers(pair):
    """transformers skips each row's left padding when it penalises repeats (prompt_ignore_length):
    with pad id == eos id (the tokenizer.pad_token = eos idiom) a padded row would otherwise have
    its eos penalised. The processed scores, then greedy tokens with that setup, equal transformers'."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[(45, 80)], [(150, 40)]], [3, 12], pad_id=0)
    padded = int((mask[:, 0] == 0).nonzero()[0])
    torch.manual_seed(0)
    logits = torch.randn(2, hf.config.text_config.vocab_size)
    first_real = (mask != 0).int().argmax(1)
    want = RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=first_real)(ids, logits.clone())
    unseen = torch.arange(ids.shape[1])[None, :] < first_real[:, None]
    got = process_logits(logits, ids, unseen=unseen, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
                         repetition_penalty=1.3)
    assert torch.equal(got, want)
    assert not torch.equal(process_logits(logits, ids, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
                                          repetition_penalty=1.3)[padded], want[padded])  # the pad id, 0
    # end to end: the padded row's pad id is its eos, a token it produces
    pv, sizes = image_inputs(hf.config, [(45, 80), (150, 40)])
    T = ids.shape[1]
    kw = dict(attention_mask=mask, pixel_values=pv, image_sizes=sizes, max_new_tokens=8, repetition_penalty=1.3)
    free = hf.generate(input_ids=ids, **kw, do_sample=False, eos_token_id=[5], pad_token_id=0)[padded, T:].tolist()
    eos = next(t for i, t in enumerate(free[1:], 1) if t not in free[:i] and t not in ids[padded].tolist())
    ids_e = ids.masked_fill(mask == 0, eos)
    want = hf.generate(input_ids=ids_e, **kw, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    got = ours.generate(input_ids=ids_e, **kw, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(got, want)


def assert_scores_close(got, want):
    """Tuples of (B, vocab) scores: -inf at the same places, the rest to 1e-4."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32 and torch.equal(torch.isinf(g), torch.isinf(w))
        torch.testing.assert_close(g[~torch.isinf(g)], w[~torch.isinf(w)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampling", [dict(do_sample=False, repetition_penalty=1.3),
                                      dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_dict_output_scores_and_logits_match_transformers(pair, sampling):
    """return_dict_in_generate with output_scores / output_logits: transformers' fields, one fp32
    (B, vocab) tensor per new token, the processed scores (-inf where a warper removed a token) and
    the raw logits, on a left-padded batch of two images. Sampling draws with the same
    torch.multinomial call on the same global generator, so the tokens agree too."""
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[(45, 80)], [(150, 40)]], [3, 9])
    pv, sizes = image_inputs(hf.config, [(45, 80), (150, 40)])
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes, max_new_tokens=8,
              eos_token_id=[], return_dict_in_generate=True, output_scores=True, output_logits=True, **sampling)
    torch.manual_seed(5)
    want = hf.generate(**kw)
    torch.manual_seed(5)
    got = ours.generate(**kw)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == 8 and got.scores[0].shape == (2, hf.config.text_config.vocab_size)
    assert_scores_close(got.scores, want.scores)
    assert_scores_close(got.logits, want.logits)
    if sampling["do_sample"]:
        assert torch.isinf(got.scores[0]).any()  # the warpers acted
    else:
        assert not torch.equal(got.scores[1], got.logits[1])  # the penalty acted
    # read like transformers' ModelOutput
    assert got.keys() == ["sequences", "scores", "logits", "cache"] and got[0] is got.sequences
    assert got["scores"] is got.scores and "attentions" not in got and got.hidden_states is None
    assert isinstance(got.cache, KVCache) and got.cache.batch_size == 2
    plain = ours.generate(**{**kw, "return_dict_in_generate": False}) if not sampling["do_sample"] else None
    if plain is not None:
        assert torch.equal(plain, got.sequences)
    for normalize in (False, True):  # the chosen tokens' scores (log-probabilities), as transformers' method
        assert_scores_close(ours.compute_transition_scores(got.sequences, got.scores, normalize_logits=normalize),
                            hf.compute_transition_scores(want.sequences, want.scores, normalize_logits=normalize))
    only = ours.generate(**{**kw, "output_scores": False, "output_logits": False})
    assert only.scores is None and only.logits is None and only.keys() == ["sequences", "cache"]


def test_min_new_tokens_and_min_length_as_transformers(pair):
    """eos scores -inf until min_new_tokens new tokens (min_length: counting the prompt), as
    transformers' MinNewTokensLength / MinLength processors; the tokens equal transformers'."""
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[(45, 80)], []], [3, 9])
    pv, sizes = image_inputs(hf.config, [(45, 80)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes, max_new_tokens=10)
    T = ids.shape[1]
    free = ours.generate(**inputs, eos_token_id=[])
    eos = int(free[0, T + 1])  # row 0's second new token
    stopped = ours.generate(**inputs, eos_token_id=eos)
    assert int(stopped[0, T + 1]) == eos and (stopped[0, T + 2:] != eos).all()  # stopped there, then padded
    for kw in (dict(min_new_tokens=4), dict(min_length=T + 5), dict(min_new_tokens=2, min_length=T + 6)):
        want = hf.generate(**inputs, **kw, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        got = ours.generate(**inputs, **kw, eos_token_id=eos, pad_token_id=eos)
        assert torch.equal(got, want), kw
        first = kw.get("min_new_tokens", kw.get("min_length", 0) - T)  # min_new_tokens wins, as there
        assert (got[:, T:T + first] != eos).all(), kw
    with pytest.raises(ValueError, match="min_new_tokens"):
        ours.generate(**inputs, min_new_tokens=-1)
    V = hf.config.text_config.vocab_size  # an eos id past the vocabulary is no score to ban, as there
    kw = dict(min_new_tokens=3, eos_token_id=[eos, V + 5], pad_token_id=eos)
    assert torch.equal(ours.generate(**inputs, **kw), hf.generate(**inputs, **kw, do_sample=False))


def test_num_return_sequences(pair):
    """n continuations a prompt, rows b * n ... b * n + n - 1 for prompt b, as transformers
    (greedy refuses it, with transformers' message). Sampling from the top token only (top_k=1)
    is deterministic: every copy equals greedy's row, and the batch equals transformers', a
    prompt with two images included (here the prompt is prefilled once and its cache copied)."""
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[(45, 80)], [(150, 40)]], [3, 9])
    pv, sizes = image_inputs(hf.config, [(45, 80), (150, 40)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes, max_new_tokens=8,
                  eos_token_id=[])
    with pytest.raises(ValueError, match="Greedy methods .* `num_return_sequences` different than 1"):
        ours.generate(**inputs, num_return_sequences=2)
    greedy = ours.generate(**inputs)
    got = ours.generate(**inputs, do_sample=True, top_k=1, num_return_sequences=3)
    assert torch.equal(got, greedy.repeat_interleave(3, 0))
    assert torch.equal(got, hf.generate(**inputs, do_sample=True, top_k=1, num_return_sequences=3))

    ids2, mask2 = prompt_ids(hf.config, [[(45, 80), (150, 40)], []], [3, 9])
    two = dict(input_ids=ids2, attention_mask=mask2, pixel_values=pv, image_sizes=sizes, max_new_tokens=6,
               eos_token_id=[])
    got = ours.generate(**two, do_sample=True, top_k=1, num_return_sequences=2)
    assert torch.equal(got, ours.generate(**two).repeat_interleave(2, 0))
    assert torch.equal(got, hf.generate(**two, do_sample=True, top_k=1, num_return_sequences=2))

    torch.manual_seed(0)
    out = ours.generate(**inputs, do_sample=True, temperature=5.0, top_k=0, num_return_sequences=2,
                        return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == (4, ids.shape[1] + 8) and out.scores[0].shape[0] == 4
    assert torch.equal(out.sequences[:, :ids.shape[1]], ids.repeat_interleave(2, 0))
    assert not torch.equal(out.sequences[0], out.sequences[1])  # two draws from one prompt
    torch.testing.assert_close(out.scores[0][0], out.scores[0][1])  # from the same first logits


class BiasThirds:
    """A caller's logits processor that writes in place, as many do: +2 on ids divisible by 3."""

    def __call__(self, input_ids, scores):
        scores[:, ::3] += 2.0
        return scores


class StopRows:
    """A caller's stopping criterion: row b is done after 3 * b + 3 new tokens."""

    def __init__(self, prompt_length):
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        new = input_ids.shape[1] - self.prompt_length
        return torch.arange(input_ids.shape[0]) * 3 + 3 <= new


@pytest.mark.parametrize("eos", ["config", "empty", "unset"])
def test_logits_processor_and_stopping_criteria_as_transformers(pair, eos):
    """A caller's logits_processor runs after the penalty, before the warpers; a stopping
    criterion finishes rows. Finished rows get the pad id when an eos id is set (an empty list
    too) and go on generating when none is, as in transformers, whose LogitsProcessorList /
    StoppingCriteriaList work here as well."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[(45, 80)], [(150, 40)]], [3, 9])
    pv, sizes = image_inputs(hf.config, [(45, 80), (150, 40)])
    T = ids.shape[1]
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes, max_new_tokens=10,
              repetition_penalty=1.2, return_dict_in_generate=True, output_scores=True, output_logits=True,
              pad_token_id=7)
    if eos == "empty":
        kw["eos_token_id"] = []
    configs = (ours.generation_config, hf.generation_config)
    saved = [c.eos_token_id for c in configs]
    try:
        if eos == "unset":
            for c in configs:
                c.eos_token_id = None
        for extra in (dict(do_sample=False), dict(do_sample=True, top_k=1)):
            want = hf.generate(**kw, **extra, logits_processor=LogitsProcessorList([BiasThirds()]),
                               stopping_criteria=StoppingCriteriaList([StopRows(T)]))
            got = ours.generate(**kw, **extra, logits_processor=BiasThirds(), stopping_criteria=[StopRows(T)])
            assert torch.equal(got.sequences, want.sequences), extra
            assert_scores_close(got.scores, want.scores)
            assert_scores_close(got.logits, want.logits)  # the raw logits, untouched by the in-place processor
    finally:
        for c, value in zip(configs, saved):
            c.eos_token_id = value
    assert not torch.equal(got.scores[0], got.logits[0])  # the processor acted
    new = got.sequences[:, T:]
    assert new.shape[1] == 6  # row 1 stopped after 6 new tokens, row 0 after 3, then:
    assert (new[0, 3:] == 7).all() if eos != "unset" else (new[0, 3:] != 7).all()
    with pytest.raises(TypeError, match="stopping_criteria must be a callable"):
        ours.generate(input_ids=ids, stopping_criteria=[3])
    seen = []  # what a criterion gets as scores: the kept tuple only for the output object, as there
    for dict_out in (True, False):
        ours.generate(input_ids=torch.ones(2, 3, dtype=torch.long), max_new_tokens=2, output_scores=True,
                      return_dict_in_generate=dict_out,
                      stopping_criteria=lambda ids, scores: seen.append(scores) or torch.zeros(2, dtype=torch.bool))
    assert [type(x) for x in seen] == [tuple, tuple, type(None), type(None)] and len(seen[1]) == 2
    logits = torch.randn(2, 30)  # a processor writing in place never reaches the logits given
    before = logits.clone()
    got = process_logits(logits, ids, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                         processors=[BiasThirds()])
    assert torch.equal(logits, before) and torch.equal(got[:, ::3], before[:, ::3] + 2)


def test_a_callers_eos_criterion_pads_finished_rows_as_transformers(pair):
    """With no eos id set, a caller's criterion that has one (transformers' EosTokenCriteria) still
    makes finished rows emit the pad id, as there."""
    from transformers.generation.stopping_criteria import EosTokenCriteria

    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[], []], [5, 12])
    T = ids.shape[1]
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=7)
    configs = (ours.generation_config, hf.generation_config)
    saved = [c.eos_token_id for c in configs]
    try:
        for c in configs:
            c.eos_token_id = None
        eos = int(ours.generate(**kw)[0, T + 1])
        got = ours.generate(**kw, stopping_criteria=[EosTokenCriteria(eos)])
        want = hf.generate(**kw, do_sample=False, stopping_criteria=[EosTokenCriteria(eos)])
    finally:
        for c, value in zip(configs, saved):
            c.eos_token_id = value
    assert torch.equal(got, want) and (got[0, T + 2:] == 7).all()


def test_stop_strings_as_transformers(pair, tmp_path):
    """generate(stop_strings=..., tokenizer=...) stops a row once its text ends in a stop string,
    where transformers' generate stops it (the criterion itself is tested in test_tokenizer)."""
    from oracle_processor import oracle_decoder, write_checkpoint

    from llava_next import LlavaNextTokenizer

    hf, ours = pair
    folder = write_checkpoint(tmp_path, "mistral" if hf.config.text_config.model_type == "mistral" else "llama")
    tokenizer, theirs = LlavaNextTokenizer.from_pretrained(folder), oracle_decoder(folder)
    n_ids = len(tokenizer)

    def in_vocabulary(input_ids, scores):  # the model's spare rows have no text (and break transformers' criterion)
        scores[:, n_ids:] = float("-inf")
        return scores

    ids, mask = prompt_ids(hf.config, [[], []], [5, 12])
    T = ids.shape[1]
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    free = ours.generate(**kw, logits_processor=[in_vocabulary])
    stop = tokenizer.decode(free[0, T:T + 5])[-3:]  # row 0 stops at its fifth token, or sooner
    got = ours.generate(**kw, logits_processor=[in_vocabulary], stop_strings=[stop, "\u00a7\u00a7"], tokenizer=tokenizer)
    want = hf.generate(**kw, do_sample=False, logits_processor=[in_vocabulary], stop_strings=[stop, "\u00a7\u00a7"],
                       tokenizer=theirs)
    assert torch.equal(got, want)
    assert stop in tokenizer.decode(got[0, T:]) and (got[0, T + 5:] == 0).all()  # stopped, then padded
    with pytest.raises(ValueError, match="stop_strings .* need the tokenizer"):
        ours.generate(**kw, stop_strings=stop)


STEP_OUTPUT_MODES = {"greedy": dict(), "sampled_copies": dict(do_sample=True, top_k=1, num_return_sequences=2),
                     # an eos id that is never chosen: transformers' beams fail on eos_token_id=[] with pad id 0
                     "beams": dict(num_beams=2, eos_token_id=[32063])}


@pytest.mark.parametrize("mode", STEP_OUTPUT_MODES.values(), ids=STEP_OUTPUT_MODES.keys())
def test_generate_hidden_states_and_attentions_match_transformers(pair, mode):
    """output_hidden_states / output_attentions with return_dict_in_generate: one tuple per new
    token of every layer's hidden states / attention weights, the prompt's forward first, shapes
    and values as transformers' eager generate on a left-padded batch of two images: greedy, two
    sampled copies of each prompt (the prompt prefilled once, its outputs repeated) and beams."""
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[(45, 80)], [(150, 40)]], [3, 9])
    pv, sizes = image_inputs(hf.config, [(45, 80), (150, 40)])
    T, new = ids.shape[1], 4
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes, max_new_tokens=new,
              return_dict_in_generate=True, output_hidden_states=True, output_attentions=True, **mode)
    kw.setdefault("do_sample", False)
    kw.setdefault("eos_token_id", [])
    want, got = hf.generate(**kw), ours.generate(**kw)
    assert torch.equal(got.sequences, want.sequences)
    N = got.sequences.shape[0] * mode.get("num_beams", 1)
    layers = hf.config.text_config.num_hidden_layers
    assert len(got.hidden_states) == len(got.attentions) == len(want.attentions) == new
    steps = zip(got.hidden_states, want.hidden_states, got.attentions, want.attentions)
    for step, (gh, wh, ga, wa) in enumerate(steps):
        t = T if step == 0 else 1
        assert len(gh) == layers + 1 and len(ga) == layers
        assert gh[0].shape == (N, t, hf.config.text_config.hidden_size) and ga[0].shape == (N, 4, t, T + step)
        real = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], 1)[:, T + step - t:T + step]
        real = real.repeat_interleave(N // 2, 0).bool()
        for g, w in zip(gh, wh):
            torch.testing.assert_close(g[real], w[real], atol=1e-4, rtol=0)
        for g, w in zip(ga, wa):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    only = ours.generate(**{**kw, "output_attentions": False})
    assert only.attentions is None and len(only.hidden_states) == new and "attentions" not in only
    assert not hasattr(ours.generate(**{**kw, "return_dict_in_generate": False}), "hidden_states")  # as transformers


def test_generate_attentions_with_a_sliding_window_as_transformers(tmp_path):
    """With a sliding window, each decode step's weights cover the last `window` keys, as
    transformers' sliding-window cache holds them (the prompt's forward covers all of it)."""
    hf = hf_checkpoint(tmp_path, "mistral", **SMALL, sliding_window=6)
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask = prompt_ids(hf.config, [[], []], [5, 9])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[], do_sample=False,
              return_dict_in_generate=True, output_attentions=True)
    want, got = hf.generate(**kw), ours.generate(**kw)
    assert torch.equal(got.sequences, want.sequences)
    assert [a[0].shape[-1] for a in got.attentions] == [a[0].shape[-1] for a in want.attentions] == [10, 6, 6, 6]
    for ga, wa in zip(got.attentions, want.attentions):
        for g, w in zip(ga, wa):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_generate_ignores_the_configs_output_options(pair, monkeypatch):
    """config.text_config.output_attentions / output_hidden_states (forward's defaults) do not make
    generate()'s own forwards form weights or keep states: only its output settings do."""
    import llava_next.language

    _, ours = pair
    ids = torch.ones(1, 3, dtype=torch.long)
    want = ours.generate(input_ids=ids, max_new_tokens=3)
    monkeypatch.setattr(ours.config.text_config, "output_attentions", True, raising=False)
    monkeypatch.setattr(ours.config.text_config, "output_hidden_states", True, raising=False)
    monkeypatch.setattr(llava_next.language, "eager_attention", lambda *a, **k: pytest.fail("weights formed"))
    got = ours.generate(input_ids=ids, max_new_tokens=3, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want) and got.attentions is None and got.hidden_states is None


def test_generate_step_outputs_errors(pair):
    _, ours = pair
    ids = torch.ones(1, 3, dtype=torch.long)
    kw = dict(input_ids=ids, max_new_tokens=2, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="output_attentions must be True or False"):
        ours.generate(**kw, output_attentions=[0])
    with pytest.raises(ValueError, match="decode eagerly"):
        ours.generate(**kw, output_hidden_states=True, cuda_graph=True)


def test_generation_config_output_and_count_settings(pair, recwarn):
    """num_return_sequences, min_new_tokens and the output settings are read from
    model.generation_config like the others (and no longer warned about as unimplemented)."""
    _, ours = pair
    ids = torch.ones(1, 3, dtype=torch.long)
    saved = ours.generation_config.to_dict()
    try:
        ours.generation_config.update(do_sample=True, top_k=1, num_return_sequences=2, return_dict_in_generate=True,
                                      output_logits=True, min_new_tokens=1)
        out = ours.generate(input_ids=ids, max_new_tokens=3)
        assert out.sequences.shape == (2, 6) and len(out.logits) == 3 and out.scores is None
        assert not [w for w in recwarn if "does not implement" in str(w.message)]
        ours.generation_config.update(output_hidden_states=True)
        assert len(ours.generate(input_ids=ids, max_new_tokens=3).hidden_states) == 3
        ours.generation_config.update(guidance_scale=1.5)  # not implemented: warned about
        with pytest.warns(UserWarning, match="guidance_scale.*does not implement"):
            ours.generate(input_ids=ids, max_new_tokens=3)
    finally:
        ours.generation_config = type(ours.generation_config)(**saved)


def test_kv_cache_decode_equals_full_forward(pair):
    """Prefill + static-shape decode steps give the logits of one full forward."""
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[(45, 80)], [(150, 40)]], [3, 9])
    pv, sizes = image_inputs(hf.config, [(45, 80), (150, 40)])
    extra = torch.randint(3, 1000, (2, 4))
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    with torch.no_grad():
        full = ours(input_ids=full_ids, attention_mask=full_mask, pixel_values=pv, image_sizes=sizes).logits
        cache = KVCache.for_model(ours, 2, full_ids.shape[1] + 3)
        T = ids.shape[1]
        steps = [ours(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes, cache=cache).logits]
        for i in range(4):
            steps.append(ours(input_ids=extra[:, i:i + 1], cache=cache, cache_pos=torch.tensor(T + i)).logits)
    got = torch.cat(steps, 1)
    real = full_mask.bool()
    assert (got - full)[real].abs().max() < 1e-4


def test_reused_cache_forgets_a_longer_earlier_prompt(pair):
    hf, ours = pair
    long_ids, long_mask = prompt_ids(hf.config, [[]], [30], seed=1)
    ids, mask = prompt_ids(hf.config, [[]], [6], seed=2)
    nxt = torch.tensor([[17]])
    with torch.no_grad():
        fresh = KVCache.for_model(ours, 1, 64)
        ours(input_ids=ids, attention_mask=mask, cache=fresh)
        want = ours(input_ids=nxt, cache=fresh, cache_pos=torch.tensor(ids.shape[1])).logits
        reused = KVCache.for_model(ours, 1, 64)
        ours(input_ids=long_ids, attention_mask=long_mask, cache=reused)
        ours(input_ids=ids, attention_mask=mask, cache=reused, cache_pos=0)
        got = ours(input_ids=nxt, cache=reused, cache_pos=torch.tensor(ids.shape[1])).logits
    torch.testing.assert_close(got, want)


def test_generating_past_the_context_as_transformers(pair):
    """A prompt near or past the context still gets its 20 (or max_new_tokens) tokens, as from
    transformers, with a warning that the positions were never trained."""
    hf, ours = pair
    context = ours.config.text_config.max_position_embeddings
    for n, kw in ((context - 5, {}), (context + 1, dict(max_new_tokens=3))):
        ids = torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(n))
        want = hf.generate(input_ids=ids, do_sample=False, **kw)
        with pytest.warns(UserWarning, match="runs past the model's context"):
            got = ours.generate(input_ids=ids, **kw)
        assert got.shape[1] == n + kw.get("max_new_tokens", 20) and torch.equal(got, want)


def test_unknown_generate_argument(pair):
    _, ours = pair
    with pytest.raises(TypeError, match="guidance_scale"):
        ours.generate(input_ids=torch.ones(1, 3, dtype=torch.long), guidance_scale=2.0)


def test_cuda_graph_true_on_cpu_decodes_eagerly(pair):
    _, ours = pair
    ids = torch.ones(1, 3, dtype=torch.long)
    assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=17),
                       ours.generate(input_ids=ids, max_new_tokens=17, cuda_graph=True))


def test_missing_attention_mask_is_inferred_from_padding(pair):
    """Without an attention_mask, a pad id found in the prompt (and not an eos id) marks the left
    padding, as transformers infers it: the same tokens as with the mask, and as transformers'."""
    hf, ours = pair
    pad = hf.generation_config.pad_token_id
    assert pad is not None and pad != hf.generation_config.eos_token_id
    ids, mask = prompt_ids(hf.config, [[(45, 80)], []], [3, 9], pad_id=pad)
    pv, sizes = image_inputs(hf.config, [(45, 80)])
    kw = dict(pixel_values=pv, image_sizes=sizes, max_new_tokens=8)
    got = ours.generate(input_ids=ids, **kw)
    assert torch.equal(got, ours.generate(input_ids=ids, attention_mask=mask, **kw))
    assert torch.equal(got, hf.generate(input_ids=ids, do_sample=False, **kw))


def test_right_padding_warns(pair):
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[], []], [3, 9])
    with pytest.warns(UserWarning, match="right padding"):
        ours.generate(input_ids=ids.flip(1), attention_mask=mask.flip(1), max_new_tokens=2)


def test_generate_argument_forms(pair):
    """eos ids as a tensor, max_new_tokens=None (the default, 20) and the refused values."""
    _, ours = pair
    ids = torch.ones(1, 3, dtype=torch.long)
    greedy = ours.generate(input_ids=ids, max_new_tokens=6, eos_token_id=[])
    eos = int(greedy[0, 5])
    stop = 3 + greedy[0, 3:].tolist().index(eos) + 1  # generation stops after its first occurrence
    for form in (torch.tensor(eos), torch.tensor([eos, 10**6]), [eos], eos):
        assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=6, eos_token_id=form), greedy[:, :stop])
    assert ours.generate(input_ids=ids, max_new_tokens=None, eos_token_id=[]).shape == (1, 3 + 20)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
            ours.generate(input_ids=ids, max_new_tokens=bad)
    with pytest.raises(ValueError, match="top_k"):
        ours.generate(input_ids=ids, do_sample=True, top_k=-1)
    out = ours(input_ids=ids)
    assert out[0] is out.logits and out["logits"] is out.logits and len(out[:]) == 1


def test_warm_up_on_scratch_leaves_a_prefilled_cache_as_it_was(pair):
    """What GraphedDecode(cache=...) does before capturing on generate()'s prefilled cache: decode
    steps at the last slot. The next real steps give the logits of a cache that never saw them."""
    from llava_next.generation import decode_one_token, prefill, warm_up_on_scratch

    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[(45, 80)], []], [3, 9])
    pv, sizes = image_inputs(hf.config, [(45, 80)])
    T, n = ids.shape[1], 4
    caches = [KVCache.for_model(ours, 2, T + n) for _ in range(2)]
    for cache in caches:
        prefill(ours, ids, mask, pv, sizes, cache)
    scratch = torch.tensor(T + n - 1)
    warm_up_on_scratch(ours, torch.full((2, 1), 7), caches[1], scratch)
    token = torch.tensor([[5], [9]])
    for step in range(n - 1):
        pos = torch.tensor(T + step)
        want, got = (decode_one_token(ours, token, cache, pos) for cache in caches)
        assert torch.equal(got, want), step
    with pytest.raises(ValueError, match="scratch slot"):
        warm_up_on_scratch(ours, token, caches[1], torch.tensor(T))


def test_pad_id_from_a_generation_config_without_one(tmp_path):
    """generation_config.json naming no pad id: finished rows are filled with eos, as transformers
    fills them (not with the model config's pad id)."""
    import json

    from transformers import LlavaNextForConditionalGeneration as HF

    hf_checkpoint(tmp_path, "vicuna", **SMALL)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    gen.pop("pad_token_id", None)
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    hf, ours = HF.from_pretrained(tmp_path).eval(), LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask = prompt_ids(hf.config, [[], []], [5, 12])
    T = ids.shape[1]
    eos = int(ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])[0, T + 1])
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    assert torch.equal(out, want)
    assert (out[0, T + 2:] == eos).all()  # row 0 finished at its second token: the rest is eos


def test_generation_config_json_settings_as_transformers(tmp_path):
    """A checkpoint's generation_config.json sets generate()'s defaults as in transformers: its
    max_new_tokens / max_length and logits settings apply when a call leaves them out, a call's
    own value wins, a setting generate() lacks is warned about, and the file round-trips."""
    import json

    from transformers import LlavaNextForConditionalGeneration as HF

    hf_checkpoint(tmp_path, "mistral", **SMALL)
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_new_tokens": 5, "repetition_penalty": 0.5}))
    hf, ours = HF.from_pretrained(tmp_path).eval(), LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    assert ours.generation_config.max_new_tokens == 5 and ours.generation_config.top_k is None
    ids, mask = prompt_ids(hf.config, [[]], [6])
    for kw in ({}, dict(max_new_tokens=9), dict(repetition_penalty=1.0)):
        want = hf.generate(input_ids=ids, attention_mask=mask, **kw)
        got = ours.generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(got, want), kw
    plain = ours.generate(input_ids=ids, attention_mask=mask, repetition_penalty=1.0)
    assert not torch.equal(ours.generate(input_ids=ids, attention_mask=mask), plain)  # the file's penalty acts

    ours.generation_config.max_new_tokens = None  # attribute access, as transformers' GenerationConfig
    ours.generation_config.max_length = ids.shape[1] + 3  # counts the prompt
    hf.generation_config.max_new_tokens, hf.generation_config.max_length = None, ids.shape[1] + 3
    got = ours.generate(input_ids=ids, attention_mask=mask)
    assert got.shape[1] == ids.shape[1] + 3 and torch.equal(got, hf.generate(input_ids=ids, attention_mask=mask))
    for kw in (dict(max_length=ids.shape[1] + 5), dict(max_length=ids.shape[1] + 5, max_new_tokens=2),
               dict(do_sample=True, top_p=0.0)):  # a call's max_length; top_p 0 keeps the top token only
        want = hf.generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, **kw), want), kw
    with pytest.raises(ValueError, match="within max_length"):
        ours.generate(input_ids=ids, attention_mask=mask, max_length=ids.shape[1])

    ours.generation_config.update(diversity_penalty=0.5, num_beam_groups=2)
    with pytest.warns(UserWarning, match="diversity_penalty.*num_beam_groups") as caught:
        assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask), got)  # without them, as warned
    assert caught[0].filename == __file__  # the warning names the caller's line
    with pytest.raises(TypeError, match="diversity_penalty"):  # asked for by the call itself: refused
        ours.generate(input_ids=ids, attention_mask=mask, diversity_penalty=0.5)
    # transformers' defaults, beam-only settings and empty values change nothing: no warning
    ours.generation_config.update(diversity_penalty=0.0, num_beam_groups=1, early_stopping=True, generation_kwargs={})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.generate(input_ids=ids, attention_mask=mask)
    assert ours.generation_config.get("top_k", 50) == 50 and ours.generation_config.min_new_tokens is None
    with pytest.raises(AttributeError, match="no setting 'max_new_token'"):
        ours.generation_config.max_new_token  # a misspelt setting is an error, not None
    ours.save_pretrained(tmp_path / "saved")
    again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert again.generation_config == ours.generation_config
    assert json.loads((tmp_path / "saved" / "generation_config.json").read_text())["repetition_penalty"] == 0.5


def test_generation_settings_from_config_json_without_a_generation_config(tmp_path):
    """No generation_config.json: transformers takes config.json's settings, a top-level eos /
    pad id before the text config's."""
    import json

    from transformers import LlavaNextForConditionalGeneration as HF

    hf_checkpoint(tmp_path, "vicuna", **SMALL)
    (tmp_path / "generation_config.json").unlink()
    ids, mask = prompt_ids(hf_config("vicuna", **SMALL), [[]], [6])
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    eos = int(ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])[0, -2])
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": eos, "max_new_tokens": 6}))
    hf, ours = HF.from_pretrained(tmp_path).eval(), LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    assert (ours.generation_config.eos_token_id, ours.generation_config.max_new_tokens) == (eos, 6)
    want = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False)
    got = ours.generate(input_ids=ids, attention_mask=mask)
    assert torch.equal(got, want) and got.shape[1] == ids.shape[1] + 3  # stopped at the top-level eos


def test_manual_decode_rewind_and_cache_checks(pair):
    """A tensor-position step that goes back (resampling, a rejected draft) forgets the slots it
    left behind, as an int write does: its logits equal a run that stopped there. After tensor
    steps the cache's length is unknown, so leaving out cache_pos is an error; a cache that does
    not fit the model or the call is named."""
    hf, ours = pair
    ids, mask = prompt_ids(hf.config, [[]], [6])
    T = ids.shape[1]
    nxt = torch.tensor([[5], [7], [9], [11], [13]])

    def run(steps):  # prefill, then tensor-position steps at T, T + 1, ...
        cache = KVCache.for_model(ours, 1, T + 8)
        ours(input_ids=ids, attention_mask=mask, cache=cache, cache_pos=0)
        with torch.no_grad():
            out = [ours(input_ids=t[None], cache=cache, cache_pos=torch.tensor(T + i)).logits for i, t in enumerate(steps)]
        return cache, out

    cache, _ = run(nxt)  # five steps ...
    with torch.no_grad():
        back = ours(input_ids=nxt[2][None], cache=cache, cache_pos=torch.tensor(T + 2)).logits  # ... then back to T + 2
    _, want = run(nxt[:3])
    torch.testing.assert_close(back, want[2])
    with pytest.raises(ValueError, match="pass cache_pos explicitly"):
        ours(input_ids=nxt[0][None], cache=cache)
    for bad, message in ((KVCache.for_model(ours, 2, T + 8), "this call needs"),
                         (KVCache.for_model(ours, 1, T + 8, dtype=torch.float16), "the model computes")):
        with pytest.raises(ValueError, match=message):
            ours(input_ids=ids, cache=bad, cache_pos=0)
    with pytest.raises(ValueError, match="cache_pos must be >= 0"):
        ours(input_ids=ids, cache=KVCache.for_model(ours, 1, T + 8), cache_pos=-1)
    with pytest.raises(ValueError, match="0-d int64 tensor"):
        ours(input_ids=nxt[0][None], cache=cache, cache_pos=torch.tensor(T, dtype=torch.int32))


def test_streamer_consumer_gets_generate_errors(pair):
    """generate() failing mid-stream in a thread: the consumer iterating a TextIteratorStreamer
    gets the exception instead of waiting forever, and the streamer serves the next call."""
    import threading

    from llava_next.generation import TextIteratorStreamer

    hf, ours = pair

    class Ids:  # a tokenizer stand-in: decode shows the ids
        def decode(self, ids, **kw):
            return " ".join(map(str, ids))

    ids, mask = prompt_ids(hf.config, [[(45, 80)]], [4])
    pv, sizes = image_inputs(hf.config, [(45, 80)])
    streamer = TextIteratorStreamer(Ids(), skip_prompt=True, timeout=30)
    bad = dict(input_ids=ids, attention_mask=mask, pixel_values=pv[:, :1], image_sizes=sizes)  # tiles missing
    worker = threading.Thread(target=lambda: pytest.raises(ValueError, ours.generate, **bad, streamer=streamer))
    worker.start()
    with pytest.raises(ValueError, match="tiles"):  # generate's own error, not the queue's timeout
        list(streamer)
    worker.join()
    good = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
    worker = threading.Thread(target=lambda: ours.generate(**good, max_new_tokens=3, eos_token_id=[], streamer=streamer))
    worker.start()
    assert len("".join(streamer).split()) == 3  # the new tokens only: the failed call left nothing behind
    worker.join()
