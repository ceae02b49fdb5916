"""End-to-end speed on one GPU: time to first token and decode speed, ours vs transformers.

Random weights at the real shapes of a llava-hf checkpoint (speed does not depend on the values);
both models get the same weights. Reports, for one 672x672 image plus a ~30-token question:
  - time to first token (TTFT), ours split into vision tower, projector and language-model prefill
  - decode ms/token at batch 1, 8, 32 (256 new tokens, eos disabled), as (t(N) - t(1)) / (N - 1)
  - peak GPU memory
  - decode as a percentage of the memory-bandwidth roofline: bytes one step must read (weights
    + the KV cache) over the spec bandwidth and over a measured device-to-device copy
and the same TTFT / decode numbers for transformers' LlavaNextForConditionalGeneration (sdpa) in
the same process. Prints a table and writes JSON (default bench/results/<card>-<date>-<preset>.json).
A batch size that does not fit in GPU memory is reported as "-" (e.g. vicuna at batch 32: its
full multi-head KV cache is ~56 GB for 7b).

    python scripts/bench.py                          # mistral-7b shapes, bf16, CUDA
    python scripts/bench.py --preset vicuna-13b --no-hf
    python scripts/bench.py --device cpu --preset tiny --new-tokens 8   # smoke mode (CI)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llava_next.anyres import num_image_tokens, num_tiles  # noqa: E402
from llava_next.config import DEFAULT_PINPOINTS, VISION_WHEN_ABSENT, LlavaNextConfig  # noqa: E402
from llava_next.generation import GraphedDecode, prefill  # noqa: E402
from llava_next.kv_cache import KVCache  # noqa: E402
from llava_next.loading import legacy_key  # noqa: E402
from llava_next.model import LlavaNextForConditionalGeneration  # noqa: E402

PINPOINTS = DEFAULT_PINPOINTS
VISION = VISION_WHEN_ABSENT  # CLIP ViT-L/14 at 336 px, the tower of every llava-hf checkpoint
# The architecture of each llava-hf checkpoint (REFERENCE.md's table).
PRESETS = {
    "mistral-7b": dict(text=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                 rope_theta=1e6, vocab_size=32064, sliding_window=None, max_position_embeddings=32768,
                                 rms_norm_eps=1e-5), image_token_index=32000),
    "vicuna-7b": dict(text=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, rope_theta=1e4, vocab_size=32064,
                                max_position_embeddings=4096, rms_norm_eps=1e-5), image_token_index=32000),
    "vicuna-13b": dict(text=dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, rope_theta=1e4, vocab_size=32064,
                                 max_position_embeddings=4096, rms_norm_eps=1e-5), image_token_index=32000),
    "34b": dict(text=dict(model_type="llama", hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
                          num_attention_heads=56, num_key_value_heads=8, rope_theta=5e6, vocab_size=64064,
                          max_position_embeddings=4096, rms_norm_eps=1e-5), image_token_index=64000),
    # CPU smoke test: the same code paths at toy sizes (28 px tiles of 14 px patches).
    "tiny": dict(text=dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, vocab_size=32064,
                           sliding_window=None, max_position_embeddings=4096, rms_norm_eps=1e-5),
                 vision=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                             num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=14),
                 pinpoints=[[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]], image=(56, 56),
                 image_token_index=32000),
}
# Datasheet memory bandwidth (bytes/s) by a piece of torch.cuda.get_device_name(), the more
# specific names first: an "NVIDIA H100 80GB HBM3" is the SXM card, the PCIe and NVL ones differ.
SPEC_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12),
                  ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40", 0.864e12))


def spec_bandwidth(card: str) -> float | None:
    """The datasheet bandwidth of the card named `card` in bytes/s, None for one not listed."""
    return next((bw for key, bw in SPEC_BANDWIDTH if key in card), None)


def config_for(preset: str) -> dict:
    p = PRESETS[preset]
    return dict(text_config=p["text"], vision_config=p.get("vision", VISION), image_token_index=p["image_token_index"],
                image_grid_pinpoints=p.get("pinpoints", PINPOINTS), vision_feature_layer=-2,
                vision_feature_select_strategy="default")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, runs: int, stat=statistics.median) -> float:
    """Median (or `stat`) wall time of fn() in seconds, synchronised around each run (after one warm-up)."""
    fn()
    times = []
    for _ in range(runs):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return stat(times)


def build_ours(cfg_dict, device, dtype, attn):
    config = LlavaNextConfig.from_dict(cfg_dict)
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config, attn_implementation=attn, device=device)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model.eval()


def build_hf(cfg_dict, ours, device, dtype):
    """transformers' model with our weights, copied by name."""
    from transformers import LlavaNextConfig as HFConfig
    from transformers import LlavaNextForConditionalGeneration as HF

    d = json.loads(json.dumps(cfg_dict))
    t = d["text_config"]
    t["rope_parameters"] = {"rope_type": "default", "rope_theta": t.pop("rope_theta")}
    config = HFConfig(**d)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        hf = HF._from_config(config, dtype=dtype, attn_implementation="sdpa")
    ours_state = ours.state_dict()
    with torch.no_grad():
        for k, v in hf.state_dict().items():
            v.copy_(ours_state[legacy_key(k)])
    return hf.eval()


