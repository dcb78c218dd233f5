"""Photo-like JPEGs for the benchmarks: what decides decoding cost is how a JPEG compresses,
and random noise compresses like no camera photo, so timing preprocessing needs these."""

from __future__ import annotations

import importlib.resources
import importlib.util
import io

import numpy as np
from numpy.typing import NDArray
from PIL import Image


def photo_like(width: int, height: int, seed: int = 0) -> NDArray[np.uint8]:
    """A photo-like image: 1/f multi-scale structure, correlated colours, fine sensor grain.

    Its JPEG compresses like a camera photo (~2 bits per pixel at quality 90), which is what
    decides decoding cost.
    """
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.float32)
    for octave in range(9):
        grid_w = max(2, (width >> (8 - octave)) // 2 + 2)
        grid_h = max(2, (height >> (8 - octave)) // 2 + 2)
        amplitude = 70.0 / (1.45**octave)
        luma = rng.normal(0.0, 1.0, (grid_h, grid_w)).astype(np.float32)
        field = np.asarray(
            Image.fromarray(luma, "F").resize((width, height), Image.Resampling.BICUBIC)
        )  # (H, W)
        tint = rng.normal(1.0, 0.25, 3).astype(np.float32)  # (3,)
        image += amplitude * field[..., None] * tint
    image += rng.normal(0.0, 4.0, (height, width, 1)).astype(np.float32)  # luminance grain
    pixels: NDArray[np.uint8] = np.clip(image + 120.0, 0, 255).astype(np.uint8)  # (H, W, 3)
    return pixels


def jpeg(pixels: NDArray[np.uint8], quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def real_photo() -> tuple[str, bytes] | None:
    """A real photo Meta ships with `llama_models` (1280×1280), when that package is installed."""
    if importlib.util.find_spec("llama_models") is None:
        return None
    pasta = importlib.resources.files("llama_models") / "resources" / "pasta.jpeg"
    return "1280x1280 pasta.jpeg (real)", pasta.read_bytes()
