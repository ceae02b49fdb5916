"""Anyres geometry shared by the image processor and the model.

The processor must write exactly as many `<image>` ids as the model produces features, so both
sides compute tile grids, unpadding and token counts here. All sizes are (height, width).
Vocabulary: a *tile* is an anyres crop of `image_size` pixels; a *patch* is the ViT's
`patch_size` square; `p = image_size // patch_size` patches per tile side.
"""

from __future__ import annotations


def select_best_resolution(image_size, pinpoints) -> tuple[int, int]:
    """The pinpoint (H, W) that keeps the most of the image's pixels, then wastes the least.

    Strict comparisons: on a tie the first pinpoint in list order wins (transformers' rule).
    """
    h, w = (int(x) for x in image_size)
    best, best_effective, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    return best


def tile_grid(image_size, pinpoints, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of tiles the processor cuts for an image of `image_size`."""
    ph, pw = select_best_resolution(image_size, pinpoints)
    return ph // tile_size, pw // tile_size


def num_tiles(image_size, pinpoints, tile_size: int) -> int:
    """Tiles fed to the vision tower for one image: the grid plus the base image."""
    gh, gw = tile_grid(image_size, pinpoints, tile_size)
    return gh * gw + 1


def unpadded_grid(image_size, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """Crop of a (grid_h, grid_w) feature map that drops the rows/cols made of padding.

    Returns (top, bottom, left, right) slice bounds. The rounding (round to 7 digits, then
    truncate, then an even split of the difference) is the reference's; do not "simplify" it.
    """
    h, w = (int(x) for x in image_size)
    if w / h > grid_w / grid_h:  # image wider than the grid: black bars top and bottom
        new_h = int(round(h * (grid_w / w), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - pad, 0, grid_w
    new_w = int(round(w * (grid_h / h), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - pad


def num_image_tokens(image_size, pinpoints, tile_size: int, patch_size: int,
                     num_additional_image_tokens: int = 1) -> int:
    """`<image>` ids for one image: unpadded grid + one newline per row + the base tile.

    `num_additional_image_tokens` mirrors transformers' processor field; with the llava-hf
    value 1 the count equals the features the model makes. 0 gives one fewer (reference quirk).
    """
    p = tile_size // patch_size
    gh, gw = tile_grid(image_size, pinpoints, tile_size)
    top, bottom, left, right = unpadded_grid(image_size, p * gh, p * gw)
    rows, cols = bottom - top, right - left
    return rows * cols + rows + p * p + num_additional_image_tokens - 1
