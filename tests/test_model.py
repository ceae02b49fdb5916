"""The model test: tiny random checkpoints built and saved by transformers, loaded by our code,
logits compared in fp32 on every non-pad position."""

import contextlib
import json

import pytest
import torch
from safetensors.torch import save_file

from llava_next import LlavaNextForConditionalGeneration
from llava_next.loading import CheckpointError
from tiny import SMALL, hf_checkpoint, image_inputs, prompt_ids

# SMALL (tiny.py) keeps most tests fast; the real 336/14 geometry and a 224/16 one have tests of their own.
ATOL = 1e-4


def compare(hf, folder, image_sizes_per_row, text_lens=None, attn="sdpa", seed=0, fuse=False):
    """Our logits vs transformers' on a (left-padded) batch; returns the max abs difference."""
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation=attn)
    if fuse:
        ours.fuse_projections()
    text_lens = text_lens or [5] * len(image_sizes_per_row)
    ids, mask = prompt_ids(hf.config, image_sizes_per_row, text_lens, seed=seed)
    flat_sizes = [s for row in image_sizes_per_row for s in row]
    kw = dict(input_ids=ids, attention_mask=mask)
    if flat_sizes:
        pv, sizes = image_inputs(hf.config, flat_sizes, seed=seed)
        kw.update(pixel_values=pv, image_sizes=sizes)
    # transformers' forward numbers positions 0..T-1 unless told; its generate() passes these.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(**kw, position_ids=position_ids).logits
        got = ours(**kw).logits
    real = mask.bool()
    assert got.shape == want.shape
    diff = (got - want)[real].abs().max().item()
    print(f"logits max abs diff vs transformers ({attn}): {diff:.2e}")
    assert diff <= ATOL, f"max abs diff {diff}"
    return diff


def assert_default_from_text_config(hf, ours, kw, option):
    """A call that leaves `option` out takes config.text_config's, as transformers 5.24 does,
    which ignores the top-level config's."""
    for where in ("top", "text"):
        given = []
        for model in (hf, ours):
            config = model.config if where == "top" else model.config.text_config
            setattr(config, option, True)
            given.append(bool(getattr(model(**kw), option.replace("output_", ""), None)))
            setattr(config, option, False)
        assert given == [where == "text"] * 2, (where, given)


@pytest.mark.parametrize("family", ["mistral", "vicuna", "yi"])
def test_hidden_states_match_transformers(tmp_path, family):
    """output_hidden_states: the language model's num_layers + 1 hidden states, equal to
    transformers' on every real position of a left-padded batch with images; selections by index
    (None elsewhere), the tuple form, the config's default, a decode step with a cache."""
    from llava_next import KVCache

    hf = hf_checkpoint(tmp_path, family, **SMALL)
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask = prompt_ids(hf.config, [[(45, 80)], [(150, 40)]], [3, 9])
    pv, sizes = image_inputs(hf.config, [(45, 80), (150, 40)])
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
    real = mask.bool()
    with torch.no_grad():
        want = hf(**kw, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True).hidden_states
        out = ours(**kw, output_hidden_states=True, logits_to_keep=1)
        got = out.hidden_states
        assert len(got) == len(want) == ours.config.text_config.num_hidden_layers + 1
        diffs = [(g - w)[real].abs().max().item() for g, w in zip(got, want)]
        print(f"hidden states max abs diff vs transformers, per index: {['%.1e' % d for d in diffs]}")
        assert max(diffs) <= ATOL
        assert got[0].shape[1] == ids.shape[1] and out.logits.shape[1] == 1  # all positions, whatever logits_to_keep
        assert torch.equal(ours.lm_head(got[-1][:, -1:]), out.logits)  # the last one is after the final norm
        picked = ours(**kw, output_hidden_states=[0, -1]).hidden_states
        assert picked[1] is None and torch.equal(picked[0], got[0]) and torch.equal(picked[-1], got[-1])
        assert [h is None for h in ours(**kw, output_hidden_states=1).hidden_states] == [i != 1 for i in range(len(got))]
        logits, states = ours(**kw, output_hidden_states=True, return_dict=False)
        assert len(states) == len(got) and "hidden_states" not in ours(**kw)
        with pytest.raises(ValueError, match="indices into the"):
            ours(**kw, output_hidden_states=len(got))
        assert_default_from_text_config(hf, ours, kw, "output_hidden_states")
        # a cached prompt, then one step: the step's hidden states are the full forward's last column
        T = ids.shape[1]
        step = torch.tensor([[11], [12]])
        full = ours(input_ids=torch.cat([ids, step], 1), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                    pixel_values=pv, image_sizes=sizes, output_hidden_states=True).hidden_states
        cache = KVCache.for_model(ours, 2, T + 1)
        ours(**kw, cache=cache)
        one = ours(input_ids=step, cache=cache, cache_pos=torch.tensor(T), output_hidden_states=True).hidden_states
        for a, b in zip(one, full):
            torch.testing.assert_close(a, b[:, -1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["mistral", "vicuna"])
def test_attentions_match_transformers(tmp_path, family):
    """output_attentions: one (B, heads, T, T) tensor of softmax weights per layer, equal to
    transformers' eager attention on every row of a left-padded batch with images (pad rows
    included: spread evenly, as there), whatever our attn_implementation; with a sliding window;
    the config's default; and a cached step, whose weights are the full forward's last row."""
    from llava_next import KVCache

    hf = hf_checkpoint(tmp_path, family, **SMALL, sliding_window=20 if family == "mistral" else None)
    ids, mask = prompt_ids(hf.config, [[(45, 80)], [(150, 40)]], [3, 9])
    pv, sizes = image_inputs(hf.config, [(45, 80), (150, 40)])
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
    with torch.no_grad():
        want = hf(**kw, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), output_attentions=True)
        for attn in ("sdpa", "eager"):
            ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=attn)
            out = ours(**kw, output_attentions=True, output_hidden_states=True)
            got = out.attentions
            assert len(got) == len(want.attentions) == ours.config.text_config.num_hidden_layers
            diffs = [(g - w).abs().max().item() for g, w in zip(got, want.attentions)]
            print(f"attention weights max abs diff vs transformers ({attn}), per layer: {['%.1e' % d for d in diffs]}")
            assert got[0].shape == (2, 4, ids.shape[1], ids.shape[1]) and max(diffs) <= 1e-5
            assert (out.logits - want.logits)[mask.bool()].abs().max() <= ATOL  # the written-out path is the model
            assert list(out.keys()) == ["logits", "hidden_states", "attentions"]
            assert ours(**kw, return_dict=False, output_attentions=True)[1][0].shape == got[0].shape
        assert "attentions" not in ours(**kw)
        with pytest.raises(ValueError, match="True or False"):
            ours(**kw, output_attentions=1)
        assert_default_from_text_config(hf, ours, kw, "output_attentions")
        # a cached prompt, then one step with an int and one with a tensor cache_pos
        T = ids.shape[1]
        step = torch.tensor([[11], [12]])
        longer = dict(kw, input_ids=torch.cat([ids, step], 1), attention_mask=torch.cat([mask, torch.ones_like(step)], 1))
        full = ours(**longer, output_attentions=True).attentions
        cache = KVCache.for_model(ours, 2, T + 3)
        for pos in (T, torch.tensor(T)):
            cache.reset()
            ours(**kw, cache=cache)
            one = ours(input_ids=step, cache=cache, cache_pos=pos, output_attentions=True).attentions
            for a, b in zip(one, full):
                assert a.shape == (2, 4, 1, T + 1 if isinstance(pos, int) else T + 3)
                torch.testing.assert_close(a[..., :T + 1], b[:, :, -1:], atol=1e-5, rtol=0)
                assert not a[..., T + 1:].any()


