"""Benchmark the Triton kernels against torch SDPA / the eager references on the same inputs.

    python scripts/bench_kernels.py                  # on a GPU, bf16
    python scripts/bench_kernels.py --sweep          # also try alternative tile configs
    python scripts/bench_kernels.py --json out.json  # keep the numbers
    python scripts/bench_kernels.py --device cpu     # seconds-long smoke run (Triton interpreter)

On a GPU every call is timed as a CUDA-graph replay of back-to-back calls (a decode-sized
kernel runs in less time than Python takes to launch it, and generation replays them from a
graph), over enough copies of the inputs to defeat the L2 cache. Attention is reported in
TFLOP/s (causal counts half the square), everything else in GB/s of the minimal bytes each op
must move (decode: the valid K/V cache once). ratio = baseline time / our time, so > 1 means
the kernel wins.
"""

import argparse
import itertools
import json
import os
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--sweep", action="store_true", help="also time alternative tile configs (GPU)")
    return p.parse_args()


args = parse_args()
if args.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from llava_next.kernels import (  # noqa: E402
    decode_attention,
    decode_linear,
    flash_attention,
    quick_gelu,
    rms_norm,
    rms_norm_reference,
    rope_decode_attention,
    rope_kv_write,
    rope_kv_write_reference,
    silu_mul,
)
from llava_next.kernels.decode_attention import _decode_config  # noqa: E402
from llava_next.kernels.decode_linear import _config as _linear_config  # noqa: E402

dl = sys.modules["llava_next.kernels.decode_linear"]
from llava_next.kernels.flash_attention import _flash_attention_forward  # noqa: E402
from bench import spec_bandwidth  # noqa: E402  (scripts/bench.py)

GPU = args.device == "cuda"
DEV = args.device
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
if not GPU:
    DTYPE = torch.float16  # the interpreter gets bf16 wrong
ELEM = DTYPE.itemsize  # bytes per element
ROWS = []
EAGER_FALLBACKS = []  # timings whose graph capture failed: eager do_bench, launch time included
_FALLBACKS_SEEN = 0


