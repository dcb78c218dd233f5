"""Image → model-ready tiles (`TiledImage`), and tiles of several requests → one batch.

The pipeline (reference §4.1): open and check → decode, orient, RGB → canvas search → resize
(PIL bilinear, bit-exact, parallel) into a black canvas → lookup-table normalization straight
into the (max_tiles, 3, T, T) output, unused tiles exactly 0.0. Bit-exact with transformers'
`MllamaImageProcessorPil` configured as the checkpoint (for images without an EXIF orientation).
"""

from __future__ import annotations

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
    """One image, tiled for the vision encoder."""

    pixel_values: NDArray[Any]  # (max_tiles, 3, T, T); unused tiles exactly 0
    aspect_ratio_id: int  # 1-based arrangement id (0 is reserved for "no image")
    aspect_ratio_mask: NDArray[np.int64]  # (max_tiles,): 1 for the first num_tiles tiles
    num_tiles: int  # tiles_high · tiles_wide
    tiles: tuple[int, int]  # (tiles_high, tiles_wide)
    source_size: tuple[int, int]  # (width, height) as decoded and oriented
    resized_size: tuple[int, int]  # (width, height) inside the canvas
    dtype: PixelDType  # "bfloat16" tiles are stored as uint16 bits


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
    out: optional preallocated (max_tiles, 3, T, T) array of the dtype's storage type.
    """
    cfg = config or DEFAULT_IMAGE_CONFIG
    if max_tiles is not None or tile_size is not None:
        cfg = cfg.replace(
            max_tiles=cfg.max_tiles if max_tiles is None else max_tiles,
            tile_size=cfg.tile_size if tile_size is None else tile_size,
        )
    tile = cfg.tile_size
    pixels = _output(out, cfg, dtype)
    opened = open_image(image, cfg.limits)
    width, height = opened.size
    plan = plan_canvas(height, width, cfg.max_tiles, tile)
    draft = (plan.resized_width, plan.resized_height) if fast else None
    rgb = decode_rgb(opened, draft_size=draft)
    canvas = np.zeros((plan.tiles_high * tile, plan.tiles_wide * tile, 3), dtype=np.uint8)
    workers = default_threads() if threads is None else threads
    resize_into(rgb, plan.resized_width, plan.resized_height, canvas, threads=workers)
    norm = normalization_table(cfg.image_mean, cfg.image_std, cfg.rescale_factor, dtype)
    write_tiles(canvas, plan.tiles_high, plan.tiles_wide, norm, pixels, threads=workers)
    mask = np.zeros(cfg.max_tiles, dtype=np.int64)
    mask[: plan.num_tiles] = 1
    return TiledImage(
        pixel_values=pixels,
        aspect_ratio_id=plan.aspect_ratio_id,
        aspect_ratio_mask=mask,
        num_tiles=plan.num_tiles,
        tiles=(plan.tiles_high, plan.tiles_wide),
        source_size=(width, height),
        resized_size=(plan.resized_width, plan.resized_height),
        dtype=dtype,
    )


def _output(out: NDArray[Any] | None, cfg: ImageConfig, dtype: PixelDType) -> NDArray[Any]:
    shape = (cfg.max_tiles, 3, cfg.tile_size, cfg.tile_size)
    storage = storage_dtype(dtype)
    if out is None:
        return np.empty(shape, dtype=storage)
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
    first = present[0]
    layout = (first.pixel_values.shape, first.dtype)
    for image in present:
        if (image.pixel_values.shape, image.dtype) != layout:
            raise ValueError(
                "cannot pack images of different layouts: "
                f"{image.pixel_values.shape} {image.dtype} vs {layout[0]} {layout[1]}"
            )
    max_tiles = first.pixel_values.shape[0]
    batch = len(images)
    pixel_values = np.zeros((batch, 1, *first.pixel_values.shape), first.pixel_values.dtype)
    ids = np.zeros((batch, 1), dtype=np.int64)
    mask = np.zeros((batch, 1, max_tiles), dtype=np.int64)
    mask[:, :, 0] = 1
    for row, item in enumerate(images):
        if item is None:
            continue
        pixel_values[row, 0] = item.pixel_values
        ids[row, 0] = item.aspect_ratio_id
        mask[row, 0] = item.aspect_ratio_mask
    counts = tuple(0 if item is None else item.num_tiles for item in images)
    return PackedImages(pixel_values, ids, mask, counts)
