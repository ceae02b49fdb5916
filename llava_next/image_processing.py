"""Anyres image preprocessing: pixels a LLaVA-NeXT checkpoint expects, equal to transformers'.

Per image: RGB uint8 -> the best pinpoint (H, W) -> bicubic resize keeping the aspect -> centred
black padding to (H, W) -> row-major tiles of `crop_size`, after the whole image squashed to one
tile (the base) -> rescale and normalise. A batch pads the tile axis with zero tiles.

transformers resizes through PIL in uint8, so every output value is a function of the channel and
one uint8 value. Rescale + normalise is therefore a (3, 256) lookup table computed with
transformers' own float64/float32 steps: bit-exact, and one gather per channel for a whole stack.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps

from .anyres import select_best_resolution
from .batch import BatchFeature
from .config import DEFAULT_PINPOINTS
from .hub import read_json, resolve_folder

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CONFIG_NAME = "preprocessor_config.json"


class LlavaNextImageProcessor:
    """LLaVA-NeXT's anyres image processor (transformers' `LlavaNextImageProcessor`, PIL backend).

    `__call__(images)` -> BatchFeature(pixel_values (N, max_tiles, 3, S, S) float32,
    image_sizes (N, 2) int64 original (height, width)). Images: PIL images, numpy arrays or torch
    tensors (HWC or CHW, 1/3/4 channels, uint8, integer-valued floats or floats in [0, 1]), file
    paths, base64 `data:image/...` URIs, or (nested) lists of these. Transparency (an alpha
    channel, or a palette / tRNS colour key) is composited onto white, as transformers does.
    """

    model_input_names = ["pixel_values", "image_sizes"]
    # Images with more pixels are refused before decoding: a small file can claim a huge size
    # (a "decompression bomb"). Pillow's own warning threshold; None disables the check.
    max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS
    # Threads for decoding, resizing and normalising; set 1 inside data-loader worker processes.
    num_threads: int = min(8, os.cpu_count() or 1)

    def __init__(self, size=None, crop_size=None, image_grid_pinpoints=None, resample: int = 3,
                 do_resize: bool = True, do_center_crop: bool = True, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True, image_mean=None, image_std=None,
                 do_pad: bool = True, do_convert_rgb: bool = True, **extra):
        self.size = dict(size) if size is not None else {"shortest_edge": 336}
        crop_size = crop_size if crop_size is not None else 336
        self.crop_size = {"height": crop_size, "width": crop_size} if isinstance(crop_size, int) else dict(crop_size)
        self.image_grid_pinpoints = [list(p) for p in (image_grid_pinpoints or DEFAULT_PINPOINTS)]
        self.resample = int(resample)
        self.do_resize, self.do_center_crop, self.do_pad = do_resize, do_center_crop, do_pad
        self.do_rescale, self.rescale_factor = do_rescale, rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = _per_channel(image_mean, CLIP_MEAN)
        self.image_std = _per_channel(image_std, CLIP_STD)
        self.do_convert_rgb = do_convert_rgb  # images are always made RGB; kept for save_pretrained
        self.extra = extra  # other keys of preprocessor_config.json, written back on save
        self._check()
        self._luts = {}

    def _check(self):
        tile = self.tile_size
        if self.crop_size.get("width", tile) != tile:
            raise ValueError(f"crop_size {self.crop_size} is not square; LLaVA-NeXT tiles are square")
        # transformers resizes every tile to `size` and centre-crops it to `crop_size`; both are
        # identities only when they equal the tile, the only layout LLaVA-NeXT checkpoints use.
        if self.base_size != (tile, tile):
            raise ValueError(f"size {self.size} does not match crop_size {self.crop_size}: this processor needs "
                             f"size {{'shortest_edge': {tile}}} (or height = width = {tile}) to cut {tile}-px tiles")
        for p in self.image_grid_pinpoints:
            if len(p) != 2 or p[0] % tile or p[1] % tile:
                raise ValueError(f"image_grid_pinpoints entry {p} is not a (height, width) pair of multiples "
                                 f"of the tile size {tile}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean {self.image_mean} and image_std {self.image_std} need 3 values (RGB)")

    @property
    def tile_size(self) -> int:
        return int(self.crop_size["height"])

    @property
    def base_size(self) -> tuple[int, int]:
        if "shortest_edge" in self.size:
            return int(self.size["shortest_edge"]), int(self.size["shortest_edge"])
        return int(self.size["height"]), int(self.size["width"])

    # ---- reading and writing ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, revision: str | None = None, **overrides) -> "LlavaNextImageProcessor":
        """From a folder or hub repo id holding `preprocessor_config.json`; keyword arguments override it."""
        folder = resolve_folder(name_or_path, [CONFIG_NAME], revision=revision)
        path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; it is needed to build the image processor")
        return cls(**{**read_json(path), **overrides})

    def to_dict(self) -> dict:
        return {
            **self.extra, "crop_size": dict(self.crop_size), "do_center_crop": self.do_center_crop,
            "do_convert_rgb": self.do_convert_rgb, "do_normalize": self.do_normalize, "do_pad": self.do_pad,
            "do_rescale": self.do_rescale, "do_resize": self.do_resize,
            "image_grid_pinpoints": self.image_grid_pinpoints, "image_mean": self.image_mean,
            "image_processor_type": "LlavaNextImageProcessor", "image_std": self.image_std,
            "resample": self.resample, "rescale_factor": self.rescale_factor, "size": dict(self.size),
        }

    def save_pretrained(self, folder) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    def __repr__(self):
        return f"LlavaNextImageProcessor({json.dumps(self.to_dict(), sort_keys=True)})"

    # ---- preprocessing -----------------------------------------------------------------------

    # Settings a call may override, as transformers' image processors take them per call.
    OPTIONS = ("size", "crop_size", "image_grid_pinpoints", "resample", "do_resize", "do_center_crop", "do_rescale",
               "rescale_factor", "do_normalize", "image_mean", "image_std", "do_pad", "do_convert_rgb")

    def with_options(self, **options) -> "LlavaNextImageProcessor":
        """This processor, or a copy with some settings changed for one call (validated the same
        way). do_resize / do_center_crop cannot be switched off: anyres tiling always resizes."""
        for name in options:
            if name not in self.OPTIONS:
                raise TypeError(f"the image processor got an unexpected keyword argument {name!r}; its per-call "
                                f"options are {', '.join(self.OPTIONS)}")
        for name in ("do_resize", "do_center_crop"):
            if name in options and not options[name]:
                raise ValueError(f"{name}=False is not supported: LLaVA-NeXT's anyres tiling resizes every tile")
        if not options:
            return self
        other = type(self)(**{**self.to_dict(), **options})
        other.num_threads = self.num_threads
        return other

    def __call__(self, images, return_tensors: str | None = "pt", **options) -> BatchFeature:
        if options:
            return self.with_options(**options)(images, return_tensors=return_tensors)
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt'")
        images = flatten_images(images)
        if not images:
            raise ValueError("no images given")
        T = self.tile_size
        for i, image in enumerate(images):
            if isinstance(image, Image.Image):  # decode a lazily opened image once, here: threads
                self._check_pixels(image.width, image.height, f"image {i}")  # would race on it
                image.load()
        # Decoding, PIL resizes and numpy gathers release the GIL: threads use every core.
        with ThreadPoolExecutor(max_workers=min(self.num_threads, 2 * len(images))) as pool:
            loaded = list(pool.map(self.load_rgb, images, [f"image {i}" for i in range(len(images))]))
            rgbs = [rgb for rgb, _ in loaded]
            layouts = [anyres_layout(rgb, self.image_grid_pinpoints) for rgb in rgbs]
            grids = [(rgb, (nw, nh)) for rgb, (H, W, nh, nw) in zip(rgbs, layouts)]
            bases = [(rgb, (T, T)) for rgb in rgbs]  # the whole image, aspect not kept: on purpose
            resized = self._resize_all(pool, grids + bases)
            stacks = [tile_stack(grid, base, layout, T)
                      for grid, base, layout in zip(resized, resized[len(rgbs):], layouts)]

            counts = [len(u) for u in stacks]
            # Allocated by numpy, which asks the kernel for huge pages: first-touch page faults of
            # a fresh buffer otherwise cost more than the normalisation itself.
            if self.do_pad or len(set(counts)) == 1:
                pixel_values = np.empty((len(stacks), max(counts), 3, T, T), np.float32)
                outs = [out[:n] for out, n in zip(pixel_values, counts)]
                for out, n in zip(pixel_values, counts):
                    out[n:] = 0  # the batch's padding tiles are zeros, not normalised black
                pixel_values = torch.from_numpy(pixel_values)
            else:  # unpadded: a list of (tiles, 3, T, T), as transformers gives with do_pad=False
                outs = [np.empty((n, 3, T, T), np.float32) for n in counts]
                pixel_values = [torch.from_numpy(out) for out in outs]
            list(pool.map(self._normalise, stacks, [prescaled for _, prescaled in loaded], outs))
        sizes = [(rgb.height, rgb.width) for rgb in rgbs]
        return BatchFeature(pixel_values=pixel_values, image_sizes=torch.tensor(sizes, dtype=torch.int64))

    preprocess = __call__

    def _resize_all(self, pool, jobs: list) -> list[Image.Image]:
        """PIL resizes of (image, (w, h)) jobs on the pool, in order. Largest sources go first,
        so that no thread is left alone with a big image at the end."""
        order = sorted(range(len(jobs)), key=lambda j: -jobs[j][0].width * jobs[j][0].height)
        done = pool.map(lambda j: jobs[j][0].resize(jobs[j][1], resample=self.resample), order)
        resized = [None] * len(jobs)
        for j, image in zip(order, done):
            resized[j] = image
        return resized

    def _normalise(self, u: np.ndarray, prescaled: bool, out: np.ndarray) -> None:
        """out (n, 3, T, T) float32 <- rescaled, normalised uint8 tiles u (n, 3, T, T)."""
        lut = self._lookup_table(prescaled)
        for c in range(3):
            lut[c].take(u[:, c], out=out[:, c])

    def _lookup_table(self, prescaled: bool) -> np.ndarray:
        """(3, 256) float32: what transformers makes of a resized uint8 value, per channel.

        `prescaled`: the input was floats in [0, 1], which transformers scales to uint8 for PIL
        and back by 1/255 after the resize, then rescales by 1/255 once more (the reference's
        behaviour, kept). Its second resize of each tile maps these values back to themselves.
        """
        key = (prescaled, self.do_rescale, self.rescale_factor, self.do_normalize,
               tuple(self.image_mean), tuple(self.image_std))  # the settings may change after a call
        if key not in self._luts:
            x = np.arange(256, dtype=np.uint8)
            if prescaled:
                x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
            if self.do_rescale:
                x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
            x = np.broadcast_to(x.astype(np.float32, copy=False), (3, 256))
            if self.do_normalize:  # float32 arithmetic, as transformers' normalize
                x = (x - np.array(self.image_mean, np.float32)[:, None]) / np.array(self.image_std, np.float32)[:, None]
            self._luts[key] = np.ascontiguousarray(x, dtype=np.float32)
        return self._luts[key]

    # ---- inputs -----------------------------------------------------------------------------

    def load_rgb(self, image, where: str = "image") -> tuple[Image.Image, bool]:
        """An RGB PIL image, and whether it came from floats in [0, 1] (see _lookup_table)."""
        if isinstance(image, (str, os.PathLike)):
            return self._open(os.fspath(image)), False
        if isinstance(image, Image.Image):
            self._check_pixels(image.width, image.height, where)
            return pil_to_rgb(image), False
        if torch.is_tensor(image):
            image = image.detach().cpu()
            image = (image.float() if image.dtype == torch.bfloat16 else image).numpy()
        if isinstance(image, np.ndarray):
            hwc = to_hwc(image, where)
            self._check_pixels(hwc.shape[1], hwc.shape[0], where)
            array, prescaled = array_to_uint8(hwc, where)
            return Image.fromarray(array), prescaled
        raise TypeError(f"{where}: expected a PIL image, numpy array, torch tensor or file path, "
                        f"got {type(image).__name__}")

    def _check_pixels(self, width: int, height: int, where: str) -> None:
        limit = self.max_image_pixels
        if limit is not None and width * height > limit:
            raise ValueError(
                f"{where} is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
                "(possibly a decompression bomb). If you trust it, raise "
                "LlavaNextImageProcessor.max_image_pixels (None disables the check).")

    def _open(self, path: str) -> Image.Image:
        if path.startswith(("http://", "https://")):
            raise ValueError(f"{path}: URLs are not fetched; download the image and pass its path or a PIL image")
        source = path
        if path.startswith("data:image/"):  # an inline image (OpenAI-style image_url), as transformers' load_image
            header, _, payload = path.partition(",")
            if not header.endswith(";base64"):
                raise ValueError(f"{header}: only base64 data URIs are read")
            try:
                source = io.BytesIO(base64.b64decode(payload))  # line breaks and the like are skipped
            except ValueError as e:
                raise ValueError(f"{header}: the base64 payload does not decode: {e}") from None
            path = header + ",..."  # what error messages call it
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with warnings.catch_warnings():  # Pillow's bomb warning: the size is checked below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(source)
        except Image.DecompressionBombError as e:
            raise ValueError(f"image file {path} is too large to decode safely ({e}); raise "
                             "PIL.Image.MAX_IMAGE_PIXELS if you trust it") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"could not read image file {path}: {e}") from None
        self._check_pixels(image.width, image.height, f"image file {path}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                # What transformers does with a path: load_image's EXIF rotation and plain RGB
                # convert, then convert_to_rgb, which composites a colour key (a palette or tRNS
                # `transparency` that the RGB convert keeps in image.info) onto white.
                return pil_to_rgb(ImageOps.exif_transpose(image).convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"could not decode image file {path} (corrupt or truncated?): {e}") from None


def flatten_images(images) -> list:
    """A flat list from one image, a list of images, or a list of per-prompt lists."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [im for item in images for im in flatten_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)  # a batch of images
    return [images]


