"""Deterministic test images and the transformers reference processor."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from guardrt.testing.references import image_processor


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


def reference(image: Image.Image) -> dict[str, Any]:
    return dict(image_processor()(image, return_tensors="np"))
