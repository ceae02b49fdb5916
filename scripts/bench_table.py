"""Regenerate the README's performance tables from the JSON files the benchmarks wrote:
bench/results/*.json (scripts/bench.py, end to end) and bench/results/kernels/*.json
(scripts/bench_kernels.py --json).

    python scripts/bench_table.py [--results bench/results] [--readme README.md]

Replaces the text between `<!-- bench:start -->` and `<!-- bench:end -->`.
"""

import argparse
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def render(results: list[dict]) -> str:
    if not results:
        return "No GPU results committed yet: run `python scripts/bench.py` on a GPU.\n"
    lines = ["| card | date | preset | TTFT ms, ours / transformers | decode b=1: ms/token (tok/s), transformers ms/token "
             "| b=1 % of spec (copy) bandwidth | b=8 ms/token, ours / transformers | b=32 ms/token, ours / transformers "
             "| peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["date"], r["card"], r["preset"])):
        o, h = r["ours"], r.get("transformers") or {}
        dec = {int(k): v for k, v in o["decode_ms_per_token"].items()}
        hdec = {int(k): v for k, v in (h.get("decode_ms_per_token") or {}).items()}
        roof = {int(k): v for k, v in r.get("roofline", {}).items()}
        f = lambda x, s=".1f": format(x, s) if x is not None else "-"  # noqa: E731
        b1 = roof.get(1) or {}
        tps = 1e3 / dec[1] if dec.get(1) else None
        flags = []  # anything that makes the row not the default fast path
        if not r.get("cuda_graph", True):
            flags.append("no CUDA graph")
        if o.get("graph_errors"):
            flags.append(f"eager decode at b={','.join(map(str, o['graph_errors']))}: graph capture failed")
        if r.get("fused_projections") is False:
            flags.append("projections not fused")
        if r.get("kernel_experiments"):
            flags.append("experiment: " + ", ".join(f"{k}={v}" for k, v in r["kernel_experiments"].items()))
        preset = (r["preset"] + (f" @{r['commit']}" if r.get("commit") else "")  # the code measured
                  + (f" ({'; '.join(flags)})" if flags else ""))
        lines.append(
            f"| {r['card']} | {r['date']} | {preset} | {f(o['ttft_ms'])} / {f(h.get('ttft_ms'))} "
            f"| {f(dec.get(1), '.2f')} ({f(tps, '.0f')}), {f(hdec.get(1), '.2f')} "
            f"| {f(b1.get('pct_of_spec'), '.0f')}% ({f(b1.get('pct_of_copy'), '.0f')}%) "
            f"| {f(dec.get(8), '.2f')} / {f(hdec.get(8), '.2f')} | {f(dec.get(32), '.2f')} / {f(hdec.get(32), '.2f')} "
            f"| {f(r.get('peak_gpu_memory_gib'))} |")
    return "\n".join(lines) + "\n"


def render_kernels(runs: list[dict]) -> str:
    out = []
    for run in runs:
        m = run["meta"]
        out += ["", f"Kernels on {m['device']} ({run['file']}: {m['dtype'].replace('torch.', '')}, torch {m['torch']}); "
                    "ratio = baseline time / ours:", "",
                "| kernel | shape | ours | baseline | ratio | note |", "|---|---|---|---|---|---|"]
        for r in run["rows"]:
            unit = r["unit"]
            base = f"{r['base']:.4g} {unit} ({r['baseline']})" if r.get("base") is not None else "-"
            ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
            out.append(f"| {r['kernel']} | {r['shape']} | {r['ours']:.4g} {unit} | {base} | {ratio} | {r['note']} |")
    return "\n".join(out) + ("\n" if out else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    args = ap.parse_args()
    results = []
    for path in sorted(glob.glob(os.path.join(args.results, "*.json"))):
        with open(path) as f:
            results.append(json.load(f))
    kernels = []
    for path in sorted(glob.glob(os.path.join(args.results, "kernels", "*.json"))):
        with open(path) as f:
            kernels.append({**json.load(f), "file": os.path.basename(path)})  # card and date, as bench_kernels names it
    text = open(args.readme, encoding="utf-8").read()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(head + START + "\n" + render(results) + render_kernels(kernels) + END + tail)
    print(f"{args.readme}: table of {len(results)} end-to-end result(s) and {len(kernels)} kernel run(s)")


if __name__ == "__main__":
    main()
