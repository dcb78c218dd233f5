"""Image → model-ready tiles (`TiledImage`), and tiles of several requests → one batch.

The pipeline (reference §4.1): open and check → decode, orient, RGB → canvas search → resize
(PIL bilinear, bit-exact, parallel) into a black canvas → lookup-table normalization into the
(max_tiles, 3, T, T) model input, unused tiles exactly 0.0. Bit-exact with transformers'
`MllamaImageProcessorPil` configured as the checkpoint (for images without an EXIF orientation).

A `TiledImage` keeps the uint8 canvas and normalizes it when its pixels are asked for (into the
batch's own array, or on the GPU by the torch back end: `device_pixels.py`). Normalization is a
function of each uint8 value alone (`normalize.py`), so the values are the same wherever it
runs, and a queued image holds 0.9 MB a tile instead of 15 MB of float32 for 4 tiles whatever
its tile count (measured: `benchmarks/preprocess.py`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guardrt.runtime.preprocess.canvas import plan_canvas
from guardrt.runtime.preprocess.config import DEFAULT_IMAGE_CONFIG, ImageConfig
from guardrt.runtime.preprocess.decode import ImageInput, decode_rgb, open_image
from guardrt.runtime.preprocess.normalize import (
    NormalizationTable,
    PixelDType,
    normalization_table,
    storage_dtype,
    write_tiles,
)
from guardrt.runtime.preprocess.resize import resize_into


def default_threads() -> int:
    """Threads one image's resize may use: the machine's cores, at most 4."""
    return max(1, min(os.cpu_count() or 1, 4))


@dataclass(frozen=True, eq=False)
class TiledImage:
    """One image, tiled for the vision encoder: its uint8 canvas and how to normalize it."""

    canvas: NDArray[np.uint8]  # (tiles_high·T, tiles_wide·T, 3): the resized image on black
    norm: NormalizationTable  # uint8 value → model input, per channel, in `dtype`
    max_tiles: int  # tile slots of the model's input; those past num_tiles are exactly 0
    aspect_ratio_id: int  # 1-based arrangement id (0 is reserved for "no image")
    aspect_ratio_mask: NDArray[np.int64]  # (max_tiles,): 1 for the first num_tiles tiles
    num_tiles: int  # tiles_high · tiles_wide
    tiles: tuple[int, int]  # (tiles_high, tiles_wide)
    source_size: tuple[int, int]  # (width, height) as decoded and oriented
    resized_size: tuple[int, int]  # (width, height) inside the canvas
    dtype: PixelDType  # "bfloat16" tiles are stored as uint16 bits
    written: NDArray[Any] | None = None  # the pixels, when written at preprocessing (`out=`)

    @property
    def tile_size(self) -> int:
        return int(self.canvas.shape[0]) // self.tiles[0]

    @property
    def pixel_shape(self) -> tuple[int, int, int, int]:
        """(max_tiles, 3, T, T): the model input's shape for this image."""
        return (self.max_tiles, 3, self.tile_size, self.tile_size)

    @property
    def pixel_values(self) -> NDArray[Any]:
        """(max_tiles, 3, T, T) in `dtype`'s storage; unused tiles exactly 0. Computed on each
        access unless written at preprocessing: hold on to it rather than asking twice."""
        if self.written is not None:
            return self.written
        out = np.empty(self.pixel_shape, dtype=storage_dtype(self.dtype))
        self.write_pixels(out)
        return out

    def with_pixels(self) -> TiledImage:
        """This image holding its pixels, normalized once (for callers that read them often:
        a reference model's inputs timed as transformers' processor output)."""
        if self.written is not None:
            return self
        return dataclasses.replace(self, written=self.pixel_values)

    def write_pixels(self, out: NDArray[Any], *, threads: int = 1) -> None:
        """Write the (max_tiles, 3, T, T) pixels into `out` (e.g. a batch array's row)."""
        if self.written is not None:
            out[...] = self.written
            return
        high, wide = self.tiles
        write_tiles(self.canvas, high, wide, self.norm, out, threads=threads)


def stack_pixels(images: Sequence[TiledImage], *, threads: int | None = None) -> NDArray[Any]:
    """The images' pixels as one (N, max_tiles, 3, T, T) array, written in place (no stack)."""
    first = common_layout(images)
    out = np.empty((len(images), *first.pixel_shape), dtype=storage_dtype(first.dtype))
    workers = default_threads() if threads is None else threads
    for row, image in enumerate(images):
        image.write_pixels(out[row], threads=workers)
    return out


def common_layout(images: Sequence[TiledImage]) -> TiledImage:
    """The first image, once every image is known to share its pixel shape and dtype (a batch
    needs one layout; ValueError otherwise)."""
    first = images[0]
    for image in images:
        if (image.pixel_shape, image.dtype) != (first.pixel_shape, first.dtype):
            raise ValueError(
                "cannot put images of different layouts in one batch: "
                f"{image.pixel_shape} {image.dtype} vs {first.pixel_shape} {first.dtype}"
            )
    return first


