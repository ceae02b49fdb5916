"""Training: loss and every parameter's gradient against transformers, gradient checkpointing,
the labels helper, freezing and parameter groups, and the fine-tuning example script."""

import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import fixture_path
from llava_next import LlavaNextConfig, LlavaNextForConditionalGeneration
from llava_next.loading import legacy_key
from llava_next.training import (IGNORE_INDEX, PROJECTOR, assistant_spans, build_labels, freeze_language_model,
                                 freeze_vision_tower, never_trained, parameter_groups, projector_only,
                                 set_trainable)
from tiny import SMALL, hf_checkpoint, image_inputs, prompt_ids

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Gradients whose true value is 0 come out as rounding noise (~1e-11) on both sides: the key
# projection's bias adds the same q.b to every logit of a query, and softmax ignores that.
TINY = 1e-6


# ---- loss and gradients against transformers --------------------------------------------------

@pytest.fixture(scope="module", params=["mistral", "vicuna"])
def checkpoint(request, tmp_path_factory):
    """mistral: GQA; vicuna: a llama with as many kv heads as heads. 2 decoder layers; 3 vision
    layers of which LLaVA runs 2 (vision_feature_layer -2)."""
    folder = tmp_path_factory.mktemp(request.param)
    return hf_checkpoint(folder, request.param, **SMALL), folder


def training_batch(config):
    """Two left-padded rows with an image each; the last few text tokens of each row are the
    supervised 'answer', everything before them (bos, prompt, image tokens) and the padding is -100."""
    ids, mask = prompt_ids(config, [[(45, 80)], [(150, 40)]], [3, 9])
    pv, sizes = image_inputs(config, [(45, 80), (150, 40)])
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :-4] = IGNORE_INDEX
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes, labels=labels)


def grads(model, name=lambda n: n):
    return {name(n): None if p.grad is None else p.grad.detach().float().cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["eager", "sdpa", "triton"])
def test_loss_and_grads_match_transformers(checkpoint, attn):
    """On CPU "triton" runs the flash-attention forward and backward kernels in Triton's interpreter."""
    hf, folder = checkpoint
    if attn == "triton":
        pytest.importorskip("triton")
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation=attn,
                                                            device_map=DEVICE if attn == "triton" else "cpu").train()
    inputs = training_batch(hf.config)
    hf.train().zero_grad(set_to_none=True)
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # what ours derives from the mask
    want = hf(**inputs, position_ids=position_ids).loss
    want.backward()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # the patch conv in full fp32 on a GPU
        got = ours(**{k: v.to(ours.device) for k, v in inputs.items()}).loss
        got.backward()

    dloss = abs(got.item() - want.item())
    g_hf, g_ours = grads(hf, legacy_key), grads(ours)
    assert set(g_ours) == set(g_hf)  # parameter names are the checkpoint keys
    unused = never_trained(ours)
    errors = {}
    for name, g in g_ours.items():
        if name in unused:  # vision layers past the feature layer, post_layernorm: run by neither
            assert g is None and g_hf[name] is None, name
            continue
        assert g is not None and g_hf[name] is not None, name
        errors[name] = ((g - g_hf[name]).norm() / max(g_hf[name].norm().item(), TINY)).item()
    worst = max(errors, key=errors.get)
    nonzero = [n for n in errors if g_hf[n].norm() > TINY]
    worst_nonzero = max(nonzero, key=errors.get)
    print(f"\n[{hf.config.text_config.model_type}, {attn}] loss ours {got.item():.7f} transformers {want.item():.7f} "
          f"|d| {dloss:.1e}; {len(errors)} grads: worst rel err {errors[worst]:.1e} ({worst}), worst of the "
          f"{len(nonzero)} nonzero ones {errors[worst_nonzero]:.1e} ({worst_nonzero}); {len(unused)} unused, no grad")
    assert dloss <= 1e-5
    assert errors[worst] <= 1e-3, worst


