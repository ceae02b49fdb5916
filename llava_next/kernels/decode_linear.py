"""Linear layers at decode time: a few rows times a large weight matrix, with the small
operations after it folded in.

    y = x @ weight.T + bias (+ residual)                       plain
    y = silu(x @ gate.T + b_gate) * (x @ up.T + b_up)          gated: weight = [gate; up], (2N, K)

At batch 1 a decoder layer reads each weight once and does almost no arithmetic, so the time is
the weights' bytes over the memory bandwidth plus a fixed cost per kernel. cuBLAS runs these
products well, but around them sit small kernels (SiLU-mul, two residual adds per layer), and
cuBLAS adds split-K reduction kernels for some shapes. Folding the activation and the residual
adds into the products' outputs leaves a decoder layer at four matrix kernels, two RMSNorms and
attention, which does the rotary and the cache write too (rope_decode_attention; see
`LlamaDecoderLayer.decode_forward` in llava_next/language.py).
"""

import os

import torch
import triton
import triton.language as tl

from .decode_attention import _sm_count
from .launch import on_tensor_device
from .pdl import pdl_args, prefetch_l2, wait_for_previous_kernel
from .activations import silu_mul_f32

# One program owns BLOCK_N output columns (rows of the weight; with GATED, the same BLOCK_N rows
# of gate and of up) for all M <= BLOCK_M input rows, and streams its slab of the weight once,
# BLOCK_K columns at a time: no split along K, so no partial sums and no second kernel. The
# product is a tl.dot on a (BLOCK_M >= 16) tile, whose operand loads Triton pipelines num_stages
# deep (cp.async on Hopper): that keeps enough bytes in flight for the memory bandwidth. Rows
# past M are masked to zero.
#
# Why the fusions sit after the product, never before it: every program needs the whole input
# row, so an operation on the input (RMSNorm, SiLU-mul) would be recomputed by each of the
# hundreds of programs, on a 16-row tile that is mostly padding: in a version compiled for sm_90
# the SiLU-mul's exp and reciprocal alone came to about four times the cycles a K chunk's bytes
# take to arrive (an estimate from the SASS, bench/NOTES.md). An operation on the output is done
# once, by the program that owns the columns.
#
# Rounding follows the unfused modules where they round: the product (+ bias) is rounded to the
# dtype; SiLU-mul is silu(g) * u in fp32 from the rounded g and u, rounded once (activations.py);
# the residual add is `residual + linear(x)` on rounded values, rounded again.


# Under PDL, the columns of each weight row a program asks L2 for before it waits: 1 KiB of a bf16
# row, about the four 128-wide chunks its pipeline loads first.
PREFETCH_K = tl.constexpr(512)


