"""Where the time goes on a GPU: one prefill and one decode step, by kernel family.

Random weights at a llava-hf checkpoint's shapes (bench.py's presets). For the vision tower, the
language-model prefill and one decode step at batch 1 it prints the wall time, the summed GPU
time of the kernels (from torch.profiler) grouped by family (GEMM, attention, the small fused
kernels, other), and the gap between them: a gap near the wall time means the GPU waited on
Python. The decode step is also timed as bench.py runs it, a CUDA-graph replay, so
"graph replay - kernel sum" is what the kernels' ramp-up and the gaps between them cost.
The model's projections are fused (`fuse_projections`, as generate() does on CUDA).
The decode step runs the cuBLAS products (`enable_decode_kernels(False)`); --decode-kernels
profiles it a second time with `enable_decode_kernels()`. Then it
times what the fusion buys in isolation: q/k/v and gate/up as one matrix-vector product against
three and two, at batch 1.

    python scripts/profile_step.py                    # mistral-7b shapes, bf16
    python scripts/profile_step.py --decode-kernels   # and the decode step with decode_linear
    python scripts/profile_step.py --preset vicuna-7b
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as e2e  # noqa: E402  (scripts/bench.py: presets, random-weight model, inputs)

from llava_next.generation import GraphedDecode, decode_one_token, prefill  # noqa: E402
from llava_next.kv_cache import KVCache  # noqa: E402

FAMILIES = [  # first match wins; names of cuBLAS/cuDNN kernels vary by version and card
    ("gemm", r"gemm|gemv|cutlass|nvjet|sm90_xmma|sm80_xmma|ampere|hopper|cublas|splitK"),
    ("flash_attn (ours)", r"_attn_fwd"),
    ("decode_linear (ours)", r"_decode_linear"),
    ("decode_attn (ours)", r"_decode_"),
    ("rope_kv_write (ours)", r"_rope_kv_write"),
    ("rms_norm (ours)", r"_rms_norm"),
    ("silu_mul (ours)", r"_silu_mul"),
    ("quick_gelu (ours)", r"_quick_gelu"),
    ("sdpa (torch)", r"flash|fmha|attention|softmax"),
    ("layer/rms norm (torch)", r"norm"),
    ("elementwise/copy (torch)", r"elementwise|vectorized|unrolled|copy|fill|reduce|cat|index|gather|arange"),
]


def family(name: str) -> str:
    for fam, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return fam
    return "other"


def kernel_times(fn, runs: int = 3):
    """(wall ms per run, {family: GPU ms per run}, [(kernel, ms per run)] top 8) for fn()."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(runs):
            fn()
        end.record()
        torch.cuda.synchronize()
    wall = start.elapsed_time(end) / runs
    fams, kernels = defaultdict(float), defaultdict(float)
    for ev in prof.events():
        if getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        ms = ev.time_range.elapsed_us() / 1e3 / runs
        fams[family(ev.name)] += ms
        kernels[ev.name] += ms
    if not kernels:  # this torch files kernels differently: show its own table instead
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
    return wall, dict(fams), top


def report(title, wall, fams, top, extra=""):
    busy = sum(fams.values())
    print(f"\n{title}: wall {wall:.3f} ms, kernels {busy:.3f} ms, GPU idle {max(0.0, wall - busy):.3f} ms{extra}")
    for fam, ms in sorted(fams.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:<26}{ms:9.3f} ms  {100 * ms / busy:5.1f}%")
    print("  top kernels:")
    for name, ms in top:
        print(f"    {ms:8.3f} ms  {name[:110]}")