def test_pad_token_row_gets_no_gradient_as_in_transformers(tmp_path):
    """vicuna's pad id is <unk> (0), which a prompt may hold: its embedding row gets no gradient
    (nn.Embedding's padding_idx, as transformers builds it), and starts at zero in a model built
    from its config; resize_token_embeddings keeps it."""
    hf = hf_checkpoint(tmp_path, "vicuna", **SMALL)
    pad = hf.config.text_config.pad_token_id
    assert pad == 0
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).train()
    ids = torch.tensor([[1, 5, pad, 7, pad, 9, 11]])  # the pad id attended, inside the text
    for model in (hf, ours):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
    g_ours = ours.get_input_embeddings().weight.grad
    g_hf = hf.get_input_embeddings().weight.grad
    assert g_hf[pad].abs().max() == 0 and g_ours[pad].abs().max() == 0
    assert g_ours[5].abs().max() > 0
    torch.testing.assert_close(g_ours, g_hf, atol=1e-6, rtol=1e-4)
    scratch = LlavaNextForConditionalGeneration(ours.config)
    assert scratch.get_input_embeddings().weight[pad].abs().max() == 0
    assert scratch.get_input_embeddings().weight[pad + 1].abs().max() > 0
    assert ours.resize_token_embeddings(ours.config.text_config.vocab_size + 8).padding_idx == pad


def test_named_parameters_are_the_checkpoint_keys(checkpoint):
    hf, folder = checkpoint
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder)
    names = [n for n, _ in ours.named_parameters()]
    assert set(names) == set(ours.state_dict()) == {legacy_key(n) for n in hf.state_dict()}
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in names
    assert never_trained(ours) == {n for n in names if n.startswith(("vision_tower.vision_model.encoder.layers.2.",
                                                                     "vision_tower.vision_model.post_layernorm."))}
    assert not any(ours.get_parameter(n).requires_grad for n in never_trained(ours))


# ---- gradient checkpointing -------------------------------------------------------------------

