"""uint8 canvas → normalized tiles, bit-exact with transformers' rescale + normalize.

After the resize every value is uint8, so rescale + normalize is a function of 256 values per
channel (reference §4.1 step 5). `NormalizationTable` holds that function as a (3, 256) table,
computed the way transformers computes each pixel: x·rescale in float64, cast to float32, then
(x − mean)/std in float32.

Applying a table with `np.take` costs ~1 ns per value and holds the GIL, so for float32 output
the tiles are computed arithmetically instead, as ((x / 255) − mean) / std in float32: three
numpy ufunc passes that use SIMD and release the GIL. That formula is used only when it
reproduces the table for all 256 inputs of every channel (checked when the table is built): each
output value depends on one input value only, so agreement on all 256 inputs is agreement on
every image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from guardrt.runtime.preprocess.parallel import map_threads

PixelDType = Literal["float32", "float16", "bfloat16"]
# numpy has no bfloat16: those tiles hold the raw bf16 bits as uint16
# (view them as torch.bfloat16 on the device side).
_STORAGE: dict[str, type[np.generic]] = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
}
_LEVELS = np.arange(256, dtype=np.uint8)


def storage_dtype(dtype: PixelDType) -> np.dtype[np.generic]:
    """The numpy dtype that holds pixel values of `dtype`."""
    if dtype not in _STORAGE:
        raise ValueError(f"pixel dtype must be one of {sorted(_STORAGE)}, got {dtype!r}")
    return np.dtype(_STORAGE[dtype])


def float32_to_bfloat16_bits(values: NDArray[np.float32]) -> NDArray[np.uint16]:
    """Round-to-nearest-even float32 → bfloat16, as raw uint16 bits (finite inputs)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


@dataclass(frozen=True, eq=False)
class NormalizationTable:
    """How uint8 values of each channel become model inputs."""

    table: NDArray[Any]  # (3, 256) in the output storage dtype
    mean: NDArray[np.float32]  # (3,)
    std: NDArray[np.float32]  # (3,)
    arithmetic: bool  # float32 output reproduced exactly by ((x / 255) − mean) / std

    def apply(self, block: NDArray[np.uint8], channel: int, out: NDArray[Any]) -> None:
        """out[...] = normalized block; block (h, w) uint8 (any strides), out (h, w)."""
        if self.arithmetic:
            np.divide(block, np.float32(255), out=out, dtype=np.float32)
            np.subtract(out, self.mean[channel], out=out)
            np.divide(out, self.std[channel], out=out)
        else:
            np.take(self.table[channel], block, out=out)


@functools.lru_cache(maxsize=16)
def normalization_table(
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    rescale_factor: float,
    dtype: PixelDType = "float32",
) -> NormalizationTable:
    """The (3, 256) table for these settings, and whether float32 arithmetic reproduces it."""
    levels = (_LEVELS.astype(np.float64) * rescale_factor).astype(np.float32)  # (256,)
    mean32 = np.asarray(mean, dtype=np.float32)  # (3,)
    std32 = np.asarray(std, dtype=np.float32)  # (3,)
    exact = ((levels[None, :] - mean32[:, None]) / std32[:, None]).astype(np.float32)  # (3, 256)
    if dtype == "bfloat16":
        table: NDArray[Any] = float32_to_bfloat16_bits(exact)
    else:
        table = exact.astype(storage_dtype(dtype))
    table.setflags(write=False)
    candidate = NormalizationTable(table, mean32, std32, arithmetic=True)
    probe = np.empty((3, 256), dtype=np.float32)
    for channel in range(3):
        candidate.apply(_LEVELS, channel, probe[channel])
    arithmetic = dtype == "float32" and bool(np.array_equal(probe, exact))
    return NormalizationTable(table, mean32, std32, arithmetic=arithmetic)


def write_tiles(
    canvas: NDArray[np.uint8],
    tiles_high: int,
    tiles_wide: int,
    norm: NormalizationTable,
    out: NDArray[Any],
    *,
    threads: int = 1,
) -> None:
    """Normalize a padded canvas and cut it into row-major tiles, writing straight into `out`.

    canvas: (tiles_high·T, tiles_wide·T, 3) uint8.
    out: (max_tiles, 3, T, T) of the table's dtype; tiles past tiles_high·tiles_wide are set to
    exactly 0 (not normalized black: "no tile" is 0.0 for the model).
    """
    tile = out.shape[-1]
    assert canvas.shape == (tiles_high * tile, tiles_wide * tile, 3), canvas.shape

    def one_tile(index: int) -> None:
        row, col = divmod(index, tiles_wide)
        block = canvas[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile]  # (T, T, 3)
        for channel in range(3):
            norm.apply(block[:, :, channel], channel, out[index, channel])

    map_threads(threads, one_tile, range(tiles_high * tiles_wide))
    out[tiles_high * tiles_wide :] = 0
