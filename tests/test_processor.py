"""The whole processor against transformers' LlavaNextProcessor, and REFERENCE.md's numbers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fixture_path
from llava_next.anyres import select_best_resolution
from llava_next.processing import LlavaNextProcessor
from oracle_processor import oracle_processor, write_checkpoint, write_yi_checkpoint

MISTRAL_PROMPT = "[INST] <image>\nWhat is shown in this image? [/INST]"
VICUNA_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions. USER: <image>\nWhat is shown "
                 "in this image? ASSISTANT:")


def image(name):
    return Image.open(fixture_path("images", name)).convert("RGB")


@pytest.fixture(scope="module")
def radar():
    return image("llava_v1_5_radar.jpg")


@pytest.fixture(scope="module")
def cats():
    return image("coco_000000039769_cats.png")


@pytest.fixture(scope="module", params=["mistral", "llama"])
def pair(request, tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp(request.param), request.param, config_json=True)
    return LlavaNextProcessor.from_pretrained(folder), oracle_processor(folder)


def assert_same(a, b):
    assert set(a) == set(b), (set(a), set(b))
    for key in ("input_ids", "attention_mask", "image_sizes"):
        if key in a:
            assert torch.equal(a[key], b[key]), key
    if "pixel_values" in a:
        assert a["pixel_values"].shape == b["pixel_values"].shape
        assert (a["pixel_values"] - b["pixel_values"]).abs().max().item() <= 1e-5


# ---- REFERENCE.md's externally authored numbers ------------------------------------------------

def test_reference_numbers(tmp_path, radar, cats):
    processor = LlavaNextProcessor.from_pretrained(write_checkpoint(tmp_path, "mistral"))
    out = processor(MISTRAL_PROMPT, radar, return_tensors="pt")  # the seed's positional order
    assert out["image_sizes"].tolist() == [[899, 1024]] and out["pixel_values"].shape[1] == 5
    assert (out["input_ids"] == 32000).sum().item() == 2634 and out["input_ids"].shape == (1, 2652)
    prompt = "USER: <image>\nDescribe the image:\nASSISTANT:"
    assert processor(text=prompt, images=cats)["input_ids"].shape == (1, 2356)
    assert len(processor.tokenizer.encode(prompt)) == 17
    pinpoints = [[672, 336], [336, 672], [672, 672], [336, 1008], [1008, 336]]
    assert select_best_resolution((336, 336), pinpoints) == (672, 336)
    assert max(processor.num_image_tokens((h, w)) for h in range(300, 1400, 37) for w in range(300, 1400, 41)) \
        == processor.num_image_tokens((1000, 1000)) == 2928


def test_explicit_zero_additional_tokens_is_one_short(tmp_path):
    # transformers' own test: a (3, 503, 316) image (h=503, w=316), pinpoints [[672, 336]] and
    # num_additional_image_tokens=0 -> 1525 (one fewer than the model's features).
    folder = write_checkpoint(tmp_path, "mistral")
    config = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({**config, "num_additional_image_tokens": 0}))
    ours = LlavaNextProcessor.from_pretrained(folder)
    ours.image_processor.image_grid_pinpoints = [[672, 336]]
    assert ours.num_image_tokens((503, 316)) == 1525
    oracle = oracle_processor(folder, num_additional_image_tokens=0, image_grid_pinpoints=[[672, 336]])
    picture = Image.new("RGB", (316, 503), (90, 20, 200))  # PIL size is (w, h)
    assert_same(ours(text="<image>", images=picture), oracle(text="<image>", images=picture, return_tensors="pt"))


# ---- parity with transformers --------------------------------------------------------------------

def test_single_prompt(pair, radar):
    ours, oracle = pair
    for prompt in (MISTRAL_PROMPT, VICUNA_PROMPT):
        assert_same(ours(prompt, radar, return_tensors="pt"),
                    oracle(text=prompt, images=radar, return_tensors="pt"))


def test_left_padded_batch(pair, radar, cats):
    ours, oracle = pair
    prompts = [MISTRAL_PROMPT, "USER: <image>\nDescribe the image:\nASSISTANT:", "A text-only prompt, no image."]
    images = [cats.crop((0, 0, 94, 251)), radar]
    a = ours(text=prompts, images=images, return_tensors="pt", padding=True)
    b = oracle(text=prompts, images=images, return_tensors="pt", padding=True)
    assert_same(a, b)
    assert a["attention_mask"][0, 0] == 0 and a["attention_mask"][1, -1] == 1  # padded on the left


def test_prompts_of_different_lengths_are_not_padded_unasked(pair):
    """As transformers: without padding=True, lists come back as they are, and "pt" refuses them."""
    ours, oracle = pair
    prompts = ["hi", "a longer prompt here"]
    a, b = ours(text=prompts, return_tensors=None), oracle(text=prompts)
    assert a["input_ids"] == b["input_ids"] and a["attention_mask"] == b["attention_mask"]
    assert len(a["input_ids"][0]) < len(a["input_ids"][1])
    for processor in (oracle, ours):
        with pytest.raises(ValueError, match="padding=True"):
            processor(text=prompts, return_tensors="pt")


def test_two_images_in_one_prompt(pair, radar, cats):
    ours, oracle = pair
    prompt = "USER: <image>\n<image>\nWhat differs between the two pictures? ASSISTANT:"
    images = [cats.crop((10, 10, 347, 1010 - 500)), radar]
    assert_same(ours(text=prompt, images=images), oracle(text=prompt, images=images, return_tensors="pt"))


def test_awkward_images(pair):
    ours, oracle = pair
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (13, 16), (2000, 300)]:
        picture = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert_same(ours(text="<image> hi", images=picture), oracle(text="<image> hi", images=picture,
                                                                     return_tensors="pt"))


def test_empty_and_text_only_prompts(pair):
    ours, oracle = pair
    for prompt in ("", "just text"):
        assert_same(ours(text=prompt), oracle(text=prompt, return_tensors="pt"))
    assert ours(text="")["input_ids"].tolist() == [[1]]


# ---- calling conventions -------------------------------------------------------------------------

def test_argument_orders_and_batch_feature(tmp_path, cats):
    processor = LlavaNextProcessor.from_pretrained(write_checkpoint(tmp_path, "mistral"))
    small = cats.crop((0, 0, 64, 48))
    seed = processor(MISTRAL_PROMPT, small, return_tensors="pt")
    for other in (processor(text=MISTRAL_PROMPT, images=small), processor(small, MISTRAL_PROMPT),
                  processor(images=[small], text=[MISTRAL_PROMPT])):
        assert_same(seed, other)
    assert seed.input_ids is seed["input_ids"]
    moved = seed.to("cpu", torch.float16)
    assert moved.pixel_values.dtype == torch.float16 and moved.input_ids.dtype == torch.int64
    assert seed.to(dtype=torch.bfloat16).pixel_values.dtype == torch.bfloat16
    only_images = processor(images=small)
    assert set(only_images) == {"pixel_values", "image_sizes"}
    assert processor.decode(seed.input_ids[0], skip_special_tokens=True) == \
        "[INST]  \nWhat is shown in this image? [/INST]"
    assert processor.batch_decode(seed.input_ids, skip_special_tokens=True) == \
        [processor.decode(seed.input_ids[0], skip_special_tokens=True)]


def test_chat_template_end_to_end(tmp_path, cats):
    processor = LlavaNextProcessor.from_pretrained(write_checkpoint(tmp_path, "mistral", config_json=True))
    assert processor.chat_format == "mistral"
    small = cats.crop((0, 0, 64, 48))
    conversation = [{"role": "user", "content": [{"type": "image", "image": small},
                                                 {"type": "text", "text": "What is shown in this image?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == MISTRAL_PROMPT
    assert processor.apply_chat_template([conversation, conversation]) == [prompt, prompt]
    inputs = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert_same(inputs, processor(prompt, small))
    assert processor.apply_chat_template(conversation, chat_format="chatml").startswith("<|im_start|>system")


def test_chat_format_detection_through_processor(tmp_path):
    folder = write_checkpoint(tmp_path / "vicuna", "llama", config_json=True)
    assert LlavaNextProcessor.from_pretrained(folder).chat_format == "vicuna"
    assert LlavaNextProcessor.from_pretrained(folder, chat_format="chatml").chat_format == "chatml"
    bare = write_checkpoint(tmp_path / "bare", "mistral")  # no config.json, no template
    processor = LlavaNextProcessor.from_pretrained(bare)
    assert processor.chat_format is None
    with pytest.raises(ValueError, match="chat_format"):
        processor.apply_chat_template([{"role": "user", "content": "hi"}])


def test_34b_style_chatml_end_to_end(tmp_path, cats):
    folder = write_yi_checkpoint(tmp_path, config_json=True)  # no processor_config: patch size from config
    ours = LlavaNextProcessor.from_pretrained(folder)
    assert ours.chat_format == "chatml" and ours.image_token_id == 400 == ours.tokenizer.vocab_size
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert not ours.apply_chat_template(conversation).endswith("assistant\n")  # transformers' default: no prompt
    prompt = ours.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    picture = cats.crop((0, 0, 500, 90))
    oracle = oracle_processor(folder)
    assert_same(ours(prompt, picture), oracle(text=prompt, images=picture, return_tensors="pt"))
    assert ours.tokenizer.eos_token_id == 7


def test_hub_id_fetches_only_processor_files(tmp_path, monkeypatch):
    import llava_next.processing as processing

    folder = write_checkpoint(tmp_path, "mistral")
    asked = {}

    def fake_resolve(name, allow_patterns, revision=None):
        asked.update(name=name, patterns=allow_patterns)
        return str(folder)
    monkeypatch.setattr(processing, "resolve_folder", fake_resolve)
    LlavaNextProcessor.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf")
    assert asked["name"] == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert "tokenizer.model" in asked["patterns"] and not any("safetensors" in p for p in asked["patterns"])


# ---- configuration -------------------------------------------------------------------------------

def test_missing_processor_config_defaults(tmp_path):
    folder = write_checkpoint(tmp_path, "mistral", processor_config=False, config_json=True)
    processor = LlavaNextProcessor.from_pretrained(folder)
    assert processor.num_additional_image_tokens == 1  # not transformers' 0: see REFERENCE.md
    assert processor.patch_size == 14 and processor.vision_feature_select_strategy == "default"
    with pytest.raises(ValueError, match="patch_size"):
        LlavaNextProcessor.from_pretrained(write_checkpoint(tmp_path / "nothing", "mistral", processor_config=False))


def test_save_and_reload(tmp_path, radar):
    processor = LlavaNextProcessor.from_pretrained(write_checkpoint(tmp_path / "a", "mistral"))
    processor.save_pretrained(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "processor_config.json").read_text())
    assert saved == {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
                     "processor_class": "LlavaNextProcessor", "vision_feature_select_strategy": "default"}
    again = LlavaNextProcessor.from_pretrained(tmp_path / "b")
    assert_same(again(MISTRAL_PROMPT, radar), processor(MISTRAL_PROMPT, radar))


# ---- bad input -------------------------------------------------------------------------------------

def test_image_count_mismatch_names_both_numbers(tmp_path, cats):
    processor = LlavaNextProcessor.from_pretrained(write_checkpoint(tmp_path, "mistral"))
    with pytest.raises(ValueError, match="2 <image> token.*1 image"):
        processor(text="<image> and <image>", images=cats)
    with pytest.raises(ValueError, match="0 <image> token.*1 image"):
        processor(text="no image token", images=cats)
    with pytest.raises(ValueError, match="1 <image> token.*0 image"):
        processor(text="<image>")
    with pytest.raises(ValueError, match=r"\[1, 1\].*\[2, 0\]"):
        processor(text=["<image>", "<image>"], images=[[cats, cats], []])


def test_missing_image_file_is_named(tmp_path):
    processor = LlavaNextProcessor.from_pretrained(write_checkpoint(tmp_path, "mistral"))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        processor(text="<image>", images=str(tmp_path / "missing.jpg"))


# ---- transformers' call options and forms --------------------------------------------------------

def test_per_call_options_match_reference(pair, cats):
    """Image options for one call (also as images_kwargs), text truncation and padding options, and
    transformers 5's positional order with a path or None: the same inputs as transformers'."""
    ours, oracle = pair
    small = cats.crop((0, 0, 90, 60))
    prompt = MISTRAL_PROMPT
    assert_same(ours(text=prompt, images=small, do_normalize=False),
                oracle(text=prompt, images=small, do_normalize=False, return_tensors="pt"))
    assert_same(ours(text=prompt, images=small, images_kwargs={"image_mean": [0.5] * 3}),
                oracle(text=prompt, images=small, images_kwargs={"image_mean": [0.5] * 3}, return_tensors="pt"))
    assert ours(text=prompt, images=small)["pixel_values"].min() < 0  # the processor's own settings are kept
    texts = ["hi there", "a somewhat longer prompt"]
    kw = dict(padding="max_length", truncation=True, max_length=4, padding_side="left")
    assert_same(ours(text=texts, **kw), oracle(text=texts, return_tensors="pt", **kw))
    path = fixture_path("images", "coco_000000039769_cats.png")
    assert_same(ours(str(path), prompt), oracle(str(path), prompt, return_tensors="pt"))
    assert_same(ours(None, "hi"), oracle(None, "hi", return_tensors="pt"))
    assert_same(ours(small, prompt), oracle(small, prompt, return_tensors="pt"))
    assert_same(ours(text=prompt, images=small, return_token_type_ids=False, verbose=False),
                ours(text=prompt, images=small))  # transformers' no-op options are accepted
    assert_same(ours(images=small, padding=True), oracle(images=small, return_tensors="pt"))
    url_prompt = "https://example.org is a website"
    assert_same(ours(url_prompt), oracle(text=url_prompt, return_tensors="pt"))  # a prompt, not an image URL
    with pytest.raises(FileNotFoundError, match="image file not found: missing.jpg"):
        ours("missing.jpg", prompt)



def test_image_path_with_a_space_in_either_order(pair, cats, tmp_path):
    ours, oracle = pair
    path = tmp_path / "my photos" / "cat.png"
    path.parent.mkdir()
    cats.crop((0, 0, 90, 60)).save(path)
    for image in (str(path), path):
        assert_same(ours(image, MISTRAL_PROMPT), oracle(text=MISTRAL_PROMPT, images=str(path), return_tensors="pt"))


def test_truncation_into_image_tokens_and_unknown_options_are_refused(pair, cats):
    ours, _ = pair
    small = cats.crop((0, 0, 90, 60))
    with pytest.raises(ValueError, match="cuts the image tokens"):
        ours(text=MISTRAL_PROMPT, images=small, truncation=True, max_length=20)
    n = ours(text=MISTRAL_PROMPT, images=small)["input_ids"].shape[1]
    assert ours(text=MISTRAL_PROMPT, images=small, truncation=True, max_length=n - 3)["input_ids"].shape[1] == n - 3
    with pytest.raises(TypeError, match="'do_normalise'"):
        ours(text=MISTRAL_PROMPT, images=small, do_normalise=False)  # a typo is not silently dropped
    with pytest.raises(ValueError, match="do_resize=False is not supported"):
        ours(text=MISTRAL_PROMPT, images=small, do_resize=False)
    with pytest.raises(TypeError, match="either positionally or by name"):
        ours(MISTRAL_PROMPT, small, text=MISTRAL_PROMPT)


def test_chat_template_options(tmp_path, cats):
    small = cats.crop((0, 0, 64, 48))
    folders = {"mistral": write_checkpoint(tmp_path / "m", "mistral", config_json=True),
               "vicuna": write_checkpoint(tmp_path / "v", "llama", config_json=True)}
    conversation = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": small}},
                                                 {"type": "text", "text": "What is it?"}]},
                    {"role": "assistant", "content": "It is a"}]
    want = {"mistral": "[INST] <image>\nWhat is it? [/INST] It is a",
            "vicuna": VICUNA_PROMPT.split("USER:")[0] + "USER: <image>\nWhat is it? ASSISTANT: It is a"}
    for fmt, folder in folders.items():
        processor = LlavaNextProcessor.from_pretrained(folder)
        assert processor.apply_chat_template(conversation, continue_final_message=True) == want[fmt]
        assert processor.apply_chat_template(conversation).endswith("It is a</s>" if fmt == "vicuna" else "It is a </s>")
        with pytest.raises(ValueError, match="exclude each other"):
            processor.apply_chat_template(conversation, continue_final_message=True, add_generation_prompt=True)
        question = conversation[:1]
        both = processor.apply_chat_template([question, question + [{"role": "assistant", "content": "A"},
                                                                     {"role": "user", "content": "Sure?"}]],
                                             add_generation_prompt=True, tokenize=True, return_dict=True,
                                             processor_kwargs={"padding": True})
        assert both["input_ids"].shape[0] == 2 and both["pixel_values"].shape[0] == 2
        with pytest.raises(TypeError, match="tokenize=True"):
            processor.apply_chat_template(question, padding=True)


def test_post_process_and_input_names(pair):
    ours, oracle = pair
    ids = ours(text=["hi", "a longer one"], padding=True)["input_ids"]
    assert ours.post_process_image_text_to_text(ids) == oracle.post_process_image_text_to_text(ids)
    assert set(ours.model_input_names) == set(oracle.model_input_names)
