"""decode_linear against its plain-PyTorch reference (and transformers' MLP): odd shapes, plain
and gated, with and without bias and residual, strided rows, tile overrides."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_utils import DEVICE, DTYPES, TOL, assert_matches_reference, require_interpreter  # noqa: E402

from llava_next.kernels import decode_linear, decode_linear_reference  # noqa: E402
from llava_next.kernels.decode_linear import MAX_ROWS, _decode_linear_kernel  # noqa: E402

require_interpreter(_decode_linear_kernel)


def randn(*shape, g, scale=1.0, dtype=torch.float32):
    return (scale * torch.randn(*shape, generator=g)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("lead,N,K", [((1, 1), 100, 64), ((3,), 17, 129), ((2, 9), 33, 40), ((1,), 1, 48)])
def test_decode_linear_matches_reference(lead, N, K, gated, dtype):
    g = torch.Generator().manual_seed(N * K)
    x = randn(*lead, 200, g=g, scale=3.0, dtype=dtype)[..., 11:11 + K]  # rows longer than K
    rows = 2 * N if gated else N
    weight = randn(rows, K, g=g, scale=2 * K ** -0.5, dtype=dtype)
    bias = randn(rows, g=g, dtype=dtype)
    residual = randn(*lead, N, g=g, dtype=dtype)
    for b, r in ((bias, residual), (None, None), (bias, None), (None, residual)):
        y = decode_linear(x, weight, b, residual=r, gated=gated)
        # in fp32 from the same inputs: gate's rounding, amplified by up, would part two fp16
        # computations that sum in different orders by more than fp16's tolerance
        want = decode_linear_reference(*(t.float() if t is not None else None for t in (x, weight, b)),
                                       residual=r.float() if r is not None else None, gated=gated)
        assert_matches_reference(y, want, like=x[..., :1].expand(*lead, N))


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_decode_linear_rounds_where_the_modules_round(dtype):
    """Inputs on a coarse binary grid make every fp32 sum exact whatever its order, so the only
    rounding left is where the kernel rounds: the product (and gate, up) to the dtype before the
    residual add (and the SiLU-mul), as `residual + linear(x)` and the unfused MLP do."""
    g = torch.Generator().manual_seed(4)
    M, N, K = 3, 40, 64
    grid = lambda *shape, n=8: (torch.randint(-n, n + 1, shape, generator=g) / n).to(DEVICE)  # noqa: E731
    x, w, w_gated = grid(M, K, n=64), grid(N, K) * 4, grid(2 * N, K) / 2  # products on a 1/128 grid
    residual = (grid(M, N) / 64).to(dtype)  # finer than the dtype's step at the products' size
    y32 = x @ w.T  # exact in fp32
    want = (y32.to(dtype).float() + residual.float()).to(dtype)
    got = decode_linear(x.to(dtype), w.to(dtype), residual=residual)
    assert (y32.to(dtype).float() != y32).any()  # the product's rounding is really exercised
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    gate, up = (x @ w_gated.T).to(dtype).float().chunk(2, dim=-1)
    want = (torch.nn.functional.silu(gate) * up).to(dtype)
    torch.testing.assert_close(decode_linear(x.to(dtype), w_gated.to(dtype), gated=True), want, atol=0, rtol=0)


def test_decode_linear_strided_rows_and_max_rows():
    g = torch.Generator().manual_seed(1)
    x = randn(MAX_ROWS, 200, g=g)[:, 7:103]  # row stride 200, K = 96
    weight = randn(50, 96, g=g, scale=0.1)
    residual = randn(MAX_ROWS, 50, g=g)
    y = decode_linear(x, weight, residual=residual)
    torch.testing.assert_close(y, residual + x @ weight.T, **TOL[torch.float32])


def test_decode_linear_config_override():
    """The sweep's tile override: other tiles, same result (the masks cover ragged N and K)."""
    g = torch.Generator().manual_seed(2)
    x, weight = randn(2, 72, g=g), randn(40, 72, g=g)
    want = x @ weight.T
    for cfg in (dict(BLOCK_N=32, BLOCK_K=16), dict(BLOCK_N=16, BLOCK_K=64), dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128)):
        y = decode_linear(x, weight, config=dict(cfg, num_warps=4, num_stages=1))
        torch.testing.assert_close(y, want, **TOL[torch.float32])