def graph_ms(fn) -> float:
    """ms per fn() as a CUDA-graph replay of back-to-back calls (median), as bench_kernels.py times."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")


def fusion_gains(cfg, dtype):
    """Matrix-vector products at batch 1 as the decoder does them, separate against fused."""
    tc = cfg["text_config"]
    C, I = tc["hidden_size"], tc["intermediate_size"]
    Dq = tc["num_attention_heads"] * (C // tc["num_attention_heads"])
    Dkv = tc["num_key_value_heads"] * (C // tc["num_attention_heads"])
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    print("\nbatch-1 projections, separate vs fused (graph replay, weights rotated past the L2):")
    for name, outs in (("q, k, v", [Dq, Dkv, Dkv]), ("gate, up", [I, I]), ("o", [C]), ("down", None)):
        shapes = [(n, C) for n in outs] if outs else [(C, I)]
        nbytes = sum(n * k for n, k in shapes) * 2
        sets = max(2, -(-4 * l2 // nbytes))
        x = torch.randn(1, shapes[0][1], device="cuda", dtype=dtype)
        sep = itertools.cycle([[torch.randn(*s, device="cuda", dtype=dtype) for s in shapes] for _ in range(sets)])
        fused = itertools.cycle([torch.randn(sum(n for n, _ in shapes), shapes[0][1], device="cuda", dtype=dtype)
                                 for _ in range(sets)])
        t_sep = graph_ms(lambda: [torch.nn.functional.linear(x, w) for w in next(sep)])
        t_fused = graph_ms(lambda: torch.nn.functional.linear(x, next(fused)))
        print(f"  {name:<9} {nbytes / 2**20:7.1f} MiB  separate {t_sep * 1e3:7.1f} us ({nbytes / t_sep / 1e6:5.0f} GB/s)"
              f"  fused {t_fused * 1e3:7.1f} us ({nbytes / t_fused / 1e6:5.0f} GB/s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mistral-7b", choices=[p for p in e2e.PRESETS if p != "tiny"])
    ap.add_argument("--context", type=int, default=None, help="decode at this cache length (default: the prompt's)")
    ap.add_argument("--decode-kernels", action="store_true",
                    help="then profile the decode step again with model.enable_decode_kernels()")
    ap.add_argument("--pdl", action="store_true",
                    help="then once more with programmatic dependent launch (kernels/pdl.py)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_step.py needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    cfg = e2e.config_for(args.preset)
    model = e2e.build_ours(cfg, device, dtype, None).fuse_projections()  # as generate() runs it on CUDA
    image = tuple(e2e.PRESETS[args.preset].get("image", (672, 672)))
    one = e2e.inputs_for(cfg, image, 30, 1, device, dtype)
    T = one["input_ids"].shape[1]
    print(f"{args.preset}, {dtype}, {torch.cuda.get_device_name()}, prompt {T} tokens, attention "
          f"{model.attn_implementation}")

    tiles = one["pixel_values"][0]
    with torch.no_grad():
        section(lambda: report("vision tower (one image's tiles)", *kernel_times(lambda: model.vision_tower(tiles))))
    cache = KVCache.for_model(model, 1, T + 64)

    def run_prefill():
        cache.reset()
        prefill(model, one["input_ids"], one["attention_mask"], one["pixel_values"], one["image_sizes"], cache)

    section(lambda: report("prefill (vision + projector + language model)", *kernel_times(run_prefill)))
    section(lambda: decode_step(model.enable_decode_kernels(False), one, T, args.context))
    if args.decode_kernels:
        section(lambda: decode_step(model.enable_decode_kernels(), one, T, args.context, "decode_linear kernels"))
    if args.pdl:  # on the last variant's path; a kernel's time now includes its wait for the one before
        pdl = sys.modules["llava_next.kernels.pdl"]
        pdl.USE_PDL = True
        variant = "decode_linear kernels" if args.decode_kernels else "cuBLAS products"
        if not pdl.pdl_active(device):
            variant += " (PDL needs compute capability 9.0: this pass runs without it)"
        section(lambda: decode_step(model, one, T, args.context, variant + " + PDL (kernel times include the waits)"))
    section(lambda: fusion_gains(cfg, dtype))


def section(fn):
    """Run one part of the report; a failure is printed and the next part still runs."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        print(f"(section failed: {type(e).__name__}: {e})")
        torch.cuda.synchronize()


def decode_step(model, one, T, context, variant="cuBLAS products"):
    device = model.device
    ctx = context or T
    graphed = GraphedDecode(model, 1, ctx + 64)
    cache = graphed.cache  # the prompt's K/V in it, so the step reads real values
    prefill(model, one["input_ids"], one["attention_mask"], one["pixel_values"], one["image_sizes"], cache)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.tensor(ctx, device=device)
    wall, fams, top = kernel_times(lambda: decode_one_token(model, token, cache, pos), runs=5)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graphed(token, pos)
    start.record()
    for _ in range(50):
        graphed(token, pos)
    end.record()
    torch.cuda.synchronize()
    replay = start.elapsed_time(end) / 50
    nbytes = e2e.decode_bytes(model, 1, int(pos) + 1)
    report(f"decode step, batch 1, {variant}, eager", wall, fams, top,
           extra=f"\n  as a CUDA-graph replay: {replay:.3f} ms ({nbytes / replay / 1e6:.0f} GB/s of "
                 f"{nbytes / 2**30:.2f} GiB); graph replay - kernel sum = {replay - sum(fams.values()):.3f} ms")


if __name__ == "__main__":
    main()
