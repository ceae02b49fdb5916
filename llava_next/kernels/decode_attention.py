"""Decode attention: one new query token per sequence against a preallocated (static) KV cache.

q (B, Hq, 1, D) sits at key index q_offset[b]; the cache k_cache, v_cache (B, Hkv, Tmax, D) holds
valid keys at 0..q_offset[b]. Same visibility rules as flash_attention: causal, optional sliding
window, optional key-padding mask; a row with no visible key gets zeros.

The launch grid depends only on shapes (B, Hkv, Tmax), never on q_offset's value, so a decode
step can be captured in a CUDA graph and replayed as the cache fills up.
"""


import torch
import triton
import triton.language as tl

from .flash_attention import _check_scale, _offset_arg, check_devices, online_softmax_step
from .launch import on_tensor_device
from .pdl import pdl_args, wait_for_previous_kernel
from .rope_kv_write import _check_rope_inputs, rope_cos_sin

# Flash-decoding (Dao et al. 2023), stage 1. With one query per sequence, a program per
# (batch, head) would leave most of the GPU idle at batch 1, so the cache is also cut along the
# sequence into NUM_SPLITS slices of SPLIT_LEN keys: grid = (B, Hkv, NUM_SPLITS).
# GQA: a program takes all GROUP query heads of its kv head as the rows of one tile (padded to
# BLOCK_H >= 16 rows for tl.dot), so each K/V byte is read from memory exactly once.
# Each program runs the online softmax over its slice (masked to [window start, q_offset] and
# by kv_mask) and writes the normalized partial output o_s = acc / l and its log-sum-exp
# lse_s = m + log2(l) (log2 domain; -inf for a slice that saw no key, e.g. past q_offset).
# With NEW_KV (rope_decode_attention) q and the token's k arrive unrotated: each program rotates
# them, the program whose slice holds the token's slot writes k and v into the cache, and the
# token's own key is folded in from registers rather than read back (see the kernel body).