def tiny_config(**text):
    """Our own tiny config (a small vocabulary, so activations, not logits, dominate memory)."""
    return LlavaNextConfig.from_dict({
        "image_token_index": 1050, "image_grid_pinpoints": SMALL["pinpoints"],
        "vision_config": dict(hidden_size=32, intermediate_size=128, num_hidden_layers=5, num_attention_heads=2,
                              image_size=56, patch_size=14),
        "text_config": {**dict(model_type="mistral", vocab_size=1100, hidden_size=64, intermediate_size=256,
                               num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
                        **text}})


class TensorMemory(TorchDispatchMode):
    """Bytes of the tensor storages made inside the block that are still alive: now and the peak.
    CPU has no allocator statistics, so this counts every op's outputs until they are freed."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.live = set()

    def _freed(self, key, nbytes):
        self.now -= nbytes
        self.live.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.live:
                    self.live.add(key)
                    self.now += nbytes
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._freed, key, nbytes)
        return out


def test_gradient_checkpointing_same_grads_lower_memory():
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(tiny_config()).train()
    inputs = training_batch(model.config)

    def step():
        model.zero_grad(set_to_none=True)
        with TensorMemory() as mem:
            loss = model(**inputs).loss
            after_forward = mem.now  # what the graph holds for backward
            loss.backward()
        return grads(model), after_forward, mem.peak

    plain, held_plain, peak_plain = step()
    model.gradient_checkpointing_enable()
    ckpt, held_ckpt, peak_ckpt = step()
    model.gradient_checkpointing_disable()
    again, _, _ = step()
    print(f"\nheld for backward after forward: {held_plain / 2**20:.2f} MiB plain, {held_ckpt / 2**20:.2f} MiB "
          f"checkpointed ({held_ckpt / held_plain:.2f}x); peak over forward + backward: {peak_plain / 2**20:.2f} MiB "
          f"plain, {peak_ckpt / 2**20:.2f} MiB checkpointed ({peak_ckpt / peak_plain:.2f}x)")
    for name, g in plain.items():
        if g is None:
            assert ckpt[name] is None, name
        else:
            torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)
            torch.testing.assert_close(again[name], g, rtol=0, atol=0, msg=name)
    assert held_ckpt < held_plain
    assert peak_ckpt < peak_plain


def test_gradient_checkpointing_per_tower():
    model = LlavaNextForConditionalGeneration(tiny_config(num_hidden_layers=2)).train()
    inputs = training_batch(model.config)
    model(**inputs).loss.backward()
    want = grads(model)
    for vision, language in [(True, False), (False, True)]:
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing_enable(vision=vision, language=language)
        model(**inputs).loss.backward()
        for name, g in grads(model).items():
            if g is not None:
                torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_as_transformers_trainer_calls_it(monkeypatch):
    """transformers 5.24's Trainer (gradient_checkpointing=True) calls
    activation_checkpointing_enable(activation_checkpointing_kwargs=..., every_n_layers=..., offload=...),
    or gradient_checkpointing_enable with the same keywords. every_n_layers picks every n-th layer of
    each tower (4 vision layers run, 6 decoder layers here); offload keeps the saved inputs on the
    host. The gradients stay those of the plain model."""
    import torch.utils.checkpoint

    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(tiny_config()).train()
    inputs = training_batch(model.config)
    model(**inputs).loss.backward()
    want = grads(model)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    for enable, n, offload, expected in (("activation_checkpointing_enable", 1, False, 4 + 6),
                                         ("activation_checkpointing_enable", 2, True, 2 + 3),
                                         ("gradient_checkpointing_enable", 3, False, 2 + 2)):
        kw = "activation_checkpointing_kwargs" if enable.startswith("activation") else "gradient_checkpointing_kwargs"
        getattr(model, enable)(**{kw: None}, every_n_layers=n, offload=offload)
        assert model.is_activation_checkpointing and model.is_gradient_checkpointing
        model.zero_grad(set_to_none=True)
        calls.clear()
        model(**inputs).loss.backward()
        assert len(calls) == expected, (enable, n, len(calls))
        for name, g in grads(model).items():
            if g is not None:
                torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7, msg=name)
    model.activation_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    model.language_model.model.gradient_checkpointing = True  # by hand, as a bool: every decoder layer
    calls.clear()
    model(**inputs).loss.backward()
    assert len(calls) == 6 and model.is_gradient_checkpointing
    model.activation_checkpointing_disable()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="every_n_layers"):
            model.activation_checkpointing_enable(every_n_layers=bad)


# ---- labels ----------------------------------------------------------------------------------

def make_processor(chat_format):
    from llava_next.image_processing import LlavaNextImageProcessor
    from llava_next.processing import LlavaNextProcessor
    from llava_next.tokenizer import AddedToken, LlavaNextTokenizer

    if chat_format == "mistral":
        model_file, added, pad = "mistral_7b_v0.1_tokenizer.model", ["<image>", "<pad>"], "<pad>"
    elif chat_format == "vicuna":
        model_file, added, pad = "llama2_tokenizer.model", ["<image>"], "<unk>"
    else:  # a 34b-style chatml tokenizer (no Yi tokenizer here): llama2's pieces plus the chatml tokens
        model_file, added, pad = "llama2_tokenizer.model", ["<image>", "<|im_start|>", "<|im_end|>"], "<unk>"
    tokenizer = LlavaNextTokenizer(fixture_path("tokenizers", model_file), pad_token=pad,
                                   added_tokens={32000 + i: AddedToken(t) for i, t in enumerate(added)})
    images = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size=56, image_grid_pinpoints=SMALL["pinpoints"])
    return LlavaNextProcessor(images, tokenizer, patch_size=14, chat_format=chat_format)


RED = np.full((40, 70, 3), (200, 30, 30), np.uint8)
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this image?"}]},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Are you sure?"},
    {"role": "assistant", "content": "Yes, quite sure."},
]
END_OF_TURN = {"mistral": " </s>", "vicuna": "</s>", "chatml": "<|im_end|>"}
SUPERVISED_TEXT = {  # the supervised tokens of [CONVERSATION, the short one], decoded
    "mistral": ["Red. </s> Yes, quite sure. </s>", "Hello! </s>"],
    "vicuna": ["Red.</s> Yes, quite sure.</s>", "Hello!</s>"],
    "chatml": ["Red.<|im_end|>Yes, quite sure.<|im_end|>", "Hello!<|im_end|>"],
}


@pytest.mark.parametrize("chat_format", ["mistral", "vicuna", "chatml"])
def test_spans_cover_exactly_the_assistant_replies(chat_format):
    tokenizer = make_processor(chat_format).tokenizer
    ids, spans = assistant_spans(tokenizer, CONVERSATION, chat_format)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(ids[s:e]) for s, e in spans] == [r + END_OF_TURN[chat_format] for r in replies]
    assert ids[spans[-1][1] - 1] == tokenizer.convert_tokens_to_ids(END_OF_TURN[chat_format].strip())
    assert spans[-1][1] == len(ids)  # the conversation ends with the last reply's end-of-turn token


@pytest.mark.parametrize("chat_format,padding_side", [("mistral", "left"), ("vicuna", "right"), ("chatml", "left")])
def test_build_labels_masks_prompt_images_and_padding(chat_format, padding_side):
    processor = make_processor(chat_format)
    processor.tokenizer.padding_side = padding_side
    short = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    inputs = build_labels(processor, [CONVERSATION, short], images=[[RED], []])
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "labels"}
    assert labels.shape == ids.shape and mask[1].sum() < mask[0].sum()
    supervised = labels != IGNORE_INDEX
    assert torch.equal(labels[supervised], ids[supervised])
    assert not supervised[mask == 0].any()
    image = ids == processor.image_token_id
    assert image.sum() == processor.num_image_tokens((40, 70)) and not supervised[image].any()
    assert (mask[1, 0] == 0) == (padding_side == "left")
    texts = [processor.tokenizer.decode(labels[i][supervised[i]]) for i in range(2)]
    assert texts == SUPERVISED_TEXT[chat_format]


def test_build_labels_takes_images_from_the_conversation():
    processor = make_processor("mistral")
    conversation = [dict(m) for m in CONVERSATION]
    conversation[1] = {"role": "user", "content": [{"type": "image", "image": RED},
                                                   {"type": "text", "text": "What colour is this image?"}]}
    got = build_labels(processor, conversation)
    want = build_labels(processor, CONVERSATION, images=[RED])
    for key in want:
        assert torch.equal(got[key], want[key]), key


class MergingTokenizer:
    """Characters as ids, except that "] " is one token: tokenization is not prefix-stable where
    a mistral prompt ("... [/INST]") is followed by its reply (" Red. </s>")."""
    bos_token_id, add_bos_token = 1, True

    def encode(self, text, add_special_tokens=True):
        ids = [1] if add_special_tokens else []
        for piece in re.split(r"(\] )", text):
            ids += [2] if piece == "] " else [ord(c) for c in piece]
        return ids


def test_tokenization_that_is_not_prefix_stable_is_an_error():
    with pytest.raises(ValueError, match="message 2: tokenization is not prefix-stable"):
        assistant_spans(MergingTokenizer(), CONVERSATION, "mistral")


def test_build_labels_trains_the_model(checkpoint):
    """The labels helper's output goes straight into the model; only supervised tokens count."""
    _, folder = checkpoint
    model = LlavaNextForConditionalGeneration.from_pretrained(folder).train()
    inputs = build_labels(make_processor("mistral"), [CONVERSATION, CONVERSATION[:3]], images=[[RED], [RED]])
    loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss) and model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    labels = inputs["labels"][:, 1:]
    want = torch.nn.functional.cross_entropy(logits[:, :-1][labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    torch.testing.assert_close(loss, want)


# ---- freezing and parameter groups ------------------------------------------------------------

def test_freeze_and_unfreeze_keep_the_unused_layers_frozen():
    model = LlavaNextForConditionalGeneration(tiny_config(num_hidden_layers=1))
    unused = never_trained(model)
    trainable = lambda prefix: {n: p.requires_grad for n, p in model.named_parameters() if n.startswith(prefix)}
    freeze_vision_tower(model)
    assert not any(trainable("vision_tower.").values()) and all(trainable("language_model.").values())
    freeze_vision_tower(model, frozen=False)
    assert all(v == (n not in unused) for n, v in trainable("vision_tower.").items())
    freeze_language_model(model)
    assert not any(trainable("language_model.").values())
    assert all(trainable("multi_modal_projector.").values()) and model.image_newline.requires_grad
    freeze_language_model(model, frozen=False)
    assert all(trainable("language_model.").values())


def test_frozen_parts_get_no_gradient():
    model = LlavaNextForConditionalGeneration(tiny_config(num_hidden_layers=1)).train()
    freeze_vision_tower(model)
    freeze_language_model(model)
    model(**training_batch(model.config)).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"image_newline", "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.bias",
                         "multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias"}


def test_projector_only_stage_one_changes_only_the_projector():
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(tiny_config(num_hidden_layers=1)).train()
    groups = projector_only(model, lr=1e-2)
    assert [g["lr"] for g in groups] == [1e-2]
    assert sorted(groups[0]["param_names"]) == sorted(n for n, _ in model.named_parameters()
                                                      if n.startswith("multi_modal_projector.") or n == "image_newline")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups)
    model(**training_batch(model.config)).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(groups[0]["param_names"])
    assert opt.state_dict()["param_groups"][0]["param_names"] == groups[0]["param_names"]


