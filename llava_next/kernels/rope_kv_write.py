"""Rotary embedding of q and k fused with the KV-cache write.

One pass over the new tokens' q, k, v projections: q is rotated and written out head-major
(B, Hq, T, D) for the attention kernel, k is rotated and v copied straight into the static
cache at cache_pos .. cache_pos + T - 1. Rotary is transformers' rotate-half form
    x * cos + rotate_half(x) * sin,   cos/sin of (position * inv_freq) repeated twice along D.
"""

import torch
import triton
import triton.language as tl

from .flash_attention import check_devices
from .launch import on_tensor_device, rows_per_program
from .pdl import pdl_args, wait_for_previous_kernel

# One program per (batch row, BLOCK_T tokens): all heads of those tokens at once, as a
# (tokens, heads, D/2) tile of first halves x1 and one of second halves x2:
#     out1 = x1 cos - x2 sin,   out2 = x2 cos + x1 sin.
# BLOCK_T is launch.rows_per_program: 1 on a GPU (timed: 2.1 TB/s for a 3000-token prompt on an
# H100), 16 in the interpreter.
# The angle is position * inv_freq in fp32, the same product transformers forms. GPU sin/cos may
# lower to the fast approximate instructions, which are only accurate near [-pi, pi], while the
# angles reach thousands of radians; so the angle is first reduced modulo 2 pi (Cody-Waite: 2 pi
# split in three constants so that k * C1 is exact in fp32). The rotation is done in fp32 and
# rounded once to the output dtype (transformers rounds cos/sin to the model dtype first and
# rounds after each product: the two agree to about one ulp).


@triton.jit
def rope_cos_sin(pos, inv_freq):
    """cos and sin of pos * inv_freq (fp32), the angle reduced modulo 2 pi first (see above);
    shared with the fused decode attention."""
    angle = pos * inv_freq
    turns = tl.floor(angle * 0.15915494309189535 + 0.5)
    angle = angle - turns * 6.28125  # exact: C1 has 8 significant bits
    angle = angle - turns * 1.9353071693331003e-03  # C2 = fp32(2 pi - C1)
    angle = angle - turns * 1.0253376606378076e-11  # C3 = 2 pi - C1 - C2
    return tl.cos(angle), tl.sin(angle)