def inputs_for(cfg_dict, image_hw, question_tokens: int, batch: int, device, dtype):
    vc = cfg_dict["vision_config"]
    S, patch = vc["image_size"], vc["patch_size"]
    pins = cfg_dict["image_grid_pinpoints"]
    n_img = num_image_tokens(image_hw, pins, S, patch)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(100, 20000, (question_tokens,), generator=g).tolist()
    row = [1] + text[:5] + [cfg_dict["image_token_index"]] * n_img + text[5:]
    ids = torch.tensor([row] * batch, device=device)
    tiles = num_tiles(image_hw, pins, S)
    pv = torch.randn(1, tiles, 3, S, S, generator=g).to(device, dtype).expand(batch, -1, -1, -1, -1).contiguous()
    sizes = torch.tensor([list(image_hw)] * batch)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_sizes=sizes)


def copy_bandwidth(device) -> float | None:
    """Measured device-to-device copy bandwidth, bytes read + written per second: the fastest of
    30 copies of 1 GiB. (The median of 10 read 2.54 TB/s in some processes and 2.96 in others
    on one H100 in one session: the roofline's denominator should be what the card can do.)"""
    if device.type != "cuda":
        return None
    a = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / timed(lambda: b.copy_(a), device, 30, stat=min)


def decode_bytes(model, batch: int, context: int) -> int:
    """Bytes one decode step must read: every language-model weight except the embedding table
    (of which only `batch` rows), plus the whole KV cache up to `context`."""
    lm = model.language_model
    emb = lm.model.embed_tokens.weight
    weights = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    weights += batch * emb.shape[1] * emb.element_size()
    tc = model.config.text_config
    kv = batch * context * tc.num_hidden_layers * 2 * tc.num_key_value_heads * tc.head_dim * emb.element_size()
    return weights + kv


