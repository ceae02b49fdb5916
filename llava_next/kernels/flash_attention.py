"""Flash attention in Triton: causal (decoder prefill) and bidirectional (vision tower), forward
and a FlashAttention-2 backward behind an autograd.Function.

q (B, Hq, Tq, D) attends to k, v (B, Hkv, Tk, D). Query i sits at key index q_offset + i; key j
is visible to it unless one of the rules says otherwise:
    causal          j <= q_offset + i
    sliding window  (q_offset + i) - j < W          (transformers' `kv_idx > q_idx - W`)
    kv_mask         kv_mask[b, j] is True           (False marks a left-padding key)
A query row that sees no key at all gets zeros, not NaN.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from ..attention import needs_grad, visibility_mask
from .launch import on_tensor_device

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: no copy-engine loads
    TensorDescriptor = None

# Flash attention (Dao 2023), forward. One program owns BLOCK_M query rows of one (batch, head)
# and streams over the key blocks it can see, BLOCK_N keys at a time, keeping per row
#     m = running max of the scaled logits (log2 domain),
#     l = running sum of exp2(logit - m),
#     acc = running sum of exp2(logit - m) * v,
# and rescaling l and acc by exp2(m_old - m_new) whenever the max grows. out = acc / l.
# The softmax scale is folded with log2(e) so every exponential is an exp2 (one MUFU op).
#
# The key range [lo, hi) a query block can see is split in three so that only the boundary
# blocks pay for masking:
#     [lo, full_lo)       partly outside the sliding window of some row     -> masked
#     [full_lo, full_hi)  visible to every row of the block                  -> unmasked
#     [full_hi, hi)       the causal diagonal and the ragged end of Tk      -> masked
# A key-padding mask, when given, is applied to every block.
# GQA: query head h reads kv head h // GROUP. Programs are ordered with the head fastest, so the
# GROUP programs that share one K/V stream run side by side and hit it in L2. Causal query
# blocks run heaviest (last) first so the short ones fill the tail.
# The row's log-sum-exp (log2 domain; +inf for a row that sees nothing, so that a backward
# pass's exp2(logit - lse) is 0 there) is stored when STORE_LSE is set.


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, q_pos,
    k_base, v_base, mask_base, k_desc, v_desc, b, kv_h,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn,
    qk_scale, window, Tk,
    lo, hi,
    offs_n0, offs_d,
    HEAD_DIM: tl.constexpr,
    MASK_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KV_MASK: tl.constexpr,
    PAD_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        if USE_TMA:  # the copy engine fetches the tiles; keys past Tk arrive as zeros
            kt = tl.trans(tl.reshape(k_desc.load([b, kv_h, start_n, 0]), [BLOCK_N, HEAD_DIM]))  # (BLOCK_D, BLOCK_N)
            v = tl.reshape(v_desc.load([b, kv_h, start_n, 0]), [BLOCK_N, HEAD_DIM])  # (BLOCK_N, BLOCK_D)
        else:
            kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (BLOCK_D, BLOCK_N)
            v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, BLOCK_D)
            if MASK_BLOCK:
                in_k = offs_n < Tk
                kt = tl.load(kt_ptrs, mask=in_k[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
                v = tl.load(v_ptrs, mask=in_k[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            elif PAD_D:
                kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            else:
                kt = tl.load(kt_ptrs)
                v = tl.load(v_ptrs)

        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32, unscaled
        if MASK_BLOCK:
            visible = (offs_n < Tk)[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (q_pos[:, None] - offs_n[None, :] < window)
            qk = tl.where(visible, qk, float("-inf"))
        if HAS_KV_MASK:
            keep = tl.load(mask_base + offs_n * stride_maskn, mask=offs_n < Tk, other=0)
            qk = tl.where((keep != 0)[None, :], qk, float("-inf"))

        # only a masked tile can leave a row with nothing visible yet
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, MASK_BLOCK or HAS_KV_MASK,
                                            DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, MAY_BE_EMPTY: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one tile of keys into a streaming softmax (shared with decode attention).
    qk (rows, BLOCK_N) fp32 unscaled logits, -inf where hidden; v (BLOCK_N, BLOCK_D); m_i, l_i
    the running max (log2 domain) and sum per row, acc the unnormalized output."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if MAY_BE_EMPTY:  # a row with nothing visible yet keeps m = -inf; subtract 0 instead of -inf (NaN)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset", "window"])  # no recompiles per length
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, KvMask, QOffset, KDesc, VDesc,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_maskb, stride_maskn,
    stride_offb,
    H, GROUP, Tq, Tk,
    q_offset, window, qk_scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KV_MASK: tl.constexpr,
    OFFSET_FROM_PTR: tl.constexpr,
    STORE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: b * stride can pass 2**31
    h = pid_bh % H
    kv_h = h // GROUP
    if CAUSAL:
        start_m = tl.num_programs(1) - 1 - pid_m
    else:
        start_m = pid_m

    if OFFSET_FROM_PTR:
        q_offset = tl.load(QOffset + b * stride_offb).to(tl.int32)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = q_offset + offs_m  # key index each query row sits at

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    mask_base = KvMask + b * stride_maskb

    # Key blocks this query block can see (see the comment above the kernel).
    pos_lo = q_offset + start_m * BLOCK_M
    pos_hi = pos_lo + BLOCK_M - 1
    hi = Tk
    full_hi = Tk
    if CAUSAL:
        hi = tl.minimum(hi, pos_hi + 1)
        full_hi = tl.minimum(full_hi, pos_lo + 1)
    full_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N
    lo = 0
    full_lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(pos_lo - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(pos_hi - window + 1, 0), BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(lo, tl.minimum(full_lo, full_hi))
    diag_lo = tl.maximum(full_hi, full_lo)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    if HAS_WINDOW:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, q_pos, k_base, v_base, mask_base, KDesc, VDesc, b.to(tl.int32), kv_h,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn,
            qk_scale, window, Tk, lo, full_lo, offs_n0, offs_d, HEAD_DIM,
            True, CAUSAL, HAS_WINDOW, HAS_KV_MASK, PAD_D, BLOCK_N, DOT_PRECISION, USE_TMA,
        )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, q_pos, k_base, v_base, mask_base, KDesc, VDesc, b.to(tl.int32), kv_h,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn,
        qk_scale, window, Tk, full_lo, full_hi, offs_n0, offs_d, HEAD_DIM,
        False, CAUSAL, HAS_WINDOW, HAS_KV_MASK, PAD_D, BLOCK_N, DOT_PRECISION, USE_TMA,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, q_pos, k_base, v_base, mask_base, KDesc, VDesc, b.to(tl.int32), kv_h,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn,
        qk_scale, window, Tk, diag_lo, hi, offs_n0, offs_d, HEAD_DIM,
        True, CAUSAL, HAS_WINDOW, HAS_KV_MASK, PAD_D, BLOCK_N, DOT_PRECISION, USE_TMA,
    )

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM))
    if STORE_LSE:
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(Lse + b * stride_lb + h * stride_lh + offs_m * stride_lm, lse, mask=offs_m < Tq)


# K and V tiles fetched by the Hopper tensor-memory-access engine (a host-side TensorDescriptor per
# tensor; Triton pipelines its loads with mbarriers) instead of pointer loads. None (the default):
# where that was measured to pay, a Hopper GPU (sm_90) at head_dim 128 in fp16/bf16, with the
# 64-row tiles below (bench/NOTES.md, sixth session); True: wherever the descriptors can be made;
# False: never (bench.py --no-flash-tma, the A/B).
USE_TMA = None


@functools.lru_cache(maxsize=None)
def _hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def _tma_pays(D: int, dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cuda" and D == 128 and dtype != torch.float32
            and _hopper(device.index if device.index is not None else torch.cuda.current_device()))


def _tma_readable(k, v) -> bool:
    """Whether the copy engine can read k and v as they are: it needs triton >= 3.4, a power-of-two
    head_dim (the tile is the whole head), a contiguous last dim, 16-byte aligned addresses and
    strides, and every dimension > 0. Broadcast (stride 0) dimensions, as .expand() makes, go to
    the pointer loads: whether a tensor map takes a zero stride is not documented."""
    if TensorDescriptor is None:
        return False
    D = k.shape[-1]
    if D < 16 or D & (D - 1) or 0 in k.shape:
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(st > 0 and st * t.element_size() % 16 == 0 for st in t.stride()[:-1]) for t in (k, v))


def _tma_descriptors(k, v, block_n: int):
    """(k_desc, v_desc) covering (B, Hkv, Tk, D) with (1, 1, block_n, D) tiles, or None where the
    copy engine cannot read the tensors as they are (_tma_readable)."""
    if not _tma_readable(k, v):
        return None
    D = k.shape[-1]
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, D]) for t in (k, v))


def _fwd_config(block_d: int, tq: int, dtype: torch.dtype, device: torch.device, tma: bool = False) -> dict:
    """Tile sizes per head dim, from the Hopper (H100/H200) sweeps in bench/NOTES.md. `tma`: the
    K/V tiles come by the copy engine. fp32 (tests only) needs smaller tiles."""
    if device.type != "cuda":  # the interpreter: small tiles keep the masked paths exercised
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    elif block_d <= 64 or tma:
        # 64 query rows on one warpgroup, K/V tiles of 64 keys triple-buffered: small enough that
        # two CTAs share an SM and drift out of step, so one's softmax overlaps the other's
        # products. D 64 (the vision tower), pointer loads: 234 vs 211 TFLOP/s for 128-row tiles on
        # an H100, 237 vs 215 on an H200. D 128 with TMA: 449 vs 413 on an H100 (one sweep), where
        # with pointer loads this tile is no faster (405).
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    elif block_d <= 128:  # 128 rows on two warpgroups for wgmma; 3 x 32 KiB of K/V stages at D 128
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    else:  # D = 256: the 128-row version would need 256 KiB of shared memory
        cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if tq <= 64:  # short query blocks (chunked prefill, speculative decode): don't waste rows
        cfg.update(BLOCK_M=max(16, triton.next_power_of_2(tq)), num_warps=4)
    return cfg


def _check_scale(scale, D: int) -> float:
    """The softmax scale, 1/sqrt(D) by default. It must be positive: the kernels hide keys with
    -inf logits before scaling, and 0 or a negative scale would turn those into NaN."""
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return scale


def check_devices(reference: torch.Tensor, **tensors) -> None:
    """The side tensors a launcher takes (masks, positions, caches) on the device of its main
    input: Triton would otherwise fail with a bare pointer error, or read host memory."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device}, the inputs on {reference.device}")