@pytest.mark.parametrize("family", ["mistral", "vicuna", "yi"])
def test_families_one_image(tmp_path, family):
    hf = hf_checkpoint(tmp_path, family, **SMALL)
    compare(hf, tmp_path, [[(45, 80)]])


def test_real_geometry_336_14(tmp_path):
    hf = hf_checkpoint(tmp_path, "mistral")  # 336 px tiles, the llava-hf pinpoints
    compare(hf, tmp_path, [[(899, 1024)]])


def test_vision_geometry_224_16(tmp_path):
    hf = hf_checkpoint(tmp_path, "vicuna", image_size=224, patch_size=16,
                       pinpoints=[[224, 448], [448, 224], [448, 448], [672, 224], [224, 672]])
    compare(hf, tmp_path, [[(300, 150)]])


@pytest.mark.parametrize("layer", [-1, 1, [-2, -3], [0, 2]])
def test_vision_feature_layer(tmp_path, layer):
    hf = hf_checkpoint(tmp_path, "mistral", vision_feature_layer=layer, vision_layers=3, **SMALL)
    compare(hf, tmp_path, [[(70, 50)]])


def test_config_edits_after_building_raise_and_config_argument_builds_them(tmp_path):
    """transformers reads vision_feature_layer and Mistral's sliding_window on every call, so code
    written for it edits model.config and expects the edit to act. Ours reads them when built:
    forward and save_pretrained refuse a model whose config changed since (no silent old
    behaviour, no config.json that does not describe the weights), and from_pretrained(config=)
    builds the changed model, equal to transformers with the edit."""
    from llava_next import LlavaNextConfig
    from llava_next.config import ConfigError

    hf = hf_checkpoint(tmp_path, "mistral", vision_layers=3, **SMALL)
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask = prompt_ids(hf.config, [[(70, 50)]], [5])
    pv, sizes = image_inputs(hf.config, [(70, 50)])
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
    for edit, value in (("vision_feature_layer", -3), ("text_config.sliding_window", 4)):
        target = ours.config.text_config if edit.startswith("text_config") else ours.config
        name = edit.split(".")[-1]
        old = getattr(target, name)
        setattr(target, name, value)
        with pytest.raises(ConfigError, match=f"{edit}: built with .*, now .*{value}"):
            ours(**kw)
        with pytest.raises(ConfigError, match="changed after the model was built"):
            ours.save_pretrained(tmp_path / "saved")
        assert not (tmp_path / "saved").exists()
        setattr(target, name, old)
        ours(**kw)  # as built again: runs

    config = LlavaNextConfig.from_pretrained(tmp_path)
    config.vision_feature_layer, config.text_config.sliding_window = -3, 4
    built = LlavaNextForConditionalGeneration.from_pretrained(tmp_path, config=config)
    assert built.config is not config and config.tie_word_embeddings == built.config.tie_word_embeddings
    hf.config.vision_feature_layer, hf.config.text_config.sliding_window = -3, 4  # transformers: read per call
    with torch.no_grad():
        want = hf(**kw, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        got = built(**kw).logits
        assert (got - want)[mask.bool()].abs().max().item() <= ATOL
        assert (got - ours(**kw).logits)[mask.bool()].abs().max().item() > 1e-3  # the edits changed something
    with pytest.raises(TypeError, match="LlavaNextConfig"):
        LlavaNextForConditionalGeneration.from_pretrained(tmp_path, config=hf.config)


def test_a_folder_of_weights_alone_loads_with_a_config(tmp_path):
    """transformers' Trainer saves only `model.state_dict()` (safetensors, no config.json) for a
    model that is not its PreTrainedModel: from_pretrained(folder, config=) loads that, in the
    file's dtype; without config= the error says what to pass."""
    from safetensors.torch import save_file

    from llava_next import LlavaNextConfig
    from llava_next.loading import CheckpointError

    hf_checkpoint(tmp_path / "base", "mistral", **SMALL)
    trained = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "base").to(torch.bfloat16)
    with torch.no_grad():
        trained.multi_modal_projector.linear_1.weight.add_(1.0)  # "fine-tuned"
    (tmp_path / "checkpoint-500").mkdir()
    save_file(trained.state_dict(), tmp_path / "checkpoint-500" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no config.json .* config=LlavaNextConfig.from_pretrained"):
        LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "checkpoint-500")
    loaded = LlavaNextForConditionalGeneration.from_pretrained(
        tmp_path / "checkpoint-500", config=LlavaNextConfig.from_pretrained(tmp_path / "base"))
    assert loaded.dtype == torch.bfloat16
    want, got = trained.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_two_image_sizes(tmp_path, attn):
    hf = hf_checkpoint(tmp_path, "mistral", **SMALL)
    compare(hf, tmp_path, [[(45, 80)], [(150, 40)]], text_lens=[3, 9], attn=attn)


