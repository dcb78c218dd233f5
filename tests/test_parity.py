"""Bit-exact parity with transformers' PIL-backend MllamaImageProcessor (max abs diff 0)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from guardrt.runtime.preprocess import pack_images, preprocess_image
from tests.images import encode, noise, reference, synthetic

# (width, height): every canvas, upscaled small images, images that fit without a resize, the
# 561x561 corner, extreme aspect ratios, 1x1, and tall downscales (Pillow 13's pass order).
SIZES = [
    (1, 1), (2, 3), (37, 23), (100, 50), (50, 100), (559, 559), (560, 560), (561, 561),
    (800, 600), (600, 800), (1000, 300), (300, 1000), (1120, 560), (560, 1120), (1500, 480),
    (480, 1500), (2240, 560), (560, 2240), (2100, 500), (500, 2100), (4000, 100), (100, 4000),
    (1920, 1080), (1080, 1920), (1280, 1280), (1700, 3000), (1023, 2999), (3000, 700),
]  # fmt: skip


def assert_same(ours_image: object, reference_image: Image.Image, threads: int = 2) -> None:
    tiled = preprocess_image(ours_image, threads=threads)  # type: ignore[arg-type]
    packed = pack_images([tiled])
    expected = reference(reference_image)
    assert packed.pixel_values.shape == expected["pixel_values"].shape
    diff = np.abs(packed.pixel_values - expected["pixel_values"]).max()
    assert diff == 0.0, f"max abs diff {diff}"
    np.testing.assert_array_equal(packed.aspect_ratio_ids, expected["aspect_ratio_ids"])
    np.testing.assert_array_equal(packed.aspect_ratio_mask, expected["aspect_ratio_mask"])
    assert [list(packed.num_tiles)] == expected["num_tiles"]


@pytest.mark.parametrize(("width", "height"), SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_random_pixels_every_size(width: int, height: int) -> None:
    image = Image.fromarray(noise(width, height, seed=width * 7 + height), "RGB")
    assert_same(image, image)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_count_never_changes_the_output(threads: int) -> None:
    image = Image.fromarray(noise(1700, 1300, seed=5), "RGB")
    assert_same(image, image, threads=threads)


def test_array_input() -> None:
    array = synthetic(900, 700)
    assert_same(array, Image.fromarray(array, "RGB"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_encoded_bytes_and_paths(fmt: str, tmp_path: object) -> None:
    data = encode(Image.fromarray(synthetic(1300, 900), "RGB"), fmt)
    decoded = Image.open(__import__("io").BytesIO(data))
    decoded.load()
    assert_same(data, decoded)
    path = tmp_path / f"image.{fmt.lower()}"  # type: ignore[operator]
    path.write_bytes(data)
    assert_same(str(path), decoded)
    assert_same(path, decoded)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "CMYK", "1", "YCbCr", "RGBX"])
def test_modes_match_transformers_conversion(mode: str) -> None:
    # transformers 5.x composites transparency onto white; so do we, for every mode.
    source = Image.fromarray(noise(700, 500, seed=3, channels=4), "RGBA")
    image = source.convert(mode) if mode not in ("P", "PA") else source.convert("RGB").quantize(64)
    if mode == "PA":
        image = image.convert("PA")
    assert_same(image, image)


def test_palette_with_transparency_matches_transformers() -> None:
    image = Image.fromarray(noise(600, 400, seed=9), "RGB").quantize(32)
    image.info["transparency"] = 3
    assert_same(image, image)
    assert_same(encode(image, "PNG"), image)