@triton.jit(do_not_specialize=["T", "cache_pos"])  # decode steps reuse one binary
def _rope_kv_write_kernel(
    Q, K, V, PosIds, InvFreq, KCache, VCache, QOut, CachePos,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_pb, stride_pt,
    stride_kcb, stride_kch, stride_kcn, stride_kcd,
    stride_vcb, stride_vch, stride_vcn, stride_vcd,
    stride_ob, stride_oh, stride_ot, stride_od,
    T, HQ, HKV, HALF, Tmax, cache_pos, attn_scaling,
    POS_FROM_PTR: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_F: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    # tokens on grid axis 0, which takes 2**31 - 1 programs (axis 1 only 65535); 64-bit offsets:
    # b * stride can pass 2**31
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) token indices
    b = tl.program_id(1).to(tl.int64)
    t_ok = offs_t < T
    if POS_FROM_PTR:
        cache_pos = tl.load(CachePos).to(tl.int32)
    slot = cache_pos + offs_t  # (BLOCK_T,) cache slots

    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < HALF
    pos = tl.load(PosIds + b * stride_pb + offs_t * stride_pt, mask=t_ok, other=0).to(tl.float32)
    cos, sin = rope_cos_sin(pos[:, None], tl.load(InvFreq + offs_f, mask=f_ok, other=0.0)[None, :])
    cos = (cos * attn_scaling)[:, None, :]  # (BLOCK_T, 1, BLOCK_F)
    sin = (sin * attn_scaling)[:, None, :]
    t3 = offs_t[:, None, None]  # (BLOCK_T, 1, 1)
    f3 = offs_f[None, None, :]  # (1, 1, BLOCK_F)

    # q: rotate and store head-major
    offs_hq = tl.arange(0, BLOCK_HQ)[None, :, None]  # (1, BLOCK_HQ, 1)
    mask_q = t_ok[:, None, None] & (offs_hq < HQ) & f_ok[None, None, :]
    q_ptrs = Q + b * stride_qb + t3 * stride_qt + offs_hq * stride_qh + f3 * stride_qd
    q1 = tl.load(q_ptrs, mask=mask_q, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptrs + HALF * stride_qd, mask=mask_q, other=0.0).to(tl.float32)
    o_ptrs = QOut + b * stride_ob + t3 * stride_ot + offs_hq * stride_oh + f3 * stride_od
    tl.store(o_ptrs, (q1 * cos - q2 * sin).to(QOut.dtype.element_ty), mask=mask_q)
    tl.store(o_ptrs + HALF * stride_od, (q2 * cos + q1 * sin).to(QOut.dtype.element_ty), mask=mask_q)

    # k: rotate into the cache; v: copy into the cache. Slots past Tmax are dropped, not written.
    offs_hk = tl.arange(0, BLOCK_HKV)[None, :, None]  # (1, BLOCK_HKV, 1)
    # a slot outside the cache (a tensor cache_pos is not range-checked on the host) is not written
    slot_ok = t_ok & (slot < Tmax) & (slot >= 0)
    mask_k = slot_ok[:, None, None] & (offs_hk < HKV) & f_ok[None, None, :]
    slot3 = slot[:, None, None]
    k_ptrs = K + b * stride_kb + t3 * stride_kt + offs_hk * stride_kh + f3 * stride_kd
    k1 = tl.load(k_ptrs, mask=mask_k, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptrs + HALF * stride_kd, mask=mask_k, other=0.0).to(tl.float32)
    kc_ptrs = KCache + b * stride_kcb + offs_hk * stride_kch + slot3 * stride_kcn + f3 * stride_kcd
    tl.store(kc_ptrs, (k1 * cos - k2 * sin).to(KCache.dtype.element_ty), mask=mask_k)
    tl.store(kc_ptrs + HALF * stride_kcd, (k2 * cos + k1 * sin).to(KCache.dtype.element_ty), mask=mask_k)

    v_ptrs = V + b * stride_vb + t3 * stride_vt + offs_hk * stride_vh + f3 * stride_vd
    vc_ptrs = VCache + b * stride_vcb + offs_hk * stride_vch + slot3 * stride_vcn + f3 * stride_vcd
    v1 = tl.load(v_ptrs, mask=mask_k, other=0.0)
    v2 = tl.load(v_ptrs + HALF * stride_vd, mask=mask_k, other=0.0)
    tl.store(vc_ptrs, v1.to(VCache.dtype.element_ty), mask=mask_k)
    tl.store(vc_ptrs + HALF * stride_vcd, v2.to(VCache.dtype.element_ty), mask=mask_k)


