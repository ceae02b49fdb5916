"""Greedy (or beam search) decode speed, ours vs transformers' generate, on the same small random model.

Both generate from the same prompt (one image at the real 336/14 geometry) with the same
settings; min_new_tokens keeps eos from ending either early. Decode tokens/s = (N - 1) / (time
for N new tokens - time for 1 new token), so the prefill and vision tower cancel out; medians of
several runs. Prints a table and the ratio.

    python scripts/bench_generate_cpu.py [--new-tokens 64] [--runs 5] [--hidden 256] [--layers 4] [--num-beams 1]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def timed(fn, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--image", default="640x480", help="image size WxH (only its size matters)")
    ap.add_argument("--num-beams", type=int, default=1, help="beam search over this many beams (1: greedy)")
    args = ap.parse_args()

    from tiny import hf_checkpoint, image_inputs, prompt_ids
    from llava_next import LlavaNextForConditionalGeneration

    w, h = (int(x) for x in args.image.split("x"))
    with tempfile.TemporaryDirectory() as folder:
        hf = hf_checkpoint(folder, "mistral", hidden_size=args.hidden, layers=args.layers,
                           num_attention_heads=8, num_key_value_heads=2)
        hf.set_attn_implementation("sdpa")
        ours = LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa")
    ids, mask = prompt_ids(hf.config, [[(h, w)]], [30])
    pv, sizes = image_inputs(hf.config, [(h, w)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)

    def run(model, n):
        return lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      num_beams=args.num_beams)

    same = torch.equal(run(hf, args.new_tokens)(), run(ours, args.new_tokens)())

    rows = []
    for name, model in [("transformers", hf), ("llava-next", ours)]:
        run(model, 2)()  # warm-up
        t1 = timed(run(model, 1), args.runs)
        tn = timed(run(model, args.new_tokens), args.runs)
        rows.append((name, t1, tn, (args.new_tokens - 1) / (tn - t1)))

    mode = "greedy" if args.num_beams == 1 else f"beam search ({args.num_beams} beams)"
    print(f"{mode} decode, CPU ({torch.get_num_threads()} threads), text hidden {args.hidden}, {args.layers} layers, "
          f"vocab 32064, one {w}x{h} image, prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, "
          f"median of {args.runs}")
    rate = "decode tok/s" if args.num_beams == 1 else "steps/s"  # a beam step decodes num_beams rows
    print(f"{'':14}{'prefill+1 tok (s)':>18}{'total (s)':>11}{rate:>14}")
    for name, t1, tn, tps in rows:
        print(f"{name:14}{t1:18.3f}{tn:11.3f}{tps:14.1f}")
    print(f"decode speed ratio llava-next / transformers: {rows[1][3] / rows[0][3]:.2f}x "
          f"(same tokens: {same})")


if __name__ == "__main__":
    main()
