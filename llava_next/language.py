"""One decoder for Llama (Vicuna), Mistral and Yi: RMSNorm, rotate-half RoPE, GQA, SiLU-gated MLP.

Module names equal the checkpoint keys under `language_model.model.` so state_dict() round-trips.
The families differ only in config values (rope theta, kv heads, vocab, Mistral's sliding window).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .attention import eager_attention, kernels_enabled, small_kernels_apply
from .compat import output_requires_grad
from .config import TextConfig
from .fused_linear import fused_weights, run_linears


class Checkpointing(NamedTuple):
    """A tower's activation checkpointing (model.activation_checkpointing_enable): every
    `every_n_layers`-th layer from the first recomputes its activations in backward; with
    `offload` the inputs it keeps for that wait in host memory."""
    every_n_layers: int = 1
    offload: bool = False


def run_layer(tower: nn.Module, i: int, layer: nn.Module, *args):
    """layer(*args), under non-reentrant torch.utils.checkpoint where `tower.gradient_checkpointing`
    (a Checkpointing; True: every layer; False: none) picks layer i, in training with gradients on."""
    ckpt = tower.gradient_checkpointing
    if ckpt is True:  # set by hand, as transformers' modules take it: every layer
        ckpt = Checkpointing()
    if not (ckpt and tower.training and torch.is_grad_enabled() and i % ckpt.every_n_layers == 0):
        return layer(*args)
    if ckpt.offload:
        with torch.autograd.graph.save_on_cpu(pin_memory=args[0].is_cuda):
            return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
    return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: str = "none"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x):
        if small_kernels_apply(self.kernels, x, self.weight):
            from .kernels import rms_norm
            return rms_norm(x, self.weight, self.eps)
        h = x.float()  # the variance in fp32 whatever the model dtype, as the reference does
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg: TextConfig, device=None):
    # Same expression as transformers so fp32 inverse frequencies are bit-identical.
    D = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float, device=device) / D))


def rope_cos_sin(inv_freq, position_ids, dtype):
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Rope(NamedTuple):
    """Rotary inputs for one forward. cos/sin are None on the fused Triton path, whose kernel
    computes the angles from position_ids and inv_freq itself."""
    position_ids: torch.Tensor  # (B, T)
    inv_freq: torch.Tensor  # (D/2,)
    cos: torch.Tensor | None  # (B, T, D)
    sin: torch.Tensor | None


def apply_rope(x, cos, sin):  # x (B, H, T, D); cos, sin (B, T, D)
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, attn_fn):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=b)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=b)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=b)
        self.sliding_window = cfg.attention_window
        self.attn_fn = attn_fn

    def forward(self, x, rope, cache=None, cache_pos=None, kv_mask=None, output_attentions=False):
        """x (B, T, C) -> (B, T, C); with output_attentions, (that, the attention weights (B, nh, T, Tk))."""
        q, k, v = run_linears(x, (self.q_proj, self.k_proj, self.v_proj))  # one product after fuse_projections()
        if output_attentions:
            y, weights = self.attend(q, k, v, rope, cache, cache_pos, kv_mask, output_attentions=True)
            return self.o_proj(y), weights
        return self.o_proj(self.attend(q, k, v, rope, cache, cache_pos, kv_mask))

    def attend(self, q, k, v, rope, cache=None, cache_pos=None, kv_mask=None, one_kernel_decode=False,
               output_attentions=False):
        """The projections q (B, T, nh*hd), k, v (B, T, nkv*hd) -> attention output (B, T, nh*hd),
        the input of o_proj: rotary embedding, the KV cache, then the attention seam.
        one_kernel_decode (decode_forward): a decode step on the Triton path does all three in
        one kernel, rope_decode_attention. output_attentions: the attention runs written out
        (eager_attention) whatever the seam, since the fused kernels never form the weights, and
        returns (output, weights (B, nh, T, Tk)); Tk is the keys attended to, the cache's
        max_length for a tensor cache_pos (unwritten keys weigh 0)."""
        B, T, _ = q.shape
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if one_kernel_decode and rope.cos is None and T == 1 and torch.is_tensor(cache_pos):
            from .kernels import rope_decode_attention
            y = rope_decode_attention(q, k, v, rope.position_ids, rope.inv_freq, cache.k[self.layer_idx],
                                      cache.v[self.layer_idx], cache_pos, kv_mask=kv_mask,
                                      sliding_window=self.sliding_window)  # (B, nh, 1, hd)
            return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        if rope.cos is None:
            # One Triton kernel rotates q and k and writes k, v into the cache.
            from .kernels import rope_kv_write
            q = rope_kv_write(q, k, v, rope.position_ids, rope.inv_freq, cache.k[self.layer_idx],
                              cache.v[self.layer_idx], cache_pos)  # (B, nh, T, hd)
            k, v = cache.read(self.layer_idx, cache_pos, T)
        else:
            q = apply_rope(q.transpose(1, 2), rope.cos, rope.sin)  # (B, nh, T, hd)
            k = apply_rope(k.transpose(1, 2), rope.cos, rope.sin)  # (B, nkv, T, hd)
            v = v.transpose(1, 2)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v, cache_pos)  # (B, nkv, T_past + T, hd)
        q_offset = cache_pos if cache is not None else None
        rules = dict(causal=True, q_offset=q_offset, kv_mask=kv_mask, sliding_window=self.sliding_window)
        if output_attentions:
            y, weights = eager_attention(q, k, v, **rules, return_weights=True)  # (B, nh, T, hd), (B, nh, T, Tk)
        else:
            y = self.attn_fn(q, k, v, **rules)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return (y, weights) if output_attentions else y


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig, kernels: str = "none"):
        super().__init__()
        C, H, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, H, bias=b)
        self.up_proj = nn.Linear(C, H, bias=b)
        self.down_proj = nn.Linear(H, C, bias=b)
        self.kernels = kernels

    def forward(self, x):
        gate, up = run_linears(x, (self.gate_proj, self.up_proj))  # one product after fuse_projections()
        # The kernel has no backward: it steps aside whenever either input needs a gradient.
        if small_kernels_apply(self.kernels, gate, up):
            from .kernels import silu_mul
            return self.down_proj(silu_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, attn_fn, kernels: str):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)
        self.self_attn = LlamaAttention(cfg, layer_idx, attn_fn)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)
        self.mlp = LlamaMLP(cfg, kernels)
        self.kernels = kernels
        # None: on CUDA for up to AUTO_DECODE_ROWS rows; True: up to decode_linear's limit; False:
        # never. Set by LlavaNextForConditionalGeneration.enable_decode_kernels().
        self.decode_kernels = None

    def forward(self, x, rope, cache=None, cache_pos=None, kv_mask=None, output_attentions=False):
        """x (B, T, C) -> (B, T, C); with output_attentions, (that, the attention weights (B, nh, T, Tk))."""
        if self.decode_kernels is not False and not output_attentions:
            weights = self._decode_weights(x)
            if weights is not None:
                return self.decode_forward(x, weights, rope, cache, cache_pos, kv_mask)
        h = self.self_attn(self.input_layernorm(x), rope, cache, cache_pos, kv_mask, output_attentions)
        h, attn_weights = h if output_attentions else (h, None)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, attn_weights) if output_attentions else x

    def decode_forward(self, x, weights, rope, cache=None, cache_pos=None, kv_mask=None):
        """forward() for a few rows without gradients (a decode step): the four products run as
        decode_linear kernels with the SiLU-mul and both residual adds folded into their outputs,
        and a one-token step's rotary + cache write + attention as one kernel
        (rope_decode_attention), so the layer is 8 kernels instead of 12 or more. `weights`
        comes from _decode_weights, which decides when this may run."""
        from .kernels import decode_linear

        (qkv_w, qkv_b), (gate_up_w, gate_up_b) = weights
        attn, mlp = self.self_attn, self.mlp
        qkv = decode_linear(self.input_layernorm(x), qkv_w, qkv_b)  # (B, T, (nh + 2 nkv) hd)
        q, k, v = qkv.split([attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features], dim=-1)
        y = attn.attend(q, k, v, rope, cache, cache_pos, kv_mask, one_kernel_decode=True)  # (B, T, nh*hd)
        x = decode_linear(y, attn.o_proj.weight, attn.o_proj.bias, residual=x)
        h = decode_linear(self.post_attention_layernorm(x), gate_up_w, gate_up_b, gated=True)  # (B, T, I)
        return decode_linear(h, mlp.down_proj.weight, mlp.down_proj.bias, residual=x)

    def _decode_weights(self, x):
        """((q/k/v weight, bias), (gate/up weight, bias)) as single tensors when decode_forward
        may run this call, else None (the module path runs, whatever changed). It runs only where
        decode_kernels allows it (None: x on CUDA with at most AUTO_DECODE_ROWS rows; True: at most
        decode_linear's row limit; False: never), with the Triton kernels on x, no gradient, no autocast or
        torch.compile, this layer's own module classes with no hooks and no replaced forward (a
        LoRA wrapper, a quantized layer or a hook must see its own call), plain weights and
        biases of x's dtype and device, and the projections laid out by fuse_projections()."""
        from .kernels.decode_linear import MAX_ROWS

        rows = MAX_ROWS if self.decode_kernels else AUTO_DECODE_ROWS
        if (self.decode_kernels is False or (self.decode_kernels is None and not x.is_cuda)
                or not kernels_enabled(self.kernels, x)
                or x.numel() > rows * x.shape[-1] or torch.compiler.is_compiling() or _autocast(x)):
            return None
        attn, mlp = self.self_attn, self.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        modules = {attn: LlamaAttention, mlp: LlamaMLP, self.input_layernorm: LlamaRMSNorm,
                   self.post_attention_layernorm: LlamaRMSNorm, **{lin: nn.Linear for lin in linears}}
        if any(type(m) is not cls for m, cls in modules.items()) or runs_python_per_call(modules):
            return None
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None
        qkv, gate_up = fused_weights(linears[:3]), fused_weights(linears[4:6])  # plain tensors, one dtype
        if qkv is None or gate_up is None:
            return None
        o, down = attn.o_proj, mlp.down_proj
        if not all(_plain(t, x) for t in (*qkv, *gate_up, o.weight, o.bias, down.weight, down.bias)):
            return None
        return qkv, gate_up


