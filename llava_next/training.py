"""Helpers for custom training loops: labels from conversations, freezing, optimizer groups.

The model itself needs nothing from here to train: it is a plain nn.Module whose parameter
names are the hub's keys, and `model(**inputs, labels=labels).loss` is the next-token
cross-entropy, mean over labels != -100. These helpers only save the usual boilerplate:

    inputs = build_labels(processor, conversations)       # input_ids, attention_mask, labels, pixels
    groups = projector_only(model, lr=1e-3)               # LLaVA's stage 1: only the glue trains
    opt = torch.optim.AdamW(groups)
    model(**inputs).loss.backward(); opt.step()
"""

from __future__ import annotations

import fnmatch

import torch

from . import chat_format as formats
from .model import IGNORE_INDEX

# Name patterns (fnmatch, on the hub key names) of the three parts of the model.
PROJECTOR = ("multi_modal_projector.*", "image_newline")  # the glue, trained from scratch in stage 1
VISION_TOWER = ("vision_tower.*",)
LANGUAGE_MODEL = ("language_model.*",)


# ---- labels ---------------------------------------------------------------------------------

def assistant_spans(tokenizer, conversation: list[dict], chat_format: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole conversation (as the processor tokenizes it, before the `<image>`
    expansion) and the [start, end) span of each assistant reply, its end-of-turn token included.

    A reply's span is found by rendering the conversation up to the reply (with the generation
    prompt) and through it, and tokenizing both: that only works if tokenization is
    prefix-stable at those boundaries, which is checked.
    """
    full = formats.render(conversation, chat_format, add_generation_prompt=False)
    full_ids = tokenizer.encode(full)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
    spans = []
    for i, message in enumerate(conversation):
        if message.get("role") != "assistant":
            continue
        before = formats.render(conversation[:i], chat_format, add_generation_prompt=True)
        through = formats.render(conversation[: i + 1], chat_format, add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(f"message {i}: the {chat_format!r} prompt up to this reply is not a prefix of the "
                             f"conversation rendered through it ({before[-40:]!r} vs {through[-60:]!r}); the reply's "
                             "tokens cannot be located")
        a = bos + tokenizer.encode(before, add_special_tokens=False)
        b = bos + tokenizer.encode(through, add_special_tokens=False)
        for where, shorter, longer in (("start", a, b), ("end", b, full_ids)):
            if longer[: len(shorter)] != shorter:
                j = next((j for j, (x, y) in enumerate(zip(shorter, longer)) if x != y), len(longer))
                raise ValueError(
                    f"message {i}: tokenization is not prefix-stable at the {where} of this assistant reply: "
                    f"alone, the text before that point ends in tokens {shorter[max(0, j - 2):j + 3]}; within the "
                    f"conversation the same positions hold {longer[max(0, j - 2):j + 3]} (the tokenizer merges text "
                    "across the turn boundary), so the reply's tokens cannot be told apart from the prompt's. Use a "
                    "chat format whose turns end at a special token or whitespace, or build the labels yourself.")
        spans.append((len(a), len(b)))
    return full_ids, spans


def build_labels(processor, conversations, images=None, chat_format: str | None = None, padding=True):
    """Model inputs with `labels` for supervised fine-tuning, from one conversation or a list of them.

    Only the assistant replies are supervised, each with its end-of-turn token (`</s>` for mistral
    and vicuna, `<|im_end|>` for chatml); the system prompt, the user turns, the `<image>` tokens
    and the padding get -100. Images come from `images` (as the processor takes them, one list
    per conversation) or from the conversations' {"type": "image", "image": ...} content items.
    Returns the processor's BatchFeature (input_ids, attention_mask, pixel_values, image_sizes)
    plus labels, ready for `model(**inputs)`.
    """
    fmt = chat_format or processor.chat_format
    if fmt is None:
        raise ValueError(f"the prompt format of this checkpoint is unknown; {formats.HOW_TO_CHOOSE}")
    batched = isinstance(conversations, (list, tuple)) and bool(conversations) and \
        isinstance(conversations[0], (list, tuple))
    conversations = list(conversations) if batched else [conversations]
    if images is None:
        found = [formats.message_images(c) for c in conversations]
        if any(im is None for group in found for im in group):
            raise ValueError("the conversations have {'type': 'image'} items without the image; pass images=...")
        images = found if any(found) else None

    tok = processor.tokenizer
    specials = sorted(set(tok.all_special_tokens) | set(tok.get_added_vocab()), key=len, reverse=True)
    for c, conversation in enumerate(conversations):
        _check_messages(specials, conversation, c)
    rows = []  # (ids, labels) before the <image> expansion
    for conversation in conversations:
        ids, spans = assistant_spans(processor.tokenizer, conversation, fmt)
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start:end]
        rows.append((ids, labels))

    prompts = [formats.render(c, fmt, add_generation_prompt=False) for c in conversations]
    out = processor(text=prompts, images=images, return_tensors="pt", padding=padding)
    image_id = processor.image_token_id
    counts = iter([processor.num_image_tokens(s) for s in out["image_sizes"].tolist()] if images is not None else [])
    labels = torch.full_like(out["input_ids"], IGNORE_INDEX)
    for i, (ids, row_labels) in enumerate(rows):
        expanded_ids, expanded_labels = [], []
        for token, label in zip(ids, row_labels):
            n = next(counts) if token == image_id else 1
            expanded_ids += [token] * n
            expanded_labels += [IGNORE_INDEX if token == image_id else label] * n
        real = out["attention_mask"][i].bool()
        if out["input_ids"][i][real].tolist() != expanded_ids:
            raise RuntimeError(f"conversation {i}: the processor's input_ids differ from the tokens the labels were "
                               "built for; the processor and its tokenizer disagree on this prompt")
        labels[i, real] = torch.tensor(expanded_labels)
    if not (labels != IGNORE_INDEX).any():  # the loss would be a NaN (a mean over nothing)
        raise ValueError("no conversation has an assistant reply: nothing to supervise")
    out["labels"] = labels
    return out


def _check_messages(specials: list[str], conversation: list[dict], c: int) -> None:
    """Refuse what would train the wrong tokens: an image in a reply (its text around the image
    would be supervised in pieces) and a special token's text (`specials`, longest first) inside a
    message, which the tokenizer reads as that token (an `</s>` mid-reply would teach the model to
    stop there)."""
    for m, message in enumerate(conversation):
        content = message.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        for item in items:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind in ("image", "image_url") and message.get("role") == "assistant":
                raise ValueError(f"conversation {c}, message {m}: an image in an assistant reply; LLaVA's replies "
                                 "are text (put the image in the user turn before it)")
            text = item.get("text", "") if kind == "text" else ""
            found = next((s for s in specials if s and s in text), None)
            if found == "<image>":
                raise ValueError(f"conversation {c}, message {m}: its text holds '<image>' (LLaVA's data format); "
                                 "here an image is a content item: "
                                 '"content": [{"type": "image"}, {"type": "text", "text": "..."}], the images '
                                 "passed in order with images=")
            if found is not None:
                raise ValueError(f"conversation {c}, message {m}: its text holds {found!r}, which the tokenizer reads "
                                 "as that special token, not as text; remove or escape it")


# ---- freezing -------------------------------------------------------------------------------

WRAPPERS = ("module", "_orig_mod")  # DistributedDataParallel's and torch.compile's wrapped module


def _unwrap(model):
    while True:
        inner = next((getattr(model, w) for w in WRAPPERS if isinstance(getattr(model, w, None), torch.nn.Module)),
                     None)
        if inner is None:
            return model
        model = inner


def _parameters(model) -> list[tuple[torch.nn.Parameter, list[str]]]:
    """Each parameter once with all its hub names: a DDP or torch.compile wrapper's prefix left
    out, and every name of a parameter two modules share (lm_head tied to the embedding)."""
    named = {}
    for name, p in _unwrap(model).named_parameters(remove_duplicate=False):
        named.setdefault(id(p), (p, []))[1].append(name)
    return list(named.values())


def never_trained(model) -> set[str]:
    """Names of the parameters that can get no gradient: the vision layers after the deepest
    feature layer and `post_layernorm`, which LLaVA never runs (kept so checkpoints save whole)."""
    vm = _unwrap(model).vision_tower.vision_model
    unused = {id(p) for m in [*vm.encoder.layers[vm.num_layers_run:], vm.post_layernorm] for p in m.parameters()}
    return {name for p, names in _parameters(model) if id(p) in unused for name in names}


def _matches(names, patterns) -> bool:
    names = [names] if isinstance(names, str) else names
    return any(fnmatch.fnmatchcase(name, pat) for name in names for pat in patterns)


def set_trainable(model, patterns) -> list[str]:
    """Train exactly the parameters whose names match one of the fnmatch `patterns`; freeze the rest.
    Returns the names left trainable."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    skip = never_trained(model)
    trainable = []
    for p, names in _parameters(model):
        p.requires_grad_(not skip.intersection(names) and _matches(names, patterns))
        if p.requires_grad:
            trainable += names
    return trainable


