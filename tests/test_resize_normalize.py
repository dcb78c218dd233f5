"""The parallel resize against Pillow itself, and the normalization paths against the table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from guardrt.runtime.preprocess import ImageConfig, preprocess_image
from guardrt.runtime.preprocess.normalize import normalization_table
from guardrt.runtime.preprocess.resize import height_pass_first, resize_into
from tests.images import encode, noise


@settings(max_examples=60, deadline=None)
@given(
    in_w=st.integers(1, 1600),
    in_h=st.integers(1, 1600),
    out_w=st.integers(1, 1200),
    out_h=st.integers(1, 1200),
    threads=st.integers(2, 5),
)
def test_parallel_resize_is_pillow_resize(
    in_w: int, in_h: int, out_w: int, out_h: int, threads: int
) -> None:
    image = Image.fromarray(noise(in_w, in_h, seed=in_w + in_h))
    expected = np.asarray(image.resize((out_w, out_h), Image.Resampling.BILINEAR))
    canvas = np.full((out_h + 3, out_w + 5, 3), 7, dtype=np.uint8)
    # Force the strip path even for small images.
    resize_into(image, out_w, out_h, canvas, threads=threads, min_parallel_pixels=0)
    np.testing.assert_array_equal(canvas[:out_h, :out_w], expected)
    assert (canvas[out_h:] == 7).all()
    assert (canvas[:, out_w:] == 7).all()


@pytest.mark.parametrize(
    ("size", "out", "height_first"),
    [
        ((1000, 4000), (560, 2240), True),
        ((4000, 3000), (1120, 840), False),
        ((50, 100), (280, 560), False),
    ],
)
def test_pass_order_rule(size: tuple[int, int], out: tuple[int, int], height_first: bool) -> None:
    assert height_pass_first(*size, *out) is height_first
    image = Image.fromarray(noise(*size, seed=1))
    canvas = np.zeros((out[1], out[0], 3), dtype=np.uint8)
    resize_into(image, *out, canvas, threads=2, min_parallel_pixels=0)
    np.testing.assert_array_equal(canvas, np.asarray(image.resize(out, Image.Resampling.BILINEAR)))


@pytest.mark.parametrize(
    ("mean", "std"),
    [
        ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ((0.1, 0.2, 0.3), (0.3, 0.7, 0.011)),
    ],
)
def test_both_normalization_paths_reproduce_the_table(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> None:
    norm = normalization_table(mean, std, 1 / 255)
    levels = np.arange(256, dtype=np.uint8)
    for channel in range(3):
        expected = (
            (levels * (1 / 255)).astype(np.float32) - np.float32(mean[channel])
        ) / np.float32(std[channel])
        np.testing.assert_array_equal(norm.table[channel], expected)
        out = np.empty(256, dtype=np.float32)
        norm.apply(levels, channel, out)
        np.testing.assert_array_equal(out, expected)


def test_half_precision_outputs_are_the_rounded_float32_tiles() -> None:
    image = Image.fromarray(noise(900, 700, seed=2))
    full = preprocess_image(image)
    half = preprocess_image(image, dtype="float16")
    brain = preprocess_image(image, dtype="bfloat16")
    assert half.pixel_values.dtype == np.float16
    np.testing.assert_array_equal(half.pixel_values, full.pixel_values.astype(np.float16))
    assert brain.pixel_values.dtype == np.uint16
    expected = torch.from_numpy(full.pixel_values).to(torch.bfloat16)
    got = torch.from_numpy(brain.pixel_values.view(np.int16)).view(torch.bfloat16)
    assert torch.equal(got, expected)


def test_unused_tiles_are_exactly_zero_and_out_is_written_in_place() -> None:
    out = np.full((4, 3, 560, 560), np.nan, dtype=np.float32)
    tiled = preprocess_image(Image.fromarray(noise(1000, 300)), out=out)
    assert tiled.pixel_values is out
    assert tiled.num_tiles == 2
    assert (out[2:] == 0).all()
    np.testing.assert_array_equal(tiled.aspect_ratio_mask, [1, 1, 0, 0])
    with pytest.raises(ValueError, match="out must be"):
        preprocess_image(Image.fromarray(noise(10, 10)), out=np.empty((4, 3, 560, 560), np.float16))


def test_other_tile_settings() -> None:
    tiled = preprocess_image(Image.fromarray(noise(300, 100)), max_tiles=6, tile_size=112)
    assert tiled.pixel_values.shape == (6, 3, 112, 112)
    assert tiled.tiles == (1, 3)
    config = ImageConfig(tile_size=224, max_tiles=2)
    assert preprocess_image(Image.fromarray(noise(50, 50)), config=config).pixel_values.shape == (
        2, 3, 224, 224,
    )  # fmt: skip


def test_fast_mode_is_close_to_exact_and_only_changes_jpeg() -> None:
    photo = Image.fromarray(noise(40, 30)).resize((3200, 2400), Image.Resampling.BICUBIC)
    jpeg = encode(photo, "JPEG", quality=92)
    exact = preprocess_image(jpeg).pixel_values
    fast = preprocess_image(jpeg, fast=True).pixel_values
    assert exact.shape == fast.shape
    assert not np.array_equal(exact, fast)
    # Smooth content: the DCT-domain downscale stays within a few uint8 levels on average.
    assert float(np.abs(exact - fast).mean()) < 0.05
    png = encode(Image.fromarray(noise(700, 500)), "PNG")
    np.testing.assert_array_equal(
        preprocess_image(png, fast=True).pixel_values, preprocess_image(png).pixel_values
    )