@triton.jit
def _decode_linear_kernel(
    X, W, Bias, Res, Y,
    stride_xm, stride_wn, stride_rm, stride_ym,
    M, N, K,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    N64 = tl.zeros([], dtype=tl.int64) + N  # N as int64 even where Triton made N == 1 a constant
    if USE_PDL:
        # Launched early (kernels/pdl.py): the weights do not depend on the kernel before, so
        # while it finishes, ask L2 for the first PREFETCH_K columns of this program's rows (one
        # address per 128-byte line, clamped into the matrix), then wait for the input.
        LINE: tl.constexpr = 1024 // W.dtype.element_ty.primitive_bitwidth  # elements in 128 bytes
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
        cols = tl.minimum(tl.arange(0, PREFETCH_K // LINE) * LINE, K - 1)[None, :]  # (1, PREFETCH_K // LINE)
        prefetch_l2(W + rows + cols)
        if GATED:
            prefetch_l2(W + N64 * stride_wn + rows + cols)
    wait_for_previous_kernel(USE_PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k0 = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # 64-bit offsets: N * K can pass 2**31 (a 34b gate/up), and x's rows may be far apart
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm  # (BLOCK_M, 1)
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn  # (BLOCK_N, 1)
    up_rows = w_rows + N64 * stride_wn  # GATED: up's rows follow gate's

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        if EVEN_K:
            x_mask = m_ok[:, None]
            w_mask = n_ok[:, None]
        else:
            x_mask = m_ok[:, None] & (offs_k < K)[None, :]
            w_mask = n_ok[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_rows + offs_k[None, :], mask=x_mask, other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_rows + offs_k[None, :], mask=w_mask, other=0.0)  # (BLOCK_N, BLOCK_K)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        if GATED:
            w_up = tl.load(up_rows + offs_k[None, :], mask=w_mask, other=0.0)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision=DOT_PRECISION)

    out_ty = Y.dtype.element_ty
    y = acc
    if HAS_BIAS:
        y += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        up = acc_up
        if HAS_BIAS:
            up += tl.load(Bias + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        g = y.to(out_ty).to(tl.float32)  # gate and up are rounded, as the unfused product leaves them
        y = silu_mul_f32(g, up.to(out_ty).to(tl.float32))
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        y = y.to(out_ty).to(tl.float32)  # linear(x) is rounded before the add
        y += tl.load(Res + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :], mask=out_mask,
                     other=0.0).to(tl.float32)
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], y.to(out_ty), mask=out_mask)


MAX_ROWS = 64  # the kernel holds all rows in one tile; more rows are a matrix product (cuBLAS)

# EVEN_K follows from the tile: whichever BLOCK_K runs, the K mask is dropped when it divides K.
_kernel = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_decode_linear_kernel)

# On a GPU the tiles are picked per shape by timing these on its first call (triton.autotune:
# each config compiled and run, the fastest kept for that (M, N, K, ...)); a CUDA graph's warm-up
# steps do it before capture. The candidates are the sweep's (scripts/bench_kernels.py --sweep):
# on an H100 at batch 1 the autotuner picked the first four, and the sweep found 16/256 on two warps
# faster still for q/k/v, o and down (19.3 vs 20.1, 13.9 vs 15.1, 41.9 vs 45.4 us; bench/NOTES.md,
# sixth session), so it replaced 64/128 (slowest for every shape). AUTOTUNE = False (or
# LLAVA_NEXT_AUTOTUNE=0 in the environment, as the tests set: they would otherwise compile and time
# six tiles for every shape they try) uses `_config`'s heuristic instead.
# The tuning is keyed by BLOCK_M, not M: 1 to 16 rows run the same 16-row tile, so batch 1 and
# batch 8 share one tuning instead of paying for two. It is kept on disk (cache_results, in
# Triton's cache directory, keyed by GPU architecture, Triton version and this kernel's source):
# a new process on the same machine skips the few seconds a shape's tuning takes (about 20 s
# for a 7B model's shapes at its first generate()).
AUTOTUNE = os.environ.get("LLAVA_NEXT_AUTOTUNE", "1") != "0"
_TUNED_CONFIGS = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
                  for bn, bk, w, st in ((16, 128, 4, 4), (16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3),
                                        (16, 128, 2, 4), (16, 256, 2, 4))]
_tuned_kernel = triton.autotune(configs=_TUNED_CONFIGS, cache_results=True,
                                key=["BLOCK_M", "N", "K", "GATED", "HAS_BIAS", "HAS_RESIDUAL", "USE_PDL"])(_kernel)


def _config(M: int, N: int, K: int, gated: bool, dtype: torch.dtype, device: torch.device) -> dict:
    """Tiles by shape where nothing is autotuned (the interpreter, AUTOTUNE = False). On a GPU:
    the widest BLOCK_N that still gives every SM about four programs (so the tail of the last
    wave is short), 128-wide K chunks four stages deep
    (BLOCK_N x 128 x 2 bytes per stage: 8 KiB at BLOCK_N 32, several programs per SM), fewer
    stages where many rows or wide gated tiles would pass 96 KiB of shared memory (within an
    A100's 163 KiB as well as a Hopper's 227). Not yet timed on a GPU: `config=` and
    scripts/bench_kernels.py --sweep exist to pick these."""
    block_m = max(16, triton.next_power_of_2(M))
    if device.type != "cuda":  # the interpreter: small tiles so the masks and loops are exercised
        return dict(BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)
    target = 4 * _sm_count(device)
    block_n = 16
    for bn in (64, 32):
        if triton.cdiv(N, bn) >= target:
            block_n = bn
            break
    block_k = 64 if dtype == torch.float32 else 128
    stages = 4
    stage_bytes = (block_m + (2 if gated else 1) * block_n) * block_k * dtype.itemsize
    while stages > 2 and stages * stage_bytes > 96 * 1024:
        stages -= 1
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=stages)


