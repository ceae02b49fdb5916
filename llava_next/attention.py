"""The attention seam: one signature, three implementations, chosen per model instance.

    attn(q, k, v, *, causal, q_offset=None, kv_mask=None, sliding_window=None, scale=None)
    q: (B, Hq, Tq, D)   k, v: (B, Hkv, Tk, D) with Hq % Hkv == 0 (GQA)   ->  (B, Hq, Tq, D)

Query i sits at key index `q_offset + i` (default Tk - Tq: the queries are the last Tq keys).
Key j is visible to query i when kv_mask[b, j] (False = padding), and, if causal,
j <= q_offset + i, and, with a sliding window W, (q_offset + i) - j < W. `q_offset` may be an
int or a 0-d tensor (decode over a static cache, where the shape must not depend on it).
A query that sees no key (a left-pad position) gets a finite, meaningless output: those rows
are never read, but a NaN there would leak into other rows through 0 * NaN in the next layer.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
import torch.nn.functional as F


def visibility_mask(Tq: int, Tk: int, *, causal: bool, q_offset=None, kv_mask=None, sliding_window=None,
                    device=None):
    """(B or 1, 1, Tq, Tk) bool: True where query i may attend to key j, by the rules above.
    q_offset may also be a (B,) tensor, one offset per row."""
    if q_offset is None:
        q_offset = Tk - Tq
    off = torch.as_tensor(q_offset, device=device).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
    q_pos = off + torch.arange(Tq, device=device).view(1, 1, Tq, 1)
    k_pos = torch.arange(Tk, device=device).view(1, 1, 1, Tk)
    visible = torch.ones_like(q_pos - k_pos, dtype=torch.bool)
    if causal:
        visible = visible & (k_pos <= q_pos)
    if sliding_window is not None:
        visible = visible & (q_pos - k_pos < sliding_window)
    if kv_mask is not None:
        visible = visible & kv_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    return visible


def _model_mask(Tq, Tk, device, **rules):
    """visibility_mask for sdpa, None when nothing is masked. A query that sees no key
    attends to everything instead: finite garbage, not NaN."""
    if not rules["causal"] and rules.get("kv_mask") is None and rules.get("sliding_window") is None:
        return None
    mask = visibility_mask(Tq, Tk, device=device, **rules)
    return mask | ~mask.any(-1, keepdim=True)


def _repeat_kv(x, n_rep: int):
    if n_rep == 1:
        return x
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, T, D).reshape(B, H * n_rep, T, D)  # (B, H*n_rep, T, D)


def attention_weights(q, k, *, causal, q_offset=None, kv_mask=None, sliding_window=None, scale=None):
    """The attention probabilities (B, Hq, Tq, Tk), as transformers' eager attention returns them
    with output_attentions: softmax in fp32, cast to q's dtype; a hidden key gets exactly 0, and
    a query that sees no key (a left-pad position) spreads evenly over all Tk keys."""
    k = _repeat_kv(k, q.shape[1] // k.shape[1])
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    if causal or kv_mask is not None or sliding_window is not None:
        visible = visibility_mask(q.shape[2], k.shape[2], causal=causal, q_offset=q_offset, kv_mask=kv_mask,
                                  sliding_window=sliding_window, device=q.device)
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


def eager_attention(q, k, v, *, causal, q_offset=None, kv_mask=None, sliding_window=None, scale=None,
                    return_weights=False):
    """Plain PyTorch attention, written out: the reference the others are checked against.
    return_weights=True returns (output, attention_weights) (output_attentions uses it)."""
    probs = attention_weights(q, k, causal=causal, q_offset=q_offset, kv_mask=kv_mask,
                              sliding_window=sliding_window, scale=scale)  # (B, Hq, Tq, Tk)
    y = torch.matmul(probs, _repeat_kv(v, q.shape[1] // v.shape[1]))  # (B, Hq, Tq, D)
    return (y, probs) if return_weights else y


def sdpa_attention(q, k, v, *, causal, q_offset=None, kv_mask=None, sliding_window=None, scale=None):
    """torch's scaled_dot_product_attention (flash / memory-efficient / math, picked by torch)."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = {}
    if q.shape[1] != k.shape[1]:
        if _SDPA_GQA:  # torch >= 2.5 reads the shared kv heads in place
            gqa = {"enable_gqa": True}
        else:
            n_rep = q.shape[1] // k.shape[1]
            k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    if q_offset is not None and not isinstance(q_offset, torch.Tensor) and q_offset == Tk - Tq:
        q_offset = None
    if causal and Tq == Tk and q_offset is None and kv_mask is None and sliding_window is None:
        # The plain causal case lets torch pick its flash kernel.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
    mask = _model_mask(Tq, Tk, q.device, causal=causal, q_offset=q_offset, kv_mask=kv_mask,
                       sliding_window=sliding_window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)