def bench(fn, graph=True, rep=40):
    """Milliseconds per call. On a GPU: the calls are captured back to back in a CUDA graph and
    replayed (triton's do_bench_cudagraph, median), since a decode-sized kernel finishes in less
    time than Python takes to launch it and generation replays them from a graph anyway;
    graph=False (or a capture that fails) times eager calls with do_bench. On CPU: one timed call."""
    if GPU:
        import triton.testing

        if graph:
            try:
                return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
            except Exception as e:  # noqa: BLE001 - report and fall back rather than lose the row
                torch.cuda.synchronize()
                print(f"  (graph capture failed, {type(e).__name__}: {e}; timing eager calls)")
                EAGER_FALLBACKS.append(f"{type(e).__name__}: {e}")
        return triton.testing.do_bench(fn, warmup=25, rep=4 * rep, return_mode="median")
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def input_sets(make, nbytes):
    """Enough copies of an op's inputs that one pass over them is 4x the L2 cache, cycled call by
    call: repeated calls on one small buffer would time the cache, not device memory (in the
    model every layer reads its own weights and cache)."""
    if not GPU:
        return itertools.cycle([make()])
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    n = max(1, min(64, -(-4 * l2 // max(1, nbytes))))
    return itertools.cycle([make() for _ in range(n)])


def row(kernel, shape, unit, work, ours, base_name, base, note=""):
    """work: FLOPs (unit TFLOP/s) or bytes (unit GB/s). A row whose timings fell back to eager
    calls since the previous row says so in its note."""
    global _FALLBACKS_SEEN
    if len(EAGER_FALLBACKS) > _FALLBACKS_SEEN:
        note = f"eager timing (graph capture failed); {note}".rstrip("; ")
        _FALLBACKS_SEEN = len(EAGER_FALLBACKS)
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    r = dict(kernel=kernel, shape=shape, unit=unit, ours_ms=ours, ours=work / (ours * 1e-3) / scale,
             baseline=base_name, base_ms=base, base=work / (base * 1e-3) / scale if base else None,
             ratio=base / ours if base else None, note=note)
    ROWS.append(r)
    return r


def print_table():
    head = f"{'kernel':<16}{'shape':<34}{'ours ms':>9}{'ours':>10}  {'unit':<8}{'baseline':<18}{'base ms':>9}{'base':>10}{'ratio':>7}  note"
    print(head)
    print("-" * len(head))
    for r in ROWS:
        base = f"{r['base']:10.4g}" if r["base"] is not None else f"{'-':>10}"
        base_ms = f"{r['base_ms']:9.3f}" if r["base_ms"] is not None else f"{'-':>9}"
        ratio = f"{r['ratio']:7.2f}" if r["ratio"] is not None else f"{'-':>7}"
        print(f"{r['kernel']:<16}{r['shape']:<34}{r['ours_ms']:9.3f}{r['ours']:10.4g}  {r['unit']:<8}"
              f"{r['baseline']:<18}{base_ms}{base}{ratio}  {r['note']}")


def attention_work(B, Hq, Hkv, T, D, causal):
    """(forward FLOPs, shape label) of one attention benchmark; causal counts half the square."""
    return 4 * B * Hq * T * T * D * (0.5 if causal else 1.0), f"B{B} H{Hq}/{Hkv} T{T} D{D} {'causal' if causal else 'full'}"


def attention_case(B, Hq, Hkv, T, D, causal):
    """(input sets, forward FLOPs, shape label) of one attention benchmark."""
    sets = input_sets(lambda: tuple(torch.randn(B, H, T, D, device=DEV, dtype=DTYPE) for H in (Hq, Hkv, Hkv)),
                      (Hq + 2 * Hkv) * B * T * D * ELEM)
    return (sets, *attention_work(B, Hq, Hkv, T, D, causal))


# The flash forward's tiles before the sixth session's sweep (bench/NOTES.md), kept as a row of the
# table so a later run shows both on its card.
OLD_FLASH_TILE = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def bench_attention(name, B, Hq, Hkv, T, D, causal, use_tma=None, config=None, note=""):
    """The flash forward against SDPA. use_tma / config None: the kernel's defaults."""
    sets, flops, shape = attention_case(B, Hq, Hkv, T, D, causal)
    ours = bench(lambda: _flash_attention_forward(*next(sets), causal, use_tma=use_tma, config=config)[0])
    base = None
    if GPU:
        sdpa = sdpa_gqa(*next(sets), causal)  # checks once whether this torch shares kv heads natively
        base = bench(lambda: sdpa(*next(sets)))
    row(name, shape, "TFLOP/s", flops, ours, "torch SDPA" if GPU else "-", base, note)


def sweep_attention(name, B, Hq, Hkv, T, D, causal):
    """Alternative tile configs for the flash forward kernel, printed as they come."""
    sets, flops, shape = attention_case(B, Hq, Hkv, T, D, causal)
    best = None
    tiles = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3),
             (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 128, 4, 3), (64, 32, 4, 4),
             (128, 32, 4, 4), (128, 64, 4, 3)]
    tma = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4),
           (64, 128, 4, 3)]  # 64-row tiles: two independent CTAs an SM (see bench/NOTES.md, fourth session)
    for (bm, bn, w, s), use_tma in [(t, False) for t in tiles] + [(t, True) for t in tma]:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
        try:
            ms = bench(lambda: _flash_attention_forward(*next(sets), causal, config=cfg, use_tma=use_tma), rep=20)
        except Exception as e:  # e.g. out of shared memory for this tile
            print(f"  sweep {name} {cfg}{' TMA' if use_tma else ''}: failed ({type(e).__name__})")
            continue
        tf = flops / (ms * 1e-3) / 1e12
        print(f"  sweep {name} {shape} BM{bm} BN{bn} w{w} s{s}{' TMA' if use_tma else ''}: {ms:.3f} ms {tf:.1f} TFLOP/s")
        best = max(best or (0, None), (tf, dict(cfg, TMA=use_tma)), key=lambda x: x[0])
    if best and best[1]:
        print(f"  sweep {name} {shape} best: {best[1]} {best[0]:.1f} TFLOP/s")


