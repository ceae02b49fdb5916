"""Checkpoint-style folders for the tests, and transformers' processor built as the reference.

transformers is imported here and in tests only, never by llava_next.

The reference tokenizer is transformers' slow sentencepiece tokenizer with `legacy=True` (each
text piece between special tokens encoded by sentencepiece on its own). In transformers 5.x
`LlamaTokenizer(vocab_file=...)` no longer reads the sentencepiece file (it builds a 3-token
vocabulary), and `LlamaTokenizer.from_pretrained` builds a `tokenizers` BPE that differs after
special tokens, so the oracle is `SentencePieceBackend(legacy=True)` with BOS added. That
`from_pretrained` tokenizer is still the reference for *decoding* (the slow one prints byte
pieces like `<0x0A>` as they are), so `oracle_decoder` returns it.
"""

import json
import shutil
from pathlib import Path

from conftest import fixture_path

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# preprocessor_config.json of the llava-hf LLaVA-NeXT checkpoints.
PREPROCESSOR_CONFIG = {
    "aspect_ratio_setting": "anyres", "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_grid_pinpoints": PINPOINTS, "image_mean": CLIP_MEAN, "image_processor_type": "LlavaNextImageProcessor",
    "image_std": CLIP_STD, "processor_class": "LlavaNextProcessor", "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}
TOKENIZERS = {  # text model -> (fixture file, pad token, config fixture)
    "mistral": ("mistral_7b_v0.1_tokenizer.model", "<pad>", "llava-v1.6-mistral-7b-hf.config.json"),
    "llama": ("llama2_tokenizer.model", "<unk>", "llava-v1.6-vicuna-7b-hf.config.json"),
}


def added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_checkpoint(folder: Path, text: str = "mistral", processor_config: bool = True,
                     config_json: bool = False) -> Path:
    """A llava-hf style processor folder: tokenizer.model + json files, like the hub's."""
    model_file, pad, config_name = TOKENIZERS[text]
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(fixture_path("tokenizers", model_file), folder / "tokenizer.model")
    added = {"0": added_token("<unk>"), "1": added_token("<s>"), "2": added_token("</s>"),
             "32000": added_token("<image>")}
    if pad == "<pad>":
        added["32001"] = added_token("<pad>")
    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added, "bos_token": "<s>",
        "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": True, "pad_token": pad,
        "padding_side": "left", "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    if processor_config:
        (folder / "processor_config.json").write_text(json.dumps({
            "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
            "processor_class": "LlavaNextProcessor", "vision_feature_select_strategy": "default"}))
    if config_json:
        shutil.copy(fixture_path("configs", config_name), folder / "config.json")
    return folder


def write_yi_checkpoint(folder: Path, dummy_prefix: bool = False, config_json: bool = False) -> Path:
    """A 34b-style folder around a 400-piece sentencepiece model trained here (no Yi copy exists):
    Yi's layout (unk 0, <|startoftext|> 1, <|endoftext|> 2, <|im_start|> 6, <|im_end|> 7) and
    `<image>` = the vocab size, like 64000 for the real one."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    lines = ["The assistant answers questions about images.", "What is shown in this image? A chart.",
             "Describe the picture in detail, please.", "数字と文字 123 456", "user assistant system"] * 40
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, add_dummy_prefix=dummy_prefix,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, bos_piece="<|startoftext|>", eos_piece="<|endoftext|>",
        control_symbols=["<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>"],
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    added = {"0": added_token("<unk>"), "1": added_token("<|startoftext|>"), "2": added_token("<|endoftext|>"),
             "6": added_token("<|im_start|>"), "7": added_token("<|im_end|>"), "400": added_token("<image>")}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added, "legacy": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "<unk>",
        "padding_side": "left", "tokenizer_class": "LlamaTokenizer"}))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    if config_json:
        shutil.copy(fixture_path("configs", "llava-v1.6-34b-hf.config.json"), folder / "config.json")
    return folder


def oracle_tokenizer(folder: Path, padding_side: str = "left"):
    """transformers' slow legacy tokenizer with the folder's added tokens (ids in their order)."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    config = json.loads((folder / "tokenizer_config.json").read_text())
    tok = SentencePieceBackend(vocab_file=str(folder / "tokenizer.model"), legacy=True, special_tokens_pattern="bos",
                               bos_token=config["bos_token"], eos_token=config["eos_token"],
                               unk_token=config["unk_token"], padding_side=padding_side)
    for token_id, token in sorted(config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0])):
        if token["content"] == config.get("pad_token"):
            tok.add_special_tokens({"pad_token": token["content"]})
        else:
            tok.add_tokens([token["content"]], special_tokens=True)
        assert tok.convert_tokens_to_ids(token["content"]) == int(token_id), token
    if config.get("pad_token") and tok.pad_token is None:
        tok.pad_token = config["pad_token"]
    return tok


def oracle_decoder(folder: Path):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(str(folder), legacy=True)


def oracle_image_processor(**overrides):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    config = {k: v for k, v in PREPROCESSOR_CONFIG.items()
              if k not in ("aspect_ratio_setting", "image_processor_type", "processor_class")}
    return LlavaNextImageProcessorPil(**{**config, **overrides})


def oracle_processor(folder: Path, num_additional_image_tokens: int = 1, **image_overrides):
    from transformers import LlavaNextProcessor

    return LlavaNextProcessor(image_processor=oracle_image_processor(**image_overrides),
                              tokenizer=oracle_tokenizer(folder), patch_size=14,
                              vision_feature_select_strategy="default",
                              num_additional_image_tokens=num_additional_image_tokens)
