"""decode_attention (split-K flash-decoding over a static KV cache) against its reference."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_utils import (  # noqa: E402
    CUDA, DEVICE, DTYPES, TOL, assert_matches_reference, inv_freq, qkv_views, require_interpreter)

from llava_next.kernels import decode_attention, decode_attention_reference, flash_attention  # noqa: E402
from llava_next.kernels.decode_attention import _decode_split_kernel  # noqa: E402

require_interpreter(_decode_split_kernel)


def make_step(B, Hq, Hkv, Tmax, D, dtype, seed=0):
    """q (B, Hq, 1, D) and caches (B, Hkv, Tmax, D); q is a transposed view like the model's."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, Hq, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, Tmax, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Tmax, D, generator=g).to(DEVICE, dtype)
    return q, k, v


def check(q, k, v, **kw):
    out = decode_attention(q, k, v, **kw)
    ref = decode_attention_reference(q.float(), k.float(), v.float(), **kw)
    assert_matches_reference(out, ref, q)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "Hq,Hkv,Tmax,D,offset",
    [
        (6, 3, 129, 64, [128, 5]),  # GQA, per-row lengths, a full cache
        (6, 3, 129, 40, 60),  # D not a power of two, one offset for the batch
        (4, 4, 7, 64, [0, 6]),  # MHA, first token
        (8, 1, 33, 128, [20, 32]),  # MQA
    ],
)
def test_decode_matches_reference(Hq, Hkv, Tmax, D, offset, dtype):
    q, k, v = make_step(2, Hq, Hkv, Tmax, D, dtype)
    check(q, k, v, q_offset=torch.tensor(offset, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_padding_and_window(dtype):
    B, Tmax, D = 2, 129, 40
    q, k, v = make_step(B, 6, 3, Tmax, D, dtype)
    kv_mask = torch.ones(B, Tmax, dtype=torch.bool, device=DEVICE)
    kv_mask[1, :50] = False  # row 1 is left-padded
    offset = torch.tensor([100, 70], device=DEVICE)
    check(q, k, v, q_offset=offset, kv_mask=kv_mask)
    check(q, k, v, q_offset=offset, kv_mask=kv_mask, sliding_window=17)
    check(q, k, v, q_offset=offset, kv_mask=kv_mask, sliding_window=30)  # row 1: window reaches the pads
    kv_mask[1] = False  # a row with nothing to see: zeros
    out = check(q, k, v, q_offset=offset, kv_mask=kv_mask)
    assert out[1].abs().max().item() == 0.0


def test_decode_ignores_garbage_past_the_offset():
    """A static cache past q_offset holds whatever was there (torch.empty): even NaN must not leak."""
    q, k, v = make_step(2, 6, 3, 129, 64, torch.float16)
    offset = torch.tensor([40, 90], device=DEVICE)
    ref = decode_attention(q, k, v, q_offset=offset)
    for b, o in enumerate(offset.tolist()):
        k[b, :, o + 1:] = float("nan")
        v[b, :, o + 1:] = float("nan")
    torch.testing.assert_close(decode_attention(q, k, v, q_offset=offset), ref, atol=0, rtol=0)


def test_decode_offset_forms_and_flash_agree():
    q, k, v = make_step(2, 6, 3, 65, 64, torch.float32)
    a = decode_attention(q, k, v, q_offset=30)
    b = decode_attention(q, k, v, q_offset=torch.tensor(30, device=DEVICE))
    c = flash_attention(q, k[:, :, :31], v[:, :, :31], causal=True)  # bottom-right: query at key 30
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split_len,block_n", [(16, 16), (32, 16), (64, 32), (160, 32)])
def test_decode_split_choices_agree(split_len, block_n):
    """The answer must not depend on how the cache is cut (one split, many, ragged last)."""
    Tmax = 150
    q, k, v = make_step(2, 6, 3, Tmax, 40, torch.float32)
    offset = torch.tensor([149, 77], device=DEVICE)
    cfg = dict(BLOCK_N=block_n, SPLIT_LEN=split_len, NUM_SPLITS=-(-Tmax // split_len), num_warps=4, num_stages=1)
    out = decode_attention(q, k, v, q_offset=offset, sliding_window=50, config=cfg)
    ref = decode_attention_reference(q, k, v, q_offset=offset, sliding_window=50)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_decode_input_errors():
    q, k, v = make_step(1, 6, 3, 9, 64, torch.float32)
    with pytest.raises(ValueError, match="one query token"):
        decode_attention(q.expand(1, 6, 2, 64), k, v, q_offset=3)
    with pytest.raises(ValueError, match="q_offset"):
        decode_attention(q, k, v, q_offset=None)
    with pytest.raises(ValueError, match="q_offset"):
        decode_attention(q, k, v, q_offset=torch.tensor([1, 2, 3], device=DEVICE))
    with pytest.raises(ValueError, match="scale must be > 0"):
        decode_attention(q, k, v, q_offset=3, scale=0.0)
    with pytest.raises(ValueError, match="q_offset is on meta"):
        decode_attention(q, k, v, q_offset=torch.tensor(3, device="meta"))
    empty = decode_attention(q, k[:, :, :0], v[:, :, :0], q_offset=0)  # an empty cache: nothing to attend to
    assert empty.shape == q.shape and not empty.any()


@pytest.mark.skipif(not CUDA, reason="realistic shapes only compiled on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,D", [(1, 32, 8, 128), (32, 32, 8, 128), (4, 32, 32, 128), (3, 40, 8, 128)])
def test_decode_realistic_cuda(B, Hq, Hkv, D, dtype):
    Tmax = 3072
    q, k, v = make_step(B, Hq, Hkv, Tmax, D, dtype)
    offset = torch.randint(0, Tmax, (B,), device=DEVICE)
    check(q, k, v, q_offset=offset)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_decode_cuda_graph_replay():
    """The grid does not depend on q_offset's value: capture once, replay at other lengths."""
    q, k, v = make_step(2, 32, 8, 1024, 128, torch.bfloat16)
    offset = torch.tensor([10, 20], device=DEVICE)
    decode_attention(q, k, v, q_offset=offset)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, q_offset=offset)
    for new in ([10, 20], [500, 3], [1023, 700]):
        offset.copy_(torch.tensor(new))
        graph.replay()
        ref = decode_attention_reference(q.float(), k.float(), v.float(), q_offset=offset)
        torch.testing.assert_close(out.float(), ref, **TOL[torch.bfloat16])


# ---------------------------------------------------------------- rope_decode_attention


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "Hq,Hkv,Tmax,D,cache_pos,window,padded",
    [
        (6, 3, 129, 64, 100, None, "pad"),  # GQA, a left-padded row (its positions lag the slot)
        (6, 3, 129, 40, 0, None, "none"),  # the first token; D not a power of two
        (4, 4, 65, 128, 64, 9, "none"),  # the last slot, a sliding window
        (8, 1, 97, 64, 31, None, "pad"),  # MQA; slot 31 ends an interpreter split of 32 keys
        (8, 1, 97, 64, 32, 5, "hide_new"),  # slot 32 starts the next one; row 1 masks the new key
    ],
)
def test_rope_decode_attention_matches_the_two_kernels(Hq, Hkv, Tmax, D, cache_pos, window, padded, dtype):
    """One launch against rope_kv_write's and decode_attention's references in turn: the output,
    and the caches (the rotated k and the v at cache_pos, every other slot untouched)."""
    from llava_next.kernels import rope_decode_attention, rope_decode_attention_reference

    B = 2
    q, k, v = qkv_views(B, 1, Hq, Hkv, D, dtype, seed=1)  # the new token's projections
    _, k_cache, v_cache = make_step(B, Hq, Hkv, Tmax, D, dtype)  # random: stale slots must stay unread
    kv_mask = torch.ones(B, Tmax, dtype=torch.bool, device=DEVICE)
    pad = 7 if padded == "pad" else 0
    kv_mask[1, :pad] = False
    if padded == "hide_new":  # kv_mask hides the token itself from row 1, as decode_attention would
        kv_mask[1, cache_pos] = False
    position_ids = torch.tensor([[cache_pos + 3000], [max(cache_pos - pad, 0)]], device=DEVICE)
    kw = dict(kv_mask=kv_mask, sliding_window=window)
    caches = (k_cache.clone(), v_cache.clone())
    slot = cache_pos if cache_pos % 2 else torch.tensor(cache_pos, device=DEVICE)  # the int and tensor forms
    out = rope_decode_attention(q, k, v, position_ids, inv_freq(D), *caches, slot, **kw)
    ref_caches = (k_cache.float(), v_cache.float())
    ref = rope_decode_attention_reference(q.float(), k.float(), v.float(), position_ids, inv_freq(D), *ref_caches,
                                          cache_pos, **kw)
    assert out.shape == (B, Hq, 1, D)
    assert_matches_reference(out, ref, q.transpose(1, 2))
    torch.testing.assert_close(caches[0].float(), ref_caches[0], **TOL[dtype])
    torch.testing.assert_close(caches[1].float(), ref_caches[1], atol=0, rtol=0)


def test_rope_decode_attention_errors():
    from llava_next.kernels import rope_decode_attention

    q, k, v = qkv_views(1, 1, 4, 2, 64, torch.float32, seed=1)
    cache = torch.zeros(1, 2, 8, 64, device=DEVICE)
    pos = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    inv = torch.ones(32, device=DEVICE)
    with pytest.raises(ValueError, match="overflows the cache of length 8"):
        rope_decode_attention(q, k, v, pos, inv, cache, cache.clone(), 8)
    with pytest.raises(ValueError, match="inv_freq"):
        rope_decode_attention(q, k, v, pos, inv[:16], cache, cache.clone(), 0)
    with pytest.raises(ValueError, match=r"\(B, 1, Hq, D\)"):
        rope_decode_attention(q.expand(1, 2, 4, 64), k, v, pos, inv, cache, cache.clone(), 0)
    with pytest.raises(ValueError, match="fewer than the cache's 8"):  # a split config leaving slots uncovered
        rope_decode_attention(q, k, v, pos, inv, cache, cache.clone(), 7,
                              config=dict(BLOCK_N=16, SPLIT_LEN=3, NUM_SPLITS=2, num_warps=4, num_stages=1))
