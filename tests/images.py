"""Deterministic test images and the transformers reference processor."""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from guardrt.runtime.preprocess.config import CLIP_MEAN, CLIP_STD


def synthetic(width: int, height: int) -> NDArray[np.uint8]:
    """The reference vectors' image: pixel (x, y, c) = (7x² + 3y² + 5xy + 50c) mod 256."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)  # (H, W) each
    c = np.arange(3, dtype=np.int64)
    value = 7 * x[..., None] ** 2 + 3 * y[..., None] ** 2 + 5 * x[..., None] * y[..., None]
    pixels: NDArray[np.uint8] = ((value + 50 * c) % 256).astype(np.uint8)  # (H, W, 3)
    return pixels


def noise(width: int, height: int, seed: int = 0, channels: int = 3) -> NDArray[np.uint8]:
    """Uniform random uint8 pixels: the hardest content for a resize to get bit-exact."""
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@functools.cache
def reference_processor() -> Any:
    """transformers' PIL-backend Mllama processor configured as the Llama Guard checkpoint."""
    from transformers.models.mllama import MllamaImageProcessorPil  # noqa: PLC0415

    return MllamaImageProcessorPil(
        size={"height": 560, "width": 560},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        max_image_tiles=4,
        resample=2,
        rescale_factor=1 / 255,
        do_convert_rgb=True,
        do_normalize=True,
        do_rescale=True,
        do_pad=True,
        do_resize=True,
    )


def reference(image: Image.Image) -> dict[str, Any]:
    return dict(reference_processor()(image, return_tensors="np"))
