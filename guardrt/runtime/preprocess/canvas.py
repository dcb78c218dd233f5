"""Canvas search for Llama Guard 3 Vision tiling: pure functions, no pixels.

Mirrors transformers' `get_optimal_tiled_canvas` / `get_image_size_fit_to_canvas` (numpy float64
arithmetic) and Meta's `VariableSizeImageTransform` (llama_models/llama3/multimodal/
image_transform.py), which agree on every size (reference §4.1, steps 1-2).

Worked example, tile 560, at most 4 tiles, a 1920×1080 photo (W×H). Each canvas's scale is
min(canvas_h/1080, canvas_w/1920): 1×1 → 0.292, 1×2 / 1×3 / 1×4 → 0.519, 2×2 → 0.583,
2×1 / 3×1 / 4×1 → 0.292. None is ≥ 1, so the least downscaling wins: 2×2 (aspect-ratio id 6).
Inside it the width is clipped to 1120 (scale 0.583) and the height follows: floor(1080·0.583)
= 630. The image is resized to 1120×630, padded black to 1120×1120 and cut into 4 tiles.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass


@functools.lru_cache(maxsize=16)
def supported_aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (tiles_high, tiles_wide) with tiles_high·tiles_wide ≤ max_tiles, in model order.

    The aspect-ratio id the model embeds is the 1-based index in this tuple (0 = no image);
    for 4 tiles: (1,1),(1,2),(1,3),(1,4),(2,1),(2,2),(3,1),(4,1) → ids 1..8.
    """
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    return tuple(
        (first, second)
        for first in range(1, max_tiles + 1)
        for second in range(1, max_tiles + 1)
        if first * second <= max_tiles
    )


@dataclass(frozen=True)
class CanvasPlan:
    """Where an image of a given size goes: canvas arrangement and resized size."""

    tiles_high: int  # canvas height in tiles
    tiles_wide: int  # canvas width in tiles
    aspect_ratio_id: int  # 1-based index into supported_aspect_ratios(max_tiles)
    resized_height: int  # image height after resize (pixels), ≤ tiles_high·tile_size
    resized_width: int  # image width after resize (pixels), ≤ tiles_wide·tile_size

    @property
    def num_tiles(self) -> int:
        return self.tiles_high * self.tiles_wide


def _canvas_scale(canvas_h: int, canvas_w: int, height: int, width: int) -> float:
    """min(canvas_h/height, canvas_w/width), written as transformers writes it (float64)."""
    scale_h = canvas_h / height
    scale_w = canvas_w / width
    return scale_h if scale_w > scale_h else scale_w


def optimal_canvas(height: int, width: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """The (tiles_high, tiles_wide) arrangement chosen for a height×width image.

    Least upscaling if any canvas needs a scale ≥ 1, else least downscaling; ties in scale go to
    the smallest canvas area, the first in model order among equal areas.
    """
    arrangements = supported_aspect_ratios(max_tiles)
    scales = [_canvas_scale(h * tile_size, w * tile_size, height, width) for h, w in arrangements]
    upscales = [s for s in scales if s >= 1]
    selected = min(upscales) if upscales else max(s for s in scales if s < 1)
    candidates = [arr for arr, s in zip(arrangements, scales, strict=True) if s == selected]
    return min(candidates, key=lambda arr: arr[0] * arr[1])


def fit_to_canvas(
    height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int
) -> tuple[int, int]:
    """(new_height, new_width) of the image inside its canvas, aspect ratio kept.

    Sides are first clipped into [tile_size, canvas side]: images smaller than a tile are
    upscaled until the limiting side reaches tile_size; images that already fit are not resized.
    A side that would round to 0 becomes 1, as in transformers (Meta would allow 0).
    """
    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_h = target_h / height
    scale_w = target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def plan_canvas(height: int, width: int, max_tiles: int, tile_size: int) -> CanvasPlan:
    """Canvas arrangement, aspect-ratio id and resized size for a height×width image."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {width}x{height} (WxH)")
    tiles_high, tiles_wide = optimal_canvas(height, width, max_tiles, tile_size)
    new_h, new_w = fit_to_canvas(
        height, width, tiles_high * tile_size, tiles_wide * tile_size, tile_size
    )
    aspect_ratio_id = supported_aspect_ratios(max_tiles).index((tiles_high, tiles_wide)) + 1
    return CanvasPlan(tiles_high, tiles_wide, aspect_ratio_id, new_h, new_w)