def test_two_images_in_one_prompt(tmp_path):
    hf = hf_checkpoint(tmp_path, "vicuna", **SMALL)
    compare(hf, tmp_path, [[(45, 80), (100, 100)]])


def test_text_only_prompt(tmp_path):
    hf = hf_checkpoint(tmp_path, "yi", **SMALL)
    compare(hf, tmp_path, [[], []], text_lens=[4, 11])


def test_sliding_window(tmp_path):
    # A window shorter than the prompt, so it changes the result.
    hf = hf_checkpoint(tmp_path, "mistral", sliding_window=16, **SMALL)
    compare(hf, tmp_path, [[(45, 80)]], text_lens=[20])
    compare(hf, tmp_path, [[(45, 80)], [(80, 45)]], text_lens=[2, 30], attn="eager")


def test_llama_ignores_a_sliding_window_as_transformers_does(tmp_path):
    """transformers' Llama attention has no window: a `sliding_window` in a llama text config
    changes nothing there, so it must change nothing here (and is saved back as it was)."""
    hf = hf_checkpoint(tmp_path, "vicuna", sliding_window=8, **SMALL)
    assert hf.config.text_config.sliding_window == 8
    compare(hf, tmp_path, [[(45, 80)]], text_lens=[20])
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["text_config"]["sliding_window"] == 8


def test_zero_images_is_no_images(tmp_path):
    """pixel_values holding no image (shape (0, tiles, 3, S, S), or an empty list) with text-only
    prompts: the vision tower is skipped, as transformers' forward skips it (its generate fails)."""
    hf = hf_checkpoint(tmp_path, "mistral", **SMALL)
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask = prompt_ids(hf.config, [[], []], [4, 9])
    S = hf.config.vision_config.image_size
    empty = dict(pixel_values=torch.zeros(0, 5, 3, S, S), image_sizes=torch.zeros(0, 2, dtype=torch.long))
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(ours(input_ids=ids, attention_mask=mask, **empty).logits, want)
        assert torch.equal(ours(input_ids=ids, attention_mask=mask, pixel_values=[], image_sizes=[]).logits, want)
        assert (want - hf(input_ids=ids, attention_mask=mask, **empty).logits)[mask.bool()].abs().max() <= ATOL
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, **empty)
    assert torch.equal(out, ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4))


def test_sharded_weights(tmp_path):
    hf = hf_checkpoint(tmp_path, "vicuna", max_shard_size="1MB", **SMALL)
    assert (tmp_path / "model.safetensors.index.json").exists()
    compare(hf, tmp_path, [[(45, 80)]])


@pytest.mark.parametrize("layout", ["legacy", "v5_file", "v5_memory"])
def test_key_layouts(tmp_path, layout):
    hf = hf_checkpoint(tmp_path / "hf", "mistral", **SMALL)
    folder = tmp_path / layout
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}  # v5 in-memory names
    if layout == "v5_file":  # what transformers 5 writes: vision_tower.* without vision_model.
        state = dict(__import__("safetensors.torch").torch.load_file(tmp_path / "hf" / "model.safetensors"))
        assert any(k.startswith("vision_tower.embeddings") for k in state)
    elif layout == "legacy":  # the hub files
        ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf")
        state = {k: v.contiguous() for k, v in ours.state_dict().items()}
        assert any(k.startswith("vision_tower.vision_model.") for k in state)
        assert any(k.startswith("language_model.model.") for k in state)
    else:
        assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    compare(hf, folder, [[(45, 80)]])


def test_state_dict_keys_are_the_hub_keys(tmp_path):
    hf_checkpoint(tmp_path, "mistral", **SMALL)
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    keys = set(ours.state_dict())
    assert "language_model.lm_head.weight" in keys
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert "vision_tower.vision_model.pre_layrnorm.weight" in keys
    assert "vision_tower.vision_model.post_layernorm.weight" in keys  # kept, though never run
    assert "multi_modal_projector.linear_1.bias" in keys and "image_newline" in keys
    assert {n for n, _ in ours.named_parameters()} == keys


