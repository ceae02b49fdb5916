"""The text tokenizer of a LLaVA-NeXT checkpoint: sentencepiece plus the added tokens.

Ids equal transformers' `LlamaTokenizer(legacy=True)` (the tokenizer LLaVA was trained with):
the text is split on added and special tokens (`<image>`, `<s>`, `</s>`, `<unk>`, `<pad>`,
`<|im_start|>`, ...), and each piece of text between them goes through sentencepiece on its own,
so each gets its own dummy prefix: "[INST] <image>\\nWhat" -> `[INST]▁`, `<image>`, `▁\\nWhat`.
Decoding follows transformers' decoder chain: pieces joined, `▁` -> space, byte pieces -> UTF-8,
one leading space dropped.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass

import sentencepiece as spm
import torch

from .hub import read_json, resolve_folder
from .batch import BatchFeature

FILES = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"]
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when the config gives none
# transformers tokenizer options that have nothing to do for a single sequence at their default
# value; any other value is refused rather than ignored.
NO_OP_OPTIONS = {"verbose": None, "return_token_type_ids": (None, False), "return_overflowing_tokens": (None, False),
                 "return_special_tokens_mask": (None, False), "return_offsets_mapping": (None, False),
                 "return_length": (None, False), "is_split_into_words": (None, False), "stride": (0,),
                 "split_special_tokens": (None, False), "clean_up_tokenization_spaces": (None, False),
                 "spaces_between_special_tokens": None}


def check_options(options: dict, where: str, no_ops: dict = NO_OP_OPTIONS) -> None:
    """Refuse keyword arguments this package does not implement, instead of ignoring them; `no_ops`
    names the ones accepted, with the values that leave nothing to do (None: any value)."""
    for name, value in options.items():
        if name not in no_ops:
            raise TypeError(f"{where} got an unexpected keyword argument {name!r}")
        allowed = no_ops[name]
        if allowed is not None and value not in allowed:
            raise ValueError(f"{where}: {name}={value!r} is not supported (only {allowed[-1]!r})")


@dataclass
class AddedToken:
    content: str
    special: bool = True
    lstrip: bool = False  # swallow the whitespace before the token
    rstrip: bool = False  # swallow the whitespace after it


class LlavaNextTokenizer:
    """sentencepiece `tokenizer.model` + added tokens, with transformers' legacy Llama ids.

    `tokenizer(text or texts, padding=False, truncation=None, max_length=None, return_tensors=None)`
    -> BatchFeature(input_ids, attention_mask); `decode(ids, skip_special_tokens=False)` (a list of
    strings for a batch of rows); `padding_side` "left" or "right", `truncation_side` likewise.
    Options of transformers' tokenizers that are not implemented here (sentence pairs, offsets,
    ...) raise an error rather than being ignored.
    """

    def __init__(self, model_file: str, added_tokens: dict[int, AddedToken] | None = None,
                 bos_token: str | None = "<s>", eos_token: str | None = "</s>", unk_token: str | None = "<unk>",
                 pad_token: str | None = None, additional_special_tokens=(), add_bos_token: bool = True,
                 add_eos_token: bool = False, padding_side: str = "left", truncation_side: str = "right",
                 model_max_length: int | None = None):
        self.sp = spm.SentencePieceProcessor(model_file=os.fspath(model_file))
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.model_max_length = int(model_max_length) if model_max_length is not None else VERY_LARGE_INTEGER
        self._added: dict[str, int] = {}
        self._added_by_id: dict[int, AddedToken] = {}
        self._splitter = None  # (tokens, regex), rebuilt when the tokens change
        for token_id, token in sorted((added_tokens or {}).items()):
            self._add(token, int(token_id))
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.additional_special_tokens = list(additional_special_tokens)
        for name in SPECIAL_NAMES:  # named special tokens the vocabulary lacks get new ids, as in transformers
            self._ensure(getattr(self, name))
        for token in self.additional_special_tokens:
            self._ensure(token)

    def _add(self, token: AddedToken, token_id: int) -> None:
        self._added[token.content] = token_id
        self._added_by_id[token_id] = token

    def _ensure(self, content: str | None) -> None:
        if content is not None and content not in self._added and self._piece_id(content) is None:
            self._add(AddedToken(content), len(self))

    def add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        """Append tokens (strings or AddedToken) to the vocabulary, as transformers does; returns how
        many were new. The llava-hf embedding tables have spare rows past the tokenizer, which new
        ids use as they are; only when `len(tokenizer)` outgrows the table, call
        `model.resize_token_embeddings(max(len(tokenizer), model.config.text_config.vocab_size))`."""
        tokens = [new_tokens] if isinstance(new_tokens, str) or hasattr(new_tokens, "content") else list(new_tokens)
        added = 0
        for t in tokens:
            token = _added_token(t, special_tokens)
            if not token.content or token.content in self._added:
                continue
            piece = self._piece_id(token.content)
            if piece is not None:  # already a piece: it keeps its id, but text is now split on it
                self._add(token, piece)
                continue
            self._add(token, len(self))
            added += 1
        return added

    def add_special_tokens(self, special_tokens_dict: dict, replace_additional_special_tokens: bool = True,
                           replace_extra_special_tokens: bool | None = None) -> int:
        """Set bos/eos/unk/pad tokens or additional_special_tokens, adding the ones the vocabulary
        lacks (returns how many); `tokenizer.add_special_tokens({"pad_token": "<pad>"})`.
        replace_extra_special_tokens is transformers 5's name for replace_additional_special_tokens."""
        if replace_extra_special_tokens is not None:
            replace_additional_special_tokens = replace_extra_special_tokens
        added = 0
        for name, value in special_tokens_dict.items():
            if name in SPECIAL_NAMES:
                added += self.add_tokens([value], special_tokens=True)
                setattr(self, name, _added_token(value, True).content)
            elif name in ("additional_special_tokens", "extra_special_tokens"):
                added += self.add_tokens(list(value), special_tokens=True)
                contents = [_added_token(v, True).content for v in value]
                self.additional_special_tokens = contents if replace_additional_special_tokens else list(
                    dict.fromkeys(self.additional_special_tokens + contents))
            else:
                raise ValueError(f"add_special_tokens: unknown key {name!r}; expected one of "
                                 f"{SPECIAL_NAMES + ('additional_special_tokens',)}")
        return added

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    # ---- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """sentencepiece pieces, without the added tokens (transformers' meaning)."""
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return max(self.vocab_size, max(self._added_by_id, default=-1) + 1)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            if tokens in self._added:
                return self._added[tokens]
            i = self._piece_id(tokens)
            return i if i is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            if ids in self._added_by_id:
                return self._added_by_id[ids].content
            return self.sp.id_to_piece(ids) if 0 <= ids < self.vocab_size else None
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.convert_tokens_to_ids(token)

    def _set_token_id(name: str):  # noqa: N805  (builds the setters below)
        def setter(self, token_id):
            token = None if token_id is None else self.convert_ids_to_tokens(int(token_id))
            if token_id is not None and token is None:
                raise ValueError(f"{name}_id {token_id} is not in the vocabulary (size {len(self)})")
            setattr(self, name, token)
        return setter

    # `tokenizer.pad_token_id = tokenizer.eos_token_id` sets pad_token, as in transformers
    bos_token_id = property(lambda self: self._token_id(self.bos_token), _set_token_id("bos_token"))
    eos_token_id = property(lambda self: self._token_id(self.eos_token), _set_token_id("eos_token"))
    unk_token_id = property(lambda self: self._token_id(self.unk_token) if self.unk_token else self.sp.unk_id(),
                            _set_token_id("unk_token"))
    pad_token_id = property(lambda self: self._token_id(self.pad_token), _set_token_id("pad_token"))
    del _set_token_id

    @property
    def special_tokens_map(self) -> dict:
        named = {n: getattr(self, n) for n in SPECIAL_NAMES if getattr(self, n) is not None}
        return {**named, "additional_special_tokens": list(self.additional_special_tokens)} \
            if self.additional_special_tokens else named

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self._added)
        return vocab

    def get_added_vocab(self) -> dict[str, int]:
        """The added tokens (`<image>`, `<pad>`, ...) and their ids, as transformers' tokenizers give them."""
        return dict(self._added)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.decode(self.convert_tokens_to_ids(list(tokens)))

    @property
    def all_special_tokens(self) -> list[str]:
        named = [getattr(self, n) for n in SPECIAL_NAMES] + self.additional_special_tokens
        added = [t.content for t in self._added_by_id.values() if t.special]
        return list(dict.fromkeys(t for t in named + added if t is not None))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    # ---- encoding ----------------------------------------------------------------------------

    def _split(self, text: str) -> list[str | int]:
        """Text pieces and token ids, in order: the added/special tokens cut the text."""
        tokens = frozenset(self._added) | frozenset(self.all_special_tokens)
        if self._splitter is None or self._splitter[0] != tokens:  # pad_token etc. may be set later
            # Longest first, so that the regex's leftmost match is also the longest one there.
            alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True) if t)
            self._splitter = tokens, re.compile(alternatives or r"(?!)")
        parts, pos, strip_next = [], 0, False
        for m in self._splitter[1].finditer(text):
            token = self._added_by_id.get(self._added.get(m.group()), AddedToken(m.group()))
            before = text[pos:m.start()]
            before = before.lstrip() if strip_next else before
            parts += [before.rstrip() if token.lstrip else before, self.convert_tokens_to_ids(m.group())]
            pos, strip_next = m.end(), token.rstrip
        rest = text[pos:]
        parts.append(rest.lstrip() if strip_next else rest)
        return [p for p in parts if p != ""]  # empty text between two tokens encodes to nothing

    def tokenize(self, text: str) -> list[str]:
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=False))

    def encode(self, text: str, add_special_tokens: bool = True, truncation=None, max_length: int | None = None,
               return_tensors: str | None = None, **options):
        """Ids of one text (a list, or a (1, n) tensor with return_tensors="pt"); with truncation,
        at most max_length ids, the special tokens included (transformers' rule)."""
        check_options(options, "encode()")
        ids = self.finish(self._encode_text(text), add_special_tokens, self.truncation_limit(truncation, max_length))
        if return_tensors is not None:
            _check_return_tensors(return_tensors)
            return torch.tensor([ids], dtype=torch.long)
        return ids

    def _encode_text(self, text: str) -> list[int]:
        """The ids of a text alone: no special tokens added, no truncation."""
        ids = []
        for part in self._split(text):
            ids += [part] if isinstance(part, int) else self.sp.encode(part)
        return ids

    def finish(self, ids: list[int], add_special_tokens: bool = True, limit: int | None = None) -> list[int]:
        """Ids of a text without special tokens -> at most `limit` ids with the special tokens (cut
        on truncation_side; None: no truncation), with bos / eos added as configured."""
        if limit is not None:
            keep = max(0, limit - (self.add_bos_token + self.add_eos_token if add_special_tokens else 0))
            ids = ids[:keep] if self.truncation_side == "right" else ids[max(0, len(ids) - keep):]
        if add_special_tokens:
            ids = [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token
        return ids

    def truncation_limit(self, truncation=None, max_length: int | None = None, padding=False,
                         pad_to_multiple_of: int | None = None) -> int | None:
        """The length rows are cut to, or None, by transformers' rules: max_length=0 cuts nothing;
        max_length without `truncation` truncates when padding is False; truncation without
        max_length cuts at model_max_length."""
        if max_length == 0:
            return None  # transformers truncates nothing then, even with a model_max_length
        if truncation is None and max_length is not None:
            if padding in (False, None):
                truncation = True
            elif padding in (True, "longest"):
                warnings.warn("max_length is ignored when padding=True and there is no truncation; to pad to "
                              "max_length use padding='max_length' (as transformers warns)", stacklevel=3)
        if truncation in (None, False, "do_not_truncate"):
            return None
        if truncation not in (True, "longest_first", "only_first"):
            raise ValueError(f"truncation={truncation!r} is not supported; use True ('longest_first') or False")
        limit = max_length if max_length is not None else self.model_max_length
        if (pad_to_multiple_of and padding not in (False, None, "do_not_pad") and limit < VERY_LARGE_INTEGER
                and limit % pad_to_multiple_of):
            raise ValueError(f"truncation to {limit} with padding to a multiple of {pad_to_multiple_of}: the "
                             "truncation length must be a multiple of pad_to_multiple_of")
        return limit

    def __call__(self, text, text_pair=None, add_special_tokens: bool = True, padding=False, truncation=None,
                 max_length: int | None = None, pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool | None = None,
                 **options) -> BatchFeature:
        check_options(options, "the tokenizer")
        if text_pair is not None:
            raise ValueError("sentence pairs (text_pair) are not supported: a LLaVA-NeXT prompt is one sequence")
        texts = [text] if isinstance(text, str) else list(text)
        limit = self.truncation_limit(truncation, max_length, padding, pad_to_multiple_of)
        ids = [self.finish(self._encode_text(t), add_special_tokens, limit) for t in texts]
        out = self.pad(ids, padding=padding, return_tensors=return_tensors, padding_side=padding_side,
                       max_length=max_length, pad_to_multiple_of=pad_to_multiple_of,
                       return_attention_mask=return_attention_mask)
        if isinstance(text, str) and return_tensors is None:
            out = BatchFeature({k: v[0] for k, v in out.items()})
        return out

    def pad(self, ids: list[list[int]], padding=True, return_tensors: str | None = None,
            padding_side: str | None = None, max_length: int | None = None, pad_to_multiple_of: int | None = None,
            return_attention_mask: bool | None = None) -> BatchFeature:
        """BatchFeature(input_ids, attention_mask) from id lists: padding=True ('longest') pads to the
        longest row, 'max_length' to max_length; pad_to_multiple_of rounds that length up."""
        if return_tensors is not None:
            _check_return_tensors(return_tensors)
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        masks = [[1] * len(x) for x in ids]
        if padding in (True, "longest"):
            target = max((len(x) for x in ids), default=0)
        elif padding == "max_length":
            target = max_length if max_length is not None else self.model_max_length
            if target >= VERY_LARGE_INTEGER:
                raise ValueError("padding='max_length' needs max_length (this tokenizer has no model_max_length)")
        elif padding in (False, None, "do_not_pad"):
            target = None
        else:
            raise ValueError(f"padding={padding!r} is not supported; use True ('longest'), 'max_length' or False")
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if target is not None and any(len(x) < target for x in ids):
            if self.pad_token_id is None:
                raise ValueError("padding needs a pad token and this tokenizer has none; set one, e.g. "
                                 "`tokenizer.pad_token = tokenizer.unk_token`")
            for i in range(len(ids)):
                fill = max(0, target - len(ids[i]))
                if side == "left":
                    ids[i], masks[i] = [self.pad_token_id] * fill + ids[i], [0] * fill + masks[i]
                else:
                    ids[i], masks[i] = ids[i] + [self.pad_token_id] * fill, masks[i] + [0] * fill
        if return_tensors == "pt":
            if len({len(x) for x in ids}) > 1:
                raise ValueError(f"texts encode to different lengths {sorted({len(x) for x in ids})}; "
                                 "pass padding=True to return one tensor")
            out = BatchFeature(input_ids=torch.tensor(ids, dtype=torch.long),
                               attention_mask=torch.tensor(masks, dtype=torch.long))
        else:
            out = BatchFeature(input_ids=ids, attention_mask=masks)
        if return_attention_mask is False:
            del out["attention_mask"]
        return out

    # ---- decoding ----------------------------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = False, **options) -> str | list[str]:
        """Text of a row of ids (a list, tensor, array or one int); a batch of rows (2-d) gives a
        list of texts, as transformers 5 does."""
        check_options(options, "decode()")
        if hasattr(ids, "tolist"):  # a tensor or numpy array
            ids = ids.tolist()
        if isinstance(ids, int):  # one id, as transformers' TextStreamer passes it
            ids = [ids]
        first = ids[0] if ids else None
        if isinstance(first, (list, tuple)) or getattr(first, "ndim", 0) > 0:  # rows: one text each
            return self.batch_decode(ids, skip_special_tokens=skip_special_tokens)
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        out, byte_run = [], bytearray()
        for i in map(int, ids):
            if i in skip or (skip_special_tokens and i not in self._added_by_id and 0 <= i < self.vocab_size
                             and self.sp.is_control(i)):  # sentencepiece's control pieces are special too
                continue
            if i not in self._added_by_id and 0 <= i < self.vocab_size and self.sp.is_byte(i):
                byte_run.append(int(self.sp.id_to_piece(i)[3:5], 16))  # "<0x0A>" -> 10
                continue
            token = self.convert_ids_to_tokens(i)
            if token is None:  # ids past the vocabulary (the model's padding rows) are dropped, first,
                continue  # as transformers does: the byte tokens around one stay one run
            if byte_run:
                out.append(_bytes_to_text(byte_run))
                byte_run = bytearray()
            out.append(token.replace("▁", " "))
        if byte_run:
            out.append(_bytes_to_text(byte_run))
        text = "".join(out)
        # transformers' decoder (Strip(left=1)) drops one leading space whether or not the model
        # adds a dummy prefix (the 34b's does not), so " leading" decodes to "leading" there too.
        return text[1:] if text.startswith(" ") else text

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **options) -> list[str]:
        check_options(options, "batch_decode()")
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # ---- reading and writing ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, revision: str | None = None, **overrides) -> "LlavaNextTokenizer":
        """From a folder or hub repo id with `tokenizer.model` and transformers' tokenizer json files.

        The ids are always the legacy ones LLaVA was trained with; a `"legacy": false` in
        tokenizer_config.json is not followed.
        """
        folder = resolve_folder(name_or_path, FILES, revision=revision)
        model_file = os.path.join(folder, "tokenizer.model")
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"{folder} has no tokenizer.model; this tokenizer reads sentencepiece models "
                                    "(a folder with only tokenizer.json is not supported)")
        def read(name):  # every one of these files is optional
            return read_json(os.path.join(folder, name), missing_ok=True)

        config, special_map = read("tokenizer_config.json"), read("special_tokens_map.json")
        added = {int(i): AddedToken(t["content"], t.get("special", True), t.get("lstrip", False),
                                    t.get("rstrip", False))
                 for i, t in config.get("added_tokens_decoder", {}).items()}
        names = {n: _content(config[n]) for n in SPECIAL_NAMES if n in config}
        names.update({n: _content(special_map[n]) for n in SPECIAL_NAMES if n in special_map})  # it wins
        extra = []
        for source in (config, special_map):
            for key in ("additional_special_tokens", "extra_special_tokens"):
                value = source.get(key) or []
                extra += [_content(t) for t in (value.values() if isinstance(value, dict) else value)]
        extra = list(dict.fromkeys(extra))  # transformers 5 may write {"image_token": "<image>"}
        for content, i in read("added_tokens.json").items():  # the older format
            added.setdefault(int(i), AddedToken(content, special=content in extra or content in names.values()))
        kwargs = dict(added_tokens=added, additional_special_tokens=extra,
                      add_bos_token=config.get("add_bos_token", True), add_eos_token=config.get("add_eos_token", False),
                      padding_side=config.get("padding_side", "left"),
                      truncation_side=config.get("truncation_side", "right"),
                      model_max_length=config.get("model_max_length"), **names)
        return cls(model_file, **{**kwargs, **overrides})

    def save_pretrained(self, folder) -> None:
        """tokenizer.model, tokenizer_config.json and special_tokens_map.json, as transformers writes them."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
            f.write(self.sp.serialized_model_proto())
        named = {n: getattr(self, n) for n in SPECIAL_NAMES if getattr(self, n) is not None}
        decoder = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": False, "rstrip": t.rstrip,
                            "single_word": False, "special": t.special}
                   for i, t in sorted(self._added_by_id.items())}
        config = {"add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
                  "added_tokens_decoder": decoder, "additional_special_tokens": self.additional_special_tokens,
                  "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": self.model_max_length,
                  "padding_side": self.padding_side, "truncation_side": self.truncation_side,
                  "tokenizer_class": "LlamaTokenizer", **named}
        _write_json(folder, "tokenizer_config.json", config)
        _write_json(folder, "special_tokens_map.json",
                    {**named, "additional_special_tokens": self.additional_special_tokens})

    def __repr__(self):
        return (f"LlavaNextTokenizer(vocab_size={self.vocab_size}, added={len(self._added)}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r}, "
                f"padding_side={self.padding_side!r})")


def _added_token(token, special: bool) -> AddedToken:
    """Ours from a string, ours, or transformers' / tokenizers' AddedToken (same attribute names)."""
    if isinstance(token, str):
        return AddedToken(token, special=special)
    return AddedToken(token.content, bool(getattr(token, "special", special)), bool(getattr(token, "lstrip", False)),
                      bool(getattr(token, "rstrip", False)))


def _check_return_tensors(return_tensors) -> None:
    if return_tensors != "pt":
        raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None")


def _bytes_to_text(run: bytearray) -> str:
    # transformers' ByteFallback: a run that is not valid UTF-8 becomes one U+FFFD per byte.
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _write_json(folder: str, name: str, data: dict) -> None:
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
