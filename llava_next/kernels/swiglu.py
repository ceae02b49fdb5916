"""The SwiGLU MLP's activation: silu(gate) * up, fused into one pass."""

import torch
import triton
import triton.language as tl

# Elementwise over (rows, N) tiles of BLOCK_N columns; gate and up may be column slices of one
# fused gate_up projection (row strides differ from N), the last dim must be contiguous.
# silu(g) * u = g * sigmoid(g) * u in fp32, rounded once: eager torch rounds silu(g) to the
# model dtype before the multiply, so the two differ by up to one ulp.


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


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for same-shape, same-dtype tensors with a contiguous last dim."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul needs gate and up of one shape and dtype; got {tuple(gate.shape)} {gate.dtype}, {tuple(up.shape)} {up.dtype}")
    if gate.dim() == 0:
        raise ValueError("silu_mul needs tensors of at least one dim, got 0-d ones")
    if gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError("silu_mul needs the last dim of gate and up contiguous")
    N = gate.shape[-1]
    g2, u2 = gate.reshape(-1, N), up.reshape(-1, N)
    y = torch.empty(g2.shape, device=gate.device, dtype=gate.dtype)
    if g2.numel() == 0:
        return y.view(gate.shape)
    block_n = min(1024, triton.next_power_of_2(N))
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(N, block_n))](
        g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), N,
        BLOCK_N=block_n, num_warps=4,
    )
    return y.view(gate.shape)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch in fp32, one rounding (eager F.silu(gate) * up rounds twice)."""
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)
