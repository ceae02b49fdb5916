"""The two towers' MLP activations, each fused into one elementwise pass:
    silu_mul(gate, up) = silu(gate) * up          the decoder's SwiGLU
    quick_gelu(x)      = x * sigmoid(1.702 x)     the CLIP vision tower's
"""

import torch
import triton
import triton.language as tl

from .launch import on_tensor_device

# Elementwise over (rows, N) tiles of BLOCK_N columns: each input may be a column slice of a wider
# output (gate and up of one fused gate_up projection: row strides differ from N); the last dim
# must be contiguous. Computed in fp32 and rounded once. Eager torch rounds each intermediate to
# the model dtype (silu(g) before the multiply; 1.702 x, then its sigmoid), so the two differ by
# up to an ulp or two.


@triton.jit
def silu_mul_f32(g, u):
    """silu(g) * u on fp32 values, as every fused SwiGLU here forms it (shared with decode_linear)."""
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _silu_mul_kernel(
    G, U, Y,
    stride_gm, stride_um, stride_ym,
    N,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31 on long batches
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    g = tl.load(G + row * stride_gm + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_um + offs, mask=mask, other=0.0).to(tl.float32)
    y = silu_mul_f32(g, u)
    tl.store(Y + row * stride_ym + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _quick_gelu_kernel(
    X, Y,
    stride_xm, stride_ym,
    N,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(X + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    y = x / (1.0 + tl.exp(-1.702 * x))  # x * sigmoid(1.702 x); exp overflows to inf -> -0.0 for x << 0
    tl.store(Y + row * stride_ym + offs, y.to(Y.dtype.element_ty), mask=mask)


def _as_rows(name: str, *xs: torch.Tensor):
    """The inputs as (rows, N) views (a copy only where no view exists), after the checks both
    launchers share; returns (views, N, grid, BLOCK_N)."""
    x = xs[0]
    if any(t.shape != x.shape or t.dtype != x.dtype for t in xs):
        raise ValueError(f"{name} needs inputs of one shape and dtype; got "
                         + ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in xs))
    if x.dim() == 0:
        raise ValueError(f"{name} needs tensors of at least one dim, got 0-d ones")
    if any(t.stride(-1) != 1 for t in xs):
        raise ValueError(f"{name} needs the last dim of its inputs contiguous")
    N = x.shape[-1]
    block_n = min(1024, triton.next_power_of_2(max(N, 1)))
    rows = [t.reshape(-1, N) for t in xs]
    return rows, N, (rows[0].shape[0], triton.cdiv(N, block_n)), block_n


@on_tensor_device
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for same-shape, same-dtype tensors with a contiguous last dim."""
    (g2, u2), N, grid, block_n = _as_rows("silu_mul", gate, up)
    y = torch.empty(g2.shape, device=gate.device, dtype=gate.dtype)
    if y.numel():
        _silu_mul_kernel[grid](g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), N, BLOCK_N=block_n, num_warps=4)
    return y.view(gate.shape)


@on_tensor_device
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x) (CLIP's activation) for a tensor with a contiguous last dim."""
    (x2,), N, grid, block_n = _as_rows("quick_gelu", x)
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    if y.numel():
        _quick_gelu_kernel[grid](x2, y, x2.stride(0), y.stride(0), N, BLOCK_N=block_n, num_warps=4)
    return y.view(x.shape)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch in fp32, one rounding (eager F.silu(gate) * up rounds twice)."""
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def quick_gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch in fp32, one rounding (transformers' x * torch.sigmoid(1.702 * x) rounds three times)."""
    h = x.float()
    return (h * torch.sigmoid(1.702 * h)).to(x.dtype)
