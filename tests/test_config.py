"""The four llava-hf config.json files parse to the architecture in REFERENCE.md's table."""

import json

import pytest

from conftest import fixture_path
from llava_next.config import ConfigError, LlavaNextConfig

# hidden, MLP, layers, heads, kv heads, rope theta, vocab, <image>, pad, eos, text model_type
TABLE = {
    "mistral-7b": (4096, 14336, 32, 32, 8, 1e6, 32064, 32000, None, 2, "mistral"),
    "vicuna-7b": (4096, 11008, 32, 32, 32, 1e4, 32064, 32000, 0, 2, "llama"),
    "vicuna-13b": (5120, 13824, 40, 40, 40, 1e4, 32064, 32000, 0, 2, "llama"),
    "34b": (7168, 20480, 60, 56, 8, 5e6, 64064, 64000, 0, 7, "llama"),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_checkpoint_configs(name):
    cfg = LlavaNextConfig.from_json_file(fixture_path("configs", f"llava-v1.6-{name}-hf.config.json"))
    t, v = cfg.text_config, cfg.vision_config
    hidden, mlp, layers, heads, kv, theta, vocab, image, pad, eos, model_type = TABLE[name]
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (hidden, mlp, layers)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (heads, kv, 128)
    assert (t.rope_theta, t.vocab_size, t.model_type) == (theta, vocab, model_type)
    assert (cfg.image_token_index, t.pad_token_id, t.eos_token_id, t.bos_token_id) == (image, pad, eos, 1)
    assert t.rms_norm_eps == 1e-5 and t.hidden_act == "silu" and not t.attention_bias and not t.mlp_bias
    assert t.sliding_window is None and not t.tie_word_embeddings
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1024, 4096, 24, 16)
    assert (v.image_size, v.patch_size, v.hidden_act, v.layer_norm_eps) == (336, 14, "quick_gelu", 1e-5)
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert cfg.projector_hidden_act == "gelu" and cfg.multimodal_projector_bias
    cfg.validate_for_model()


@pytest.mark.parametrize("name", list(TABLE))
def test_round_trip_through_to_dict(name):
    """to_dict keeps every setting of the hub file, modelled or not; only the dtypes go (the model
    writes its own when saved)."""
    path = fixture_path("configs", f"llava-v1.6-{name}-hf.config.json")
    cfg = LlavaNextConfig.from_json_file(path)
    out = json.loads(json.dumps(cfg.to_dict()))
    assert LlavaNextConfig.from_dict(out) == cfg
    with open(path, encoding="utf-8") as f:
        hub = json.load(f)
    for part, got in ((hub, out), (hub["text_config"], out["text_config"]), (hub["vision_config"], out["vision_config"])):
        for key, value in part.items():
            if key not in ("dtype", "torch_dtype", "text_config", "vision_config"):
                assert got[key] == value, (name, key)


def test_missing_text_fields_take_the_model_type_defaults():
    cfg = LlavaNextConfig.from_dict({"model_type": "llava_next", "text_config": {"model_type": "mistral"}})
    t = cfg.text_config
    assert (t.num_key_value_heads, t.sliding_window, t.max_position_embeddings, t.intermediate_size) == (
        8, 4096, 131072, 14336)
    cfg = LlavaNextConfig.from_dict({"model_type": "llava_next"})  # no sub-configs at all
    assert cfg.text_config.model_type == "llama" and cfg.text_config.num_key_value_heads == 32
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (336, 14)


def test_v5_rope_parameters_are_read():
    cfg = LlavaNextConfig.from_dict({"text_config": {"model_type": "llama",
                                                     "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}})
    assert cfg.text_config.rope_theta == 7.0


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="unknown model_type 'falcon'"):
        LlavaNextConfig.from_dict({"text_config": {"model_type": "falcon"}})
    with pytest.raises(ConfigError, match="rope_type 'yarn' is not supported"):
        LlavaNextConfig.from_dict({"text_config": {"rope_scaling": {"type": "yarn", "factor": 2.0}}})
    with pytest.raises(ConfigError, match="model_type is 'llava'"):
        LlavaNextConfig.from_dict({"model_type": "llava"})
    with pytest.raises(ConfigError, match="vision_feature_layer 30"):
        LlavaNextConfig.from_dict({"vision_feature_layer": 30}).validate_for_model()
    with pytest.raises(ConfigError, match="not a .height, width. pair of multiples"):
        LlavaNextConfig.from_dict({"image_grid_pinpoints": [[336, 500]]}).validate_for_model()


def test_dropout_in_a_config_warns():
    from llava_next import LlavaNextConfig

    with pytest.warns(UserWarning, match="no dropout layers"):
        LlavaNextConfig.from_dict({"text_config": {"attention_dropout": 0.1}})