def test_parameter_groups_by_pattern():
    model = LlavaNextForConditionalGeneration(tiny_config(num_hidden_layers=1))
    groups = parameter_groups(model, {"vision_tower.*": 2e-6, PROJECTOR: 1e-3}, default_lr=1e-5, weight_decay=0.1)
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(by_name) == trainable and not set(by_name) & never_trained(model)
    assert by_name["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] == (2e-6, 0.1)
    assert by_name["vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias"] == (2e-6, 0.0)
    assert by_name["multi_modal_projector.linear_1.weight"] == (1e-3, 0.1) and by_name["image_newline"] == (1e-3, 0.0)
    assert by_name["language_model.lm_head.weight"] == (1e-5, 0.1)
    assert by_name["language_model.model.norm.weight"] == (1e-5, 0.0)
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    only = parameter_groups(model, {"language_model.lm_head.*": 1.0})  # no default_lr: the rest left out
    assert [g["param_names"] for g in only] == [["language_model.lm_head.weight"]]
    set_trainable(model, ["vision_tower.*"])
    with pytest.raises(ValueError, match="no trainable parameter matched"):
        parameter_groups(model, {"language_model.*": 1.0})
    model.requires_grad_(True)  # by hand: the never-run parameters need grad again, but get none
    names = {n for g in parameter_groups(model, default_lr=1e-5) for n in g["param_names"]}
    assert never_trained(model) and not names & never_trained(model)
    assert names == {n for n, p in model.named_parameters()} - never_trained(model)


# ---- the example script -------------------------------------------------------------------------

def test_finetune_example_loss_drops(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "finetune_example.py"
    tokenizer = fixture_path("tokenizers", "mistral_7b_v0.1_tokenizer.model")
    # One thread: two OpenMP threads on a busy 2-core machine can be 10x slower than on an idle one.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(script), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, env=env)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step +\d+ +loss ([\d.]+)", run.stdout, re.M)]
    assert len(losses) >= 10 and losses[-1] < 0.1 * losses[0]
    assert "reloaded: loss" in run.stdout and (tmp_path / "out" / "config.json").exists()


def test_left_padding_trains_nothing_from_pad_positions(tmp_path):
    """labels = input_ids with the pads masked (the usual recipe): a left-padded row's loss is its
    right-padded twin's. The last pad would otherwise be scored on the row's first token."""
    from tiny import hf_checkpoint, prompt_ids

    hf_checkpoint(tmp_path, "mistral", image_size=56, patch_size=14, pinpoints=[[56, 112], [112, 56]])
    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    ids, mask = prompt_ids(model.config, [[], []], [3, 9])
    right_ids = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids, mask)])
    right_mask = mask.sort(dim=1, descending=True).values
    losses = [model(input_ids=i, attention_mask=m, labels=i.masked_fill(m == 0, -100)).loss
              for i, m in ((ids, mask), (right_ids, right_mask))]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)


