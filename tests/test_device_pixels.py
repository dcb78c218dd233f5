"""Images held as uint8 canvases: their pixels, stacked on the host or gathered on the device,
are exactly those the normalization table gives (and so transformers', `test_parity.py`).

On a GPU (GUARDRT_TEST_DEVICE=cuda, scripts/gpu_check.sh) the gather runs on CUDA too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from guardrt.runtime.device_pixels import DevicePixels, tiles_from_canvas
from guardrt.runtime.preprocess import (
    ImageConfig,
    TiledImage,
    pack_images,
    preprocess_image,
    stack_pixels,
)
from guardrt.runtime.preprocess.normalize import normalization_table, write_tiles
from tests.images import noise
from tests.models import DEVICE

# (width, height) → 1×1, 1×2, 2×1, 2×2, 1×3 and 4×1 tiles of 28 px with up to 4 tiles.
SIZES = [(20, 20), (50, 25), (25, 50), (50, 50), (80, 26), (20, 100)]
SMALL = ImageConfig(tile_size=28, max_tiles=4)


def tiled(width: int, height: int, dtype: str = "float32", seed: int = 0) -> TiledImage:
    image = Image.fromarray(noise(width, height, seed=seed))
    return preprocess_image(image, config=SMALL, dtype=dtype)  # type: ignore[arg-type]


def written(image: TiledImage) -> np.ndarray:
    """The pixels the eager path writes (`out=`), from the same canvas and table."""
    out = np.empty(image.pixel_shape, dtype=image.norm.table.dtype)
    write_tiles(image.canvas, *image.tiles, image.norm, out)
    return out


def as_float(values: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(values))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def test_a_queued_image_holds_its_uint8_canvas_only() -> None:
    one = preprocess_image(Image.fromarray(noise(300, 300)))  # 1 tile of 560 px
    assert one.written is None
    assert one.tiles == (1, 1)
    assert one.canvas.dtype == np.uint8
    assert one.canvas.nbytes == 560 * 560 * 3
    four = preprocess_image(Image.fromarray(noise(1000, 1000)))
    assert four.canvas.nbytes == 4 * 560 * 560 * 3  # 3.8 MB, where 15 MB of float32 were held
    assert four.pixel_values.shape == (4, 3, 560, 560)
    assert four.pixel_values.dtype == np.float32


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_pixels_on_access_are_the_eager_ones(width: int, height: int, dtype: str) -> None:
    image = tiled(width, height, dtype)
    out = np.empty(image.pixel_shape, dtype=image.norm.table.dtype)
    eager = preprocess_image(
        Image.fromarray(noise(width, height)),
        config=SMALL,
        dtype=dtype,  # type: ignore[arg-type]
        out=out,
    )
    assert eager.written is out
    np.testing.assert_array_equal(image.pixel_values, out)
    assert (image.pixel_values[image.num_tiles :] == 0).all()


def test_stack_pixels_rows_are_each_images_pixels() -> None:
    images = [tiled(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    stacked = stack_pixels(images)
    assert stacked.shape == (len(SIZES), 4, 3, 28, 28)
    for row, image in enumerate(images):
        np.testing.assert_array_equal(stacked[row], written(image))
    with pytest.raises(ValueError, match="different layouts"):
        stack_pixels([images[0], tiled(20, 20, "float16")])
    packed = pack_images([images[3], None])
    np.testing.assert_array_equal(packed.pixel_values[0, 0], written(images[3]))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_tiles_gathered_from_the_canvas_are_the_hosts(width: int, height: int, dtype: str) -> None:
    image = tiled(width, height, dtype, seed=width)
    table = as_float(image.norm.table, dtype)
    canvas = torch.from_numpy(image.canvas)
    got = tiles_from_canvas(table, canvas, image.tiles)
    expected = as_float(written(image), dtype)[: image.num_tiles]
    assert got.dtype == expected.dtype
    assert torch.equal(
        got.view(torch.int16 if dtype != "float32" else torch.int32),
        expected.view(torch.int16 if dtype != "float32" else torch.int32),
    )


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_device_pixels_batch_is_the_stacked_one(gather: bool, dtype: str) -> None:
    """Both ways to the device (and on CUDA under gpu_check.sh, the gather there) give the
    host's stacked pixels bit for bit, unused tiles exactly 0."""
    images = [tiled(w, h, dtype, seed=i) for i, (w, h) in enumerate(SIZES)]
    pixels = DevicePixels(torch.device(DEVICE), gather=gather).pixels(images)
    expected = as_float(stack_pixels(images), dtype)
    assert pixels.device.type == torch.device(DEVICE).type
    assert pixels.dtype == expected.dtype
    assert torch.equal(pixels.cpu(), expected)


def test_device_pixels_default_gathers_off_the_cpu_only() -> None:
    assert not DevicePixels(torch.device("cpu")).gather
    assert DevicePixels(torch.device("meta")).gather
    with pytest.raises(ValueError, match="different layouts"):
        DevicePixels(torch.device("cpu")).pixels([tiled(20, 20), tiled(20, 20, "float16")])


def test_the_table_the_device_gathers_is_the_shared_one() -> None:
    """The device keeps one copy per normalization table (they are cached by settings)."""
    first, second = tiled(20, 20), tiled(50, 50, seed=3)
    assert (
        first.norm
        is second.norm
        is normalization_table(SMALL.image_mean, SMALL.image_std, SMALL.rescale_factor, "float32")
    )
    pixels = DevicePixels(torch.device("cpu"), gather=True)
    pixels.pixels([first, second])
    assert len(pixels._tables) == 1


def test_the_gathered_table_lives_on_the_device() -> None:
    """The canvases' indices are on the device, so the table must be too (a CUDA index into a
    CPU table is refused on a GPU; the meta device stands in for it here)."""
    image = tiled(20, 20)
    meta = DevicePixels(torch.device("meta"), gather=True)
    assert meta._table(image.norm, image.dtype).device.type == "meta"
    assert meta.pixels([image]).device.type == "meta"


def test_with_pixels_holds_them_once() -> None:
    """transformers' timed inputs start from held pixels, as from its processor's output."""
    image = tiled(50, 50)
    held = image.with_pixels()
    assert image.written is None
    assert held.written is not None
    assert held.pixel_values is held.pixel_values  # not normalized again on each access
    np.testing.assert_array_equal(held.pixel_values, image.pixel_values)
    assert held.with_pixels() is held
