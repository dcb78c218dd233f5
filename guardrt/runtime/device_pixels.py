"""Images' uint8 canvases → the vision encoder's input tensor on the torch engine's device.

A `TiledImage` keeps its resized canvas as uint8 and is normalized only when its pixels are
needed (`tiling.py`). On a GPU the canvases cross PCIe as they are, a quarter of float32's
bytes (3.8 MB for 4 tiles instead of 15 MB, and one tile's 0.9 MB for a one-tile image), and
are normalized there by gathering from the very table the host uses (`normalize.py`: the model
input of each uint8 value, per channel): the same values bit for bit, without the host's
normalization pass or its stack copy on the engine thread. On the CPU the host writes them
straight into the batch array (`stack_pixels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from guardrt.runtime.preprocess import TiledImage, common_layout, stack_pixels
from guardrt.runtime.preprocess.normalize import NormalizationTable, PixelDType

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,  # stored on the host as uint16 bits
}


def host_tensor(values: np.ndarray, dtype: PixelDType) -> torch.Tensor:
    """A numpy array of `dtype`'s storage as a torch tensor of that dtype (no copy)."""
    tensor = torch.from_numpy(values)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def tiles_from_canvas(
    table: torch.Tensor, canvas: torch.Tensor, tiles: tuple[int, int]
) -> torch.Tensor:
    """table (3, 256) of pixel values, canvas (high·T, wide·T, 3) uint8, tiles (high, wide) →
    (high·wide, 3, T, T): the canvas's tiles in row-major order, each value looked up."""
    high, wide = tiles
    tile = canvas.shape[0] // high
    blocks = canvas.view(high, tile, wide, tile, 3).permute(0, 2, 4, 1, 3)  # (h, w, 3, T, T)
    channels = torch.arange(3, device=canvas.device).view(1, 1, 3, 1, 1)
    values = table[channels, blocks.long()]  # (h, w, 3, T, T)
    return values.reshape(high * wide, 3, tile, tile)


class DevicePixels:
    """Makes the (N, max_tiles, 3, T, T) pixel tensor of a batch's images on one device."""

    def __init__(self, device: torch.device, *, gather: bool | None = None) -> None:
        """gather: normalize on the device from the uint8 canvases (default: on any device
        but the CPU, where numpy's pass writes the batch array directly)."""
        self.device = device
        self.gather = device.type != "cpu" if gather is None else gather
        # One per normalization table in use (`normalization_table` caches them): a few.
        self._tables: dict[NormalizationTable, torch.Tensor] = {}

    def _table(self, norm: NormalizationTable, dtype: PixelDType) -> torch.Tensor:
        found = self._tables.get(norm)
        if found is None:
            copy = np.array(norm.table)  # writable: torch refuses to wrap a read-only array
            found = host_tensor(copy, dtype).to(self.device)
            self._tables[norm] = found
        return found

    def pixels(self, images: Sequence[TiledImage]) -> torch.Tensor:
        """The images' pixels, in their dtype, on the device; tiles past each image's own are
        exactly 0, as `TiledImage.pixel_values` has them."""
        first = common_layout(images)
        if not self.gather:
            return host_tensor(stack_pixels(images), first.dtype).to(self.device)
        shape = (len(images), *first.pixel_shape)
        out = torch.zeros(shape, dtype=_TORCH_DTYPES[first.dtype], device=self.device)
        for row, image in enumerate(images):
            canvas = torch.from_numpy(image.canvas).to(self.device)  # (h·T, w·T, 3) uint8
            table = self._table(image.norm, image.dtype)
            out[row, : image.num_tiles] = tiles_from_canvas(table, canvas, image.tiles)
        return out