def test_helpers_see_through_wrappers_and_tied_names(tmp_path):
    """Patterns name the hub keys whether the model is wrapped (torch.compile's _orig_mod, DDP's
    module) or lm_head is tied to the embedding (one Parameter under two names)."""
    from tiny import hf_config, hf_model

    cfg = hf_config("vicuna", image_size=56, patch_size=14, pinpoints=[[56, 112], [112, 56]])
    cfg.tie_word_embeddings = True
    hf_model(cfg).save_pretrained(tmp_path)
    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    trained = set_trainable(model, ["multi_modal_projector.*", "language_model.lm_head.*"])
    assert "language_model.lm_head.weight" in trained and model.language_model.lm_head.weight.requires_grad
    wrapper = torch.nn.Module()
    wrapper._orig_mod = model  # what torch.compile(model) holds
    set_trainable(wrapper, "*")
    groups = parameter_groups(wrapper, {"vision_tower.*": 2e-6}, default_lr=1e-5)
    vision = [n for g in groups if g["lr"] == 2e-6 for n in g["param_names"]]
    assert vision and all(n.startswith("vision_tower.") for n in vision)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="use_reentrant=True"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant=True"):  # positionally, as transformers takes it
        model.gradient_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(TypeError, match="vision= / language="):  # the old positional meaning is refused
        model.gradient_checkpointing_enable(False)