def sdpa_gqa(q, k, v, causal, mask=None):
    """A function (q, k, v) -> torch SDPA, sharing kv heads natively when this torch can (checked
    once here); otherwise the kv heads are expanded inside the timed call."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    try:
        F.scaled_dot_product_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], attn_mask=None, enable_gqa=True)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                              enable_gqa=True)
    except (TypeError, RuntimeError):
        return lambda q, k, v: F.scaled_dot_product_attention(
            q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, is_causal=causal)


def bench_attention_backward(name, B, Hq, Hkv, T, D, causal):
    """Backward alone: dq, dk, dv from a saved forward (2.5x the forward FLOPs). Timed eagerly:
    at ~1 ms a call, launch overhead does not matter."""
    q, k, v = (torch.randn(B, H, T, D, device=DEV, dtype=DTYPE, requires_grad=True) for H in (Hq, Hkv, Hkv))
    dout = torch.randn(B, Hq, T, D, device=DEV, dtype=DTYPE)
    fwd_flops, shape = attention_work(B, Hq, Hkv, T, D, causal)
    flops = 2.5 * fwd_flops
    out = flash_attention(q, k, v, causal=causal)
    ours = bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), graph=False)
    base = None
    if GPU:
        ref = sdpa_gqa(q, k, v, causal)(q, k, v)
        base = bench(lambda: torch.autograd.grad(ref, (q, k, v), dout, retain_graph=True), graph=False)
    row(name, shape, "TFLOP/s", flops, ours, "torch SDPA bwd" if GPU else "-", base)


def decode_bytes(B, Hq, Hkv, L, D):
    """What one decode-attention step must move: the valid K and V once, q in, the output out."""
    return 2 * B * Hkv * L * D * ELEM + 2 * B * Hq * D * ELEM


def bench_decode(B, Hq, Hkv, L, Tmax, D):
    nbytes = decode_bytes(B, Hq, Hkv, L, D)

    def make():
        q = torch.randn(B, Hq, 1, D, device=DEV, dtype=DTYPE)
        k_cache = torch.randn(B, Hkv, Tmax, D, device=DEV, dtype=DTYPE)
        v_cache = torch.randn(B, Hkv, Tmax, D, device=DEV, dtype=DTYPE)
        return q, k_cache, v_cache

    sets = input_sets(make, 2 * B * Hkv * Tmax * D * ELEM)
    offset = torch.full((B,), L - 1, device=DEV, dtype=torch.int64)
    ours = bench(lambda: decode_attention(*next(sets), q_offset=offset))
    base = None
    if GPU:  # SDPA over the valid slice of the cache (the most favourable baseline)
        sdpa = sdpa_gqa(*next(sets), False)
        base = bench(lambda: (lambda q, k, v: sdpa(q, k[:, :, :L], v[:, :, :L]))(*next(sets)))
    cfg = _decode_config(B, Hkv, Tmax, DTYPE, torch.device(DEV))
    note = f"splits={cfg['NUM_SPLITS']}x{cfg['SPLIT_LEN']}"
    if GPU:
        peak = peak_bandwidth_gbs()
        if peak:
            note += f", {100 * nbytes / (ours * 1e-3) / 1e9 / peak:.0f}% of {peak / 1e3:.2f} TB/s"
    row("decode_attn", f"B{B} H{Hq}/{Hkv} L{L}/{Tmax} D{D}", "GB/s", nbytes, ours,
        "SDPA on cache" if GPU else "-", base, note)


def sweep_decode(B, Hq, Hkv, L, Tmax, D):
    """Alternative tiles and split counts for decode attention."""
    nbytes = decode_bytes(B, Hq, Hkv, L, D)
    sets = input_sets(lambda: (torch.randn(B, Hq, 1, D, device=DEV, dtype=DTYPE),
                               *(torch.randn(B, Hkv, Tmax, D, device=DEV, dtype=DTYPE) for _ in range(2))),
                      2 * B * Hkv * Tmax * D * ELEM)
    offset = torch.full((B,), L - 1, device=DEV, dtype=torch.int64)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for block_n, warps, stages, mult in [(64, 4, 3, 4), (32, 4, 4, 4), (64, 4, 4, 8), (128, 8, 3, 4),
                                         (64, 4, 3, 2), (64, 4, 3, 1), (64, 8, 3, 4)]:
        splits = max(1, min(-(-mult * sms // (B * Hkv)), -(-Tmax // (2 * block_n))))
        split_len = -(-(-(-Tmax // splits)) // block_n) * block_n
        cfg = dict(BLOCK_N=block_n, SPLIT_LEN=split_len, NUM_SPLITS=-(-Tmax // split_len),
                   num_warps=warps, num_stages=stages)
        try:
            ms = bench(lambda: decode_attention(*next(sets), q_offset=offset, config=cfg), rep=20)
        except Exception as e:
            print(f"  sweep decode B{B} {cfg}: failed ({type(e).__name__})")
            continue
        print(f"  sweep decode B{B} H{Hq}/{Hkv} BN{block_n} w{warps} s{stages} splits{cfg['NUM_SPLITS']}: "
              f"{ms * 1e3:.1f} us {nbytes / (ms * 1e-3) / 1e9:.0f} GB/s")


def bench_rope_decode(B, Hq, Hkv, L, Tmax, D):
    """rope_decode_attention against what the model runs without it: rope_kv_write, then
    decode_attention. Bytes as for decode attention (the valid cache once)."""
    nbytes = decode_bytes(B, Hq, Hkv, L, D)

    def make():
        qkv = torch.randn(B, 1, (Hq + 2 * Hkv) * D, device=DEV, dtype=DTYPE)
        q, k, v = (t.view(B, 1, -1, D) for t in qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1))
        return q, k, v, *(torch.randn(B, Hkv, Tmax, D, device=DEV, dtype=DTYPE) for _ in range(2))

    sets = input_sets(make, 2 * B * Hkv * Tmax * D * ELEM)
    pos_ids = torch.full((B, 1), L - 1, device=DEV, dtype=torch.int64)
    slot = torch.tensor(L - 1, device=DEV)
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D)

    kv_mask = torch.ones(B, Tmax, device=DEV, dtype=torch.bool)  # the model always passes the cache's

    def two_kernels(q, k, v, kc, vc):
        q_rot = rope_kv_write(q, k, v, pos_ids, inv, kc, vc, slot)
        return decode_attention(q_rot, kc, vc, q_offset=slot, kv_mask=kv_mask)

    def fused(q, k, v, kc, vc):
        return rope_decode_attention(q, k, v, pos_ids, inv, kc, vc, slot, kv_mask=kv_mask)

    ours = bench(lambda: fused(*next(sets)))
    base = bench(lambda: two_kernels(*next(sets)))
    row("rope_decode", f"B{B} H{Hq}/{Hkv} L{L}/{Tmax} D{D}", "GB/s", nbytes, ours,
        "rope_kv_write+decode" if GPU else "-", base, "2 launches (split, reduce) instead of 3")


def peak_bandwidth_gbs():
    spec = spec_bandwidth(torch.cuda.get_device_name())
    return spec / 1e9 if spec else None


def bench_rope(B, T, Hq, Hkv, D, Tmax):
    nbytes = 2 * B * T * (Hq + 2 * Hkv) * D * ELEM

    def make():
        qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=DEV, dtype=DTYPE)
        q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        k_cache = torch.zeros(B, Hkv, Tmax, D, device=DEV, dtype=DTYPE)
        return q.view(B, T, Hq, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D), k_cache, torch.zeros_like(k_cache)

    sets = input_sets(make, nbytes)
    pos = torch.arange(T, device=DEV)[None].expand(B, T) + 100
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D)
    pos_t = torch.tensor(7, device=DEV)
    ours = bench(lambda: (lambda q, k, v, kc, vc: rope_kv_write(q, k, v, pos, inv, kc, vc, pos_t))(*next(sets)))
    base = bench(lambda: (lambda q, k, v, kc, vc: rope_kv_write_reference(q, k, v, pos, inv, kc, vc, 7))(*next(sets)))
    row("rope_kv_write", f"B{B} T{T} H{Hq}/{Hkv} D{D}", "GB/s", nbytes, ours, "eager reference", base)


def bench_rms_norm(M, N):
    nbytes = 2 * M * N * ELEM + N * ELEM
    sets = input_sets(lambda: (torch.randn(M, N, device=DEV, dtype=DTYPE), torch.randn(N, device=DEV, dtype=DTYPE)),
                      nbytes)
    ours = bench(lambda: rms_norm(*next(sets), 1e-5))
    base = bench(lambda: rms_norm_reference(*next(sets), 1e-5))
    row("rms_norm", f"{M}x{N}", "GB/s", nbytes, ours, "eager reference", base)


def bench_silu_mul(M, N):
    nbytes = 3 * M * N * ELEM
    sets = input_sets(lambda: torch.randn(M, 2 * N, device=DEV, dtype=DTYPE).chunk(2, dim=-1), nbytes)
    ours = bench(lambda: silu_mul(*next(sets)))
    base = bench(lambda: (lambda gate, up: F.silu(gate) * up)(*next(sets)))
    row("silu_mul", f"{M}x{N}", "GB/s", nbytes, ours, "eager silu*up", base)


def bench_quick_gelu(M, N):
    nbytes = 2 * M * N * ELEM
    sets = input_sets(lambda: (torch.randn(M, N, device=DEV, dtype=DTYPE),), nbytes)
    ours = bench(lambda: quick_gelu(*next(sets)))
    base = bench(lambda: (lambda h: h * torch.sigmoid(1.702 * h))(*next(sets)))
    row("quick_gelu", f"{M}x{N}", "GB/s", nbytes, ours, "eager h*sigmoid(1.702h)", base)


def _linear_inputs(M, N, K, gated):
    rows = 2 * N if gated else N
    nbytes = rows * K * ELEM + M * K * ELEM + 2 * M * N * ELEM  # the weight once, x in, y out (+ residual)

    def make():
        return (torch.randn(M, K, device=DEV, dtype=DTYPE), torch.randn(rows, K, device=DEV, dtype=DTYPE) * K ** -0.5,
                torch.randn(M, N, device=DEV, dtype=DTYPE))

    return nbytes, input_sets(make, nbytes)


def bench_decode_linear(name, M, N, K, gated=False, residual=False):
    """decode_linear against what the model runs without it: the cuBLAS product (F.linear), then
    the SiLU-mul kernel when gated, then the residual add."""
    nbytes, sets = _linear_inputs(M, N, K, gated)

    def ours(x, w, r):
        return decode_linear(x, w, residual=r if residual else None, gated=gated)

    def unfused(x, w, r):
        y = F.linear(x, w)
        if gated:
            y = silu_mul(*y.chunk(2, dim=-1))
        return r + y if residual else y

    ms = bench(lambda: ours(*next(sets)))
    base = bench(lambda: unfused(*next(sets)))
    if GPU and dl.AUTOTUNE:  # the tile the autotuner kept for this shape (the last one launched)
        best = dl._tuned_kernel.best_config
        note = f"autotuned BN{best.kwargs['BLOCK_N']} BK{best.kwargs['BLOCK_K']} w{best.num_warps} s{best.num_stages}"
    else:
        cfg = _linear_config(M, N, K, gated, DTYPE, torch.device(DEV))
        note = f"BN{cfg['BLOCK_N']} BK{cfg['BLOCK_K']} s{cfg['num_stages']}"
    if GPU and peak_bandwidth_gbs():
        note += f", {100 * nbytes / (ms * 1e-3) / 1e9 / peak_bandwidth_gbs():.0f}% of spec"
    what = ("gated " if gated else "") + ("+res " if residual else "")
    row(name, f"M{M} N{N} K{K} {what}".rstrip(), "GB/s", nbytes, ms,
        "F.linear" + (" + silu_mul" if gated else "") + (" + add" if residual else "") if GPU else "unfused", base, note)


def sweep_decode_linear(name, M, N, K, gated=False, residual=False):
    nbytes, sets = _linear_inputs(M, N, K, gated)
    for bn, bk, w, st in [(16, 128, 4, 4), (16, 256, 4, 3), (16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3),
                          (16, 128, 4, 6), (64, 128, 4, 3), (16, 512, 4, 2), (32, 128, 8, 4),
                          (16, 128, 2, 4), (16, 256, 2, 4)]:  # 2 warps: no warp idles on a 16-wide tile
        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
        try:
            ms = bench(lambda: (lambda x, wt, r: decode_linear(x, wt, residual=r if residual else None, gated=gated,
                                                               config=cfg))(*next(sets)), rep=20)
        except Exception as e:
            print(f"  sweep {name} {cfg}: failed ({type(e).__name__})")
            continue
        print(f"  sweep {name} M{M} N{N} K{K} BN{bn} BK{bk} w{w} s{st}: {ms * 1e3:.1f} us "
              f"{nbytes / (ms * 1e-3) / 1e9:.0f} GB/s")


# mistral-7b's decoder products at decode, as decode_linear runs them in a layer
LINEAR_SHAPES = [("linear_qkv", 6144, 4096, False, False), ("linear_o", 4096, 4096, False, True),
                 ("linear_gate_up", 14336, 4096, True, False), ("linear_down", 4096, 14336, False, True)]


def main():
    if GPU and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for the interpreter smoke test")
    torch.manual_seed(0)
    if GPU:
        print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {DTYPE}")
        old = dict(use_tma=False, config=OLD_FLASH_TILE, note="before: 128x64 tiles, pointer loads")
        bench_attention("prefill_attn", 1, 32, 8, 3000, 128, True)
        bench_attention("prefill_attn", 1, 32, 8, 3000, 128, True, **old)
        bench_attention("prefill_attn", 1, 32, 32, 3000, 128, True)
        bench_attention("vision_attn", 5, 16, 16, 577, 64, False)
        bench_attention("vision_attn", 5, 16, 16, 577, 64, False, **old)
        bench_attention_backward("attn_backward", 1, 32, 8, 3000, 128, True)
        for B in (1, 8, 32):
            bench_decode(B, 32, 8, 3000, 3072, 128)
        bench_decode(32, 32, 32, 3000, 3072, 128)
        for B in (1, 8):
            bench_rope_decode(B, 32, 8, 3000, 3072, 128)
        bench_rope(1, 3000, 32, 8, 128, 4096)
        bench_rope(32, 1, 32, 8, 128, 4096)
        bench_rms_norm(3000, 4096)
        bench_rms_norm(32, 4096)
        bench_silu_mul(3000, 14336)
        bench_silu_mul(32, 14336)
        bench_quick_gelu(5 * 577, 4096)  # the vision tower's MLP, one 672x672 image's five tiles
        for M in (1, 8):
            for name, N, K, gated, residual in LINEAR_SHAPES:
                bench_decode_linear(name, M, N, K, gated, residual)
    else:  # interpreter smoke: tiny shapes, timings meaningless
        print(f"CPU smoke run under the Triton interpreter ({DTYPE}); times are not performance")
        bench_attention("prefill_attn", 1, 4, 2, 40, 64, True)
        bench_attention("prefill_attn", 1, 4, 2, 40, 64, True, use_tma=True, note="K/V by TMA")
        bench_attention("vision_attn", 1, 2, 2, 33, 40, False)
        bench_attention_backward("attn_backward", 1, 2, 1, 33, 40, True)
        bench_decode(2, 4, 2, 50, 64, 64)
        bench_rope_decode(2, 4, 2, 50, 64, 64)
        bench_rope(1, 5, 4, 2, 64, 16)
        bench_rms_norm(4, 256)
        bench_silu_mul(4, 256)
        bench_quick_gelu(4, 256)
        bench_decode_linear("linear_gate_up", 1, 48, 64, gated=True)
        bench_decode_linear("linear_down", 3, 64, 96, residual=True)
    print_table()
    if args.json:
        meta = dict(device=torch.cuda.get_device_name() if GPU else "cpu-interpreter", torch=torch.__version__,
                    dtype=str(DTYPE), timing="cuda-graph replay" if GPU else "one eager call",
                    eager_fallbacks=EAGER_FALLBACKS)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=ROWS), f, indent=1)
        print(f"wrote {args.json}", flush=True)
    if args.sweep and GPU:  # after the table, so a run cut short keeps it
        sweep_attention("prefill_attn", 1, 32, 8, 3000, 128, True)
        sweep_attention("vision_attn", 5, 16, 16, 577, 64, False)
        for B in (1, 8, 32):
            sweep_decode(B, 32, 8, 3000, 3072, 128)
        sweep_decode(32, 32, 32, 3000, 3072, 128)
        for name, N, K, gated, residual in LINEAR_SHAPES:
            sweep_decode_linear(name, 1, N, K, gated, residual)


if __name__ == "__main__":
    main()