@on_tensor_device
def rope_kv_write(q, k, v, position_ids, inv_freq, k_cache, v_cache, cache_pos, *, attention_scaling: float = 1.0):
    """Rotate q and k, write rotated k and raw v into the caches at cache_pos.., return rotated q.

    q (B, T, Hq, D); k, v (B, T, Hkv, D), any strides; position_ids (B, T) int; inv_freq (D/2,)
    fp32; k_cache, v_cache (B, Hkv, Tmax, D); cache_pos: int or 0-d int tensor.
    Returns q_rot (B, Hq, T, D), a new tensor in q's dtype. Cache slots >= Tmax are not written
    (checked eagerly when cache_pos is an int)."""
    B, T, Hq, Hkv, D, Tmax = _check_rope_inputs(q, k, v, position_ids, inv_freq, k_cache, v_cache, cache_pos)
    pos_t, pos_int = (cache_pos, 0) if isinstance(cache_pos, torch.Tensor) else (None, int(cache_pos))

    q_rot = torch.empty((B, Hq, T, D), device=q.device, dtype=q.dtype)
    if B * T == 0:
        return q_rot
    inv_freq = inv_freq.to(torch.float32).contiguous()  # the kernel reads it with unit stride
    block_t = rows_per_program(q.device)
    _rope_kv_write_kernel[(triton.cdiv(T, block_t), B)](
        q, k, v, position_ids, inv_freq, k_cache, v_cache, q_rot,
        pos_t if pos_t is not None else position_ids,
        *q.stride(), *k.stride(), *v.stride(), *position_ids.stride(),
        *k_cache.stride(), *v_cache.stride(), *q_rot.stride(),
        T, Hq, Hkv, D // 2, Tmax, pos_int, float(attention_scaling),
        POS_FROM_PTR=pos_t is not None,
        BLOCK_T=block_t,
        BLOCK_HQ=triton.next_power_of_2(Hq),
        BLOCK_HKV=triton.next_power_of_2(Hkv),
        BLOCK_F=triton.next_power_of_2(D // 2),
        num_warps=4, **pdl_args(q),
    )
    return q_rot


def _check_rope_inputs(q, k, v, position_ids, inv_freq, k_cache, v_cache, cache_pos):
    """The shapes rope_kv_write (and rope_decode_attention) take, checked: (B, T, Hq, Hkv, D, Tmax)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be (B, T, Hq, D) and k, v (B, T, Hkv, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, length or head_dim")
    if D % 2 or D == 0 or Hkv == 0 or Hq == 0:
        raise ValueError(f"rotary needs an even head_dim and at least one q and kv head; got head_dim {D}, "
                         f"{Hq} q heads, {Hkv} kv heads")
    if inv_freq.shape != (D // 2,):
        raise ValueError(f"inv_freq must have shape ({D // 2},) for head_dim {D}, got {tuple(inv_freq.shape)}")
    if position_ids.shape != (B, T):
        raise ValueError(f"position_ids must be ({B}, {T}), got {tuple(position_ids.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[0] != B or k_cache.shape[1] != Hkv or k_cache.shape[3] != D:
        raise ValueError(f"k_cache and v_cache must both be ({B}, {Hkv}, Tmax, {D}); got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    check_devices(q, k=k, v=v, position_ids=position_ids, inv_freq=inv_freq, k_cache=k_cache, v_cache=v_cache,
                  cache_pos=cache_pos)
    Tmax = k_cache.shape[2]
    if isinstance(cache_pos, torch.Tensor):
        if cache_pos.numel() != 1:
            raise ValueError(f"cache_pos must be an int or a 0-d tensor, got shape {tuple(cache_pos.shape)}")
    elif int(cache_pos) < 0 or int(cache_pos) + T > Tmax:
        raise ValueError(f"writing {T} tokens at cache_pos {int(cache_pos)} overflows the cache of length {Tmax}")
    return B, T, Hq, Hkv, D, Tmax


def rope_kv_write_reference(q, k, v, position_ids, inv_freq, k_cache, v_cache, cache_pos, *, attention_scaling: float = 1.0):
    """Plain PyTorch, same signature and effect; rotation in fp32, one rounding at the end."""
    T = q.shape[1]
    freqs = position_ids.float()[:, :, None] * inv_freq.float()[None, None, :]  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # (B, T, 1, D)
    cos, sin = emb.cos() * attention_scaling, emb.sin() * attention_scaling

    def rotate(x):
        x = x.float()
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    start = int(cache_pos)
    k_cache[:, :, start:start + T] = rotate(k).to(k_cache.dtype).transpose(1, 2)
    v_cache[:, :, start:start + T] = v.to(v_cache.dtype).transpose(1, 2)
    return rotate(q).to(q.dtype).transpose(1, 2).contiguous()  # (B, Hq, T, D)