def _set_frozen(model, patterns, frozen: bool) -> None:
    skip = never_trained(model)
    for p, names in _parameters(model):
        if _matches(names, patterns):
            p.requires_grad_(not frozen and not skip.intersection(names))


def freeze_vision_tower(model, frozen: bool = True) -> None:
    """Freeze (or, with frozen=False, unfreeze) the CLIP tower; the never-run layers stay frozen."""
    _set_frozen(model, VISION_TOWER, frozen)


def freeze_language_model(model, frozen: bool = True) -> None:
    """Freeze (or unfreeze) the decoder, its embeddings and lm_head."""
    _set_frozen(model, LANGUAGE_MODEL, frozen)


# ---- optimizer parameter groups -------------------------------------------------------------

def parameter_groups(model, lrs: dict | None = None, default_lr: float | None = None,
                     weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups of the trainable parameters by name (never those the model never runs,
    `never_trained`): `lrs` maps an fnmatch pattern (or a
    tuple of them) to a learning rate, the first match wins; the others get `default_lr`, or are
    left out of the optimizer when it is None. Weight decay applies to matrices only (not to
    biases, norms, `image_newline`, `class_embedding`). Each group carries its "param_names"
    (torch's own key for them, so optimizer state dicts speak the hub names).

        parameter_groups(model, {"vision_tower.*": 2e-6}, default_lr=1e-5)   # LLaVA-NeXT stage 2
    """
    rules = [((pat,) if isinstance(pat, str) else tuple(pat), lr) for pat, lr in (lrs or {}).items()]
    groups: dict[tuple[float, float], dict] = {}
    unused = never_trained(model)  # even if unfrozen by hand (model.requires_grad_(True)): no gradient ever
    for p, names in _parameters(model):
        if not p.requires_grad or names[0] in unused:
            continue
        name = names[0]
        lr = next((lr for pats, lr in rules if _matches(names, pats)), default_lr)
        if lr is None:
            continue
        decay = weight_decay if p.dim() >= 2 else 0.0
        group = groups.setdefault((lr, decay), {"params": [], "param_names": [], "lr": lr,
                                                    "weight_decay": decay})
        group["params"].append(p)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("no trainable parameter matched: check the patterns and requires_grad "
                         "(names are the hub keys, e.g. 'multi_modal_projector.linear_1.weight')")
    return list(groups.values())


def projector_only(model, lr: float = 1e-3, weight_decay: float = 0.0) -> list[dict]:
    """LLaVA's first stage: freeze both towers, train the projector and `image_newline`."""
    set_trainable(model, PROJECTOR)
    return parameter_groups(model, {PROJECTOR: lr}, weight_decay=weight_decay)