def test_save_pretrained_round_trip_and_transformers_loads_it(tmp_path):
    from transformers import LlavaNextForConditionalGeneration as HF

    hf = hf_checkpoint(tmp_path / "hf", "yi", **SMALL)
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours", max_shard_size="200KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    compare(hf, tmp_path / "ours", [[(45, 80)]])  # our loader reads our files back
    back = HF.from_pretrained(tmp_path / "ours").eval()  # transformers reads them as it reads the hub's
    for (k1, v1), (k2, v2) in zip(sorted(hf.state_dict().items()), sorted(back.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_save_pretrained_keeps_config_settings_it_does_not_model(tmp_path):
    """Settings the model never reads (initializer_range, use_cache, a sub-config's architectures,
    image_seq_length, ...) survive load -> save, so a fine-tune saved by us configures
    transformers as the original did."""
    from transformers import LlavaNextForConditionalGeneration as HF

    hf_checkpoint(tmp_path / "hf", "mistral", **SMALL)
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["image_seq_length"] = 600
    cfg["text_config"].update(initializer_range=0.007, use_cache=False, architectures=["MistralForCausalLM"])
    cfg["vision_config"]["initializer_factor"] = 3.0
    path.write_text(json.dumps(cfg))
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["image_seq_length"] == 600 and saved["vision_config"]["initializer_factor"] == 3.0
    assert {k: saved["text_config"][k] for k in ("initializer_range", "use_cache", "architectures")} == {
        "initializer_range": 0.007, "use_cache": False, "architectures": ["MistralForCausalLM"]}
    assert saved["torch_dtype"] == "bfloat16" and "dtype" not in saved["text_config"]  # the model's, not the file's
    back = HF.from_pretrained(tmp_path / "ours").config
    assert (back.image_seq_length, back.text_config.initializer_range, back.text_config.use_cache,
            back.vision_config.initializer_factor) == (600, 0.007, False, 3.0)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_malformed_json_is_named(tmp_path, name):
    hf_checkpoint(tmp_path, "mistral", **SMALL)
    (tmp_path / name).write_text('{"eos_token_id": 2,')
    with pytest.raises(ValueError, match=f"{name} is not valid JSON"):
        LlavaNextForConditionalGeneration.from_pretrained(tmp_path)


def test_dtype_and_device_arguments(tmp_path):
    hf_checkpoint(tmp_path, "vicuna", **SMALL)
    m = LlavaNextForConditionalGeneration.from_pretrained(tmp_path, torch_dtype=torch.bfloat16,
                                                         low_cpu_mem_usage=True, device_map="cpu")
    assert m.dtype == torch.bfloat16 and m.device.type == "cpu" and not m.training
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert LlavaNextForConditionalGeneration.from_pretrained(tmp_path, dtype="auto").dtype == torch.float32


def test_save_pretrained_replaces_only_its_own_files(tmp_path):
    """A save over a folder removes the weight files of an older save (single file <-> shards) and
    nothing else, keeps the generation_config ids, and works over the folder the model was loaded
    from (whose files it may still memory-map)."""
    hf_checkpoint(tmp_path / "hf", "mistral", **SMALL)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.3}))
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model_ema.safetensors", "model-ft-notes.safetensors", "notes.txt"):
        (out / name).write_bytes(b"the user's")
    ours.save_pretrained(out, max_shard_size="200KB")
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    ours.save_pretrained(out)  # now one file: the shards and the index go
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "model_ema.safetensors",
         "model-ft-notes.safetensors", "notes.txt"])
    assert all((out / n).read_bytes() == b"the user's" for n in ("model_ema.safetensors", "notes.txt"))
    back = LlavaNextForConditionalGeneration.from_pretrained(out)
    assert back.generation_config == ours.generation_config and ours.generation_config
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.3  # other settings kept
    ours.save_pretrained(tmp_path / "hf")  # over its own (memory-mapped) source files
    again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_tied_word_embeddings(tmp_path):
    """A checkpoint whose config ties lm_head to the embedding (transformers then leaves lm_head out
    of the file): loaded with one Parameter for both, the same logits, saved the same way."""
    from tiny import hf_config, hf_model
    from transformers import LlavaNextForConditionalGeneration as HF

    cfg = hf_config("vicuna", **SMALL)
    cfg.tie_word_embeddings = True
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    compare(hf, tmp_path / "hf", [[(45, 80)]])
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert ours.language_model.lm_head.weight is ours.language_model.model.embed_tokens.weight
    ours.save_pretrained(tmp_path / "ours")
    from safetensors import safe_open
    assert "language_model.lm_head.weight" not in safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt").keys()
    back = HF.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(back.lm_head.weight, hf.lm_head.weight)
    again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "ours")  # our own file back
    lm = again.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight and torch.equal(lm.lm_head.weight, hf.lm_head.weight)
    again.resize_token_embeddings(lm.lm_head.weight.shape[0] + 2)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # still one Parameter


def test_device_map_forms_and_conflicting_dtypes(tmp_path):
    hf_checkpoint(tmp_path, "vicuna", **SMALL)
    for device_map in ("sequential", "balanced", {"vision_tower": "cpu", "language_model": torch.device("cpu")}):
        assert LlavaNextForConditionalGeneration.from_pretrained(tmp_path, device_map=device_map).device.type == "cpu"
    with pytest.raises(ValueError, match="disagree"):
        LlavaNextForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16, torch_dtype=torch.bfloat16)


# ---- bad input: clear errors, and never a half-loaded model ---------------------------------------

@pytest.fixture
def saved(tmp_path):
    hf = hf_checkpoint(tmp_path, "mistral", **SMALL)
    return hf, tmp_path


def _rewrite(folder, edit):
    from safetensors.torch import load_file
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_named(saved):
    _, folder = saved
    _rewrite(folder, lambda s: s.pop("multi_modal_projector.linear_2.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): multi_modal_projector.linear_2.bias"):
        LlavaNextForConditionalGeneration.from_pretrained(folder)


def test_unexpected_key_is_named(saved):
    _, folder = saved
    _rewrite(folder, lambda s: s.__setitem__("language_model.model.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): language_model.model.extra.weight"):
        LlavaNextForConditionalGeneration.from_pretrained(folder)


def test_shape_mismatch_names_key_and_shapes(saved):
    _, folder = saved
    _rewrite(folder, lambda s: s.__setitem__("image_newline", torch.zeros(63)))
    with pytest.raises(CheckpointError, match=r"shape mismatch for image_newline: the model expects \(64,\), "
                                              r"the checkpoint has \(63,\)"):
        LlavaNextForConditionalGeneration.from_pretrained(folder)


def test_integer_tensor_is_named(saved):
    _, folder = saved
    _rewrite(folder, lambda s: s.__setitem__("image_newline", torch.zeros(64, dtype=torch.int8)))
    with pytest.raises(CheckpointError, match="image_newline is I8 in the checkpoint"):
        LlavaNextForConditionalGeneration.from_pretrained(folder)


def test_truncated_file_is_named(saved):
    _, folder = saved
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        LlavaNextForConditionalGeneration.from_pretrained(folder)


def test_corrupt_file_is_named(saved):
    _, folder = saved
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LlavaNextForConditionalGeneration.from_pretrained(folder)


def test_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="pickle"):
        LlavaNextForConditionalGeneration.from_pretrained(tmp_path)


def test_unknown_model_type(saved):
    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown model_type 'gpt2'"):
        LlavaNextForConditionalGeneration.from_pretrained(folder)


def test_full_strategy_refused(saved):
    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "full"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'full'.*cannot be packed"):
        LlavaNextForConditionalGeneration.from_pretrained(folder)


def test_feature_count_mismatch_says_both_numbers(saved):
    hf, folder = saved
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder)
    ids, mask = prompt_ids(hf.config, [[(45, 80)]], [3])
    pv, sizes = image_inputs(hf.config, [(45, 80)])
    n = int((ids == hf.config.image_token_index).sum())
    ids = ids[:, 1:]  # drops the bos: still n tokens; now drop one image token
    ids = torch.cat([ids[:, :3], ids[:, 4:]], dim=1)
    with pytest.raises(ValueError, match=rf"{n - 1} <image> tokens in input_ids, {n} image features"):
        ours(input_ids=ids, pixel_values=pv, image_sizes=sizes)


