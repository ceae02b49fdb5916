"""Tiny random LLaVA-NeXT checkpoints built with transformers (the oracle), for tests.

`hf_checkpoint(folder, family=...)` builds transformers' model from a tiny config, saves it
and returns the model, so a test can load the folder with our code and compare outputs.
Geometry defaults to the real one (336 px tiles, 14 px patches, the llava-hf pinpoints) with
tiny widths, so real images and the real processor arithmetic apply.
"""

from __future__ import annotations

import torch

from llava_next.anyres import num_image_tokens, num_tiles

PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

FAMILIES = {
    # GQA, Mistral model_type; sliding_window None as in the llava-hf config.
    "mistral": dict(model_type="mistral", vocab_size=32064, num_attention_heads=4, num_key_value_heads=2,
                    rope_theta=1e6, sliding_window=None, image_token_index=32000, pad_token_id=32001, eos=2),
    "vicuna": dict(model_type="llama", vocab_size=32064, num_attention_heads=4, num_key_value_heads=4,
                   rope_theta=1e4, image_token_index=32000, pad_token_id=0, eos=2),
    # Yi: a llama with a 64k vocabulary, <image> = 64000, GQA.
    "yi": dict(model_type="llama", vocab_size=64064, num_attention_heads=4, num_key_value_heads=2,
               rope_theta=5e6, image_token_index=64000, pad_token_id=0, eos=7),
}


def hf_config(family="mistral", image_size=336, patch_size=14, pinpoints=None, vision_feature_layer=-2,
              hidden_size=64, layers=2, vision_layers=3, **text_overrides):
    from transformers import LlavaNextConfig

    fam = dict(FAMILIES[family])
    image_token_index, pad, eos = fam.pop("image_token_index"), fam.pop("pad_token_id"), fam.pop("eos")
    rope_theta = fam.pop("rope_theta")
    text = dict(fam, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                rms_norm_eps=1e-5, max_position_embeddings=4096, pad_token_id=pad, eos_token_id=eos,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    text.update(text_overrides)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                  patch_size=patch_size, projection_dim=16)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                           image_grid_pinpoints=pinpoints or PINPOINTS_336,
                           vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default")


def hf_model(config, seed=0, attn_implementation="eager"):
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    # transformers initialises norms to 1 and biases to 0; random values test more of the wiring.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.set_attn_implementation(attn_implementation)
    return model


def hf_checkpoint(folder, family="mistral", seed=0, max_shard_size=None, **config_kw):
    """Save a tiny transformers model to `folder` (transformers' own file layout); return it."""
    model = hf_model(hf_config(family, **config_kw), seed=seed)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kw)
    return model


# A small vision geometry (56 px tiles of 14 px patches: 4x4 patches a tile) for fast tests.
SMALL = dict(image_size=56, patch_size=14, pinpoints=[[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]])


def hf_and_ours(folder, family):
    """transformers' tiny model of `family` at the SMALL vision geometry, saved to `folder`, and
    ours loaded from there: the pair the generation tests compare."""
    from llava_next import LlavaNextForConditionalGeneration

    hf = hf_checkpoint(folder, family, **SMALL)
    return hf, LlavaNextForConditionalGeneration.from_pretrained(folder)


def image_inputs(config, image_sizes, seed=0):
    """Random pixel_values (N, max_tiles, 3, S, S) with zeroed padding tiles, as a processor makes."""
    g = torch.Generator().manual_seed(seed)
    S = config.vision_config.image_size
    pinpoints = config.image_grid_pinpoints
    tiles = [num_tiles(s, pinpoints, S) for s in image_sizes]
    pv = torch.zeros(len(image_sizes), max(tiles), 3, S, S)
    for i, n in enumerate(tiles):
        pv[i, :n] = torch.randn(n, 3, S, S, generator=g)
    return pv, torch.tensor(image_sizes)


def n_image_tokens(config, image_size):
    vc = config.vision_config
    return num_image_tokens(image_size, config.image_grid_pinpoints, vc.image_size, vc.patch_size)


def prompt_ids(config, image_sizes_per_row, text_lens, seed=0, pad_id=0):
    """Left-padded input_ids / attention_mask: each row is bos, text, its images' <image> runs, text."""
    g = torch.Generator().manual_seed(seed)
    img = config.image_token_index
    rows = []
    for sizes, n_text in zip(image_sizes_per_row, text_lens):
        row = [1]
        for s in sizes:
            row += torch.randint(3, 1000, (2,), generator=g).tolist() + [img] * n_image_tokens(config, s)
        row += torch.randint(3, 1000, (n_text,), generator=g).tolist()
        rows.append(row)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids, mask
