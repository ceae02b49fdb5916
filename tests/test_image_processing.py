"""Our anyres image processor against transformers' LlavaNextImageProcessor (PIL backend)."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fixture_path
from llava_next.image_processing import LlavaNextImageProcessor
from oracle_processor import PREPROCESSOR_CONFIG, oracle_image_processor

AWKWARD_SIZES = [(1, 1), (13, 16), (94, 251), (337, 1000), (808, 1100), (2000, 300)]  # (h, w)


@pytest.fixture(scope="module")
def oracle():
    return oracle_image_processor()


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    return LlavaNextImageProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def cats():
    return Image.open(fixture_path("images", "coco_000000039769_cats.png")).convert("RGB")


def smooth_image(h, w, seed=0) -> Image.Image:
    """Photo-like content: upsampled noise (plain noise would hide resampling mistakes less well)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 7, 1), max(w // 7, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def assert_same(ours, oracle, images):
    a = ours(images)
    b = oracle(images, return_tensors="pt")
    assert a["pixel_values"].dtype == torch.float32 and a["image_sizes"].dtype == torch.int64
    assert a["pixel_values"].shape == b["pixel_values"].shape
    assert torch.equal(a["image_sizes"], b["image_sizes"])
    assert (a["pixel_values"] - b["pixel_values"]).abs().max().item() <= 1e-5
    return a


@pytest.mark.parametrize("name", ["llava_v1_5_radar.jpg", "coco_000000039769_cats.png", "llava_logo.png"])
def test_real_images(ours, oracle, name):
    image = Image.open(fixture_path("images", name))
    out = assert_same(ours, oracle, image)
    if name.startswith("llava_v1_5_radar"):  # REFERENCE.md: 1024x899, 5 tiles
        assert out["image_sizes"].tolist() == [[899, 1024]] and out["pixel_values"].shape == (1, 5, 3, 336, 336)


def test_file_paths_like_transformers_load_image(ours, oracle):
    paths = [str(fixture_path("images", n)) for n in ("llava_v1_5_radar.jpg", "llava_logo.png")]
    assert_same(ours, oracle, paths)


def test_colour_key_transparency_in_files(ours, oracle, tmp_path):
    """A palette PNG / GIF with a transparent index, or an RGB PNG with a tRNS colour: by path,
    the keyed pixels become white, as transformers' load_image + convert_to_rgb make them."""
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30], rgb[:, 30:] = (10, 20, 30), (200, 100, 50)
    image = Image.fromarray(rgb)
    palette = image.quantize(colors=2)
    key = palette.getpixel((0, 0))
    palette.save(tmp_path / "key.png", transparency=key)
    palette.save(tmp_path / "key.gif", transparency=key)
    image.save(tmp_path / "key_rgb.png", transparency=(10, 20, 30))
    for name in ("key.png", "key.gif", "key_rgb.png"):
        out = assert_same(ours, oracle, str(tmp_path / name))
        white = (1 - torch.tensor(PREPROCESSOR_CONFIG["image_mean"])) / torch.tensor(PREPROCESSOR_CONFIG["image_std"])
        torch.testing.assert_close(out["pixel_values"][0, 0, :, 0, 0], white)  # base tile, a keyed pixel


@pytest.mark.parametrize("size", AWKWARD_SIZES)
def test_awkward_sizes(ours, oracle, size):
    assert_same(ours, oracle, smooth_image(*size))


@pytest.mark.parametrize("box", [(0, 0, 1, 1), (100, 50, 116, 63), (10, 20, 261, 114), (5, 100, 605, 437)])
def test_crops_of_a_photo(ours, oracle, cats, box):
    assert_same(ours, oracle, cats.crop(box))


def test_batch_pads_tile_axis_with_zeros(ours, oracle, cats):
    images = [cats.crop((0, 0, 300, 300)), smooth_image(94, 251), cats]  # 3, 3 and 5 tiles
    out = assert_same(ours, oracle, images)
    assert out["pixel_values"].shape == (3, 5, 3, 336, 336)
    assert out["pixel_values"][0, 3:].abs().max() == 0  # zero tiles, not normalised black


def test_nested_lists_are_flattened(ours, cats):
    small = cats.crop((0, 0, 50, 40))
    a, b = ours([[small], [small, cats]]), ours([small, small, cats])
    assert torch.equal(a["pixel_values"], b["pixel_values"])


@pytest.mark.parametrize("mode", ["L", "LA", "P", "P-transparency", "RGBA", "CMYK", "I;16", "1"])
def test_pil_modes(ours, oracle, cats, mode):
    rgba = cats.crop((200, 100, 253, 137)).convert("RGBA")
    alpha = np.linspace(0, 255, rgba.width * rgba.height, dtype=np.uint8).reshape(rgba.height, rgba.width)
    rgba.putalpha(Image.fromarray(alpha))
    if mode == "P-transparency":
        image = rgba.convert("RGB").convert("P")
        image.info["transparency"] = 0
    elif mode == "I;16":
        gray = np.asarray(rgba.convert("L"), dtype=np.uint16) * 300  # beyond 8 bits
        image = Image.fromarray(gray)  # uint16 -> mode I;16
    else:
        image = rgba.convert(mode)
    assert image.mode == mode.split("-")[0]
    assert_same(ours, oracle, image)