def test_loss_with_logits_to_keep_scores_the_kept_positions(saved):
    hf, folder = saved
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder)
    ids, mask = prompt_ids(hf.config, [[], []], [9, 12])
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=5).loss
    want = torch.nn.functional.cross_entropy(full[:, -5:-1].flatten(0, 1), labels[:, -4:].flatten(), ignore_index=-100)
    torch.testing.assert_close(got, want)


def test_pixel_values_as_a_list_of_unpadded_images(saved):
    hf, folder = saved
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder)
    ids, mask = prompt_ids(hf.config, [[(45, 80), (150, 40)]], [3])
    pv, sizes = image_inputs(hf.config, [(45, 80), (150, 40)])
    as_list = [pv[0, :3], pv[1]]  # the first image has 3 tiles, the second all of its own
    with torch.no_grad():
        want = ours(input_ids=ids, pixel_values=pv, image_sizes=sizes).logits
        got = ours(input_ids=ids, pixel_values=as_list, image_sizes=sizes.tolist()).logits
    torch.testing.assert_close(got, want)


def test_pixel_values_with_inputs_embeds_is_refused(saved):
    hf, folder = saved
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder)
    pv, sizes = image_inputs(hf.config, [(45, 80)])
    with pytest.raises(ValueError, match="pixel_values need input_ids"):
        ours(inputs_embeds=torch.zeros(1, 3, 64), pixel_values=pv, image_sizes=sizes)


# ---- fuse_projections: q/k/v and gate/up as one product each --------------------------------

def _shared(*linears) -> bool:
    return len({lin.weight.untyped_storage().data_ptr() for lin in linears}) == 1


def _fused(layer) -> bool:
    a, m = layer.self_attn, layer.mlp
    return _shared(a.q_proj, a.k_proj, a.v_proj) and _shared(m.gate_proj, m.up_proj)


@pytest.mark.parametrize("family", ["mistral", "yi"])
def test_fused_projections_match_transformers(tmp_path, family):
    hf = hf_checkpoint(tmp_path, family, **SMALL)
    compare(hf, tmp_path, [[(45, 80)], [(80, 45)]], text_lens=[5, 9], fuse=True)


def test_fuse_projections_keeps_parameters_and_saves(tmp_path):
    hf_checkpoint(tmp_path, "mistral", **SMALL)
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    params = dict(ours.named_parameters())
    ours.fuse_projections()
    layer = ours.language_model.model.layers[0]
    assert _fused(layer)
    clip = ours.vision_tower.vision_model.encoder.layers[0].self_attn
    assert _shared(clip.q_proj, clip.k_proj, clip.v_proj)
    assert clip.q_proj.bias.untyped_storage().data_ptr() == clip.v_proj.bias.untyped_storage().data_ptr()
    ptr = layer.self_attn.q_proj.weight.data_ptr()
    ours.fuse_projections()  # idempotent: no second copy
    assert layer.self_attn.q_proj.weight.data_ptr() == ptr
    assert dict(ours.named_parameters()).keys() == params.keys()
    assert all(params[k] is p for k, p in ours.named_parameters())  # same Parameter objects
    after = ours.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    ours.save_pretrained(tmp_path / "saved")  # safetensors refuses shared storage unless we separate it
    again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(v, before[k]) for k, v in again.state_dict().items())


def test_fused_and_separate_agree_and_to_separates(tmp_path):
    from llava_next.config import LlavaNextConfig

    cfg = json.loads((hf_checkpoint(tmp_path, "vicuna", **SMALL) and (tmp_path / "config.json")).read_text())
    cfg["text_config"]["attention_bias"] = True  # the bias path too
    model = LlavaNextForConditionalGeneration(LlavaNextConfig.from_dict(cfg))
    torch.manual_seed(0)
    model.init_weights()
    for lin in model.modules():
        if isinstance(lin, torch.nn.Linear) and lin.bias is not None:
            torch.nn.init.normal_(lin.bias, std=0.5)
    model.eval()
    ids = torch.randint(3, 1000, (2, 11))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = model.fuse_projections()(input_ids=ids).logits
        assert _fused(model.language_model.model.layers[1])
        assert (got - want).abs().max().item() <= 1e-5
        model.to(torch.float64)  # new storage per tensor: the layers run one by one again
        assert not _fused(model.language_model.model.layers[1])
        assert (model(input_ids=ids).logits.float() - want).abs().max().item() <= 1e-5