_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def triton_attention(q, k, v, *, causal, q_offset=None, kv_mask=None, sliding_window=None, scale=None):
    """Hand-written Triton kernels: flash attention for prefill and vision, flash-decoding
    for one query token over a KV cache."""
    from .kernels import decode_attention, flash_attention

    if q.shape[2] == 1 and causal and isinstance(q_offset, torch.Tensor):
        return decode_attention(q, k, v, q_offset=q_offset, kv_mask=kv_mask,
                                sliding_window=sliding_window, scale=scale)
    return flash_attention(q, k, v, causal=causal, q_offset=q_offset, kv_mask=kv_mask,
                           sliding_window=sliding_window, scale=scale)


def auto_attention(q, k, v, **kw):
    """The default: the Triton kernels for CUDA tensors, torch SDPA for anything else, and SDPA
    as well where a gradient flows through the attention: our flash backward runs at 0.45-0.48x
    SDPA's (H200 and H100, bench/NOTES.md), which costs training more than our forward's few
    percent gain can save. Decided per call by where the tensors are and whether autograd needs
    them, so a model loaded on CPU and moved with .to("cuda") gets the kernels for generation."""
    fast = q.is_cuda and not needs_grad(q, k, v)
    return (triton_attention if fast else sdpa_attention)(q, k, v, **kw)


ATTENTION_FUNCTIONS = {"eager": eager_attention, "sdpa": sdpa_attention, "triton": triton_attention,
                       "auto": auto_attention}


def resolve_attn_implementation(name: str | None, device=None) -> str:
    """The seam a new model gets. None means "auto" where triton is installed, else "sdpa"."""
    if name is None:
        return "auto" if importlib.util.find_spec("triton") is not None else "sdpa"
    if name not in ATTENTION_FUNCTIONS:
        hint = ""
        if isinstance(name, str) and (name.startswith(("flash_attention", "flex_attention", "paged")) or "/" in name):
            hint = (f" ({name!r} names a transformers backend or hub kernel; llava-next's own flash attention is "
                    "'triton', which the default, 'auto', uses on CUDA)")
        raise ValueError(f"attn_implementation={name!r} is not one of {sorted(ATTENTION_FUNCTIONS)}{hint}")
    if name == "triton":
        from .kernels import triton_available

        device = torch.device(device) if device is not None else None
        if not triton_available() or (device is not None and device.type == "cpu"
                                      and os.environ.get("TRITON_INTERPRET") != "1"):
            raise ValueError(
                "attn_implementation='triton' needs triton and a CUDA device; on CPU set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels in Triton's interpreter (slow; for tests)."
            )
    return name


def kernels_enabled(mode, x) -> bool:
    """Whether the fused small kernels (RMSNorm, SiLU-mul, rope + cache write) run on x: always
    with "triton", for CUDA tensors with "auto"."""
    return mode == "triton" or (mode == "auto" and x.is_cuda)


def needs_grad(*inputs) -> bool:
    """Whether autograd will want a gradient through any of `inputs`."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def small_kernels_apply(mode, *inputs) -> bool:
    """Whether a fused small kernel without a backward (RMSNorm, SiLU-mul, quick_gelu) runs on
    `inputs`: kernels_enabled on the first, and no gradient needed through any of them."""
    return kernels_enabled(mode, inputs[0]) and not needs_grad(*inputs)
