"""A preallocated KV cache, passed explicitly into the model's forward.

Keys and values of every decoder layer live in two tensors of fixed shape, so a decode step
has static shapes (it can be captured in a CUDA graph). `kv_mask` records which written
positions hold real tokens (False for left padding); it is what attention masks with.

Two ways to write, chosen by the type of `cache_pos`:
  int     (prefill)  tokens go to [cache_pos, cache_pos + T); attention sees keys [0, cache_pos + T).
  tensor  (decode)   a 0-d device tensor; one token goes to index cache_pos; attention sees the
                     whole buffer and the causal rule hides what is not written yet.
Either way a write at cache_pos ends the context there: going back (resampling, a rejected draft
token) forgets what followed. `length` follows int writes; after tensor steps it is unknown (no
host sync), so the next call must pass cache_pos.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every decoder layer, preallocated: k, v (layers, B, Hkv, max_length, D)
    and kv_mask (B, max_length). `KVCache.for_model(model, batch_size, max_length)` sizes one for a
    model (its dtype and device); pass it as `cache=` with `cache_pos=` to the model's forward
    (see the module docstring), `reset()` before reusing it for another prompt."""

    def __init__(self, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int,
                 head_dim: int, dtype=torch.float32, device=None):
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, Tmax, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.kv_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)  # (B, Tmax)
        self._slots = torch.arange(max_length, device=device)  # (Tmax,), for tensor-position writes
        # Positions written by int-position (prefill) calls. A decode step with a tensor position
        # cannot advance it without a host sync, so it sets None: pass cache_pos explicitly after.
        self.length = 0

    @classmethod
    def for_model(cls, model, batch_size: int, max_length: int, dtype=None, device=None) -> "KVCache":
        cfg = model.config.text_config
        p = model.lm_head.weight
        return cls(cfg.num_hidden_layers, batch_size, max_length, cfg.num_key_value_heads, cfg.head_dim,
                   dtype=dtype or p.dtype, device=device or p.device)

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        self.kv_mask.zero_()
        self.length = 0

    def fill_repeated(self, prompt: "KVCache", repeats: int) -> None:
        """Start over with `prompt`'s `length` positions (an int-position prefill), each of its rows
        taken `repeats` times in a row: row b of `prompt` becomes rows b * repeats ... b * repeats +
        repeats - 1 here (num_return_sequences: one prefill serves every copy)."""
        T = prompt.length
        if T is None or self.batch_size != prompt.batch_size * repeats or T > self.max_length:
            raise ValueError(f"cannot repeat a cache of batch {prompt.batch_size} and length {T} {repeats} times into "
                             f"one of batch {self.batch_size} and max_length {self.max_length}")
        for mine, theirs in ((self.k, prompt.k), (self.v, prompt.v)):  # (L, B * r, Hkv, Tmax, D) <- (L, B, Hkv, T, D)
            mine[:, :, :, :T].unflatten(1, (prompt.batch_size, repeats)).copy_(theirs[:, :, None, :, :T])
        self.kv_mask.zero_()
        self.kv_mask[:, :T] = prompt.kv_mask[:, :T].repeat_interleave(repeats, 0)
        self.length = T

    def reorder(self, rows, length: int, start: int = 0) -> None:
        """Row i takes what row rows[i] held in positions [start, length) (beam search: each beam
        continues the one it was chosen from; its positions before `start`, the prompt, are the
        same in every beam of a prompt, so they need no copy). `rows` (B,) long on the cache's
        device. Positions past `length` (not yet written, and a graph's scratch slot) are left alone.
        The right side is a copy (rows may repeat), as large as the part copied."""
        for buf in (self.k, self.v):  # (L, B, Hkv, Tmax, D)
            buf[:, :, :, start:length] = buf[:, rows, :, start:length]
        self.kv_mask[:, start:length] = self.kv_mask[rows, start:length]

    def check(self, model, batch_size: int, T: int, cache_pos) -> None:
        """That this cache fits the model and the call (host-side facts only: no device sync)."""
        cfg = model.config.text_config
        want = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim)
        have = (self.k.shape[0], self.batch_size, self.k.shape[2], self.k.shape[4])
        if have != want:
            raise ValueError(f"the KVCache holds (layers, batch, kv heads, head_dim) = {have}; this call needs {want} "
                             "(KVCache.for_model(model, batch_size, max_length))")
        if self.k.dtype != model.dtype or self.k.device != model.device:
            raise ValueError(f"the KVCache is {self.k.dtype} on {self.k.device}; the model computes {model.dtype} on "
                             f"{model.device}")
        if isinstance(cache_pos, torch.Tensor):
            if T != 1 or cache_pos.numel() != 1 or cache_pos.dtype != torch.long:
                raise ValueError("a tensor cache_pos writes one token per row: a 0-d int64 tensor and T = 1 "
                                 f"(got {cache_pos.dtype} of shape {tuple(cache_pos.shape)}, T = {T})")
        elif cache_pos < 0:
            raise ValueError(f"cache_pos must be >= 0, got {cache_pos}")

    def mark(self, cache_pos, T: int, attention_mask=None) -> None:
        """Record which of the T new positions are real tokens (once per forward, not per layer)."""
        if isinstance(cache_pos, torch.Tensor):  # one decode token per row, always real
            # As an int write does, writing at cache_pos ends the context there: a step that goes
            # back (resampling, a rejected draft) must not count the slots it left behind.
            self.kv_mask &= self._slots <= cache_pos
            self.kv_mask.index_fill_(1, cache_pos.reshape(1), True)
            self.length = None
            return
        end = cache_pos + T
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: writing positions [{cache_pos}, {end}) into a cache of "
                             f"max_length {self.max_length}; build a larger KVCache")
        self.kv_mask[:, end:] = False  # a longer earlier use of this cache must not count as context
        if attention_mask is None:
            self.kv_mask[:, cache_pos:end] = True
        elif attention_mask.shape[1] == end:  # past + new tokens, as transformers passes it
            self.kv_mask[:, :end] = attention_mask.bool()
        elif attention_mask.shape[1] == T:  # the new tokens only
            self.kv_mask[:, cache_pos:end] = attention_mask.bool()
        else:
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns; expected {T} (the new "
                             f"tokens) or {end} (the {cache_pos} cached positions plus the new tokens)")
        self.length = end

    def update(self, layer: int, k, v, cache_pos):
        """Write k, v (B, Hkv, T, D) of one layer; return that layer's keys and values to attend to."""
        T = k.shape[2]
        if isinstance(cache_pos, torch.Tensor):
            self.k[layer].index_copy_(2, cache_pos.reshape(1), k)
            self.v[layer].index_copy_(2, cache_pos.reshape(1), v)
        else:
            self.k[layer, :, :, cache_pos:cache_pos + T] = k
            self.v[layer, :, :, cache_pos:cache_pos + T] = v
        return self.read(layer, cache_pos, T)

    def read(self, layer: int, cache_pos, T: int):
        """One layer's keys and values up to the T tokens just written at cache_pos."""
        if isinstance(cache_pos, torch.Tensor):  # static shape: the causal rule hides the unwritten tail
            return self.k[layer], self.v[layer]
        return self.k[layer, :, :, :cache_pos + T], self.v[layer, :, :, :cache_pos + T]

    def visible_mask(self, cache_pos, T: int):
        """kv_mask for the keys `update` returns."""
        if isinstance(cache_pos, torch.Tensor):
            return self.kv_mask
        return self.kv_mask[:, : cache_pos + T]
