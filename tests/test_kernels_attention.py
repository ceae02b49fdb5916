"""flash_attention against its plain-PyTorch reference on odd shapes.

On CPU the kernel runs under the Triton interpreter (fp32, fp16; the interpreter gets bf16
wrong); on a GPU the same tests run compiled, in bf16 too, plus realistic shapes."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_utils import CUDA, DEVICE, DTYPES, TOL, assert_matches_reference, require_interpreter  # noqa: E402

from llava_next.kernels import flash_attention, flash_attention_reference  # noqa: E402
from llava_next.kernels.flash_attention import _attn_fwd_kernel, _flash_attention_forward, _tma_descriptors  # noqa: E402

require_interpreter(_attn_fwd_kernel)


def make_qkv(B, Hq, Hkv, Tq, Tk, D, dtype, layout="bthd", seed=0):
    """q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D). layout 'bthd': transposed views of (B, T, H, D)
    tensors, as the model passes them; 'bhtd': contiguous; 'sliced': views into wider buffers."""
    g = torch.Generator().manual_seed(seed)

    def rand(H, T):
        if layout == "bthd":
            return torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
        if layout == "bhtd":
            return torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype)
        return torch.randn(B, T, H, D + 24, generator=g).to(DEVICE, dtype)[..., 3:D + 3].transpose(1, 2)

    return rand(Hq, Tq), rand(Hkv, Tk), rand(Hkv, Tk)


def check(q, k, v, **kw):
    out = flash_attention(q, k, v, **kw)
    ref = flash_attention_reference(q.float(), k.float(), v.float(), **kw)  # fp32 reference
    assert_matches_reference(out, ref, q)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "Tq,Tk,D,causal",
    [
        (129, 129, 64, True),  # prefill, ragged last block
        (129, 129, 128, False),  # vision tower
        (7, 7, 40, True),  # D not a power of two
        (1, 129, 64, True),  # one query at the bottom-right
        (7, 129, 80, True),  # chunk of queries after a prefix
        (33, 33, 96, False),
    ],
)
def test_flash_matches_reference(Tq, Tk, D, causal, dtype):
    q, k, v = make_qkv(2, 6, 3, Tq, Tk, D, dtype)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 17])
def test_flash_left_padding(dtype, window):
    B, T, D = 2, 129, 40
    q, k, v = make_qkv(B, 6, 3, T, T, D, dtype)
    kv_mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    kv_mask[1, :50] = False  # row 1 is left-padded by 50 tokens
    out = check(q, k, v, causal=True, kv_mask=kv_mask, sliding_window=window)
    # the padding queries of row 1 see no key at all: zeros, not NaN
    assert out[1, :, :50].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flash_sliding_window(dtype):
    q, k, v = make_qkv(1, 6, 3, 129, 129, 64, dtype, layout="bhtd")
    for window in (1, 5, 64):
        check(q, k, v, causal=True, sliding_window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flash_q_offset_forms(dtype):
    B, Tq, Tk, D = 2, 7, 129, 64
    q, k, v = make_qkv(B, 6, 3, Tq, Tk, D, dtype)
    for off in (40, torch.tensor(40, device=DEVICE), torch.tensor([40], device=DEVICE)):
        out = check(q, k, v, causal=True, q_offset=off)
    per_row = torch.tensor([3, 100], device=DEVICE)
    check(q, k, v, causal=True, q_offset=per_row, sliding_window=9)
    # None means bottom-right aligned: q_offset = Tk - Tq
    torch.testing.assert_close(flash_attention(q, k, v, causal=True), flash_attention(q, k, v, causal=True, q_offset=Tk - Tq))
    del out


@pytest.mark.parametrize("layout", ["bthd", "bhtd", "sliced"])
def test_flash_strides(layout):
    q, k, v = make_qkv(2, 6, 3, 33, 33, 40, torch.float16, layout=layout)
    check(q, k, v, causal=True)


def test_flash_gqa_equals_repeated_kv():
    q, k, v = make_qkv(1, 6, 2, 33, 33, 64, torch.float32)
    grouped = flash_attention(q, k, v, causal=True)
    repeated = flash_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), causal=True)
    torch.testing.assert_close(grouped, repeated, atol=1e-6, rtol=1e-6)


def test_flash_lse_for_backward():
    q, k, v = make_qkv(2, 6, 3, 33, 33, 40, torch.float32)
    kv_mask = torch.ones(2, 33, dtype=torch.bool, device=DEVICE)
    kv_mask[0, :5] = False
    _, lse = _flash_attention_forward(q, k, v, True, kv_mask=kv_mask, store_lse=True)
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 40 ** 0.5
    visible = torch.ones(33, 33, dtype=torch.bool, device=DEVICE).tril() & kv_mask[:, None, None, :]
    ref = torch.logsumexp(logits.masked_fill(~visible, float("-inf")), -1) / torch.log(torch.tensor(2.0))
    ref = ref.masked_fill(ref == float("-inf"), float("inf"))  # rows that see nothing store +inf
    torch.testing.assert_close(lse, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["causal", "full_D128", "one_query", "offset_window_padding", "bhtd"])
def test_flash_tma_loads_match(case, dtype, monkeypatch):
    """The copy-engine (TMA) variant of the K/V loads (flash_attention.USE_TMA; by default on Hopper at D 128):
    same results as the pointer loads, including the ragged last key block, which the engine
    fills with zeros, and the masks; tensors it cannot read fall back to pointer loads."""
    import sys

    fa = sys.modules["llava_next.kernels.flash_attention"]
    Tq, Tk, D, layout, kw = {
        "causal": (129, 129, 64, "bthd", dict(causal=True)),
        "full_D128": (129, 129, 128, "bthd", dict(causal=False)),
        "one_query": (1, 129, 64, "bthd", dict(causal=True)),
        "offset_window_padding": (7, 129, 64, "bthd", dict(causal=True, q_offset=torch.tensor([3, 100], device=DEVICE),
                                                            sliding_window=9)),
        "bhtd": (33, 33, 32, "bhtd", dict(causal=True)),
    }[case]
    q, k, v = make_qkv(2, 6, 3, Tq, Tk, D, dtype, layout=layout)
    if case == "offset_window_padding":
        kv_mask = torch.ones(2, Tk, dtype=torch.bool, device=DEVICE)
        kv_mask[1, :20] = False
        kw["kv_mask"] = kv_mask
    assert _tma_descriptors(k, v, 32) is not None
    pointer_loads = flash_attention(q, k, v, **kw)
    monkeypatch.setattr(fa, "USE_TMA", True)
    launches, kernel = [], fa._attn_fwd_kernel

    class Spy:  # records how the kernel was specialized
        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(k["USE_TMA"]) or kernel[grid](*a, **k)

    monkeypatch.setattr(fa, "_attn_fwd_kernel", Spy())
    out = check(q, k, v, **kw)
    assert launches == [True]
    if not CUDA:
        # The interpreter runs both loads' products through numpy, value for value the same but for
        # OpenBLAS's fp32 kernel: on AVX-512 CPUs its rounding depends on the operands' memory layout
        # (up to 9.5e-7 here; exact with OPENBLAS_CORETYPE=Haswell). A wrong fill or mask is >= 1e-3.
        tol = 2e-6 if dtype == torch.float32 else 0
        torch.testing.assert_close(out, pointer_loads, atol=tol, rtol=0)


def test_flash_tma_falls_back_where_it_cannot_read():
    q, k, v = make_qkv(1, 2, 1, 9, 9, 40, torch.float32)
    assert _tma_descriptors(k, v, 32) is None  # head_dim 40: not a power of two
    q, k, v = make_qkv(1, 2, 1, 9, 9, 32, torch.float16, layout="sliced")
    assert _tma_descriptors(k, v, 32) is None  # 6-byte offset into a wider buffer: not 16-byte aligned
    assert _tma_descriptors(*make_qkv(1, 2, 1, 9, 0, 32, torch.float16)[1:], 32) is None  # no keys
    k1, v1 = make_qkv(1, 2, 1, 9, 9, 32, torch.float16)[1:]
    assert _tma_descriptors(k1, v1, 32) is not None
    assert _tma_descriptors(k1.expand(3, -1, -1, -1), v1.expand(3, -1, -1, -1), 32) is None  # stride 0
    out, _ = _flash_attention_forward(q, k, v, True, use_tma=True)
    assert_matches_reference(out, flash_attention_reference(q.float(), k.float(), v.float(), causal=True), q)


def test_flash_input_errors():
    q, k, v = make_qkv(1, 6, 4, 7, 7, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, k, v, causal=True)
    q, k, v = make_qkv(1, 6, 3, 7, 7, 64, torch.float32)
    with pytest.raises(ValueError, match="kv_mask"):
        flash_attention(q, k, v, causal=True, kv_mask=torch.ones(1, 8, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q, k.half(), v.half(), causal=True)
    for scale in (0.0, -1.0):  # hidden keys are -inf before scaling: the result would be NaN
        with pytest.raises(ValueError, match="scale must be > 0"):
            flash_attention(q, k, v, causal=True, scale=scale)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, k[:, :0], v[:, :0], causal=True)
    # a side tensor on another device (meta stands in for a GPU/CPU mix-up): named before any launch
    with pytest.raises(ValueError, match="kv_mask is on meta"):
        flash_attention(q, k, v, causal=True, kv_mask=torch.ones(1, 7, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="q_offset is on meta"):
        flash_attention(q, k, v, causal=True, q_offset=torch.tensor(0, device="meta"))


def test_flash_reference_keeps_nan():
    """The reference zeroes only the rows that see no key: a NaN in q stays NaN, as in the kernel."""
    q, k, v = make_qkv(1, 2, 2, 3, 3, 16, torch.float32)
    q[0, 0, 1, 0] = float("nan")
    mask = torch.tensor([[False, True, True]], device=DEVICE)  # row 0 sees no key under the causal rule
    ref = flash_attention_reference(q, k, v, causal=True, kv_mask=mask)
    assert (ref[0, :, 0] == 0).all() and ref[0, 0, 1].isnan().all() and not ref[0, 1].isnan().any()
    out = flash_attention(q, k, v, causal=True, kv_mask=mask)
    assert (out[0, :, 0] == 0).all() and out[0, 0, 1].isnan().all() and not out[0, 1].isnan().any()


GRAD_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["causal_padded", "full", "window_offset"])
def test_flash_backward_matches_autograd_of_reference(case, dtype):
    B, Tq, Tk, D = 2, 33, 40, 40
    q, k, v = make_qkv(B, 6, 3, Tq, Tk, D, dtype)
    kw = dict(causal=True)
    if case == "causal_padded":  # row 1: 30 pads, so its first queries see nothing
        kv_mask = torch.ones(B, Tk, dtype=torch.bool, device=DEVICE)
        kv_mask[1, :30] = False
        kw["kv_mask"] = kv_mask
    elif case == "full":
        kw["causal"] = False
    else:
        kw.update(sliding_window=9, q_offset=torch.tensor([3, 7], device=DEVICE))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    flash_attention(*leaves, **kw).backward(dout)
    ref_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    flash_attention_reference(*ref_leaves, **kw).backward(dout.float())
    for name, ours, ref in zip("qkv", leaves, ref_leaves):
        assert ours.grad.dtype == dtype and not ours.grad.isnan().any(), name
        torch.testing.assert_close(ours.grad.float(), ref.grad, **GRAD_TOL[dtype], msg=f"d{name}")


@pytest.mark.skipif(not CUDA, reason="realistic shapes only compiled on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_flash_backward_realistic_cuda(dtype):
    q, k, v = make_qkv(1, 32, 8, 700, 700, 128, dtype)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    dout = torch.randn_like(q)
    flash_attention(*leaves, causal=True).backward(dout)
    ref_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    flash_attention_reference(*ref_leaves, causal=True).backward(dout.float())
    for ours, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad.float(), ref.grad, **GRAD_TOL[dtype])


def test_flash_tile_choice():
    """The tiles _fwd_config picks on a GPU (a pure function of its arguments; no GPU needed), and
    where the copy-engine loads are used by default: nowhere off a GPU."""
    import sys

    fa = sys.modules["llava_next.kernels.flash_attention"]
    gpu, bf16 = torch.device("cuda"), torch.bfloat16
    tile = lambda *a: tuple(fa._fwd_config(*a).values())  # noqa: E731
    assert tile(128, 3000, bf16, gpu, True) == (64, 64, 4, 3)  # D 128 with TMA
    assert tile(128, 3000, bf16, gpu, False) == (128, 64, 8, 3)  # D 128, pointer loads (D 80, 96 too)
    assert tile(64, 577, bf16, gpu, False) == (64, 64, 4, 3)  # the vision tower's D 64
    assert tile(256, 3000, bf16, gpu, False) == (64, 32, 8, 2)
    assert tile(128, 7, bf16, gpu, True) == (16, 64, 4, 3)  # a short query block
    assert tile(128, 3000, torch.float32, gpu, True) == (32, 32, 4, 2)
    assert not fa._tma_pays(128, bf16, torch.device("cpu"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,causal", [(128, True), (64, False)])
def test_flash_gpu_default_tiles_match_reference(D, causal, dtype):
    """The 64x64 tiles the GPU runs by default (with TMA at D 128) over ragged lengths, under the
    interpreter too (which ignores warps and stages, not the tile shape)."""
    import sys

    if CUDA and dtype == torch.float32:
        pytest.skip("fp32 has its own smaller tiles on a GPU")
    fa = sys.modules["llava_next.kernels.flash_attention"]
    q, k, v = make_qkv(2, 6, 3, 129, 129, D, dtype)
    cfg = fa._fwd_config(D, 129, torch.bfloat16, torch.device("cuda"), D == 128)
    kv_mask = torch.ones(2, 129, dtype=torch.bool, device=DEVICE)
    kv_mask[1, :30] = False  # a left-padded row
    out, _ = _flash_attention_forward(q, k, v, causal, kv_mask=kv_mask, config=cfg, use_tma=D == 128)
    ref = flash_attention_reference(q.float(), k.float(), v.float(), causal=causal, kv_mask=kv_mask)
    assert_matches_reference(out, ref, q)


@pytest.mark.skipif(not CUDA, reason="realistic shapes only compiled on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "B,Hq,Hkv,T,D,causal",
    [(1, 32, 8, 1500, 128, True), (5, 16, 16, 577, 64, False), (2, 32, 32, 300, 128, True), (1, 40, 8, 250, 128, True)],
)
@pytest.mark.parametrize("use_tma,config", [(None, None), (False, None), (True, None),
                                            (False, dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3))],
                         ids=["default", "pointer_loads", "tma", "old_tile"])
def test_flash_realistic_cuda(B, Hq, Hkv, T, D, causal, dtype, use_tma, config):
    q, k, v = make_qkv(B, Hq, Hkv, T, T, D, dtype)
    assert not use_tma or _tma_descriptors(k, v, 64) is not None  # really the TMA loads
    out, _ = _flash_attention_forward(q, k, v, causal, use_tma=use_tma, config=config)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(Hq // Hkv, 1), v.float().repeat_interleave(Hq // Hkv, 1), is_causal=causal)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