def anyres_layout(image: Image.Image, pinpoints) -> tuple[int, int, int, int]:
    """(H, W) of the best pinpoint for the image, and (nh, nw) of the image resized to fit in it."""
    H, W = select_best_resolution((image.height, image.width), pinpoints)
    return (H, W) + fit_size((image.height, image.width), (H, W))


def tile_stack(grid: Image.Image, base: Image.Image, layout, T: int) -> np.ndarray:
    """uint8 (1 + gh*gw, 3, T, T): the base image, then the anyres tiles in row-major order."""
    H, W, nh, nw = layout
    top, left = (H - nh) // 2, (W - nw) // 2  # the odd pixel of padding goes bottom/right
    canvas = np.zeros((H, W, 3), np.uint8)  # black, padded before rescaling like the reference
    canvas[top:top + nh, left:left + nw] = np.asarray(grid)
    gh, gw = H // T, W // T
    stack = np.empty((1 + gh * gw, 3, T, T), np.uint8)
    stack[0] = np.asarray(base).transpose(2, 0, 1)
    stack[1:].reshape(gh, gw, 3, T, T)[:] = canvas.reshape(gh, T, gw, T, 3).transpose(0, 2, 4, 1, 3)
    return stack


def fit_size(size, target) -> tuple[int, int]:
    """(h, w) of `size` scaled to fit `target`: the limiting side exact, the other rounded up."""
    h, w = size
    H, W = target
    if W / w < H / h:
        return min(math.ceil(h * (W / w)), H), W
    return H, min(math.ceil(w * (H / h)), W)


