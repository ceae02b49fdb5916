"""Our sentencepiece tokenizer against transformers' legacy Llama tokenizer (see oracle_processor)."""

import json

import pytest
import torch

from llava_next.tokenizer import LlavaNextTokenizer
from oracle_processor import (added_token, oracle_decoder, oracle_tokenizer, write_checkpoint,
                              write_yi_checkpoint)

CORPUS = [
    "", " ", "  ", "\n", "\t", "\n\n", " \n ", "a", "Hello world", " leading space", "trailing space ",
    "  two leading", "two trailing  ", "line one\nline two", "tab\tseparated\tvalues", "mixed \t\n whitespace",
    "1234567890", "3.14159 and 2,718", "x = 42; y = -7", "1st 2nd 3rd 10th", "Ünïcödé çåfé", "日本語のテキスト",
    "Привет, мир", "emoji 😀🎉👍🏽 and text", "🤖", "e\u0301 vs é", "ﬁ ligature", "zero\u200bwidth",
    "<image>", "<image>\n", "\n<image>", " <image> ", "<image>word", "word<image>", "a<image>b<image>c",
    "<image><image>", "<image>\n<image>\nTwo images.", "[INST] <image>\nWhat is shown in this image? [/INST]",
    "USER: <image>\nDescribe the image:\nASSISTANT:", "<s>", "</s>", "<unk>", "<s> starts", "ends</s>",
    "a</s>b", "<s><s></s>", "x <unk> y", "<pad>", "pad<pad>pad", "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>assistant\n",
    "<<SYS>>\nS\n<</SYS>>\n\n", " A chart. </s>[INST] Explain. [/INST]", "<im", "image>", "<image",
    "<ima ge>", "code:\n    def f(x):\n        return x", "URL https://example.com/a?b=c&d=e",
    "\u00a0non-breaking", "a" * 300, "  \n\t  ",
]


@pytest.fixture(scope="module", params=["mistral", "llama"])
def pair(request, tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return LlavaNextTokenizer.from_pretrained(folder), oracle_tokenizer(folder), folder


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 50


def test_ids_match_reference(pair):
    ours, oracle, _ = pair
    for text in CORPUS:
        assert ours.encode(text) == oracle(text)["input_ids"], repr(text)
        assert ours(text)["input_ids"] == oracle(text)["input_ids"], repr(text)


def test_decode_matches_reference(pair):
    ours, _, folder = pair
    decoder = oracle_decoder(folder)
    for text in CORPUS:
        ids = ours.encode(text)
        assert ours.decode(ids) == decoder.decode(ids), repr(text)
        assert ours.decode(ids, skip_special_tokens=True) == decoder.decode(ids, skip_special_tokens=True), repr(text)
    batch = [ours.encode(t) for t in CORPUS[:8]]
    assert ours.batch_decode(batch, skip_special_tokens=True) == decoder.batch_decode(batch, skip_special_tokens=True)


def test_reference_prompt_ids_and_decoding(tmp_path):
    # REFERENCE.md's externally written ids for the mistral prompt: a lone "▁" on both sides of <image>.
    ours = LlavaNextTokenizer.from_pretrained(write_checkpoint(tmp_path, "mistral"))
    ids = ours.encode("[INST] <image>\nWhat is shown in this image? [/INST]")
    assert ids[:9] == [1, 733, 16289, 28793, 28705, 32000, 28705, 13, 3195]
    assert ours.decode(ids, skip_special_tokens=True) == "[INST]  \nWhat is shown in this image? [/INST]"
    assert ours.decode(torch.tensor(ids)) == ours.decode(ids)
    assert ours.decode(torch.tensor([ids])) == [ours.decode(ids)]  # a batch of one row: a list, as transformers 5


def test_special_token_ids(pair):
    ours, oracle, _ = pair
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id) == (1, 2, 0)
    assert ours.pad_token_id == oracle.pad_token_id and ours.pad_token == oracle.pad_token
    assert ours.convert_tokens_to_ids("<image>") == 32000
    assert sorted(ours.all_special_ids) == sorted(oracle.all_special_ids)
    assert len(ours) == len(oracle)
    assert ours.convert_ids_to_tokens([1, 32000, 13]) == oracle.convert_ids_to_tokens([1, 32000, 13])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_reference(pair, side):
    ours, oracle, _ = pair
    texts = ["short", "a somewhat longer text with <image> inside", "", "mid length\ntext"]
    a = ours(texts, padding=True, return_tensors="pt", padding_side=side)
    oracle.padding_side = side
    b = oracle(texts, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    ours.padding_side = side  # the attribute works the same as the argument
    assert torch.equal(ours(texts, padding=True, return_tensors="pt")["input_ids"], a["input_ids"])
    ours.padding_side = "left"


def test_unpadded_batch_and_errors(pair):
    ours, _, _ = pair
    out = ours(["a", "b c d"])
    assert [len(x) for x in out["input_ids"]] == [len(ours.encode("a")), len(ours.encode("b c d"))]
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "b c d"], return_tensors="pt")