def preprocess_image(
    image: ImageInput,
    *,
    max_tiles: int | None = None,
    tile_size: int | None = None,
    config: ImageConfig | None = None,
    dtype: PixelDType = "float32",
    fast: bool = False,
    threads: int | None = None,
    out: NDArray[Any] | None = None,
) -> TiledImage:
    """Tile one image for Llama Guard 3 Vision. Raises ImageError for anything it won't judge.

    image: encoded bytes, a path, a PIL image or an HxWx3 uint8 array.
    config: tile size, tile count, mean/std and limits (default: the model's own
        preprocessor_config); max_tiles / tile_size override it.
    dtype: "float32" (bit-exact with the reference), "float16" or "bfloat16" (the float32 values
        rounded to nearest; bf16 returned as uint16 bits).
    fast: let JPEG decoding shrink by 1/2, 1/4 or 1/8 in the DCT domain first (never below the
        resize target). Much faster on large photos; not bit-exact (see the benchmark).
    threads: cores for the resize (default: up to 4). Output is identical for any value.
    out: optional preallocated (max_tiles, 3, T, T) array of the dtype's storage type: the
        pixels are written into it now. Without it they are computed when asked for.
    """
    cfg = config or DEFAULT_IMAGE_CONFIG
    if max_tiles is not None or tile_size is not None:
        cfg = cfg.replace(
            max_tiles=cfg.max_tiles if max_tiles is None else max_tiles,
            tile_size=cfg.tile_size if tile_size is None else tile_size,
        )
    tile = cfg.tile_size
    storage_dtype(dtype)  # an unknown dtype is refused before any decoding
    written = None if out is None else _output(out, cfg, dtype)
    opened = open_image(image, cfg.limits)
    width, height = opened.size
    plan = plan_canvas(height, width, cfg.max_tiles, tile)
    draft = (plan.resized_width, plan.resized_height) if fast else None
    rgb = decode_rgb(opened, draft_size=draft)
    canvas = np.zeros((plan.tiles_high * tile, plan.tiles_wide * tile, 3), dtype=np.uint8)
    workers = default_threads() if threads is None else threads
    resize_into(rgb, plan.resized_width, plan.resized_height, canvas, threads=workers)
    norm = normalization_table(cfg.image_mean, cfg.image_std, cfg.rescale_factor, dtype)
    if written is not None:
        write_tiles(canvas, plan.tiles_high, plan.tiles_wide, norm, written, threads=workers)
    mask = np.zeros(cfg.max_tiles, dtype=np.int64)
    mask[: plan.num_tiles] = 1
    return TiledImage(
        canvas=canvas,
        norm=norm,
        max_tiles=cfg.max_tiles,
        aspect_ratio_id=plan.aspect_ratio_id,
        aspect_ratio_mask=mask,
        num_tiles=plan.num_tiles,
        tiles=(plan.tiles_high, plan.tiles_wide),
        source_size=(width, height),
        resized_size=(plan.resized_width, plan.resized_height),
        dtype=dtype,
        written=written,
    )


def _output(out: NDArray[Any], cfg: ImageConfig, dtype: PixelDType) -> NDArray[Any]:
    shape = (cfg.max_tiles, 3, cfg.tile_size, cfg.tile_size)
    storage = storage_dtype(dtype)
    if out.shape != shape or out.dtype != storage or not out.flags.c_contiguous:
        # A caller's programming error, not a property of the image: not an ImageError.
        raise ValueError(
            f"out must be a C-contiguous {shape} {storage} array, got {out.shape} {out.dtype}"
        )
    return out


@dataclass(frozen=True, eq=False)
class PackedImages:
    """A batch of tiled images in the model's layout (one image slot per request)."""

    pixel_values: NDArray[Any]  # (B, 1, max_tiles, 3, T, T); rows without image are 0
    aspect_ratio_ids: NDArray[np.int64]  # (B, 1); 0 for rows without image
    aspect_ratio_mask: NDArray[np.int64]  # (B, 1, max_tiles); tile 0 is always 1, as in HF
    num_tiles: tuple[int, ...]  # (B,); 0 for rows without image


def pack_images(images: Sequence[TiledImage | None]) -> PackedImages:
    """Stack per-request tiles into batch arrays. `None` marks a request without an image."""
    present = [image for image in images if image is not None]
    if not images or not present:
        raise ValueError("pack_images needs at least one image")
    first = common_layout(present)
    max_tiles = first.max_tiles
    batch = len(images)
    pixel_values = np.zeros((batch, 1, *first.pixel_shape), storage_dtype(first.dtype))
    ids = np.zeros((batch, 1), dtype=np.int64)
    mask = np.zeros((batch, 1, max_tiles), dtype=np.int64)
    mask[:, :, 0] = 1
    for row, item in enumerate(images):
        if item is None:
            continue
        item.write_pixels(pixel_values[row, 0], threads=default_threads())
        ids[row, 0] = item.aspect_ratio_id
        mask[row, 0] = item.aspect_ratio_mask
    counts = tuple(0 if item is None else item.num_tiles for item in images)
    return PackedImages(pixel_values, ids, mask, counts)
