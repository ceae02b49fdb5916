"""RMSNorm with transformers' LlamaRMSNorm numerics:
    h = x.float(); h = h * rsqrt(mean(h^2, -1) + eps); y = weight * h.to(x.dtype)
"""

import torch
import triton
import triton.language as tl

from .launch import on_tensor_device, rows_per_program
from .pdl import pdl_args, wait_for_previous_kernel

# One program per BLOCK_M rows (launch.rows_per_program: 1 on a GPU, 16 in the interpreter), each
# whole row (N <= 64K) one tile, so x is read once and y written once. The statistics are fp32;
# the normalized row is rounded to x's dtype *before* the weight multiply, as in transformers,
# and the product is formed in fp32 and rounded to the output dtype (torch's type promotion of
# weight and x), which reproduces torch's low-precision mul.


@triton.jit
def _rms_norm_kernel(
    X, W, Y,
    stride_xm, stride_ym,
    M, N, eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # row * stride can pass 2**31
    offs = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (offs < N)[None, :]  # (BLOCK_M, BLOCK_N)
    x = tl.load(X + rows[:, None] * stride_xm + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / N + eps)  # (BLOCK_M,)
    h = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=offs < N, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_ym + offs[None, :], (w[None, :] * h).to(Y.dtype.element_ty), mask=mask)


@on_tensor_device
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., N) with a contiguous last dim, weight (N,). Returns weight * normalize(x), in the
    dtype torch would give `weight * x` (x's dtype when weight matches it)."""
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm normalizes the last dim of x, which needs at least one element; x is {tuple(x.shape)}")
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"rms_norm weight must have shape ({N},) to match x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("rms_norm needs the last dim of x and weight contiguous")
    if N > 65536:
        raise ValueError(f"rms_norm handles rows of up to 65536 elements, got {N}")
    x2 = x.reshape(-1, N)  # a view whenever the leading dims allow it
    y = torch.empty(x2.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    if x2.shape[0] == 0:
        return y.view(x.shape)
    block_n = triton.next_power_of_2(N)
    block_m = rows_per_program(x.device)
    _rms_norm_kernel[(triton.cdiv(x2.shape[0], block_m),)](
        x2, weight, y, x2.stride(0), y.stride(0), x2.shape[0], N, float(eps),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=min(16, max(1, block_n // 256)), **pdl_args(x),
    )
    return y.view(x.shape)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, verbatim in effect."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
