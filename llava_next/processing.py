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
from .hub import resolve_folder
from .batch import BatchFeature
from .image_processing import LlavaNextImageProcessor, flatten_images
from .tokenizer import FILES as TOKENIZER_FILES
from .tokenizer import LlavaNextTokenizer

PROCESSOR_FILES = ["preprocessor_config.json", "processor_config.json", "config.json", "chat_template.json",
                   "chat_template.jinja"] + TOKENIZER_FILES


class LlavaNextProcessor:
    """`processor(text, images, return_tensors="pt", padding=False)` -> BatchFeature(input_ids,
    attention_mask, pixel_values, image_sizes); `apply_chat_template(conversation)` -> prompt."""

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
        settings = {}
        path = os.path.join(folder, "processor_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                settings = json.load(f)
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

    def num_image_tokens(self, image_size) -> int:
        """`<image>` ids for one image of original (height, width), as transformers counts them."""
        extra = self.num_additional_image_tokens + (self.vision_feature_select_strategy == "full")
        return num_image_tokens(image_size, self.image_processor.image_grid_pinpoints,
                                self.image_processor.tile_size, self.patch_size, extra)

    def __call__(self, text=None, images=None, return_tensors: str | None = "pt", padding=False,
                 padding_side: str | None = None, add_special_tokens: bool = True, **unused) -> BatchFeature:
        """Also accepts transformers 5's positional order (images, text) when the types make it clear."""
        if _is_images(text) and (images is None or isinstance(images, str) or _is_text_list(images)):
            text, images = images, text
        if text is None and images is None:
            raise ValueError("give a prompt (text=...), images (images=...) or both")
        if text is None:
            return self.image_processor(images)
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text is an empty list; give at least one prompt (an empty string is fine)")
        ids = [self.tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        self._check_image_count(ids, images)  # before the (slower) image work
        out = BatchFeature()
        if flatten_images(images):
            out.update(self.image_processor(images))
            ids = self._expand_images(ids, out["image_sizes"].tolist())
        out.update(self.tokenizer.pad(ids, padding=padding, return_tensors=return_tensors, padding_side=padding_side))
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

    def _expand_images(self, ids: list[list[int]], image_sizes: list) -> list[list[int]]:
        """Each `<image>` id repeated to its image's token count; images are taken in prompt order."""
        image_id = self.image_token_id
        counts = iter([self.num_image_tokens(size) for size in image_sizes])
        expanded = []
        for row in ids:
            new = []
            for token in row:
                new += [image_id] * next(counts) if token == image_id else [token]
            expanded.append(new)
        return expanded

    # ---- chat and decoding -------------------------------------------------------------------

    def apply_chat_template(self, conversation, add_generation_prompt: bool = True, tokenize: bool = False,
                            return_dict: bool = False, return_tensors: str | None = "pt", chat_format=None,
                            **kwargs):
        """The prompt string(s) of a conversation (or a list of them) in the checkpoint's format.

        With tokenize=True the prompt goes through the processor with the images found in the
        content items ({"type": "image", "image" | "path" | "url": ...}); returns input_ids, or
        everything with return_dict=True.
        """
        fmt = chat_format or self.chat_format
        if fmt is None:
            raise ValueError(f"the prompt format of this checkpoint is unknown; {formats.HOW_TO_CHOOSE}")
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and \
            isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        prompts = [formats.render(c, fmt, add_generation_prompt) for c in conversations]
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


def _is_image(x) -> bool:
    return isinstance(x, (Image.Image, np.ndarray, torch.Tensor))


def _is_images(x) -> bool:
    return _is_image(x) or (isinstance(x, (list, tuple)) and bool(x) and all(
        _is_image(i) or (isinstance(i, (list, tuple)) and all(map(_is_image, i))) for i in x))


def _is_text_list(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(t, str) for t in x)


def _per_prompt_counts(images, n_prompts: int) -> list[int] | None:
    """Images per prompt when given as one list per prompt, else None."""
    if isinstance(images, (list, tuple)) and len(images) == n_prompts and n_prompts > 1 and \
            all(isinstance(group, (list, tuple)) for group in images):
        return [len(flatten_images(group)) for group in images]
    return None
