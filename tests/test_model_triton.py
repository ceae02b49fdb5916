"""attn_implementation="triton" against "sdpa" on tiny checkpoints: logits, decode steps and
greedy tokens. On CPU this runs the kernels under TRITON_INTERPRET=1 (set by conftest)."""

import pytest
import torch

pytest.importorskip("triton")

from llava_next import KVCache, LlavaNextForConditionalGeneration  # noqa: E402
from tiny import hf_checkpoint, image_inputs, prompt_ids  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(image_size=56, patch_size=14, pinpoints=[[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]])


@pytest.fixture(scope="module", params=["mistral", "yi"])
def models(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    # head_dim 16 on the text side, 16 on the vision side; GQA for both families here.
    hf = hf_checkpoint(folder, request.param, **SMALL)
    load = lambda attn: LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation=attn,
                                                                          device_map=DEVICE)
    return hf.config, load("sdpa"), load("triton")


def batch(config):
    ids, mask = prompt_ids(config, [[(45, 80)], [(150, 40)]], [3, 9])
    pv, sizes = image_inputs(config, [(45, 80), (150, 40)])
    return dict(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), pixel_values=pv.to(DEVICE),
                image_sizes=sizes)


def test_prefill_logits_match_sdpa(models):
    config, sdpa, triton = models
    inputs = batch(config)
    with torch.no_grad():
        want = sdpa(**inputs).logits
        got = triton(**inputs).logits
    real = inputs["attention_mask"].bool()
    diff = (got - want)[real].abs().max().item()
    print(f"prefill logits, triton vs sdpa: max abs diff {diff:.2e}")
    assert diff <= 2e-4


def test_cached_prefill_and_decode_steps_match_sdpa(models):
    """With a cache the triton model uses the fused rope + cache-write kernel, flash attention for
    the prompt and flash-decoding for each new token."""
    config, sdpa, triton = models
    inputs = batch(config)
    T = inputs["input_ids"].shape[1]
    steps = torch.randint(3, 1000, (2, 3), device=DEVICE)
    outs = []
    for model in (sdpa, triton):
        cache = KVCache.for_model(model, 2, T + 3)
        with torch.no_grad():
            logits = [model(**inputs, cache=cache).logits[:, -1]]
            for i in range(3):
                logits.append(model(input_ids=steps[:, i:i + 1], cache=cache,
                                    cache_pos=torch.tensor(T + i, device=DEVICE)).logits[:, -1])
        outs.append(torch.stack(logits, 1))
    diff = (outs[1] - outs[0]).abs().max().item()
    print(f"cached prefill + 3 decode steps, triton vs sdpa: max abs diff {diff:.2e}")
    assert diff <= 2e-4


def test_greedy_tokens_equal_sdpa(models):
    config, sdpa, triton = models
    inputs = batch(config)
    want = sdpa.generate(**inputs, max_new_tokens=8)
    got = triton.generate(**inputs, max_new_tokens=8)
    assert torch.equal(got, want)


def test_default_attention_is_sdpa_on_cpu_and_triton_on_cuda(tmp_path):
    hf_checkpoint(tmp_path, "vicuna", **SMALL)
    m = LlavaNextForConditionalGeneration.from_pretrained(tmp_path, device_map=DEVICE)
    assert m.attn_implementation == ("triton" if DEVICE == "cuda" else "sdpa")