def test_fused_model_trains_with_separate_gradients(tmp_path):
    """With gradients on, the layers run one by one, so every weight gets its own gradient."""
    hf_checkpoint(tmp_path, "mistral", **SMALL)
    ref = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).train()
    fused = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).fuse_projections().train()
    ids = torch.randint(3, 1000, (1, 9))
    for m in (ref, fused):
        m(input_ids=ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    k_proj = fused.language_model.model.layers[0].self_attn.k_proj.weight
    torch.optim.SGD(fused.parameters(), lr=0.1).step()  # in place, into the shared storage
    assert _fused(fused.language_model.model.layers[0]) and k_proj.grad.abs().sum() > 0


def test_fused_path_steps_aside_for_hooks_and_wrapped_layers(tmp_path):
    """A forward hook on q_proj (or a LoRA-style wrapper) must still see its own call."""
    hf_checkpoint(tmp_path, "mistral", **SMALL)
    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).fuse_projections()
    seen = []
    attn = model.language_model.model.layers[0].self_attn
    handle = attn.q_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        want = model(input_ids=torch.tensor([[1, 5, 9]])).logits
    handle.remove()
    assert seen == [torch.Size([1, 3, attn.n_head * attn.head_dim])]

    class Scaled(torch.nn.Linear):  # stands in for a wrapper that changes the output
        def forward(self, x):
            return 2 * super().forward(x)

    attn.v_proj.__class__ = Scaled
    with torch.no_grad():
        got = model(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert not torch.allclose(got, want)  # the wrapper ran: the fused product did not bypass it


def test_fused_path_keeps_bias_gradients_and_refuses_mixed_layers(tmp_path, monkeypatch):
    from llava_next.config import LlavaNextConfig
    from llava_next.fused_linear import fuse_linears, fused_linear

    cfg = json.loads((hf_checkpoint(tmp_path, "vicuna", **SMALL) and (tmp_path / "config.json")).read_text())
    cfg["text_config"]["attention_bias"] = True
    model = LlavaNextForConditionalGeneration(LlavaNextConfig.from_dict(cfg))
    model.init_weights()
    model.fuse_projections()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".bias"))  # frozen weights, trained biases
    ids = torch.randint(3, 1000, (1, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.language_model.model.layers[0].self_attn.q_proj.bias.grad is not None

    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4).to(torch.float64)
    fuse_linears((a, b))  # mixed dtypes: left alone, not promoted
    assert a.weight.dtype == torch.float32 and b.weight.dtype == torch.float64
    c, d = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    fuse_linears((c, d))
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert fused_linear(x, (c, d)) is not None
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert fused_linear(x, (c, d)) is None  # torch.compile traces the plain layers


def test_partly_cached_hub_repo_offline(tmp_path):
    """Offline, with only config.json of a repo in the hub cache (what fetching a config leaves):
    the config loads from the cache, the model says the weights are not cached."""
    import os
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--llava-hf--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    hf_checkpoint(tmp_path / "full", "mistral", **SMALL)
    (snapshot / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    code = ("from llava_next import LlavaNextConfig, LlavaNextForConditionalGeneration as M\n"
            "print(LlavaNextConfig.from_pretrained('llava-hf/tiny').text_config.hidden_size)\n"
            "try:\n    M.from_pretrained('llava-hf/tiny')\nexcept OSError as e:\n    print(type(e).__name__, e)\n")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "64"
    assert lines[1].startswith("HubError") and "holds only part of it (no *.safetensors)" in lines[1], lines[1]


def test_tied_word_embeddings_file_variants(tmp_path):
    """As transformers reads a tied config: a file with only lm_head ties both to it; a file whose
    two matrices differ loads both, untied, with a warning (and saves both)."""
    from safetensors.torch import load_file

    from tiny import hf_config, hf_model

    cfg = hf_config("vicuna", **SMALL)
    cfg.tie_word_embeddings = True
    hf_model(cfg).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    embed_key = next(k for k in state if k.endswith("embed_tokens.weight"))
    head = torch.randn_like(state[embed_key])
    save_file({**{k: v for k, v in state.items() if k != embed_key}, "lm_head.weight": head},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    lm = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight and torch.equal(lm.lm_head.weight, head)
    save_file({**state, "lm_head.weight": head}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="two different matrices"):
        model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    lm = model.language_model
    assert lm.lm_head.weight is not lm.model.embed_tokens.weight
    assert torch.equal(lm.lm_head.weight, head) and torch.equal(lm.model.embed_tokens.weight, state[embed_key])
    model.save_pretrained(tmp_path / "again")
    assert "language_model.lm_head.weight" in load_file(tmp_path / "again" / "model.safetensors")


def test_resize_token_embeddings(tmp_path):
    """After tokenizer.add_tokens: the table and lm_head grow, old rows and old logits unchanged,
    new rows at the old rows' mean; a tied head stays tied; transformers loads the saved model."""
    from transformers import LlavaNextForConditionalGeneration as HF

    hf = hf_checkpoint(tmp_path / "hf", "mistral", **SMALL)
    ours = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf")
    old_vocab = ours.config.text_config.vocab_size
    ids = torch.tensor([[1, 5, 9, 42]])
    before = ours(input_ids=ids).logits
    emb = ours.resize_token_embeddings(old_vocab + 3, pad_to_multiple_of=8)
    n = -(-(old_vocab + 3) // 8) * 8
    assert emb is ours.get_input_embeddings() and emb.weight.shape[0] == n
    assert ours.get_output_embeddings().weight.shape[0] == n and ours.config.text_config.vocab_size == n
    after = ours(input_ids=ids).logits
    torch.testing.assert_close(after[..., :old_vocab], before)
    torch.testing.assert_close(emb.weight[old_vocab:], emb.weight[:old_vocab].mean(0).expand(n - old_vocab, -1))
    ours.save_pretrained(tmp_path / "ours")
    back = HF.from_pretrained(tmp_path / "ours").eval()
    assert back.lm_head.weight.shape[0] == n
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, after, atol=1e-5, rtol=1e-5)
    del hf


# ---- transformers-shaped use in training and evaluation loops -------------------------------------

def test_copy_and_pickle_the_model(saved):
    """deepcopy (EMA, a frozen reference model) and pickling (torch.save of the module) work."""
    import copy
    import pickle

    hf, folder = saved
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder)
    ids, mask = prompt_ids(hf.config, [[]], [6])
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask).logits
        ours.enable_input_require_grads()  # a hook on the embedding: still picklable
        for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
            assert torch.equal(clone(input_ids=ids, attention_mask=mask).logits, want)
            assert clone.generation_config == ours.generation_config and clone.config == ours.config
    shallow = copy.copy(ours.generation_config)
    shallow.max_new_tokens = 9
    assert ours.generation_config.max_new_tokens is None  # the copy has its own settings


def test_vision_cuda_graphs_change_nothing_off_cuda_and_copies_get_their_own(saved):
    """enable_vision_cuda_graphs() leaves CPU forwards as they were (nothing is captured), and a
    copied model (deepcopy, pickle) gets its own, empty graph cache. (The graphs themselves are
    tested on CUDA in test_model_triton.py.)"""
    import copy
    import pickle

    hf, folder = saved
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder)
    ids, mask = prompt_ids(hf.config, [[(45, 80)]], [4])
    pv, sizes = image_inputs(hf.config, [(45, 80)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
    with torch.no_grad():
        want = ours(**inputs).logits
        assert ours.enable_vision_cuda_graphs() is ours
        graphs = ours.vision_tower.cuda_graphs
        assert torch.equal(ours(**inputs).logits, want)
        assert graphs.captures == 0 and not graphs.graphs
        for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
            theirs = clone.vision_tower.cuda_graphs
            assert theirs is not graphs and not theirs.graphs
            assert (theirs.max_graphs, theirs.max_tiles) == (graphs.max_graphs, graphs.max_tiles)
            assert torch.equal(clone(**inputs).logits, want)
    with pytest.raises(TypeError, match="True or False"):
        ours.enable_vision_cuda_graphs(None)
    with pytest.raises(ValueError, match="max_graphs"):
        ours.enable_vision_cuda_graphs(max_graphs=0)
    with pytest.raises(ValueError, match="max_tiles"):
        ours.enable_vision_cuda_graphs(max_tiles=0)
    assert ours.enable_vision_cuda_graphs(False).vision_tower.cuda_graphs is None


def test_vision_cuda_graphs_bookkeeping(saved, monkeypatch):
    """VisionTowerGraphs' caching without a GPU: a stand-in graph whose replay runs the tower
    eagerly into the captured output. One capture per shape, replays after; the least recently
    used shape dropped past max_graphs; everything captured again after a weight moved or a
    module was swapped; the caller gets a copy, never the buffer the next replay overwrites."""
    from llava_next.vision import VisionTowerGraphs

    class Replay:
        def __init__(self, tower, static_in, static_out):
            self.replay = lambda: static_out.copy_(tower(static_in))

    def capture(self, tower, pixel_values):
        static_in = pixel_values.clone()
        static_out = tower(static_in)
        self.captures += 1
        return Replay(tower, static_in, static_out), static_in, static_out

    monkeypatch.setattr(VisionTowerGraphs, "replay_is_call", staticmethod(lambda tower, pv: not torch.is_grad_enabled()))
    monkeypatch.setattr(VisionTowerGraphs, "_capture", capture)
    monkeypatch.setattr(VisionTowerGraphs, "own_stream", lambda self, device: contextlib.nullcontext())
    hf, folder = saved
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder)
    tower = ours.vision_tower
    pv, _ = image_inputs(hf.config, [(45, 80), (150, 40)])
    five, three = pv[0], pv[1][:3]  # (the first image's tiles padded to the batch's most)
    assert len(five) not in (1, 3)
    with torch.no_grad():
        want5, want3 = tower(five), tower(three)
        graphs = ours.enable_vision_cuda_graphs(max_graphs=2).vision_tower.cuda_graphs
        first = tower(five)
        assert torch.equal(first, want5) and torch.equal(tower(five), want5) and graphs.captures == 1
        assert first.data_ptr() != graphs.graphs[tuple(five.shape), five.dtype, five.device][2].data_ptr()
        assert torch.equal(tower(three), want3) and graphs.captures == 2
        assert torch.equal(tower(five), want5) and graphs.captures == 2  # five is now the most recent
        tower(five[:1])
        assert graphs.captures == 3 and [k[0][0] for k in graphs.graphs] == [len(five), 1]  # three was dropped
        ours.fuse_projections()  # the q/k/v weights move
        torch.testing.assert_close(tower(five), want5, atol=1e-5, rtol=1e-5)
        assert graphs.captures == 4 and len(graphs.graphs) == 1
        layer = tower.vision_model.encoder.layers[0]
        layer.mlp = copy_module(layer.mlp)  # swapped (same weights' addresses would not tell)
        tower(five)
        assert graphs.captures == 5
        graphs.max_tiles = len(three) - 1
        torch.testing.assert_close(tower(three), want3, atol=1e-5, rtol=1e-5)
        assert graphs.captures == 5  # more tiles than max_tiles: eager, nothing captured
    assert tower(five).requires_grad and graphs.captures == 5  # with gradients: eager


def copy_module(module):
    import copy

    clone = copy.copy(module)  # a new module object sharing the same Parameters
    clone._modules = dict(module._modules)
    return clone


def test_loss_over_num_items_in_batch_as_transformers(saved):
    """transformers' Trainer passes num_items_in_batch (gradient accumulation): sum / that count."""
    hf, folder = saved
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder)
    ids, mask = prompt_ids(hf.config, [[(45, 80)], []], [4, 9])
    pv, sizes = image_inputs(hf.config, [(45, 80)])
    first = mask.cumsum(-1) == 1  # each row's bos: transformers scores it from the last pad, we do not (README)
    labels = ids.masked_fill((mask == 0) | first | (ids == hf.config.image_token_index), -100)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes, labels=labels)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for n in (7, torch.tensor(7)):
            want = hf(**kw, position_ids=position_ids, num_items_in_batch=n).loss
            got = ours(**kw, num_items_in_batch=n).loss
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        scored = int((labels[:, 1:] != -100).sum())
        torch.testing.assert_close(ours(**kw, num_items_in_batch=scored).loss, ours(**kw).loss)