def _autotune(x) -> bool:
    return AUTOTUNE and x.is_cuda  # the interpreter cannot time configs


@on_tensor_device
def decode_linear(x, weight, bias=None, *, residual=None, gated=False, config=None):
    """x @ weight.T + bias (+ residual) for a few rows (at most MAX_ROWS); with gated=True,
    weight (and bias) stack [gate; up] and the result is silu(x @ gate.T) * (x @ up.T).

    x (..., K) with a contiguous last dim; weight (N, K), or (2N, K) gated, contiguous; bias
    matching weight's rows or None; residual (..., N) like the output, or None. All share x's
    dtype. Returns (..., N) in x's dtype. `config` overrides the tiles (benchmark sweeps; on a
    GPU they are otherwise autotuned, see AUTOTUNE)."""
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K or K == 0:
        raise ValueError(f"decode_linear weight must be (N, {K}) with K > 0 to match x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if gated and weight.shape[0] % 2:
        raise ValueError(f"gated decode_linear needs [gate; up] stacked: an even number of rows, got {weight.shape[0]}")
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    M = x.numel() // K
    if M > MAX_ROWS:
        raise ValueError(f"decode_linear takes at most {MAX_ROWS} rows, got {M}: use F.linear for more")
    for name, t in {"weight": weight, "bias": bias, "residual": residual}.items():
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"decode_linear: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    if x.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError("decode_linear needs x's last dim and the weight contiguous")
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_contiguous()):
        raise ValueError(f"bias must be ({weight.shape[0]},) and contiguous, got {tuple(bias.shape)}")
    out_shape = (*x.shape[:-1], N)
    if residual is not None and (residual.shape != out_shape or residual.stride(-1) != 1):
        raise ValueError(f"residual must be {out_shape} with a contiguous last dim, got {tuple(residual.shape)}")

    x2 = x.reshape(M, K)  # a view whenever the leading dims allow it (they are size 1 at decode)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y.view(out_shape)
    r2 = residual.reshape(M, N) if residual is not None else None
    args = (x2, weight, bias if bias is not None else x2, r2 if r2 is not None else y, y,
            x2.stride(0), weight.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0), M, N, K)
    flags = dict(GATED=bool(gated), HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                 DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **pdl_args(x))
    if config is None and _autotune(x):
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _tuned_kernel[grid](*args, BLOCK_M=max(16, triton.next_power_of_2(M)), **flags)
        return y.view(out_shape)
    cfg = dict(config) if config is not None else _config(M, N, K, gated, x.dtype, x.device)
    block_n = cfg["BLOCK_N"]
    cfg.setdefault("BLOCK_M", max(16, triton.next_power_of_2(M)))
    if cfg["BLOCK_M"] < M:
        raise ValueError(f"config BLOCK_M={cfg['BLOCK_M']} is smaller than the {M} rows: one tile holds them all")
    _kernel[(triton.cdiv(N, block_n),)](*args, **flags, **cfg)
    return y.view(out_shape)


def decode_linear_reference(x, weight, bias=None, *, residual=None, gated=False):
    """The unfused modules in plain PyTorch: F.linear, then the fused kernels' single-rounding
    SiLU-mul when gated, then the residual add."""
    from .activations import silu_mul_reference

    y = torch.nn.functional.linear(x, weight, bias)
    if gated:
        y = silu_mul_reference(*y.chunk(2, dim=-1))
    return y if residual is None else residual + y