def runs_python_per_call(modules) -> bool:
    """Whether any of `modules` runs Python of its own on a call, which decode_forward's kernels
    and a CUDA graph's replay would skip: a forward hook or pre-hook (a global one too) or a
    forward replaced on the instance. enable_input_require_grads' hook (on the token embedding)
    does not count: it only marks the embedding's output as needing a gradient, which a step
    without one does not need."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_pre_hooks or "forward" in m.__dict__
               or any(h is not output_requires_grad for h in m._forward_hooks.values()) for m in modules)


# By default (decode_kernels None) the decode_linear path runs on CUDA for steps of at most this
# many rows: at batch 1 and 8 it took the mistral-7b step from 6.25 to 5.86 and from 7.42 to 6.98
# ms/token on an H100 (bench/NOTES.md, sixth session); more rows were not timed against cuBLAS.
AUTO_DECODE_ROWS = 8


def _plain(t, x) -> bool:
    """A weight or bias decode_linear can read as it is: None, or a plain contiguous tensor (no
    subclass such as a DTensor or a quantized tensor) of x's dtype and device."""
    return t is None or (type(t) in (torch.Tensor, nn.Parameter) and t.dtype == x.dtype and t.device == x.device
                         and t.is_contiguous())


def _autocast(x) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()


class LlamaModel(nn.Module):
    """`kernels` is the model's attn_implementation: the fused small kernels (RMSNorm, SiLU-mul,
    rope + cache write) run with "triton", and with "auto" on CUDA tensors."""

    def __init__(self, cfg: TextConfig, attn_fn, kernels: str = "none"):
        super().__init__()
        self.config = cfg
        # The pad id's row gets no gradient (and starts at zero), as in transformers: for vicuna and
        # the 34b the pad id is <unk> (0), a token a prompt may hold.
        pad = cfg.pad_token_id if cfg.pad_token_id is not None and 0 <= cfg.pad_token_id < cfg.vocab_size else None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, attn_fn, kernels)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)
        self.kernels = kernels
        self.gradient_checkpointing = False  # or a Checkpointing
        # Not a buffer: it must stay fp32 whatever dtype the model is cast to, and a buffer would
        # be left on the meta device by loading. Computed once per device.
        self._inv_freq = {}

    def inv_freq(self, device):
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.config, device=device)
        return self._inv_freq[device]

    def forward(self, inputs_embeds, position_ids, cache=None, cache_pos=None, kv_mask=None, hidden_states=None,
                attentions=None):
        """inputs_embeds (B, T, C), position_ids (B, T) -> hidden states (B, T, C) after the final norm.
        `hidden_states`, a list: gets each layer's input and then the output, num_layers + 1
        tensors (B, T, C) as transformers' output_hidden_states gives them (the last one normed).
        `attentions`, a list: gets each layer's attention weights (B, nh, T, Tk)."""
        x = inputs_embeds
        inv_freq = self.inv_freq(x.device)
        if kernels_enabled(self.kernels, x) and cache is not None and not torch.is_grad_enabled():
            rope = Rope(position_ids, inv_freq, None, None)
        else:
            rope = Rope(position_ids, inv_freq, *rope_cos_sin(inv_freq, position_ids, x.dtype))
        for i, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            if attentions is None:
                x = run_layer(self, i, layer, x, rope, cache, cache_pos, kv_mask)
            else:  # returned, not appended by the layer: a checkpointed layer runs twice
                x, weights = run_layer(self, i, layer, x, rope, cache, cache_pos, kv_mask, True)
                attentions.append(weights)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x


class LlamaForCausalLM(nn.Module):
    """The `language_model.` level of the hub keys: the decoder (`model.`) and `lm_head`."""

    def __init__(self, cfg: TextConfig, attn_fn, kernels: str = "none"):
        super().__init__()
        self.model = LlamaModel(cfg, attn_fn, kernels)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