def test_numpy_and_torch_inputs(ours, oracle):
    rng = np.random.default_rng(1)
    hwc = np.array(smooth_image(45, 70))  # writable, so torch.from_numpy stays quiet
    arrays = {
        "hwc uint8": hwc, "chw uint8": hwc.transpose(2, 0, 1).copy(),
        "hwc float 0..1": hwc / 255.0, "chw float32 0..1": (hwc.transpose(2, 0, 1) / 255.0).astype(np.float32),
        "chw float 0..255 integers": hwc.transpose(2, 0, 1).astype(np.float32),
        "random floats": rng.random((40, 60, 3)),
        "rgba uint8": np.concatenate([hwc, rng.integers(0, 256, (45, 70, 1), dtype=np.uint8)], axis=2),
        "rgba float": np.concatenate([hwc / 255.0, rng.random((45, 70, 1))], axis=2),
        "one channel": hwc[:, :, :1],
    }
    for name, array in arrays.items():
        assert_same(ours, oracle, array), name
        a = ours(torch.from_numpy(array))["pixel_values"]  # tensors take the same path as arrays
        assert torch.equal(a, ours(array)["pixel_values"]), name


def test_float_tile_of_only_black_and_white(ours, oracle):
    # transformers re-resizes each float tile and takes a tile holding only 0.0/1.0 for integers,
    # a path of its own; two such tiles here, beside ordinary ones.
    x = np.random.default_rng(2).random((336, 1008, 3))
    x[:, :336], x[:, 336:672] = 1.0, 0.0
    assert_same(ours, oracle, x)


def test_grayscale_2d_array_is_accepted(ours):
    gray = np.asarray(smooth_image(30, 40).convert("L"))
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    assert torch.equal(ours(gray)["pixel_values"], ours(rgb)["pixel_values"])


def test_save_and_reload(ours, oracle, tmp_path, cats):
    ours.save_pretrained(tmp_path)
    again = LlavaNextImageProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == ours.to_dict()
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "LlavaNextImageProcessor" and saved["crop_size"] == {"height": 336,
                                                                                                  "width": 336}
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    theirs = LlavaNextImageProcessorPil.from_pretrained(str(tmp_path))  # transformers reads our file
    assert_same(again, theirs, cats.crop((0, 0, 200, 120)))


def test_base64_data_uri(ours, oracle, cats, tmp_path):
    """An inline image (the OpenAI-style image_url), as transformers' load_image reads it."""
    import base64

    cats.crop((0, 0, 120, 90)).save(tmp_path / "small.png")
    uri = "data:image/png;base64," + base64.b64encode((tmp_path / "small.png").read_bytes()).decode()
    assert torch.equal(assert_same(ours, oracle, uri)["pixel_values"], ours(str(tmp_path / "small.png"))["pixel_values"])
    with pytest.raises(ValueError, match="base64 payload does not decode"):
        ours("data:image/png;base64,not*base64")


def test_one_number_for_mean_and_std(oracle, cats):
    """image_mean=0.5 means 0.5 for each channel, per call or in the constructor, as in transformers."""
    plain = LlavaNextImageProcessor()
    want = oracle(cats, image_mean=0.5, image_std=0.5, return_tensors="pt")["pixel_values"]
    assert (plain(cats, image_mean=0.5, image_std=0.5)["pixel_values"] - want).abs().max() <= 1e-5
    assert LlavaNextImageProcessor(image_mean=0.5, image_std=0.5).image_mean == [0.5, 0.5, 0.5]


def test_do_pad_false_gives_one_tensor_per_image(cats):
    images = [cats.crop((0, 0, 300, 300)), cats]
    out = LlavaNextImageProcessor(do_pad=False)(images)
    assert [tuple(p.shape) for p in out["pixel_values"]] == [(3, 3, 336, 336), (5, 3, 336, 336)]


# ---- bad input -----------------------------------------------------------------------------------

def test_missing_file_names_it(ours, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        ours(str(tmp_path / "nope.png"))


def test_corrupt_file_names_it(ours, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        ours(str(bad))
    truncated = tmp_path / "truncated.png"
    smooth_image(64, 64).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.png"):
        ours(str(truncated))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds almost no data: a decompression bomb's shape."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [12_000, 100_000])  # past our limit; past Pillow's own hard limit
def test_decompression_bomb_is_refused(ours, tmp_path, side):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(side, side))
    with pytest.raises(ValueError, match="bomb.png.*(pixels|too large)"):
        ours(str(bomb))


def test_lazily_opened_bomb_is_refused_before_decoding(ours, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(12_000, 12_000))
    with pytest.warns(Image.DecompressionBombWarning):
        lazy = Image.open(bomb)  # Pillow only warns up to twice its limit
    with pytest.raises(ValueError, match="image 0 is 12000x12000"):
        ours(lazy)


def test_pixel_limit_applies_to_in_memory_images(cats):
    processor = LlavaNextImageProcessor()
    processor.max_image_pixels = 10_000
    with pytest.raises(ValueError, match="image 1 is 640x480 = 307,200 pixels"):
        processor([cats.crop((0, 0, 10, 10)), cats])


def test_bad_arrays(ours):
    with pytest.raises(ValueError, match="channel axis"):
        ours(np.zeros((10, 10, 7), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ours(np.full((10, 10, 3), 3.5))
    with pytest.raises(TypeError, match="image 0"):
        ours(12)


def test_unsupported_layout_is_explained():
    with pytest.raises(ValueError, match="crop_size"):
        LlavaNextImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 336, "width": 336})
