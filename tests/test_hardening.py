"""Untrusted input: every refusal is a typed ImageError naming the reason and the size."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from PIL import Image, ImageOps

from guardrt.runtime.errors import ImageError, ImageReason
from guardrt.runtime.preprocess import ImageConfig, ImageLimits, preprocess_image
from guardrt.runtime.preprocess.normalize import normalization_table
from tests.images import encode, noise


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds no pixel data at all."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def refuse(image: object, reason: ImageReason, config: ImageConfig | None = None) -> str:
    with pytest.raises(ImageError) as info:
        preprocess_image(image, config=config)  # type: ignore[arg-type]
    assert info.value.reason is reason, str(info.value)
    return str(info.value)


def limits(**kwargs: int) -> ImageConfig:
    return ImageConfig(limits=ImageLimits(**kwargs))


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # No pixel data follows the header: decoding would fail as corrupt, so this proves the
    # refusal happened first, from the declared size alone.
    message = refuse(png_header_only(6000, 6000), ImageReason.TOO_MANY_PIXELS)
    assert "6000x6000" in message
    assert "25000000" in message


def test_pillow_decompression_bomb_becomes_our_error() -> None:
    message = refuse(
        png_header_only(20000, 20000), ImageReason.TOO_MANY_PIXELS, limits(max_pixels=10**12)
    )
    assert "decoder" in message


def test_pixel_limit_applies_to_arrays_and_pil_images() -> None:
    refuse(noise(300, 200), ImageReason.TOO_MANY_PIXELS, limits(max_pixels=59_999))
    refuse(Image.new("RGB", (300, 200)), ImageReason.TOO_MANY_PIXELS, limits(max_pixels=59_999))


def test_byte_limit_for_bytes_and_paths(tmp_path: Path) -> None:
    data = encode(Image.fromarray(noise(64, 64)), "PNG")
    message = refuse(data, ImageReason.TOO_MANY_BYTES, limits(max_bytes=1000))
    assert f"{len(data)} bytes" in message
    assert "1000" in message
    path = tmp_path / "big.png"
    path.write_bytes(data)
    refuse(path, ImageReason.TOO_MANY_BYTES, limits(max_bytes=1000))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", ImageReason.EMPTY),
        (b"SECRET-TEXT this is not an image at all", ImageReason.UNKNOWN_FORMAT),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", ImageReason.UNKNOWN_FORMAT),
    ],
)
def test_empty_and_unknown_data(data: bytes, reason: ImageReason) -> None:
    message = refuse(data, reason)
    assert "SECRET" not in message


def test_formats_outside_the_allow_list_are_refused() -> None:
    refuse(encode(Image.fromarray(noise(32, 32)), "PCX"), ImageReason.UNKNOWN_FORMAT)
    refuse(encode(Image.fromarray(noise(32, 32)), "ICO"), ImageReason.UNKNOWN_FORMAT)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated_data_is_corrupt(fmt: str) -> None:
    data = encode(Image.fromarray(noise(400, 300)), fmt)
    refuse(data[: len(data) // 2], ImageReason.CORRUPT)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animations_are_refused(fmt: str) -> None:
    frames = [Image.fromarray(noise(64, 48, seed=i)) for i in range(3)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    message = refuse(data, ImageReason.MULTI_FRAME)
    assert "3 frames" in message


def test_multi_page_tiff_is_refused() -> None:
    pages = [Image.fromarray(noise(64, 48, seed=i)) for i in range(2)]
    refuse(
        encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]), ImageReason.MULTI_FRAME
    )


def test_single_frame_gif_is_accepted() -> None:
    tiled = preprocess_image(encode(Image.fromarray(noise(64, 48)).quantize(16), "GIF"))
    assert tiled.num_tiles == 1


def test_mpo_is_judged_on_its_primary_picture() -> None:
    primary = Image.fromarray(noise(640, 480, seed=1))
    data = encode(primary, "MPO", save_all=True, append_images=[Image.fromarray(noise(640, 480))])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    first_frame = encode(primary, "JPEG")
    np.testing.assert_array_equal(
        preprocess_image(data).pixel_values, preprocess_image(first_frame).pixel_values
    )


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    stored = Image.fromarray(noise(300, 200, seed=orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert upright is not None
    tiled = preprocess_image(data)
    expected = preprocess_image(np.asarray(upright.convert("RGB")))
    assert tiled.source_size == upright.size
    np.testing.assert_array_equal(tiled.pixel_values, expected.pixel_values)


def test_transparent_pixels_become_white() -> None:
    rgba = np.zeros((560, 560, 4), dtype=np.uint8)  # black, fully transparent
    tiled = preprocess_image(Image.fromarray(rgba, "RGBA"))
    white = normalization_table(*_clip(), "float32").table[:, 255]
    np.testing.assert_array_equal(tiled.pixel_values[0, :, 0, 0], white)


def _clip() -> tuple[tuple[float, float, float], tuple[float, float, float], float]:
    cfg = ImageConfig()
    return cfg.image_mean, cfg.image_std, cfg.rescale_factor


def test_sixteen_bit_grey_keeps_its_high_byte() -> None:
    values = np.random.default_rng(0).integers(0, 65536, (300, 400), dtype=np.uint16)
    sixteen = Image.fromarray(values)
    assert sixteen.mode == "I;16"
    high = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(
        preprocess_image(encode(sixteen, "PNG")).pixel_values, preprocess_image(high).pixel_values
    )


@pytest.mark.parametrize("mode", ["F", "I"])
def test_wide_modes_are_refused(mode: str) -> None:
    message = refuse(Image.new(mode, (10, 10)), ImageReason.UNSUPPORTED_MODE)
    assert repr(mode) in message


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((10, 10), dtype=np.uint8),
        np.zeros((10, 10, 4), dtype=np.uint8),
        np.zeros((10, 10, 3), dtype=np.float32),
    ],
)
def test_bad_arrays(array: NDArray[Any]) -> None:
    message = refuse(array, ImageReason.BAD_INPUT)
    assert str(array.shape) in message


def test_empty_array_and_bad_types_and_missing_paths(tmp_path: Path) -> None:
    refuse(np.zeros((0, 5, 3), dtype=np.uint8), ImageReason.EMPTY)
    refuse(12345, ImageReason.BAD_INPUT)
    assert "nothing.png" in refuse(tmp_path / "nothing.png", ImageReason.NOT_FOUND)
    (tmp_path / "empty.png").write_bytes(b"")
    refuse(tmp_path / "empty.png", ImageReason.EMPTY)


SEEDS = {
    "png": encode(Image.fromarray(noise(24, 16)), "PNG"),
    "gif": encode(Image.fromarray(noise(24, 16)).quantize(8), "GIF"),
    "jpeg": encode(Image.fromarray(noise(24, 16)), "JPEG"),
    "webp": encode(Image.fromarray(noise(24, 16)), "WEBP"),
    "tiff": encode(Image.fromarray(noise(24, 16)), "TIFF"),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 10_000),
)
def test_mutated_files_only_ever_raise_image_error(
    seed: str, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(SEEDS[seed])
    for position, value in edits:
        data[position % len(data)] = value
    data = data[: max(1, len(data) - cut % 64)]
    try:
        tiled = preprocess_image(bytes(data), config=limits(max_pixels=4_000_000))
    except ImageError:
        return
    assert np.isfinite(tiled.pixel_values).all()
