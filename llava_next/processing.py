"""Prompt + images -> model inputs: the image processor, the tokenizer and the `<image>` expansion.

Each `<image>` id in a prompt becomes exactly as many `<image>` ids as the model will make features
for that image (anyres.num_image_tokens), so the model can write the features in their places.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

from . import chat_format as formats
from .anyres import num_image_tokens
from .config import LlavaNextConfig
from .hub import read_json, resolve_folder
from .batch import BatchFeature
from .image_processing import LlavaNextImageProcessor, flatten_images
from .tokenizer import FILES as TOKENIZER_FILES
from .tokenizer import NO_OP_OPTIONS, LlavaNextTokenizer, check_options

# transformers' processor options with nothing to do here: the tokenizer's, and one of its own
PROCESSOR_NO_OPS = {**NO_OP_OPTIONS, "return_mm_token_type_ids": (None, False)}

PROCESSOR_FILES = ["preprocessor_config.json", "processor_config.json", "config.json", "chat_template.json",
                   "chat_template.jinja"] + TOKENIZER_FILES


class LlavaNextProcessor:
    """`processor(text, images, return_tensors="pt", padding=False)` -> BatchFeature(input_ids,
    attention_mask, pixel_values, image_sizes); prompts of different lengths need padding=True
    (left padding); `apply_chat_template(conversation)` -> prompt."""

    def __init__(self, image_processor: LlavaNextImageProcessor | None = None,
                 tokenizer: LlavaNextTokenizer | None = None, patch_size: int = 14,
                 vision_feature_select_strategy: str = "default", num_additional_image_tokens: int = 1,
                 image_token: str = "<image>", chat_format: str | None = None):
        if chat_format is not None and chat_format not in formats.FORMATS:
            raise ValueError(f"unknown chat_format {chat_format!r}; expected one of {formats.FORMATS}")
        self.image_processor = image_processor or LlavaNextImageProcessor()
        self.tokenizer = tokenizer
        self.patch_size = int(patch_size)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = int(num_additional_image_tokens)
        self.image_token = image_token
        self.chat_format = chat_format

    @property
    def image_token_id(self) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.image_token!r} token; LLaVA-NeXT tokenizers add it "
                             "in tokenizer_config.json (added_tokens_decoder)")
        return token_id

    # ---- reading and writing ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, chat_format: str | None = None, revision: str | None = None,
                        **overrides) -> "LlavaNextProcessor":
        """From a checkpoint folder or hub repo id (only the small processor files are fetched).

        processor_config.json gives patch_size, vision_feature_select_strategy and
        num_additional_image_tokens (1 when absent: the count that matches the model's features);
        patch_size falls back to config.json's vision_config. `chat_format` (one of "mistral",
        "vicuna", "chatml") overrides the format read from the folder.
        """
        folder = resolve_folder(name_or_path, PROCESSOR_FILES, revision=revision)
        image_processor = LlavaNextImageProcessor.from_pretrained(folder)
        tokenizer = LlavaNextTokenizer.from_pretrained(folder)
        path = os.path.join(folder, "processor_config.json")
        settings = read_json(path, missing_ok=True)
        settings = {k: v for k, v in settings.items() if v is not None}
        config_path = os.path.join(folder, "config.json")
        if os.path.isfile(config_path) and ("patch_size" not in settings
                                            or "vision_feature_select_strategy" not in settings):
            config = LlavaNextConfig.from_json_file(config_path)
            settings.setdefault("patch_size", config.vision_config.patch_size)
            settings.setdefault("vision_feature_select_strategy", config.vision_feature_select_strategy)
        kwargs = {k: settings[k] for k in ("patch_size", "vision_feature_select_strategy",
                                           "num_additional_image_tokens", "image_token") if k in settings}
        kwargs.update(overrides)
        if "patch_size" not in kwargs:
            raise ValueError(f"{folder}: the vision patch size is unknown (no patch_size in processor_config.json "
                             "and no config.json); pass patch_size=14 for the llava-hf checkpoints")
        has_im_start = tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
        chat_format = chat_format or formats.detect_format(folder, has_im_start)
        return cls(image_processor, tokenizer, chat_format=chat_format, **kwargs)

    def save_pretrained(self, folder) -> None:
        os.makedirs(folder, exist_ok=True)
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        config = {"image_token": self.image_token, "num_additional_image_tokens": self.num_additional_image_tokens,
                  "patch_size": self.patch_size, "processor_class": "LlavaNextProcessor",
                  "vision_feature_select_strategy": self.vision_feature_select_strategy}
        with open(os.path.join(folder, "processor_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)

    def __repr__(self):
        return (f"LlavaNextProcessor(patch_size={self.patch_size}, strategy={self.vision_feature_select_strategy!r}, "
                f"num_additional_image_tokens={self.num_additional_image_tokens}, chat_format={self.chat_format!r},\n"
                f"  image_processor={self.image_processor!r},\n  tokenizer={self.tokenizer!r})")

    # ---- inputs ----------------------------------------------------------------------------

    def num_image_tokens(self, image_size, image_processor: LlavaNextImageProcessor | None = None) -> int:
        """`<image>` ids for one image of original (height, width), as transformers counts them."""
        image_processor = image_processor or self.image_processor
        extra = self.num_additional_image_tokens + (self.vision_feature_select_strategy == "full")
        return num_image_tokens(image_size, image_processor.image_grid_pinpoints,
                                image_processor.tile_size, self.patch_size, extra)

    TEXT_OPTIONS = ("padding", "truncation", "max_length", "pad_to_multiple_of", "padding_side", "add_special_tokens",
                    "return_attention_mask")

    def __call__(self, *args, text=None, images=None, return_tensors: str | None = "pt", text_kwargs=None,
                 images_kwargs=None, common_kwargs=None, **options) -> BatchFeature:
        """`processor(text, images)`, or transformers 5's order `processor(images, text)`: positional
        arguments are told apart by type (images, image paths or base64 data URIs vs prompt
        strings; http(s) URLs count as images but are refused, not fetched).

        Text options (padding, truncation, max_length, pad_to_multiple_of, padding_side,
        add_special_tokens, return_attention_mask) go to the tokenizer and image options
        (do_normalize, image_mean, image_grid_pinpoints, ...) to the image processor, for this call;
        they may also come in transformers' text_kwargs / images_kwargs / common_kwargs dicts.
        Anything else is an error, not ignored. Truncation that would cut an image's tokens is
        refused, as transformers refuses it."""
        text, images = _text_and_images(args, text, images)
        options = {**(common_kwargs or {}), **(text_kwargs or {}), **(images_kwargs or {}), **options}
        return_tensors = options.pop("return_tensors", return_tensors)
        text_options = {k: options.pop(k) for k in list(options) if k in self.TEXT_OPTIONS}
        check_options({k: options.pop(k) for k in list(options) if k in PROCESSOR_NO_OPS}, "the processor",
                      PROCESSOR_NO_OPS)
        image_processor = self.image_processor.with_options(**options)  # refuses what is left that it does not take
        if text is None and images is None:
            raise ValueError("give a prompt (text=...), images (images=...) or both")
        if text is None:  # text options have nothing to act on
            return image_processor(images, return_tensors=return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text is an empty list; give at least one prompt (an empty string is fine)")
        tok = self.tokenizer
        add_special = text_options.pop("add_special_tokens", True)
        limit = tok.truncation_limit(text_options.pop("truncation", None), text_options.get("max_length"),
                                     text_options.get("padding", False), text_options.get("pad_to_multiple_of"))
        ids = [tok.encode(t, add_special_tokens=False) for t in texts]
        self._check_image_count(ids, images)  # before the (slower) image work
        out = BatchFeature()
        if flatten_images(images):
            out.update(image_processor(images))
            ids = self._expand_images(ids, out["image_sizes"].tolist(), image_processor)
        full = ids
        ids = [tok.finish(row, add_special, limit) for row in ids]
        image_id = self.image_token_id
        for row, (before, after) in enumerate(zip(full, ids)):
            if after.count(image_id) != before.count(image_id):
                raise ValueError(f"truncation to {limit} tokens cuts the image tokens of prompt {row} "
                                 f"({before.count(image_id)} of its {len(before)} tokens are <image>): raise "
                                 "max_length or shorten the text")
        text_options.setdefault("padding", False)  # as transformers: a batch of unequal prompts needs padding=True
        out.update(tok.pad(ids, return_tensors=return_tensors, **text_options))
        return BatchFeature({k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")
                             if k in out})

    def _check_image_count(self, ids: list[list[int]], images) -> None:
        image_id = self.image_token_id
        found = [row.count(image_id) for row in ids]
        given = len(flatten_images(images))
        if sum(found) != given:
            where = "the prompt has" if len(ids) == 1 else f"the {len(ids)} prompts have"
            raise ValueError(f"{where} {sum(found)} {self.image_token} token(s) but {given} image(s) were given; "
                             f"put one {self.image_token} in the prompt per image")
        per_prompt = _per_prompt_counts(images, len(ids))
        if per_prompt is not None and per_prompt != found:
            raise ValueError(f"the prompts have {found} {self.image_token} tokens but the images come in groups "
                             f"of {per_prompt}")

    def _expand_images(self, ids: list[list[int]], image_sizes: list, image_processor=None) -> list[list[int]]:
        """Each `<image>` id repeated to its image's token count; images are taken in prompt order."""
        image_id = self.image_token_id
        counts = iter([self.num_image_tokens(size, image_processor) for size in image_sizes])
        expanded = []
        for row in ids:
            new = []
            for token in row:
                new += [image_id] * next(counts) if token == image_id else [token]
            expanded.append(new)
        return expanded

    # ---- chat and decoding -------------------------------------------------------------------

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, return_tensors: str | None = "pt", chat_format=None,
                            continue_final_message: bool = False, processor_kwargs=None, **kwargs):
        """The prompt string(s) of a conversation (or a list of them) in the checkpoint's format.

        add_generation_prompt=True ends the prompt where the assistant's answer starts (what
        generation wants; False by default, as in transformers); continue_final_message=True leaves
        a final assistant message open instead. With tokenize=True the prompt goes through the
        processor with the images found in the content items ({"type": "image", "image" | "path" |
        "url": ...} or {"type": "image_url", "image_url": {"url": ...}}), with `processor_kwargs`
        and the other keyword arguments as processor options; returns input_ids, or everything
        with return_dict=True.
        """
        fmt = chat_format or self.chat_format
        if fmt is None:
            raise ValueError(f"the prompt format of this checkpoint is unknown; {formats.HOW_TO_CHOOSE}")
        kwargs = {**(processor_kwargs or {}), **kwargs}
        if kwargs and not tokenize:
            raise TypeError(f"apply_chat_template() got unexpected keyword arguments {sorted(kwargs)} (processor "
                            "options apply with tokenize=True)")
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and \
            isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        prompts = [formats.render(c, fmt, add_generation_prompt, continue_final_message) for c in conversations]
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [formats.message_images(c) for c in conversations]
        if any(im is None for group in images for im in group):
            raise ValueError("tokenize=True needs the images in the content items ({'type': 'image', 'image': "
                             "...}); or render the prompt and call the processor with images=...")
        out = self(text=prompts, images=images if any(images) else None, return_tensors=return_tensors, **kwargs)
        return out if return_dict else out["input_ids"]

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True,
                                        **kwargs) -> list[str]:
        """The texts of generate()'s output rows (transformers' name for batch_decode here)."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    model_input_names = ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


def _text_and_images(args: tuple, text, images):
    """(text, images) from the positional arguments, in either order, plus the named ones."""
    if len(args) > 2:
        raise TypeError(f"the processor takes text and images (in either order), got {len(args)} positional arguments")
    if len(args) == 2:
        if text is not None or images is not None:
            raise TypeError("give text and images either positionally or by name, not both")
        first, second = args
        if _is_images(first) or _is_paths(first) or (first is None and second is not None and not _is_images(second)
                                                     and not _is_paths(second)):
            return second, first  # transformers 5's (images, text)
        return first, second
    if len(args) == 1:
        if _is_images(args[0]) or _is_paths(args[0]):
            if images is not None:
                raise TypeError("images given twice (positionally and by name)")
            return text, args[0]
        if text is not None:
            raise TypeError("text given twice (positionally and by name)")
        return args[0], images
    return text, images


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def _is_paths(x) -> bool:
    """An image file that exists, an http(s) URL or a data URI (one word), or a (nested) non-empty
    list of them.
    A one-word string with an image file's suffix that does not exist is an error, not a prompt."""
    if isinstance(x, (str, os.PathLike)):
        s = os.fspath(x)
        if os.path.isfile(s):
            return True
        if not s or any(c.isspace() for c in s):
            return False  # a prompt
        if s.startswith(("http://", "https://", "data:image/")):
            return True
        if s.lower().endswith(IMAGE_SUFFIXES):
            raise FileNotFoundError(f"image file not found: {s}")
        return False
    return isinstance(x, (list, tuple)) and bool(x) and all(_is_paths(v) for v in x)


def _is_image(x) -> bool:
    return isinstance(x, (Image.Image, np.ndarray, torch.Tensor))


def _is_images(x) -> bool:
    return _is_image(x) or (isinstance(x, (list, tuple)) and bool(x) and all(
        _is_image(i) or (isinstance(i, (list, tuple)) and all(map(_is_image, i))) for i in x))


def _per_prompt_counts(images, n_prompts: int) -> list[int] | None:
    """Images per prompt when given as one list per prompt, else None."""
    if isinstance(images, (list, tuple)) and len(images) == n_prompts and n_prompts > 1 and \
            all(isinstance(group, (list, tuple)) for group in images):
        return [len(flatten_images(group)) for group in images]
    return None
