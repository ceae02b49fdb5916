"""Time our anyres image preprocessing against transformers' LlavaNextImageProcessor (PIL backend).

Both run in this process on the same in-memory RGB images of mixed sizes (the fixtures when
present, plus synthetic ones), one batch call each. Prints a table and the ratio ours / theirs.

    python scripts/bench_preprocess.py [--repeats 5]
"""

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from llava_next.image_processing import CLIP_MEAN, CLIP_STD, LlavaNextImageProcessor

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "images"
SIZES = [(13, 16), (94, 251), (337, 1000), (808, 1100), (2000, 300), (480, 640), (1080, 1920)]  # (h, w)


def bench_images() -> list[Image.Image]:
    images = [Image.open(p).convert("RGB") for p in sorted(FIXTURES.glob("*")) if p.suffix in (".jpg", ".png")]
    rng = np.random.default_rng(0)
    for h, w in SIZES:
        # smooth noise: random pixels would make no codec or filter difference, but look less like photos
        small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    return images


def best_times(ours, theirs, repeats: int) -> tuple[float, float]:
    """Best of `repeats` for each, the two interleaved so that a busy machine slows both alike."""
    for _ in range(3):  # warm-up: lookup tables, threads, the allocator settling
        ours(), theirs()
    times = {ours: [], theirs: []}
    for _ in range(repeats):
        for fn in (theirs, ours):
            start = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - start)
    return min(times[ours]), min(times[theirs])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    config = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
                  image_mean=CLIP_MEAN, image_std=CLIP_STD, do_pad=True)
    ours, theirs = LlavaNextImageProcessor(**config), LlavaNextImageProcessorPil(**config)
    images = bench_images()

    a, b = ours(images)["pixel_values"], theirs(images, return_tensors="pt")["pixel_values"]
    diff = (a - b).abs().max().item()
    t_ours, t_theirs = best_times(lambda: ours(images), lambda: theirs(images, return_tensors="pt"), args.repeats)
    one = images[0]
    t1_ours, t1_theirs = best_times(lambda: ours(one), lambda: theirs(one, return_tensors="pt"), args.repeats)

    sizes = ", ".join(f"{im.height}x{im.width}" for im in images)
    print(f"{len(images)} images (h x w): {sizes}; pixel_values {tuple(a.shape)}, max abs diff {diff:.1e}")
    print(f"{'case':<24}{'ours ms':>10}{'transformers ms':>18}{'ratio':>8}")
    print(f"{'batch of all':<24}{t_ours * 1e3:>10.1f}{t_theirs * 1e3:>18.1f}{t_ours / t_theirs:>8.2f}")
    print(f"{'one image ' + f'{one.height}x{one.width}':<24}{t1_ours * 1e3:>10.1f}{t1_theirs * 1e3:>18.1f}"
          f"{t1_ours / t1_theirs:>8.2f}")
    print(f"ratio (ours / transformers, batch): {t_ours / t_theirs:.2f}x")


if __name__ == "__main__":
    main()
