"""rope_kv_write, rms_norm, silu_mul and quick_gelu against their plain-PyTorch references (and
rope, rms_norm and quick_gelu against transformers, the definition of the semantics)."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_utils import DEVICE, DTYPES, TOL, inv_freq, qkv_views, require_interpreter  # noqa: E402

from llava_next.kernels import (  # noqa: E402
    quick_gelu,
    quick_gelu_reference,
    rms_norm,
    rms_norm_reference,
    rope_kv_write,
    rope_kv_write_reference,
    silu_mul,
    silu_mul_reference,
)
from llava_next.kernels.rms_norm import _rms_norm_kernel  # noqa: E402

require_interpreter(_rms_norm_kernel)
TOL = {**TOL, torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}  # elementwise ops: tighter than attention


# ---------------------------------------------------------------- rope_kv_write


@pytest.mark.parametrize("block_t", [1, 16], ids=lambda n: f"{n}tok")  # tokens a program: GPU's, interpreter's
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,D,cache_pos", [(1, 64, 17), (7, 40, 0), (7, 128, 5), (129, 64, 0)])
def test_rope_kv_write_matches_reference(T, D, cache_pos, dtype, block_t, monkeypatch):
    import sys

    # the package binds the name rope_kv_write to the function, so the module comes from sys.modules
    monkeypatch.setattr(sys.modules["llava_next.kernels.rope_kv_write"], "rows_per_program", lambda device: block_t)
    B, Hq, Hkv, Tmax = 2, 6, 3, 160
    q, k, v = qkv_views(B, T, Hq, Hkv, D, dtype)
    # row 1 is left-padded by 3: its positions are shifted; row 0 sits deep in a long context
    position_ids = torch.stack([torch.arange(T) + 3000 + cache_pos, torch.arange(T) - 3 + cache_pos]).clamp(min=0)
    position_ids = position_ids.to(DEVICE)
    sentinel = torch.full((B, Hkv, Tmax, D), 7.0, dtype=dtype, device=DEVICE)
    k_cache, v_cache = sentinel.clone(), sentinel.clone()
    k_ref, v_ref = sentinel.clone(), sentinel.clone()
    pos_arg = torch.tensor(cache_pos, device=DEVICE) if cache_pos else cache_pos  # tensor and int forms
    q_rot = rope_kv_write(q, k, v, position_ids, inv_freq(D), k_cache, v_cache, pos_arg)
    q_want = rope_kv_write_reference(q, k, v, position_ids, inv_freq(D), k_ref, v_ref, cache_pos)
    assert q_rot.shape == (B, Hq, T, D) and q_rot.dtype == dtype
    torch.testing.assert_close(q_rot, q_want, **TOL[dtype])
    torch.testing.assert_close(k_cache, k_ref, **TOL[dtype])  # includes the untouched slots
    torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=0)


def test_rope_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, T, Hq, Hkv, D = 2, 7, 6, 3, 64
    q, k, v = qkv_views(B, T, Hq, Hkv, D, torch.float32)
    position_ids = torch.stack([torch.arange(T) + 40, torch.arange(T)]).to(DEVICE)
    freqs = position_ids.float()[:, :, None] * inv_freq(D)[None, None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), emb.cos(), emb.sin())
    k_cache = torch.zeros(B, Hkv, 16, D, device=DEVICE)
    v_cache = torch.zeros(B, Hkv, 16, D, device=DEVICE)
    q_rot = rope_kv_write(q, k, v, position_ids, inv_freq(D), k_cache, v_cache, 2)
    torch.testing.assert_close(q_rot, q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache[:, :, 2:2 + T], k_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_cache[:, :, 2:2 + T], v.transpose(1, 2), atol=0, rtol=0)


def test_rope_kv_write_strided_inv_freq_and_a_slot_outside_the_cache():
    """A strided inv_freq view is read by its values; a tensor cache_pos outside the cache (no
    host check reads it) writes nothing, not the slot before the cache."""
    B, T, Hq, Hkv, D, Tmax = 2, 1, 4, 2, 64, 8
    q, k, v = qkv_views(B, T, Hq, Hkv, D, torch.float32)
    pos = torch.full((B, T), 5, device=DEVICE)
    strided = torch.stack([inv_freq(D), torch.zeros_like(inv_freq(D))], -1)[:, 0]  # stride 2, same values
    caches = [torch.zeros(B, Hkv, Tmax, D, device=DEVICE) for _ in range(4)]
    q_rot = rope_kv_write(q, k, v, pos, strided, caches[0], caches[1], 3)
    want = rope_kv_write_reference(q, k, v, pos, inv_freq(D), caches[2], caches[3], 3)
    torch.testing.assert_close(q_rot, want)
    torch.testing.assert_close(caches[0], caches[2])
    whole = torch.zeros(2 * B * Hkv * Tmax * D, device=DEVICE)  # the cache is the second half of a buffer
    k_cache = whole[B * Hkv * Tmax * D:].view(B, Hkv, Tmax, D)
    rope_kv_write(q, k, v, pos, inv_freq(D), k_cache, torch.zeros_like(k_cache), torch.tensor(-1, device=DEVICE))
    assert not whole.any()


def test_rope_kv_write_errors():
    q, k, v = qkv_views(1, 7, 6, 3, 64, torch.float32)
    cache = torch.zeros(1, 3, 8, 64, device=DEVICE)
    pos = torch.arange(7, device=DEVICE)[None]
    with pytest.raises(ValueError, match="overflows the cache"):
        rope_kv_write(q, k, v, pos, inv_freq(64), cache, cache.clone(), 2)
    with pytest.raises(ValueError, match="inv_freq"):
        rope_kv_write(q, k, v, pos, inv_freq(32), cache, cache.clone(), 0)
    with pytest.raises(ValueError, match="position_ids is on meta"):
        rope_kv_write(q, k, v, pos.to("meta"), inv_freq(64), cache, cache.clone(), 0)


# ---------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("block_m", [1, 16], ids=lambda n: f"{n}rows")  # rows a program: GPU's, interpreter's
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 40), (2, 7, 129), (2, 3, 4096), (37, 40)])
def test_rms_norm_matches_reference(shape, dtype, block_m, monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules["llava_next.kernels.rms_norm"], "rows_per_program", lambda device: block_m)
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    w = torch.randn(shape[-1], generator=g).to(DEVICE, dtype)
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-6), **TOL[dtype])


def test_rms_norm_fp32_weight_and_strided_rows():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
    x = torch.randn(7, 200, generator=g).to(DEVICE, torch.float16)[:, 13:109]  # row stride 200
    y = rms_norm(x, norm.weight.detach(), 1e-5)
    want = norm(x)
    assert y.dtype == want.dtype == torch.float32  # fp32 weight * fp16 row promotes, as in torch
    torch.testing.assert_close(y, want, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------- silu_mul


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 40), (2, 7, 129), (3, 2500)])
def test_silu_mul_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    gate_up = (4 * torch.randn(*shape[:-1], 2 * shape[-1], generator=g)).to(DEVICE, dtype)
    gate, up = gate_up.chunk(2, dim=-1)  # column slices of one fused projection
    y = silu_mul(gate, up)
    assert y.shape == gate.shape and y.dtype == dtype
    torch.testing.assert_close(y, silu_mul_reference(gate, up), **TOL[dtype])
    eager = torch.nn.functional.silu(gate) * up  # rounds twice: within about one ulp
    torch.testing.assert_close(y, eager, **TOL[dtype])


def test_silu_mul_refuses_mismatched_or_strided_inputs():
    a = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="one shape and dtype"):
        silu_mul(a, a[:, :4])
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul(a.t(), a.t())
    assert silu_mul(a[:0], a[:0]).shape == (0, 8)


# ---------------------------------------------------------------- quick_gelu


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 40), (2, 7, 129), (3, 2500)])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter (numpy), x = -200
def test_quick_gelu_matches_reference_and_transformers(shape, dtype):
    from transformers.activations import QuickGELUActivation

    g = torch.Generator().manual_seed(0)
    wide = (6 * torch.randn(*shape[:-1], shape[-1] + 3, generator=g)).to(DEVICE, dtype)
    x = wide[..., :shape[-1]]  # rows wider than N, as a column slice
    x[..., :2] = torch.tensor([-200.0, 200.0], dtype=dtype)  # exp overflow and saturation
    y = quick_gelu(x)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y, quick_gelu_reference(x), **TOL[dtype])
    torch.testing.assert_close(y, QuickGELUActivation()(x), **TOL[dtype])  # rounds three times: about one ulp
    assert torch.equal(y[..., :2].float().cpu(), torch.tensor([-0.0, 200.0]).expand_as(y[..., :2]))