def test_logits_to_keep_and_transformers_options(saved):
    hf, folder = saved
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder)
    ids, mask = prompt_ids(hf.config, [[]], [9])
    with torch.no_grad():
        full = ours(input_ids=ids).logits
        for keep in (torch.tensor([3]), torch.tensor([0, 5])):  # positions, as in transformers
            got = ours(input_ids=ids, logits_to_keep=keep).logits
            torch.testing.assert_close(got, full[:, keep])  # fewer rows in the product: last-bit rounding
            assert got.shape == hf(input_ids=ids, logits_to_keep=keep).logits.shape
        torch.testing.assert_close(ours(input_ids=ids, num_logits_to_keep=2).logits, full[:, -2:])
        for keep in (1, torch.tensor([3])):
            with pytest.raises(ValueError, match="logits_to_keep"):
                ours(input_ids=ids, labels=ids, logits_to_keep=keep)
        # options that ask for nothing different are accepted; return_dict=False gives a tuple
        same = ours(input_ids=ids, use_cache=False, return_dict=True, output_attentions=False, past_key_values=None,
                    output_hidden_states=False, vision_feature_layer=ours.config.vision_feature_layer)
        assert torch.equal(same.logits, full)
        loss, logits = ours(input_ids=ids, labels=ids, return_dict=False)
        assert torch.equal(logits, full) and loss.dim() == 0
        for option in (dict(vision_feature_layer=-3), dict(past_key_values=object())):
            with pytest.raises(TypeError, match=f"does not support \\['{next(iter(option))}'\\]"):
                ours(input_ids=ids, **option)
        with pytest.raises(TypeError, match=r"unexpected arguments: \['lables'\]$"):  # a typo: named, not printed
            ours(input_ids=ids, lables=ids)
        with pytest.raises(TypeError, match="not both"):
            ours(input_ids=ids, logits_to_keep=2, num_logits_to_keep=2)
        assert isinstance(ours(input_ids=ids, return_dict=0), tuple)
        with pytest.raises(TypeError, match="KVCache"):
            from transformers import DynamicCache
            ours(input_ids=ids, cache=DynamicCache())
        with pytest.raises(ValueError, match="4-d masks"):
            ours(input_ids=ids, attention_mask=torch.ones(1, 1, ids.shape[1], ids.shape[1]))
    out = ours(input_ids=ids, labels=ids)
    assert "loss" in out and out.keys() == ["loss", "logits"] and out.to_tuple()[1] is out.logits
    assert "loss" not in ours(input_ids=ids) and ours(input_ids=ids).get("loss") is None
    with pytest.raises(KeyError):
        ours(input_ids=ids)["loss"]