def test_decode_linear_autotuned_launch(monkeypatch):
    """The GPU's launch path (triton.autotune over the tiles, EVEN_K from the tile chosen) with one
    candidate, which the autotuner runs without timing, so the interpreter can take it too."""
    import sys

    import triton

    dl = sys.modules["llava_next.kernels.decode_linear"]
    tuned = triton.autotune(configs=[triton.Config(dict(BLOCK_N=16, BLOCK_K=64), num_warps=4, num_stages=1)],
                            key=["M", "N", "K"])(dl._kernel)
    monkeypatch.setattr(dl, "_tuned_kernel", tuned)
    monkeypatch.setattr(dl, "_autotune", lambda x: True)
    g = torch.Generator().manual_seed(5)
    x, w, r = randn(3, 100, g=g), randn(2 * 40, 100, g=g, scale=0.1), randn(3, 40, g=g)  # K % 64 != 0
    torch.testing.assert_close(decode_linear(x, w, residual=r, gated=True),
                               decode_linear_reference(x, w, residual=r, gated=True), **TOL[torch.float32])
    x, w = randn(2, 128, g=g), randn(40, 128, g=g, scale=0.1)  # K % 64 == 0: EVEN_K
    torch.testing.assert_close(decode_linear(x, w), x @ w.T, **TOL[torch.float32])
    assert tuned.best_config.kwargs == dict(BLOCK_N=16, BLOCK_K=64)  # the launch went through the autotuner


def test_decode_linear_tunes_once_per_row_tile(monkeypatch):
    """The autotuner's key (the real one) is the 16-row tile, not the row count: batch 1 and batch
    8 share a tuning, 20 rows (a 32-row tile) get their own. The timing is a stand-in that counts."""
    import sys

    import triton

    dl = sys.modules["llava_next.kernels.decode_linear"]
    timed = []

    def bench(kernel_call, quantiles=None):
        kernel_call()  # runs the candidate, as the real benchmark does
        timed.append(1)
        return [float(len(timed))] * (len(quantiles) if quantiles else 1)

    configs = [triton.Config(dict(BLOCK_N=16, BLOCK_K=64), num_warps=4, num_stages=1),
               triton.Config(dict(BLOCK_N=32, BLOCK_K=32), num_warps=4, num_stages=1)]
    tuned = triton.autotune(configs=configs, key=dl._tuned_kernel.keys, do_bench=bench)(dl._kernel)
    monkeypatch.setattr(dl, "_tuned_kernel", tuned)
    monkeypatch.setattr(dl, "_autotune", lambda x: True)
    g = torch.Generator().manual_seed(8)
    w = randn(40, 96, g=g, scale=0.1)
    for rows, benched in ((1, 2), (8, 2), (20, 4), (3, 4)):
        x = randn(rows, 96, g=g)
        torch.testing.assert_close(decode_linear(x, w), x @ w.T, **TOL[torch.float32])
        assert len(timed) == benched, f"after {rows} rows: {len(timed)} candidates timed, expected {benched}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning times configs on a GPU")
def test_decode_linear_autotuned_on_gpu(monkeypatch):
    """The real autotuner (six tiles timed) on mistral-7b's down projection at batch 1."""
    import sys

    dl = sys.modules["llava_next.kernels.decode_linear"]
    monkeypatch.setattr(dl, "AUTOTUNE", True)
    g = torch.Generator().manual_seed(6)
    x, w, r = (randn(1, 14336, g=g), randn(4096, 14336, g=g, scale=14336 ** -0.5), randn(1, 4096, g=g))
    x, w, r = (t.to(torch.bfloat16) for t in (x, w, r))
    y = decode_linear(x, w, residual=r)
    want = decode_linear_reference(x.float(), w.float(), residual=r.float())
    torch.testing.assert_close(y.float(), want, **TOL[torch.bfloat16])
    assert dl._tuned_kernel.best_config in dl._TUNED_CONFIGS


def test_decode_linear_matches_transformers_mlp():
    """transformers' LlamaMLP plus the residual, as two kernels: gated gate/up, then down + residual."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    g = torch.Generator().manual_seed(3)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=80, num_attention_heads=4, mlp_bias=True, hidden_act="silu")
    mlp = LlamaMLP(cfg).to(DEVICE)
    x = randn(1, 1, 48, g=g, scale=3.0)
    with torch.no_grad():
        want = x + mlp(x)
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
    gate_up_bias = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]).detach()
    h = decode_linear(x, gate_up, gate_up_bias, gated=True)
    out = decode_linear(h, mlp.down_proj.weight.detach(), mlp.down_proj.bias.detach(), residual=x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_decode_linear_errors():
    x, w = torch.zeros(1, 8, device=DEVICE), torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        decode_linear(torch.zeros(MAX_ROWS + 1, 8, device=DEVICE), w)
    with pytest.raises(ValueError, match=r"weight must be \(N, 8\)"):
        decode_linear(x, torch.zeros(4, 9, device=DEVICE))
    with pytest.raises(TypeError, match="bias is torch.float16"):
        decode_linear(x, w, torch.zeros(4, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="even number of rows"):
        decode_linear(x, torch.zeros(5, 8, device=DEVICE), gated=True)
    with pytest.raises(ValueError, match="residual must be"):
        decode_linear(x, w, residual=torch.zeros(1, 5, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        decode_linear(x, torch.zeros(8, 4, device=DEVICE).T)
    with pytest.raises(ValueError, match="smaller than the 20 rows"):
        decode_linear(torch.zeros(20, 8, device=DEVICE), w, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16))
