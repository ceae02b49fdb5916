"""Regenerate the README's performance table from the JSON files scripts/bench.py wrote.

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
    lines = ["| card | date | preset | TTFT ms (ours / transformers) | decode ms/token b=1 (ours / transformers) "
             "| b=1 % of spec bandwidth | b=8 ms/token | b=32 ms/token | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["date"], r["card"], r["preset"])):
        o, h = r["ours"], r.get("transformers") or {}
        dec = {int(k): v for k, v in o["decode_ms_per_token"].items()}
        hdec = {int(k): v for k, v in (h.get("decode_ms_per_token") or {}).items()}
        roof = {int(k): v for k, v in r.get("roofline", {}).items()}
        f = lambda x, s=".1f": format(x, s) if x is not None else "-"  # noqa: E731
        lines.append(
            f"| {r['card']} | {r['date']} | {r['preset']} | {f(o['ttft_ms'])} / {f(h.get('ttft_ms'))} "
            f"| {f(dec.get(1), '.2f')} / {f(hdec.get(1), '.2f')} | {f((roof.get(1) or {}).get('pct_of_spec'))} "
            f"| {f(dec.get(8), '.2f')} | {f(dec.get(32), '.2f')} | {f(r.get('peak_gpu_memory_gib'))} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    args = ap.parse_args()
    results = []
    for path in sorted(glob.glob(os.path.join(args.results, "*.json"))):
        with open(path) as f:
            results.append(json.load(f))
    text = open(args.readme, encoding="utf-8").read()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(head + START + "\n" + render(results) + END + tail)
    print(f"{args.readme}: table of {len(results)} result(s)")


if __name__ == "__main__":
    main()