def test_load_a_transformers_state_dict(saved):
    """load_state_dict takes transformers' own state_dict() (its v5 key names), strictly."""
    from llava_next.config import LlavaNextConfig

    hf, folder = saved
    ours = LlavaNextForConditionalGeneration(LlavaNextConfig.from_pretrained(folder))
    both = {**hf.state_dict(), "language_model.model.norm.weight": torch.ones(64)}  # one tensor under two names
    with pytest.raises(KeyError, match="two names of one tensor"):
        ours.load_state_dict(both)
    ours.load_state_dict(hf.state_dict())
    ids, mask = prompt_ids(hf.config, [[]], [6])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, hf(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_config_attributes_transformers_code_reads(saved):
    hf, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    for exclude in (False, True):
        assert model.num_parameters(exclude_embeddings=exclude) == hf.num_parameters(exclude_embeddings=exclude)
    ours = model.config
    assert ours.model_type == "llava_next" and ours.use_return_dict and ours.get_text_config() is ours.text_config
    assert ours.text_config.initializer_range == cfg["text_config"]["initializer_range"]  # unmodelled, still readable
    with pytest.raises(AttributeError):
        ours.text_config.no_such_setting


def test_unknown_attn_implementation_is_named(saved):
    """A transformers backend name (flash_attention_2, ...) fails at load with the name of ours."""
    _, folder = saved
    for name in ("flash_attention_2", "kernels-community/flash-attn3"):
        with pytest.raises(ValueError, match=f"'{name}' names a transformers backend or hub kernel; llava-next's own "
                                             "flash attention is 'triton'"):
            LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation=name)
    with pytest.raises(ValueError, match=r"'sdpa ' is not one of \['auto', 'eager', 'sdpa', 'triton'\]$"):
        LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa ")


def test_set_attn_implementation_switches_every_layer(saved):
    """model.set_attn_implementation(name) (transformers' method) gives what loading with that
    name gives, in both towers; an unknown name or a per-tower dict is refused."""
    from llava_next.attention import ATTENTION_FUNCTIONS

    hf, folder = saved
    ids, mask = prompt_ids(hf.config, [[(45, 80)], [(150, 40)]], [3, 9])
    pv, sizes = image_inputs(hf.config, [(45, 80), (150, 40)])
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
    model = LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa")
    for name in ("eager", "sdpa"):
        model.set_attn_implementation(name)
        loaded = LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation=name)
        assert model.attn_implementation == name
        fns = {m.attn_fn for m in model.modules() if hasattr(m, "attn_fn")}
        assert fns == {ATTENTION_FUNCTIONS[name]} and len([m for m in model.modules() if hasattr(m, "attn_fn")]) == (
            hf.config.vision_config.num_hidden_layers + hf.config.text_config.num_hidden_layers)
        with torch.no_grad():
            assert torch.equal(model(**kw).logits, loaded(**kw).logits)
    old = model.enable_vision_cuda_graphs(max_tiles=7).vision_tower.cuda_graphs
    model.set_attn_implementation(None)
    graphs = model.vision_tower.cuda_graphs
    assert graphs is not old and graphs.max_tiles == 7 and not graphs.graphs  # captured ones replay the old path
    assert {m.kernels for m in model.modules() if hasattr(m, "kernels")} == {model.attn_implementation}
    with pytest.raises(ValueError, match="is not one of"):
        model.set_attn_implementation("fast")
    with pytest.raises(TypeError, match="one name for both towers"):
        model.set_attn_implementation({"text_config": "sdpa"})