def test_loss_with_a_cache_and_a_mask_over_past_and_new_tokens(tmp_path):
    """transformers' convention with a cache: attention_mask covers past + new tokens. The loss of
    the second chunk is the same as with a mask over the new tokens only."""
    from llava_next import KVCache
    from tiny import hf_checkpoint

    hf_checkpoint(tmp_path, "mistral", image_size=56, patch_size=14, pinpoints=[[56, 112], [112, 56]])
    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(3, 500, (2, 4), generator=g), torch.randint(3, 500, (2, 5), generator=g)
    new_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # (a left-padded second chunk, for the test)
    losses = []
    for mask in (new_mask, torch.cat([torch.ones(2, 4, dtype=torch.long), new_mask], 1)):
        cache = KVCache.for_model(model, 2, 9)
        model(input_ids=first, cache=cache, cache_pos=0)
        losses.append(model(input_ids=second, attention_mask=mask, labels=second, cache=cache, cache_pos=4).loss)
    torch.testing.assert_close(losses[0], losses[1])


def test_accessors_peft_calls():
    """What PEFT and trainers ask of a transformers model; with the embedding frozen and
    gradient checkpointing on, a trainable layer gets gradients (enable_input_require_grads on)."""
    model = LlavaNextForConditionalGeneration(tiny_config(num_hidden_layers=2)).train()
    assert model.can_generate() and model.main_input_name == "input_ids" and model.supports_gradient_checkpointing
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    assert LOSS_MAPPING.get(model.loss_type) is ForCausalLMLoss  # Trainer counts the shifted labels, as we score
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    inputs = training_batch(model.config)
    model.requires_grad_(False)
    layer = model.language_model.model.layers[1].self_attn.q_proj
    layer.weight.requires_grad_(True)
    assert model.num_parameters(only_trainable=True) == layer.weight.numel()
    model.gradient_checkpointing_enable(vision=False)
    assert model.is_gradient_checkpointing
    model.enable_input_require_grads()
    model.enable_input_require_grads()  # twice: still one hook
    assert len(model.get_input_embeddings()._forward_hooks) == 1
    model(**inputs).loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    model.disable_input_require_grads()
    assert not model.get_input_embeddings()._forward_hooks
    assert model.get_decoder() is model.language_model.model
    emb = torch.nn.Embedding(*model.get_input_embeddings().weight.shape)
    model.set_input_embeddings(emb)
    assert model.get_input_embeddings() is emb and model.get_output_embeddings().weight is not emb.weight  # untied
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.get_output_embeddings().weight is emb.weight


@pytest.mark.parametrize("chat_format", ["mistral", "chatml"])
def test_build_labels_refuses_what_would_train_the_wrong_tokens(chat_format):
    """A special token's text inside a message (read as that token: an `</s>` mid-reply would be
    supervised as a stop), an image inside a reply, and a batch with no reply at all (NaN loss)."""
    processor = make_processor(chat_format)
    stop = "</s>" if chat_format == "mistral" else "<|im_end|>"
    user = {"role": "user", "content": "Strike it out?"}
    with pytest.raises(ValueError, match=f"message 1: its text holds '{re.escape(stop)}'"):
        build_labels(processor, [user, {"role": "assistant", "content": f"Use <s>old{stop} new."}])
    with pytest.raises(ValueError, match="""message 0: its text holds '<image>'.*\\{"type": "image"\\}"""):
        build_labels(processor, [{"role": "user", "content": "what is <image>?"}, {"role": "assistant", "content": "A tag."}])
    with pytest.raises(ValueError, match="image in an assistant reply"):
        build_labels(processor, [user, {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
                     images=[[RED]])
    with pytest.raises(ValueError, match="nothing to supervise"):
        build_labels(processor, [[user]])
    fine = build_labels(processor, [[user, {"role": "assistant", "content": "No."}], [user]])  # one row has a reply
    assert (fine["labels"][0] != -100).any() and (fine["labels"][1] == -100).all()
