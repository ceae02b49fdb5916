"""Flash attention forward in Triton: causal (decoder prefill) and bidirectional (vision tower).

q (B, Hq, Tq, D) attends to k, v (B, Hkv, Tk, D). Query i sits at key index q_offset + i; key j
is visible to it unless one of the rules says otherwise:
    causal          j <= q_offset + i
    sliding window  (q_offset + i) - j < W          (transformers' `kv_idx > q_idx - W`)
    kv_mask         kv_mask[b, j] is True           (False marks a left-padding key)
A query row that sees no key at all gets zeros, not NaN.
"""

import math

import torch
import triton
import triton.language as tl

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
    k_base, v_base, mask_base,
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
):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
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

        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # a row with nothing visible yet keeps m = -inf; subtract 0 instead of -inf (NaN)
        if MASK_BLOCK:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        elif HAS_KV_MASK:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset", "window"])  # no recompiles per length
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, KvMask, QOffset,
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
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // H
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
            acc, l_i, m_i, q, q_pos, k_base, v_base, mask_base,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn,
            qk_scale, window, Tk, lo, full_lo, offs_n0, offs_d, HEAD_DIM,
            True, CAUSAL, HAS_WINDOW, HAS_KV_MASK, PAD_D, BLOCK_N, DOT_PRECISION,
        )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, q_pos, k_base, v_base, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn,
        qk_scale, window, Tk, full_lo, full_hi, offs_n0, offs_d, HEAD_DIM,
        False, CAUSAL, HAS_WINDOW, HAS_KV_MASK, PAD_D, BLOCK_N, DOT_PRECISION,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, q_pos, k_base, v_base, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn,
        qk_scale, window, Tk, diag_lo, hi, offs_n0, offs_d, HEAD_DIM,
        True, CAUSAL, HAS_WINDOW, HAS_KV_MASK, PAD_D, BLOCK_N, DOT_PRECISION,
    )

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM))
    if STORE_LSE:
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(Lse + b * stride_lb + h * stride_lh + offs_m * stride_lm, lse, mask=offs_m < Tq)


def _on_interpreter(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _fwd_config(block_d: int, tq: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes per head dim. Hopper (H100/H200) numbers: 128 query rows per program on two
    warpgroups for wgmma, K/V tiles of 64 keys triple-buffered (3 x 32 KiB at D=128 fits in
    shared memory with the Q tile). fp32 (tests only) needs smaller tiles."""
    if device.type != "cuda":  # the interpreter: small tiles keep the masked paths exercised
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    elif block_d <= 64:  # 8 warps: ~130 registers; 4 warps sit at the 255 cliff
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    if tq <= 64:  # short query blocks (chunked prefill, speculative decode): don't waste rows
        cfg.update(BLOCK_M=max(16, triton.next_power_of_2(tq)), num_warps=4)
    return cfg


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
    if Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if not (k.dtype == v.dtype == q.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attention kernels take fp16, bf16 or fp32, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported")
    if kv_mask is not None:
        if kv_mask.shape != (B, Tk) or kv_mask.dtype != torch.bool:
            raise ValueError(f"kv_mask must be a bool tensor of shape ({B}, {Tk}); got {kv_mask.dtype} {tuple(kv_mask.shape)}")
    return B, Hq, Tq, D, Hkv, Tk


def _flash_attention_forward(q, k, v, causal, q_offset=None, kv_mask=None, sliding_window=None,
                             scale=None, store_lse=False, config=None):
    """Launches the forward kernel; returns (out, lse). lse is (B, Hq, Tq) fp32 in the log2 domain
    (+inf for rows that see no key) or None. `config` overrides the tile sizes (benchmark sweeps)."""
    B, Hq, Tq, D, Hkv, Tk = _check_attention_inputs(q, k, v, kv_mask)
    offset, offset_t, stride_offb = _offset_arg(q_offset, Tk - Tq, B)
    if sliding_window is not None and int(sliding_window) <= 0:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    # Laid out (B, Tq, Hq, D) in memory, so the caller's transpose(1, 2).reshape(B, Tq, Hq * D)
    # into o_proj is free.
    out = torch.empty((B, Tq, Hq, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32) if store_lse else None
    if B * Hq * Tq == 0:
        return out, lse
    block_d = max(16, triton.next_power_of_2(D))
    cfg = dict(config) if config is not None else _fwd_config(block_d, Tq, q.dtype, q.device)
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    mask_t = kv_mask.view(torch.uint8) if kv_mask is not None else None
    lse_arg = lse if lse is not None else out
    grid = (B * Hq, triton.cdiv(Tq, block_m))
    _attn_fwd_kernel[grid](
        q, k, v, out, lse_arg,
        mask_t if mask_t is not None else q, offset_t if offset_t is not None else q,
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
        **cfg,
    )
    return out, lse


def flash_attention(q, k, v, *, causal: bool, q_offset=None, kv_mask=None, sliding_window=None, scale=None):
    """softmax(q k^T * scale + mask) v with GQA, causal / sliding-window / key-padding masks.

    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D), any strides; returns (B, Hq, Tq, D) in q's dtype.
    q_offset: key index of query 0 (None: Tk - Tq; int; or 0-d / (1,) / (B,) int tensor).
    kv_mask: (B, Tk) bool, False = padding key. Rows that see no key come out as zeros."""
    out, _ = _flash_attention_forward(q, k, v, causal, q_offset, kv_mask, sliding_window, scale)
    return out


def visibility_mask(Tq, Tk, *, causal, q_offset=None, kv_mask=None, sliding_window=None, device=None):
    """(B or 1, 1, Tq, Tk) bool: True where query i may attend to key j (the rules in the module
    docstring). Shared by the plain-PyTorch references."""
    if q_offset is None:
        q_offset = Tk - Tq
    off = torch.as_tensor(q_offset, device=device).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
    q_pos = off + torch.arange(Tq, device=device).view(1, 1, Tq, 1)
    k_idx = torch.arange(Tk, device=device).view(1, 1, 1, Tk)
    visible = torch.ones_like(q_pos - k_idx, dtype=torch.bool)
    if causal:
        visible = visible & (k_idx <= q_pos)
    if sliding_window is not None:
        visible = visible & (q_pos - k_idx < sliding_window)
    if kv_mask is not None:
        visible = visible & kv_mask[:, None, None, :].to(device)
    return visible


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
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all -inf rows -> NaN -> 0
    return (probs @ v).to(q.dtype)