def _offset_arg(q_offset, default: int, batch: int, name: str = "q_offset"):
    """(int value, tensor or None, batch stride) for an offset given as None / int / tensor."""
    if q_offset is None:
        return default, None, 0
    if isinstance(q_offset, torch.Tensor):
        if q_offset.numel() not in (1, batch) or q_offset.dim() > 1:
            raise ValueError(f"{name} tensor must be 0-d, (1,) or ({batch},), got shape {tuple(q_offset.shape)}")
        if q_offset.dtype.is_floating_point or q_offset.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {q_offset.dtype}")
        stride = 0 if q_offset.numel() == 1 else q_offset.stride(0)
        return 0, q_offset, stride
    return int(q_offset), None, 0


def _check_attention_inputs(q, k, v, kv_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-d (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if not (k.dtype == v.dtype == q.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attention kernels take fp16, bf16 or fp32, got {q.dtype}")
    check_devices(q, k=k, v=v, kv_mask=kv_mask)
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported")
    if D == 0:
        raise ValueError("head_dim is 0")
    if kv_mask is not None:
        if kv_mask.shape != (B, Tk) or kv_mask.dtype != torch.bool:
            raise ValueError(f"kv_mask must be a bool tensor of shape ({B}, {Tk}); got {kv_mask.dtype} {tuple(kv_mask.shape)}")
    return B, Hq, Tq, D, Hkv, Tk


def _flash_attention_forward(q, k, v, causal, q_offset=None, kv_mask=None, sliding_window=None,
                             scale=None, store_lse=False, config=None, use_tma=None):
    """Launches the forward kernel; returns (out, lse). lse is (B, Hq, Tq) fp32 in the log2 domain
    (+inf for rows that see no key) or None. `config` overrides the tile sizes (benchmark sweeps);
    `use_tma` (default: the module's USE_TMA; None there: where they pay) asks for the copy-engine
    loads, which run wherever the tensors allow them (_tma_readable)."""
    B, Hq, Tq, D, Hkv, Tk = _check_attention_inputs(q, k, v, kv_mask)
    offset, offset_t, stride_offb = _offset_arg(q_offset, Tk - Tq, B)
    check_devices(q, q_offset=offset_t)
    if sliding_window is not None and int(sliding_window) <= 0:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
    scale = _check_scale(scale, D)

    # Laid out (B, Tq, Hq, D) in memory, so the caller's transpose(1, 2).reshape(B, Tq, Hq * D)
    # into o_proj is free.
    out = torch.empty((B, Tq, Hq, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32) if store_lse else None
    if B * Hq * Tq == 0:
        return out, lse
    block_d = max(16, triton.next_power_of_2(D))
    tma = USE_TMA if use_tma is None else use_tma
    if tma is None:
        tma = _tma_pays(D, q.dtype, q.device)
    tma = tma and _tma_readable(k, v)
    cfg = dict(config) if config is not None else _fwd_config(block_d, Tq, q.dtype, q.device, tma)
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    mask_t = kv_mask.view(torch.uint8) if kv_mask is not None else None
    lse_arg = lse if lse is not None else out
    descs = _tma_descriptors(k, v, block_n) if tma else None
    grid = (B * Hq, triton.cdiv(Tq, block_m))
    _attn_fwd_kernel[grid](
        q, k, v, out, lse_arg,
        mask_t if mask_t is not None else q, offset_t if offset_t is not None else q,
        *(descs if descs is not None else (k, v)),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *(lse.stride() if lse is not None else (0, 0, 0)),
        *(mask_t.stride() if mask_t is not None else (0, 0)),
        stride_offb,
        Hq, Hq // Hkv, Tq, Tk,
        offset, int(sliding_window or 0), scale * 1.4426950408889634,
        HEAD_DIM=D,
        CAUSAL=bool(causal),
        HAS_WINDOW=sliding_window is not None,
        HAS_KV_MASK=kv_mask is not None,
        OFFSET_FROM_PTR=offset_t is not None,
        STORE_LSE=store_lse,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        USE_TMA=descs is not None,
        **cfg,
    )
    return out, lse


# Backward (FlashAttention-2). With P = exp2(logits * log2e * scale - lse) recomputed from the
# stored log-sum-exp and delta_i = sum_d dO_id O_id (a preprocessing pass):
#     dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q.
# Two kernels avoid atomics: one program per key block accumulates dK, dV over every query
# head of its GQA group and every query block that can see it; one program per query block
# accumulates dQ over its visible key blocks. Every tile is masked with the full visibility rule
# (the backward is for training, where the speed of the boundary tiles matters less).


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_deltab, stride_deltah, stride_deltam,
    H, Tq,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: b * stride can pass 2**31
    h = pid_bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + b * stride_deltab + h * stride_deltah + offs_m * stride_deltam, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _attn_visible(q_pos, offs_n, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) causal / sliding-window visibility of keys offs_n to queries at q_pos."""
    visible = (q_pos[:, None] >= -2147483647) & (offs_n[None, :] >= 0)
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        visible = visible & (q_pos[:, None] - offs_n[None, :] < window)
    return visible


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset", "window"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, KvMask, QOffset,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh, stride_lm,
    stride_maskb, stride_maskn,
    stride_offb,
    HKV, GROUP, Tq, Tk,
    q_offset, window, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KV_MASK: tl.constexpr,
    OFFSET_FROM_PTR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)  # 64-bit offsets: b * stride can pass 2**31
    kv_h = pid_bh % HKV
    if OFFSET_FROM_PTR:
        q_offset = tl.load(QOffset + b * stride_offb).to(tl.int32)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Tk
    kv_tile = n_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_tile, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_tile, other=0.0)
    keep = n_ok
    if HAS_KV_MASK:
        keep = keep & (tl.load(KvMask + b * stride_maskb + offs_n * stride_maskn, mask=n_ok, other=0) != 0)

    # query rows that can see some key of this block: [m_lo, m_hi)
    m_lo = 0
    m_hi = Tq
    if CAUSAL:
        m_lo = (tl.maximum(start_n - q_offset, 0) // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        m_hi = tl.minimum(m_hi, start_n + BLOCK_N - 1 + window - q_offset)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        h = kv_h * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        l_base = Lse + b * stride_lb + h * stride_lh
        d_base = Delta + b * stride_lb + h * stride_lh
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < Tq
            q_tile = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_tile, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_tile, other=0.0)
            lse = tl.load(l_base + offs_m * stride_lm, mask=m_ok, other=float("inf"))
            delta = tl.load(d_base + offs_m * stride_lm, mask=m_ok, other=0.0)
            visible = _attn_visible(q_offset + offs_m, offs_n, window, CAUSAL, HAS_WINDOW)  # (BLOCK_M, BLOCK_N)
            visible = visible & keep[None, :] & m_ok[:, None]

            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            p_t = tl.where(tl.trans(visible), tl.exp2(qk_t * qk_scale - lse[None, :]), 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    tl.store(DK + b * stride_dkb + kv_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_tile)
    tl.store(DV + b * stride_dvb + kv_h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_tile)


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset", "window"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, KvMask, QOffset,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh, stride_lm,
    stride_maskb, stride_maskn,
    stride_offb,
    H, GROUP, Tq, Tk,
    q_offset, window, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KV_MASK: tl.constexpr,
    OFFSET_FROM_PTR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: b * stride can pass 2**31
    h = pid_bh % H
    kv_h = h // GROUP
    if OFFSET_FROM_PTR:
        q_offset = tl.load(QOffset + b * stride_offb).to(tl.int32)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    q_tile = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_tile, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=q_tile, other=0.0)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m * stride_lm, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + b * stride_lb + h * stride_lh + offs_m * stride_lm, mask=m_ok, other=0.0)
    q_pos = q_offset + offs_m

    # key blocks visible to some row of this block: [lo, hi)
    lo = 0
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(hi, q_offset + start_m + BLOCK_M)
    if HAS_WINDOW:
        lo = (tl.maximum(q_offset + start_m - window + 1, 0) // BLOCK_N) * BLOCK_N

    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Tk
        kv_tile = n_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_tile, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_tile, other=0.0)
        visible = _attn_visible(q_pos, offs_n, window, CAUSAL, HAS_WINDOW) & n_ok[None, :]
        if HAS_KV_MASK:
            keep = tl.load(KvMask + b * stride_maskb + offs_n * stride_maskn, mask=n_ok, other=0)
            visible = visible & (keep != 0)[None, :]

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.where(visible, tl.exp2(qk * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_tile)


def _bwd_config(dtype: torch.dtype, device: torch.device) -> dict:
    """(dK/dV tiles, dQ tiles). The dK/dV program keeps a tall key tile and streams thin query
    tiles, the dQ program the other way round (as in the Triton tutorial's backward)."""
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1), dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        small = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
        return small, dict(small)
    return (dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3))


def _flash_attention_backward(dout, q, k, v, out, lse, causal, q_offset, kv_mask, sliding_window, scale):
    """dq, dk, dv for the forward above (lse from _flash_attention_forward(store_lse=True))."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    offset, offset_t, stride_offb = _offset_arg(q_offset, Tk - Tq, B)
    scale = _check_scale(scale, D)
    block_d = max(16, triton.next_power_of_2(D))
    mask_t = kv_mask.view(torch.uint8) if kv_mask is not None else None
    mask_arg = mask_t if mask_t is not None else q
    mask_strides = mask_t.stride() if mask_t is not None else (0, 0)
    offset_arg = offset_t if offset_t is not None else q
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    flags = dict(HEAD_DIM=D, CAUSAL=bool(causal), HAS_WINDOW=sliding_window is not None,
                 HAS_KV_MASK=kv_mask is not None, OFFSET_FROM_PTR=offset_t is not None,
                 BLOCK_D=block_d, DOT_PRECISION=precision)

    delta = torch.empty_like(lse)
    _attn_bwd_preprocess_kernel[(B * Hq, triton.cdiv(Tq, 64))](
        out, dout, delta, *out.stride(), *dout.stride(), *delta.stride(), Hq, Tq,
        HEAD_DIM=D, BLOCK_M=64, BLOCK_D=block_d,
    )
    dq = torch.empty((B, Tq, Hq, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    dk = torch.empty((B, Tk, Hkv, D), device=k.device, dtype=k.dtype).transpose(1, 2)
    dv = torch.empty((B, Tk, Hkv, D), device=v.device, dtype=v.dtype).transpose(1, 2)
    window = int(sliding_window or 0)
    qk_scale = scale * 1.4426950408889634
    cfg_kv, cfg_q = _bwd_config(q.dtype, q.device)
    cfg_kv, cfg_q = dict(cfg_kv), dict(cfg_q)
    bm, bn = cfg_kv.pop("BLOCK_M"), cfg_kv.pop("BLOCK_N")
    _attn_bwd_dkdv_kernel[(triton.cdiv(Tk, bn), B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, mask_arg, offset_arg,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), *lse.stride(),
        *mask_strides, stride_offb,
        Hkv, Hq // Hkv, Tq, Tk, offset, window, qk_scale, scale,
        BLOCK_M=bm, BLOCK_N=bn, **flags, **cfg_kv,
    )
    bm, bn = cfg_q.pop("BLOCK_M"), cfg_q.pop("BLOCK_N")
    _attn_bwd_dq_kernel[(B * Hq, triton.cdiv(Tq, bm))](
        q, k, v, dout, lse, delta, dq, mask_arg, offset_arg,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *lse.stride(),
        *mask_strides, stride_offb,
        Hq, Hq // Hkv, Tq, Tk, offset, window, qk_scale, scale,
        BLOCK_M=bm, BLOCK_N=bn, **flags, **cfg_q,
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: the forward stores the per-row log-sum-exp, the backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, causal, q_offset, kv_mask, sliding_window, scale):
        out, lse = _flash_attention_forward(q, k, v, causal, q_offset, kv_mask, sliding_window, scale, store_lse=True)
        offset_t = q_offset if isinstance(q_offset, torch.Tensor) else None
        ctx.save_for_backward(q, k, v, out, lse, kv_mask, offset_t)
        ctx.args = (causal, None if offset_t is not None else q_offset, sliding_window, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, kv_mask, offset_t = ctx.saved_tensors
        causal, q_offset, sliding_window, scale = ctx.args
        if offset_t is not None:
            q_offset = offset_t
        dq, dk, dv = _flash_attention_backward(dout, q, k, v, out, lse, causal, q_offset, kv_mask, sliding_window, scale)
        return dq, dk, dv, None, None, None, None, None


@on_tensor_device
def flash_attention(q, k, v, *, causal: bool, q_offset=None, kv_mask=None, sliding_window=None, scale=None):
    """softmax(q k^T * scale + mask) v with GQA, causal / sliding-window / key-padding masks.

    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D), any strides; returns (B, Hq, Tq, D) in q's dtype.
    q_offset: key index of query 0 (None: Tk - Tq; int; or 0-d / (1,) / (B,) int tensor).
    kv_mask: (B, Tk) bool, False = padding key. Rows that see no key come out as zeros.
    Differentiable in q, k, v (a FlashAttention-2 backward) when grad mode is on."""
    if needs_grad(q, k, v):
        return FlashAttentionFunction.apply(q, k, v, causal, q_offset, kv_mask, sliding_window, scale)
    out, _ = _flash_attention_forward(q, k, v, causal, q_offset, kv_mask, sliding_window, scale)
    return out


def flash_attention_reference(q, k, v, *, causal: bool, q_offset=None, kv_mask=None, sliding_window=None, scale=None):
    """Plain PyTorch: fp32 logits, boolean mask from the rules, softmax, zeros for empty rows."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.float().repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, D)
    v = v.float().repeat_interleave(Hq // Hkv, dim=1)
    logits = (q.float() @ k.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    visible = visibility_mask(Tq, Tk, causal=causal, q_offset=q_offset, kv_mask=kv_mask,
                              sliding_window=sliding_window, device=q.device)
    logits = logits.masked_fill(~visible, float("-inf"))
    # a row that sees no key gets zeros (softmax gives NaN there); a NaN in q, k or v stays NaN
    probs = torch.softmax(logits, dim=-1).masked_fill(~visible.any(-1, keepdim=True), 0.0)
    return (probs @ v).to(q.dtype)