@triton.jit(do_not_specialize=["q_offset", "window"])
def _decode_split_kernel(
    Q, K, V, KvMask, QOffset, PartO, PartLse, KNew, VNew, PosIds, InvFreq,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_maskb, stride_maskn,
    stride_offb,
    stride_pob, stride_poh, stride_pos, stride_pod,
    stride_plb, stride_plh, stride_pls,
    stride_knb, stride_knh, stride_knd,
    stride_vnb, stride_vnh, stride_vnd,
    stride_posb,
    GROUP, Tmax, q_offset, window, qk_scale, split_len,
    HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KV_MASK: tl.constexpr,
    OFFSET_FROM_PTR: tl.constexpr,
    NEW_KV: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * stride can pass 2**31
    kv_h = tl.program_id(1)
    split = tl.program_id(2)
    if OFFSET_FROM_PTR:
        q_offset = tl.load(QOffset + b * stride_offb).to(tl.int32)

    # keys this row may see: [start, end), intersected with this program's slice. With NEW_KV
    # the current token's key is not in the cache yet: the loop stops before it (see below).
    end = q_offset + 1
    if NEW_KV:
        end = q_offset
    end = tl.minimum(end, Tmax)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(q_offset - window + 1, 0)
    split_lo = split * split_len
    lo = tl.maximum(split_lo, start)
    hi = tl.minimum(split_lo + split_len, end)
    lo_block = split_lo + ((lo - split_lo) // BLOCK_N) * BLOCK_N  # split_lo <= lo; tiles stay aligned

    offs_h = tl.arange(0, BLOCK_H)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    h = kv_h * GROUP + offs_h
    h_ok = offs_h < GROUP
    d_ok = offs_d < HEAD_DIM
    q_tile = h_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=q_tile, other=0.0)  # (BLOCK_H, BLOCK_D)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    if NEW_KV:
        # Rotary in place of rope_kv_write, as rotate-half on whole rows: element d pairs with
        # d +- D/2 (its partner), x_rot[d] = x[d] cos - x[d + D/2] sin in the first half and
        # x[d] cos + x[d - D/2] sin in the second; fp32, rounded once, as rope_kv_write does.
        half = HEAD_DIM // 2
        partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
        sign = tl.where(offs_d < half, -1.0, 1.0)
        pos = tl.load(PosIds + b * stride_posb).to(tl.float32)
        cos, sin = rope_cos_sin(pos, tl.load(InvFreq + offs_d % half, mask=d_ok, other=0.0))  # (BLOCK_D,)
        q_pair = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + partner[None, :] * stride_qd,
                         mask=q_tile, other=0.0)
        q = (q.to(tl.float32) * cos[None, :] + sign[None, :] * q_pair.to(tl.float32) * sin[None, :]).to(q.dtype)
        k_new = tl.load(KNew + b * stride_knb + kv_h * stride_knh + offs_d * stride_knd, mask=d_ok, other=0.0)
        k_pair = tl.load(KNew + b * stride_knb + kv_h * stride_knh + partner * stride_knd, mask=d_ok, other=0.0)
        k_new = (k_new.to(tl.float32) * cos + sign * k_pair.to(tl.float32) * sin).to(k_new.dtype)  # (BLOCK_D,)
        v_new = tl.load(VNew + b * stride_vnb + kv_h * stride_vnh + offs_d * stride_vnd, mask=d_ok, other=0.0)
        # The program whose slice holds the current slot writes the token into the cache (for
        # the next steps); no program reads that slot in this launch.
        slot = offs_d * 0 + q_offset  # as a vector: masks built from scalars alone trip the interpreter
        owns = (slot >= split_lo) & (slot < split_lo + split_len) & (slot < Tmax)  # (BLOCK_D,), all equal
        tl.store(k_base + q_offset * stride_kn + offs_d * stride_kd, k_new, mask=d_ok & owns)
        tl.store(v_base + q_offset * stride_vn + offs_d * stride_vd, v_new, mask=d_ok & owns)

    m_i = tl.zeros([BLOCK_H], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo_block, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        valid = (offs_n >= lo) & (offs_n < hi)  # keys outside may be garbage (even NaN): never load
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=valid[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=valid[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        if HAS_KV_MASK:
            keep = tl.load(KvMask + b * stride_maskb + offs_n * stride_maskn, mask=valid, other=0)
            valid = valid & (keep != 0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)  # (BLOCK_H, BLOCK_N)
        qk = tl.where(valid[None, :], qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, True, DOT_PRECISION)

    if NEW_KV:  # the current token's key, from registers, in the owning program only
        owns_h = tl.max(owns.to(tl.int32), 0) + offs_h * 0 != 0  # (BLOCK_H,)
        if HAS_KV_MASK:
            keep = tl.load(KvMask + b * stride_maskb + tl.maximum(tl.minimum(q_offset, Tmax - 1), 0) * stride_maskn)
            owns_h = owns_h & (offs_h * 0 + keep != 0)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale  # (BLOCK_H,)
        s_new = tl.where(owns_h, s_new, float("-inf"))
        m_new = tl.maximum(m_i, s_new)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s_new - m_use)
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + p
        p = p.to(v_new.dtype).to(tl.float32)  # rounded like the p fed to tl.dot in the loop
        acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    po_ptrs = PartO + b * stride_pob + h[:, None] * stride_poh + split * stride_pos + offs_d[None, :] * stride_pod
    tl.store(po_ptrs, acc, mask=h_ok[:, None] & d_ok[None, :])
    tl.store(PartLse + b * stride_plb + h * stride_plh + split * stride_pls, lse, mask=h_ok)


# Stage 2: one program per (batch, query head) merges the NUM_SPLITS partial results,
#     out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s.
# Slices with lse = -inf weigh 0 (their o_s is not even read); if every slice is empty the
# row comes out as zeros.


@triton.jit
def _decode_reduce_kernel(
    PartO, PartLse, Out,
    stride_pob, stride_poh, stride_pos, stride_pod,
    stride_plb, stride_plh, stride_pls,
    stride_ob, stride_oh, stride_od,
    H, NUM_SPLITS, D,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * stride can pass 2**31
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(PartLse + b * stride_plb + h * stride_plh + offs_s * stride_pls,
                  mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # (BLOCK_S,)
    live = lse > float("-inf")
    o = tl.load(PartO + b * stride_pob + h * stride_poh + offs_s[:, None] * stride_pos + offs_d[None, :] * stride_pod,
                mask=live[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_S, BLOCK_D)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty), mask=offs_d < D)


_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


PROGRAMS_PER_SM = 4  # the split target below; an H200 sweep favoured 1 (bench/NOTES.md), not yet adopted


def _decode_config(B: int, Hkv: int, Tmax: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Split the cache so that B * Hkv * NUM_SPLITS programs cover the SMs a few times over,
    with at least two K/V tiles and at most 1024 keys per split. Depends on shapes only, never
    on q_offset's value (CUDA-graph safe)."""
    if device.type != "cuda":  # the interpreter: small tiles, several splits
        return dict(BLOCK_N=16, SPLIT_LEN=32, NUM_SPLITS=triton.cdiv(Tmax, 32), num_warps=4, num_stages=1)
    block_n = 32 if dtype == torch.float32 else 64
    target = max(1, int(PROGRAMS_PER_SM * _sm_count(device)))
    splits = max(1, min(triton.cdiv(target, B * Hkv), triton.cdiv(Tmax, 2 * block_n)))
    # a static cache is often much longer than what is filled: keep slices <= 1024 keys so the
    # filled part is still spread over several programs per head
    splits = max(splits, triton.cdiv(Tmax, 1024))
    split_len = triton.cdiv(triton.cdiv(Tmax, splits), block_n) * block_n
    return dict(BLOCK_N=block_n, SPLIT_LEN=split_len, NUM_SPLITS=triton.cdiv(Tmax, split_len), num_warps=4, num_stages=3)


@on_tensor_device
def decode_attention(q, k_cache, v_cache, *, q_offset, kv_mask=None, sliding_window=None, scale=None, config=None):
    """Attention of one query token per row over a static KV cache (two-stage flash-decoding).

    q (B, Hq, 1, D); k_cache, v_cache (B, Hkv, Tmax, D), any strides; q_offset: 0-d or (B,) int
    tensor (or int) = cache index of the current token, keys 0..q_offset are valid; kv_mask
    (B, Tmax) bool, False = padding. Returns (B, Hq, 1, D) in q's dtype.
    `config` overrides the tile/split choice (benchmark sweeps)."""
    return _decode_attention(q, k_cache, v_cache, q_offset, kv_mask, sliding_window, scale, config)


@on_tensor_device
def rope_decode_attention(q, k, v, position_ids, inv_freq, k_cache, v_cache, cache_pos, *, kv_mask=None,
                          sliding_window=None, scale=None, config=None):
    """rope_kv_write then decode_attention with one launch fewer (the rotary and the cache write
    happen in decode attention's split kernel), for one new token per row.

    q (B, 1, Hq, D), k, v (B, 1, Hkv, D): the token's projections before rotary, any strides
    (views of one fused q/k/v product); position_ids (B, 1) int; inv_freq (D/2,) fp32; k_cache,
    v_cache (B, Hkv, Tmax, D); cache_pos: int or 0-d int tensor, the token's cache slot, which is
    also its key index. Writes the rotated k and v into the caches at cache_pos and returns the
    attention output (B, Hq, 1, D), as the two kernels in turn would (within rounding)."""
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"rope_decode_attention takes one token a row: q must be (B, 1, Hq, D), got {tuple(q.shape)}")
    _check_rope_inputs(q, k, v, position_ids, inv_freq, k_cache, v_cache, cache_pos)  # rope_kv_write's checks
    if not (k.dtype == v.dtype == q.dtype == k_cache.dtype):
        raise TypeError(f"q, k, v and the caches must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}, {k_cache.dtype}")
    new_kv = (k[:, 0], v[:, 0], position_ids, inv_freq.to(torch.float32).contiguous())  # k, v (B, Hkv, D)
    return _decode_attention(q.transpose(1, 2), k_cache, v_cache, cache_pos, kv_mask, sliding_window, scale, config,
                             new_kv)


def _decode_attention(q, k_cache, v_cache, q_offset, kv_mask, sliding_window, scale, config, new_kv=None):
    """Checks and launches both stages; new_kv = (k, v (B, Hkv, D), position_ids, inv_freq)
    makes stage 1 rotate q and k and write the token into the cache (rope_decode_attention)."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode_attention takes one query token: q must be (B, Hq, 1, D), got {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be (B, Hkv, Tmax, D); got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, Hq, _, D = q.shape
    _, Hkv, Tmax, Dk = k_cache.shape
    if k_cache.shape[0] != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} disagree on batch or head_dim")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if D == 0:
        raise ValueError("head_dim is 0")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q and the caches must share a dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if kv_mask is not None and (kv_mask.shape != (B, Tmax) or kv_mask.dtype != torch.bool):
        raise ValueError(f"kv_mask must be a bool tensor of shape ({B}, {Tmax}); got {kv_mask.dtype} {tuple(kv_mask.shape)}")
    if q_offset is None:
        raise ValueError("decode_attention needs q_offset (the cache index of the current token)")
    if sliding_window is not None and int(sliding_window) <= 0:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
    offset, offset_t, stride_offb = _offset_arg(q_offset, 0, B)
    check_devices(q, k_cache=k_cache, v_cache=v_cache, kv_mask=kv_mask, q_offset=offset_t)
    scale = _check_scale(scale, D)
    if Tmax == 0:  # an empty cache: nothing to attend to, and no tile to launch
        return torch.zeros_like(q)

    cfg = dict(config) if config is not None else _decode_config(B, Hkv, Tmax, q.dtype, q.device)
    block_n, split_len, splits = cfg.pop("BLOCK_N"), cfg.pop("SPLIT_LEN"), cfg.pop("NUM_SPLITS")
    if splits * split_len < Tmax:  # a slot no split covers: its key dropped, and with new_kv never cached
        raise ValueError(f"config covers {splits} x {split_len} keys, fewer than the cache's {Tmax}")
    block_d = max(16, triton.next_power_of_2(D))
    group = Hq // Hkv
    part_o = torch.empty((B, Hq, splits, D), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((B, Hq, splits), device=q.device, dtype=torch.float32)
    mask_t = kv_mask.view(torch.uint8) if kv_mask is not None else None
    # without new_kv the kernel never reads these: any tensors of the right rank stand in
    k_new, v_new, pos_ids, inv_freq = new_kv if new_kv is not None else (q[:, :, 0],) * 2 + (q, q)
    _decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache,
        mask_t if mask_t is not None else q, offset_t if offset_t is not None else q,
        part_o, part_lse, k_new, v_new, pos_ids, inv_freq,
        q.stride(0), q.stride(1), q.stride(3),
        *k_cache.stride(), *v_cache.stride(),
        *(mask_t.stride() if mask_t is not None else (0, 0)),
        stride_offb,
        *part_o.stride(), *part_lse.stride(),
        *k_new.stride(), *v_new.stride(), pos_ids.stride(0),
        group, Tmax, offset, int(sliding_window or 0), scale * 1.4426950408889634, split_len,
        HEAD_DIM=D,
        HAS_WINDOW=sliding_window is not None,
        HAS_KV_MASK=kv_mask is not None,
        OFFSET_FROM_PTR=offset_t is not None,
        NEW_KV=new_kv is not None,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **cfg, **pdl_args(q),
    )
    out = torch.empty((B, 1, Hq, D), device=q.device, dtype=q.dtype).transpose(1, 2)  # (B, Hq, 1, D)
    _decode_reduce_kernel[(B, Hq)](
        part_o, part_lse, out,
        *part_o.stride(), *part_lse.stride(),
        out.stride(0), out.stride(1), out.stride(3),
        Hq, splits, D,
        BLOCK_S=triton.next_power_of_2(splits),
        BLOCK_D=block_d,
        num_warps=4, **pdl_args(q),
    )
    return out


def decode_attention_reference(q, k_cache, v_cache, *, q_offset, kv_mask=None, sliding_window=None, scale=None):
    """Plain PyTorch: attend over the whole cache with the visibility rules at q_offset."""
    from .flash_attention import flash_attention_reference

    return flash_attention_reference(q, k_cache, v_cache, causal=True, q_offset=q_offset, kv_mask=kv_mask,
                                     sliding_window=sliding_window, scale=scale)


def rope_decode_attention_reference(q, k, v, position_ids, inv_freq, k_cache, v_cache, cache_pos, *, kv_mask=None,
                                    sliding_window=None, scale=None):
    """The two references in turn: rope_kv_write_reference, then decode_attention_reference."""
    from .rope_kv_write import rope_kv_write_reference

    q = rope_kv_write_reference(q, k, v, position_ids, inv_freq, k_cache, v_cache, int(cache_pos))
    return decode_attention_reference(q, k_cache, v_cache, q_offset=cache_pos, kv_mask=kv_mask,
                                      sliding_window=sliding_window, scale=scale)