def measure_ours(model, cfg_dict, args, device, dtype):
    res = {}
    fuse = dict(fuse_projections=args.fuse)
    one = inputs_for(cfg_dict, args.image, args.question_tokens, 1, device, dtype)
    T = one["input_ids"].shape[1]
    res["prompt_tokens"] = T
    tiles = one["pixel_values"][0]
    with torch.no_grad():
        feats = model.vision_tower(tiles)
        res["vision_ms"] = 1e3 * timed(lambda: model.vision_tower(tiles), device, args.runs)
        res["projector_ms"] = 1e3 * timed(lambda: model.multi_modal_projector(feats[:, 1:]), device, args.runs)
    cache = KVCache.for_model(model, 1, T + 1)

    def first_token():
        cache.reset()
        return prefill(model, one["input_ids"], one["attention_mask"], one["pixel_values"], one["image_sizes"],
                       cache).argmax(-1)

    res["prefill_ms"] = 1e3 * timed(first_token, device, args.runs)  # vision + projector + LM, no generate()
    res["lm_prefill_ms"] = res["prefill_ms"] - res["vision_ms"] - res["projector_ms"]
    # The comparable TTFT: a whole generate() call for one token, as for transformers.
    res["ttft_ms"] = 1e3 * timed(lambda: model.generate(**one, max_new_tokens=1, **fuse), device, args.runs)
    log(f"ours: TTFT {res['ttft_ms']:.1f} ms, prefill {res['prefill_ms']:.1f} ms (vision {res['vision_ms']:.1f}, "
        f"projector {res['projector_ms']:.2f})")
    try:
        res["generate_call"] = generate_call(model, one, args, device)
        log(f"ours: generate() as called: {describe_call(res['generate_call'])}")
    except Exception as e:  # keep the run's other numbers; say what broke
        res["generate_call"] = dict(error=f"{type(e).__name__}: {e}")
        log(f"ours: generate() as called failed ({type(e).__name__}: {e})")
        free_memory(device)
    res["decode_ms_per_token"] = {}
    for b in args.batches:
        inp = inputs_for(cfg_dict, args.image, args.question_tokens, b, device, dtype)
        res.setdefault("decode_bytes_per_step", {})[b] = decode_bytes(model, b, T + args.new_tokens // 2)
        use_graph = device.type == "cuda" and not args.no_graph
        try:
            res["decode_ms_per_token"][b] = decode_ms(model, inp, T, b, args, device, use_graph)
        except torch.cuda.OutOfMemoryError:
            res["decode_ms_per_token"][b] = None
        except Exception as e:  # keep the run's other numbers; say what broke and time eager decode instead
            if not use_graph:
                raise
            log(f"ours: CUDA-graph decode failed at batch {b} ({type(e).__name__}: {e}); timing eager decode")
            res.setdefault("graph_errors", {})[b] = f"{type(e).__name__}: {e}"
            free_memory(device)
            res["decode_ms_per_token"][b] = decode_ms(model, inp, T, b, args, device, False)
        inp = None
        free_memory(device)
        log(f"ours: batch {b} decode {res['decode_ms_per_token'][b]} ms/token")
    return res


def generate_call(model, one, args, device) -> dict:
    """ms per new token of `model.generate(**inputs, max_new_tokens=n)` as a user calls it: eager
    decode (cuda_graph=False), and cuda_graph=True (generate()'s default on CUDA with the Triton
    kernels since the sixth session's H100 run) with its warm-up and capture in every call."""
    n = max(2, min(64, args.new_tokens))
    out = dict(new_tokens=n, cuda_graph_ms_per_token=None)  # None off CUDA: cuda_graph=True decodes eagerly there
    for name, graph in (("eager", False), ("cuda_graph", True))[:2 if device.type == "cuda" else 1]:
        gen = lambda k: model.generate(**one, max_new_tokens=k, eos_token_id=[], cuda_graph=graph,  # noqa: E731
                                       fuse_projections=args.fuse)
        t1 = timed(lambda: gen(1), device, 1)
        tn = timed(lambda: gen(n), device, 1)
        out[f"{name}_ms_per_token"] = 1e3 * (tn - t1) / (n - 1)
    return out


def describe_call(call: dict) -> str:
    graph = call["cuda_graph_ms_per_token"]
    return (f"batch 1, {call['new_tokens']} new tokens: eager {call['eager_ms_per_token']:.2f} ms/token, "
            + (f"cuda_graph=True {graph:.2f} ms/token (its capture included)" if graph is not None
               else "cuda_graph=True not timed (no CUDA)"))


def decode_ms(model, inp, T, b, args, device, use_graph) -> float:
    """ms per new token at batch b: (t(N) - t(1)) / (N - 1), prefill cancelling out."""
    graph = GraphedDecode(model, b, T + args.new_tokens, fuse_projections=args.fuse) if use_graph else False
    gen = lambda n: model.generate(**inp, max_new_tokens=n, eos_token_id=[], cuda_graph=graph,  # noqa: E731
                                   fuse_projections=args.fuse)
    return 1e3 * decode_seconds(gen, args, device)


def decode_seconds(gen, args, device) -> float:
    """(t(N) - t(1)) / (N - 1) of gen(n), a generate() call for n new tokens. Each timing's own
    warm-up compiles and captures what it needs. Both get runs // 2 runs: t(1) is mostly the
    prefill (3.5 s for transformers at batch 32), whose spread over N - 1 = 255 tokens is
    negligible; more runs there cost the GPU session ~20 s at batch 32."""
    runs = max(1, args.runs // 2)
    t1 = timed(lambda: gen(1), device, runs)
    tn = timed(lambda: gen(args.new_tokens), device, runs)
    return (tn - t1) / (args.new_tokens - 1)


def set_kernel_experiments(args) -> dict:
    """Override the kernels' default tiles for this run (A/B of a sweep's lead end to end)."""
    import llava_next.kernels  # noqa: F401  (binds the submodules; their names are the functions')

    da = sys.modules["llava_next.kernels.decode_attention"]
    fa = sys.modules["llava_next.kernels.flash_attention"]

    done = {}
    if args.flash_tile:
        bm, bn, w, st = (int(v) for v in args.flash_tile.split(","))
        default = fa._fwd_config

        def tile(block_d, tq, dtype, device, tma=False):
            cfg = default(block_d, tq, dtype, device, tma)
            if device.type == "cuda" and dtype != torch.float32 and tq > 64 and block_d <= 128:
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
            return cfg

        fa._fwd_config = tile
        done["flash_tile"] = [bm, bn, w, st]
    if args.decode_programs_per_sm is not None:
        da.PROGRAMS_PER_SM = args.decode_programs_per_sm
        done["decode_programs_per_sm"] = args.decode_programs_per_sm
    if args.flash_tma is not None:  # default: None, where it pays (see flash_attention.USE_TMA)
        fa.USE_TMA = args.flash_tma
        done["flash_tma"] = args.flash_tma
    if args.pdl:
        pdl = sys.modules["llava_next.kernels.pdl"]
        pdl.USE_PDL = True
        device = torch.device(args.device)
        # what the kernels really get (no CUDA here: main() stops before any kernel runs)
        done["pdl"] = (device.type != "cuda" or torch.cuda.is_available()) and pdl.pdl_active(device)
    return done


def _version(package):
    from importlib.metadata import version

    return version(package)


def _git_commit():
    """The code measured: the checkout's commit (+"-dirty" with uncommitted changes), None without git."""
    import subprocess

    try:
        run = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        return run("rev-parse", "--short=7", "HEAD") + ("-dirty" if run("status", "--porcelain", "--untracked-files=no")
                                                        else "")
    except (OSError, subprocess.SubprocessError):
        return None


_T0 = time.perf_counter()


def log(msg):
    # progress, so a run cut short still leaves its numbers in the log; the seconds since the start
    # show where a GPU session's minutes go
    print(f"[{time.perf_counter() - _T0:5.0f}s] {msg}", flush=True)


def free_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_hf(hf, cfg_dict, args, device, dtype):
    res = {}
    one = inputs_for(cfg_dict, args.image, args.question_tokens, 1, device, dtype)
    kw = dict(do_sample=False)
    res["ttft_ms"] = 1e3 * timed(lambda: hf.generate(**one, max_new_tokens=1, **kw), device, args.runs)
    log(f"transformers: TTFT {res['ttft_ms']:.1f} ms")
    res["decode_ms_per_token"] = {}
    for b in args.batches:
        inp = inputs_for(cfg_dict, args.image, args.question_tokens, b, device, dtype)
        gen = lambda n: hf.generate(**inp, max_new_tokens=n, min_new_tokens=n, **kw)  # noqa: E731
        try:
            res["decode_ms_per_token"][b] = 1e3 * decode_seconds(gen, args, device)
        except torch.cuda.OutOfMemoryError:
            res["decode_ms_per_token"][b] = None
        inp = None
        free_memory(device)
        log(f"transformers: batch {b} decode {res['decode_ms_per_token'][b]} ms/token")
    return res


def tokens_agree(ours, hf, cfg_dict, args, device, dtype, n: int = 16) -> int:
    """How many of the first n greedy tokens ours and transformers' share (batch 1, same weights).
    Informational: in bf16 two correct implementations can part at a near-tie of random logits."""
    one = inputs_for(cfg_dict, args.image, args.question_tokens, 1, device, dtype)
    T = one["input_ids"].shape[1]
    a = ours.generate(**one, max_new_tokens=n, eos_token_id=[], fuse_projections=args.fuse)[0, -n:].tolist()
    b = hf.generate(**one, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, T:].tolist()
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mistral-7b", choices=list(PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--attn", default=None, help="our attention (default auto: the Triton kernels on CUDA, sdpa on CPU)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--question-tokens", type=int, default=30)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (e.g. when both do not fit)")
    ap.add_argument("--no-graph", action="store_true", help="decode without CUDA graph capture")
    ap.add_argument("--no-fuse", action="store_true",
                    help="keep q/k/v and gate/up as separate products (an A/B of fuse_projections)")
    ap.add_argument("--flash-tile", default=None, metavar="BM,BN,WARPS,STAGES",
                    help="experiment: this tile for fp16/bf16 flash attention instead of the default")
    ap.add_argument("--decode-programs-per-sm", type=float, default=None,
                    help="experiment: the decode-attention split target (default: the kernel's, 4)")
    ap.add_argument("--flash-tma", action=argparse.BooleanOptionalAction, default=None,
                    help="flash attention fetches K/V with the copy engine (TMA) everywhere it can / never "
                         "(default: where it pays, Hopper at head_dim 128; flash_attention.USE_TMA)")
    ap.add_argument("--decode-kernels", action=argparse.BooleanOptionalAction, default=None,
                    help="decode steps through the decode_linear kernels up to 64 rows / never (default: on "
                         "CUDA up to 8 rows; enable_decode_kernels)")
    ap.add_argument("--vision-graph", action="store_true",
                    help="experiment: the vision tower replays CUDA graphs (enable_vision_cuda_graphs)")
    ap.add_argument("--pdl", action="store_true",
                    help="experiment: the decode step's Triton kernels start early (programmatic dependent launch)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<card>-<date>-<preset>.json on CUDA)")
    args = ap.parse_args()
    if args.decode_kernels and args.no_fuse:
        ap.error("--decode-kernels runs on the fused projections: drop --no-fuse")
    experiments = set_kernel_experiments(args)
    args.image = tuple(PRESETS[args.preset].get("image", (672, 672)))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py: CUDA is not available; use --device cpu --preset tiny for the smoke mode")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cfg_dict = config_for(args.preset)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    t0 = time.perf_counter()
    ours = build_ours(cfg_dict, device, dtype, args.attn)
    args.fuse = device.type == "cuda" and not args.no_fuse  # what generate() does by default on CUDA
    if args.fuse:
        ours.fuse_projections()  # before any timing, so the vision/prefill split matches TTFT
    if args.decode_kernels is not None:
        ours.enable_decode_kernels(args.decode_kernels)
        experiments["decode_kernels"] = args.decode_kernels
    if args.vision_graph:
        ours.enable_vision_cuda_graphs()  # after fuse_projections, which would make the graphs stale
        experiments["vision_graph"] = True
    log(f"built ours ({args.preset}, {dtype}) on {card} in {time.perf_counter() - t0:.1f} s")
    r_ours = measure_ours(ours, cfg_dict, args, device, dtype)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    r_hf = None
    free_memory(device)
    if not args.no_hf:
        t0 = time.perf_counter()
        hf = build_hf(cfg_dict, ours, device, dtype)
        log(f"built transformers' model in {time.perf_counter() - t0:.1f} s")
        r_hf = measure_hf(hf, cfg_dict, args, device, dtype)
        r_hf["greedy_tokens_agree"] = tokens_agree(ours, hf, cfg_dict, args, device, dtype)
        log(f"leading greedy tokens equal to transformers' (of 16, batch 1): {r_hf['greedy_tokens_agree']}")
        del hf
    copy_bw = copy_bandwidth(device)
    spec = spec_bandwidth(card)

    result = dict(card=card, date=datetime.date.today().isoformat(), commit=_git_commit(), preset=args.preset,
                  dtype=str(dtype),
                  attn=ours.attn_implementation, cuda_graph=device.type == "cuda" and not args.no_graph,
                  fused_projections=args.fuse, kernel_experiments=experiments, image=list(args.image),
                  new_tokens=args.new_tokens,
                  torch=torch.__version__, transformers_version=None if args.no_hf else _version("transformers"),
                  ours=r_ours, transformers=r_hf, peak_gpu_memory_gib=peak,
                  copy_bandwidth_bytes_per_s=copy_bw, spec_bandwidth_bytes_per_s=spec)
    roof = {}
    for b, ms in r_ours["decode_ms_per_token"].items():
        if ms is None:
            roof[b] = dict(achieved_bytes_per_s=None, pct_of_spec=None, pct_of_copy=None)
            continue
        achieved = r_ours["decode_bytes_per_step"][b] / (ms / 1e3)
        roof[b] = dict(achieved_bytes_per_s=achieved, pct_of_spec=100 * achieved / spec if spec else None,
                       pct_of_copy=100 * achieved / copy_bw if copy_bw else None)
    result["roofline"] = roof

    print(f"\n{args.preset} shapes, {dtype}, {card}, attention {ours.attn_implementation}, "
          f"prompt {r_ours['prompt_tokens']} tokens ({args.image[1]}x{args.image[0]} image + "
          f"{args.question_tokens}-token question), {args.new_tokens} new tokens")
    print(f"TTFT ours {r_ours['ttft_ms']:.1f} ms (generate, 1 token); prefill {r_ours['prefill_ms']:.1f} ms = vision "
          f"{r_ours['vision_ms']:.1f} + projector {r_ours['projector_ms']:.2f} + LM {r_ours['lm_prefill_ms']:.1f}"
          + (f";  transformers {r_hf['ttft_ms']:.1f} ms ({r_hf['ttft_ms'] / r_ours['ttft_ms']:.2f}x)" if r_hf else ""))
    call = r_ours["generate_call"]
    if "error" in call:
        print(f"generate() as called: failed ({call['error']})")
    else:
        print(f"generate() as called: {describe_call(call)}")
    print(f"{'batch':>5} {'ours ms/tok':>12} {'tok/s/row':>10} {'hf ms/tok':>10} {'speedup':>8} "
          f"{'% spec BW':>10} {'% copy BW':>10}")
    for b in args.batches:
        o = r_ours["decode_ms_per_token"][b]
        h = r_hf["decode_ms_per_token"][b] if r_hf else None
        rf = roof[b]
        fmt = lambda x, spec=".1f": format(x, spec) if x is not None else "-"  # noqa: E731
        print(f"{b:>5} {fmt(o, '.2f'):>12} {fmt(1e3 / o if o else None):>10} {fmt(h, '.2f'):>10} "
              f"{fmt(h / o if h and o else None, '.2f'):>8} "
              f"{fmt(rf['pct_of_spec']):>10} {fmt(rf['pct_of_copy']):>10}")
    if peak is not None:
        print(f"peak GPU memory (ours): {peak:.1f} GiB")

    out = args.out
    if out is None and device.type == "cuda":
        name = card.replace("NVIDIA ", "").replace(" ", "-")
        out = os.path.join(ROOT, "bench", "results", f"{name}-{result['date']}-{args.preset}.json")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