def _per_channel(value, default) -> list:
    """image_mean / image_std as three values; one number is every channel's, as in transformers."""
    if value is None:
        return list(default)
    return [float(value)] * 3 if isinstance(value, (int, float)) else list(value)


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: transparency is composited onto white, other modes converted."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # resizing never writes to it


def to_hwc(image: np.ndarray, where: str) -> np.ndarray:
    """(H, W, 3) in the input's dtype from (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4."""
    if image.ndim == 2:
        image = image[:, :, None]
    elif image.ndim != 3:
        raise ValueError(f"{where}: expected a 2-D or 3-D array, got shape {tuple(image.shape)}")
    elif image.shape[0] in (1, 3, 4):  # channels first wins when both ends could be channels
        image = image.transpose(1, 2, 0)
    elif image.shape[2] not in (1, 3, 4):
        raise ValueError(f"{where}: cannot tell the channel axis of shape {tuple(image.shape)}; "
                         "expected (H, W, C) or (C, H, W) with C = 1, 3 or 4")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:  # composite onto white, in the input's dtype (transformers' rule)
        floating = np.issubdtype(image.dtype, np.floating)
        if floating and (image.min() < 0 or image.max() > 1):
            raise ValueError(f"{where}: a float RGBA image must lie in [0, 1], got "
                             f"[{image.min()}, {image.max()}]")
        white = 1.0 if floating else 255
        alpha = image[..., 3:4] / white
        rgb = alpha * image[..., :3] + (1 - alpha) * white
        return rgb.astype(image.dtype) if floating else np.round(rgb).astype(image.dtype)
    return image


def array_to_uint8(image: np.ndarray, where: str) -> tuple[np.ndarray, bool]:
    """uint8 pixels as transformers hands them to PIL, and whether floats in [0, 1] were scaled."""
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image), False
    if np.allclose(image, image.astype(int)):
        if image.min() < 0 or image.max() > 255:
            raise ValueError(f"{where}: integer pixel values must lie in [0, 255], got "
                             f"[{image.min()}, {image.max()}]")
        return image.astype(np.uint8), False  # truncates, as the reference does
    if image.min() >= 0 and image.max() <= 1:
        return (image.astype(np.float64) * 255).astype(np.float32).astype(np.uint8), True
    raise ValueError(f"{where}: float pixel values must be integers in [0, 255] or lie in [0, 1], got "
                     f"[{image.min()}, {image.max()}]")