def test_save_and_reload(pair, tmp_path):
    ours, _, _ = pair
    ours.save_pretrained(tmp_path)
    again = LlavaNextTokenizer.from_pretrained(tmp_path)
    for text in CORPUS:
        assert again.encode(text) == ours.encode(text), repr(text)
    assert (again.pad_token, again.padding_side, len(again)) == (ours.pad_token, ours.padding_side, len(ours))
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["bos_token"] == "<s>"


def test_older_files_added_tokens_json_and_special_tokens_map(tmp_path):
    folder = write_checkpoint(tmp_path / "new", "mistral")
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    (old / "added_tokens.json").write_text(json.dumps({"<image>": 32000, "<pad>": 32001}))
    (old / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "extra_special_tokens": {"image_token": "<image>"}}))  # transformers 5 spelling
    a, b = LlavaNextTokenizer.from_pretrained(old), LlavaNextTokenizer.from_pretrained(folder)
    for text in CORPUS:
        assert a.encode(text) == b.encode(text), repr(text)
    assert a.decode(a.encode("x<image>y"), skip_special_tokens=True) == "x y"  # "y" got its own "▁"
    assert "<image>" in a.all_special_tokens


def test_missing_model_file_is_explained(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        LlavaNextTokenizer.from_pretrained(tmp_path)


def test_padding_without_pad_token_is_explained(tmp_path):
    folder = write_checkpoint(tmp_path, "llama")
    tok = LlavaNextTokenizer.from_pretrained(folder, pad_token=None)
    with pytest.raises(ValueError, match="pad token"):
        tok(["a", "b c"], padding=True)
    tok.pad_token = tok.unk_token
    assert tok(["a", "b c"], padding=True, return_tensors="pt")["input_ids"][0, 0] == 0


def test_lstrip_rstrip_tokens_like_reference(tmp_path):
    from tokenizers import AddedToken

    folder = write_checkpoint(tmp_path, "mistral")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["32002"] = {**added_token("<mark>"), "lstrip": True, "rstrip": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours = LlavaNextTokenizer.from_pretrained(folder)
    oracle = oracle_tokenizer(write_checkpoint(tmp_path / "plain", "mistral"))
    oracle.add_tokens([AddedToken("<mark>", lstrip=True, rstrip=True, normalized=False, special=True)],
                      special_tokens=True)
    for text in ["a <mark> b", "a\n<mark>\n\nb", "<mark>  x", "x  <mark>"]:
        assert ours.encode(text) == oracle(text)["input_ids"], repr(text)


# ---- Yi-style (34b): a small sentencepiece model trained here -------------------------------------

YI_CORPUS = ["<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is this?<|im_end|>"
             "<|im_start|>assistant\n", "<|im_start|>user\nhi<|im_end|>", " leading", "trailing ", "数字 123",
             "emoji 😀", "<image>\n<image>\nTwo", "a<|im_end|>b", "<|startoftext|>text<|endoftext|>", "", "\n\n"]


@pytest.fixture(scope="module", params=[False, True], ids=["no-dummy-prefix", "dummy-prefix"])
def yi_folder(request, tmp_path_factory):
    return write_yi_checkpoint(tmp_path_factory.mktemp("yi"), dummy_prefix=request.param)


def test_yi_style_tokenizer(yi_folder):
    ours = LlavaNextTokenizer.from_pretrained(yi_folder)
    assert ours.vocab_size == 400 and ours.convert_tokens_to_ids("<image>") == ours.vocab_size
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 7, 0)
    assert ours.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [6, 7]
    oracle = oracle_tokenizer(yi_folder)
    for text in YI_CORPUS:
        assert ours.encode(text) == oracle(text)["input_ids"], repr(text)
    text = "<|im_start|>assistant\nA chart.<|im_end|>"
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == "assistant\nA chart."
    decoder = oracle_decoder(yi_folder)  # one leading space goes, with or without a dummy prefix
    reserved = ours.convert_tokens_to_ids("<|reserved_0|>")  # a sentencepiece control piece
    for ids in [ours.encode(t) for t in YI_CORPUS + ["  two", "<|im_start|> hi"]] + [[reserved, 5, 9]]:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == decoder.decode(ids, skip_special_tokens=skip), ids
            assert ours.decode(ids[1:], skip_special_tokens=skip) == decoder.decode(ids[1:], skip_special_tokens=skip)


STREAMED = ["code:\n    def f(x):\n        if x:\n            return 1\n    return 2", "- a\n - b\n\n  c",
            "line one\nline two", "Ünïcödé çåfé\n日本語のテキスト", "emoji 😀🎉👍🏽 and text\n  🤖 indented",
            "trailing newline\n", "\n\nstarts with newlines", "a" * 50 + "\n" + " b" * 10,
            "x\n</s> y", "line\n<s><s>  indented"]  # skipped special tokens right after a newline


def test_streamer_prints_what_decode_gives(pair):
    """TextStreamer fed one id at a time prints, piece by piece, exactly decode() of all the ids:
    indentation after a newline included (decoded alone, a token loses its leading space)."""
    ours, _, _ = pair
    for text in STREAMED:
        ids = ours.encode(text, add_special_tokens=False)
        assert "".join(streamed(ours, ids)) == ours.decode(ids, skip_special_tokens=True), text
    assert ours.decode(ids[0]) == ours.decode(ids[:1])  # one id as an int, as transformers' streamer passes it


@pytest.mark.parametrize("kw", [
    dict(padding=True, truncation=True, max_length=3),
    dict(padding="max_length", max_length=12),
    dict(padding="max_length", truncation=True, max_length=5, padding_side="right"),
    dict(padding=True, pad_to_multiple_of=8),
    dict(padding="longest", return_attention_mask=False),
    dict(padding=True, truncation="longest_first", max_length=4, add_special_tokens=False),
    dict(padding=True, max_length=4),  # max_length without truncation: ignored when padding
    dict(padding=True, truncation=True, max_length=0),  # 0 counts as not given
    dict(padding=True, truncation=True, max_length=30, truncation_side="left"),  # longer than every row
    dict(padding=True, truncation=True, max_length=4, truncation_side="left"),
], ids=str)
@pytest.mark.filterwarnings("ignore:.*max_length.? is ignored")  # both sides warn for padding=True + max_length
def test_call_options_match_reference(pair, kw):
    """transformers' truncation / padding options give the same ids, masks and keys."""
    ours, oracle, _ = pair
    texts = ["hi", "hello there you are", "a longer sentence with <image> inside it"]
    kw = {"padding_side": "left", **kw}  # explicit: other tests change the shared tokenizers' default
    side = kw.pop("truncation_side", "right")
    ours.truncation_side = oracle.truncation_side = side
    try:
        got, want = ours(texts, return_tensors="pt", **kw), oracle(texts, return_tensors="pt", **kw)
    finally:
        ours.truncation_side = oracle.truncation_side = "right"
    assert set(got) == set(want) - {"token_type_ids"}
    for key in got:
        assert torch.equal(got[key], want[key]), key
    assert ours.encode(texts[1], truncation=True, max_length=3) == oracle.encode(texts[1], truncation=True, max_length=3)
    assert ours(texts[1], max_length=3)["input_ids"] == oracle(texts[1], max_length=3)["input_ids"]  # truncates
    with pytest.raises(ValueError, match="multiple of pad_to_multiple_of"):
        ours(texts, padding=True, truncation=True, max_length=5, pad_to_multiple_of=4)


def test_options_it_does_not_implement_are_refused(pair):
    ours, _, _ = pair
    with pytest.raises(ValueError, match="text_pair"):
        ours("Hello", text_pair="world")
    with pytest.raises(TypeError, match="'return_overflowing_token'"):
        ours("Hello", return_overflowing_token=True)  # a typo is not silently dropped
    with pytest.raises(ValueError, match="return_offsets_mapping=True is not supported"):
        ours("Hello", return_offsets_mapping=True)
    assert ours("Hello", return_token_type_ids=False, verbose=False)["input_ids"] == ours("Hello")["input_ids"]
    with pytest.raises(ValueError, match="max_length"):
        ours(["a", "b c"], padding="max_length")  # no model_max_length in these configs
    with pytest.warns(UserWarning, match="max_length is ignored when padding=True"):
        ours(["a", "b c"], padding=True, max_length=1)


def test_decode_batches_and_token_id_setters_like_reference(pair):
    ours, _, folder = pair
    decoder = oracle_decoder(folder)
    rows = ours(["Hello world", "Bye there friend"], padding=True, return_tensors="pt")["input_ids"]
    assert ours.decode(rows) == decoder.decode(rows) and isinstance(ours.decode(rows), list)
    assert ours.decode(rows[:1]) == decoder.decode(rows[:1])
    assert ours.decode(rows.tolist()) == decoder.decode(rows.tolist())
    assert ours.decode(list(rows[0])) == decoder.decode(list(rows[0]))  # a list of 0-d tensors is one row
    assert ours.encode("Hello", return_tensors="pt").tolist() == [ours.encode("Hello")]
    vocab = ours.get_vocab()
    assert vocab == decoder.get_vocab()
    assert ours.convert_tokens_to_string(ours.tokenize("Hello world")) == "Hello world"
    ours.pad_token_id = ours.eos_token_id  # the common idiom
    assert ours.pad_token == "</s>" and ours.pad_token_id == ours.eos_token_id
    assert ours.special_tokens_map["pad_token"] == "</s>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ours.pad_token_id = 10 ** 9


def test_added_tokens_like_reference(tmp_path):
    """add_tokens / add_special_tokens: the same new ids, the same encoding around them, the same
    decoding, saved and read back."""
    folder = write_checkpoint(tmp_path, "mistral")
    ours, oracle, decoder = LlavaNextTokenizer.from_pretrained(folder), oracle_tokenizer(folder), oracle_decoder(folder)
    for tok in (ours, oracle, decoder):  # (the slow decoder counts <image> as added, though it keeps its id)
        added = tok.add_tokens(["<box>", "</box>", "<image>"])
        assert tok is decoder or added == 2  # <image> is already there
        assert tok.add_special_tokens({"additional_special_tokens": ["<ref>"]}) == 1
    assert len(ours) == len(oracle) == len(decoder)
    text = "Find <ref>the cat</ref> at <box>1, 2</box> in <image>\nplease"
    assert ours.encode(text) == oracle.encode(text)
    ids = ours.encode(text)
    assert ours.decode(ids) == decoder.decode(ids)  # the decoding reference, as in the tests above
    assert ours.decode(ids, skip_special_tokens=True) == decoder.decode(ids, skip_special_tokens=True)
    ours.save_pretrained(tmp_path / "saved")
    assert LlavaNextTokenizer.from_pretrained(tmp_path / "saved").encode(text) == ids


def test_more_option_edges_like_reference(tmp_path):
    """Edges a randomized comparison with transformers found: padding='do_not_pad' with max_length,
    max_length=0 with a model_max_length, pad_to_multiple_of without a length, tokens added as
    transformers' AddedToken, a token that is already a piece, an empty token."""
    from tokenizers import AddedToken as HFAddedToken

    folder = write_checkpoint(tmp_path, "mistral")
    ours, oracle = LlavaNextTokenizer.from_pretrained(folder), oracle_tokenizer(folder)
    texts = ["hello there you are", "hi"]
    for kw in (dict(padding="do_not_pad", max_length=3), dict(padding=True, truncation=True, pad_to_multiple_of=3)):
        assert ours(texts, **kw)["input_ids"] == oracle(texts, **kw)["input_ids"], kw
    ours.model_max_length = oracle.model_max_length = 4
    assert ours(texts, truncation=True, max_length=0)["input_ids"] == oracle(texts, truncation=True,
                                                                              max_length=0)["input_ids"]
    for tok in (ours, oracle):
        assert tok.add_tokens([HFAddedToken("<x>", lstrip=True)]) == 1
        assert tok.add_tokens(["hello", ""]) == 0  # a piece already; nothing
    text = "say hello <x> world"
    assert ours.encode(text) == oracle.encode(text) and len(ours) == len(oracle)


def test_streamer_emits_cjk_as_it_comes(pair):
    """Text without spaces between characters (CJK ideographs, kana) streams piece by piece, as
    transformers' TextStreamer does, not only at the line's end."""
    ours, _, _ = pair
    ids = ours.encode("日本語の文章です。東京は大きい都市です。", add_special_tokens=False)
    pieces = streamed(ours, ids)
    assert "".join(pieces) == ours.decode(ids, skip_special_tokens=True)
    assert len([p for p in pieces if p]) >= 8


def test_streamer_emits_letters_as_they_come_as_transformers(pair):
    """transformers 5.24's TextStreamer prints runs of letters, digits and spaces as they come (a
    long word, Thai without spaces): the same pieces, where both decode the same text."""
    from transformers import TextStreamer as Reference

    ours, oracle, _ = pair
    compared = 0
    for text in ("supercalifragilisticexpialidocious is a long word", "สวัสดีครับผมชื่อ"):
        ids = ours.encode(text, add_special_tokens=False)
        if any(t.startswith("<0x") for t in ours.convert_ids_to_tokens(ids)):
            continue  # byte pieces: the slow oracle decodes them by name
        compared += 1
        got = [p for p in streamed(ours, ids) if p]
        assert got == [p for p in streamed(oracle, ids, Reference) if p], text
        assert len(got) >= 8
    assert compared


def test_decode_drops_ids_past_the_vocabulary_before_joining_bytes(pair):
    """The model's embedding has rows past the tokenizer (32064 for 32002 ids); sampling may pick
    one. transformers drops such an id before it joins byte tokens, so the bytes around it still
    form one character."""
    ours, _, _ = pair
    c3, a9 = ours.convert_tokens_to_ids(["<0xC3>", "<0xA9>"])  # "é" in UTF-8
    past = len(ours) + 5
    assert ours.convert_ids_to_tokens(past) is None
    assert ours.decode([c3, a9]) == "é"
    assert ours.decode([c3, past, a9]) == "é"


def streamed(tokenizer, ids, streamer_class=None) -> list[str]:
    """The pieces a TextStreamer (ours, or transformers' as `streamer_class`) emits when fed
    `ids` one at a time, as generate() feeds it."""
    from llava_next.generation import TextStreamer

    pieces = []

    class Collect(streamer_class or TextStreamer):
        def on_text(self, text, stream_end=False):  # ours
            pieces.append(text)

        on_finalized_text = on_text  # transformers'

    streamer = Collect(tokenizer, skip_special_tokens=True)
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    return pieces



STOP_TEXTS = CORPUS + ["stop", "stopper", "lastopper", "st op", "unstoppable", "non-stop\nline two", "a stop. Then",
                       "Paris is the capital.\nNext", "word<image>stop", "ends</s>stop"]
STOP_STRINGS = [["stop"], [" two", "\n"], ["e\u0301", "😀"], ["<image>", "</s>"], ["2,7", ". T"], ["is shown"],
                ["ﬁ", "Пр"], ["T"]]


def test_stop_strings_as_transformers(pair):
    """StopStringCriteria (generate's stop_strings) against transformers' on every prefix of many
    texts' ids: a stop string counts when it ends inside the newest token."""
    from transformers.generation.stopping_criteria import StopStringCriteria as Theirs

    from llava_next.generation import StopStringCriteria

    ours, _, folder = pair
    decoder = oracle_decoder(folder)
    hits = 0
    for stops in STOP_STRINGS:
        mine, theirs = StopStringCriteria(ours, stops), Theirs(decoder, stops)
        for text in STOP_TEXTS:
            ids = torch.tensor([ours.encode(text)])
            for k in range(1, ids.shape[1] + 1):
                got, want = mine(ids[:, :k]), theirs(ids[:, :k], None)
                assert got.tolist() == want.tolist(), (stops, text, ours.convert_ids_to_tokens(ids[0, :k].tolist()))
                hits += int(got[0])
    assert hits > 40  # the strings do occur
    # an id past the tokenizer (the model's spare embedding rows) ends a match, as in transformers
    spare = len(ours) + 5
    for stops, pieces in ((["-stop"], ["non", "-", spare, "stop"]), (["op"], ["st", spare, "op"]),
                          (["stop"], [spare])):
        ids = torch.tensor([[i if isinstance(i, int) else ours.encode(i, add_special_tokens=False)[-1]
                             for i in pieces]])
        got, want = StopStringCriteria(ours, stops)(ids), Theirs(decoder, stops)(ids, None)
        assert got.tolist() == want.tolist(), (stops, pieces)
    long = torch.tensor([ours.encode("x " * 50 + "the end stop")])  # the tail window of a long row
    assert StopStringCriteria(ours, ["end stop", "x x"])(long).tolist() == [True]
    batch = torch.tensor([ours.encode("a stop"), ours.encode("a sto")])  # rows apart
    assert StopStringCriteria(ours, "stop")(batch).tolist() == [True, False]
    with pytest.raises(ValueError, match="stop_strings must be"):
        StopStringCriteria(ours, [""])
