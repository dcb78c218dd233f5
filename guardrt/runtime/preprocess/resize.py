"""PIL's antialiased bilinear resize, bit-exact, spread over several cores.

Pillow resizes in two separable passes, rounding to uint8 after each (reference §4.1 step 3).
A pass along the width treats every row independently and a pass along the height every column,
so each pass can be cut into strips across the other axis and run in parallel threads (Pillow
releases the GIL while resampling). Each strip is computed by Pillow itself with the very same
coefficients, so the result is identical to `image.resize(size, BILINEAR)`; the tests check it.

A strip is `crop()`ped before resizing rather than selected with `resize(box=...)`: the box
would add an identity pass over the other axis that costs more than the copy (measured).

The only thing to mirror is Pillow's pass order: up to 12.x the width pass always runs first;
from 13.0 the height pass runs first when the image shrinks vertically by more than twice what
it shrinks horizontally.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL
from numpy.typing import NDArray
from PIL import Image

from guardrt.runtime.preprocess.parallel import cuts, map_threads

_BILINEAR = Image.Resampling.BILINEAR

_PILLOW_MAJOR = int(PIL.__version__.split(".", 1)[0])
# Below this many input pixels, one thread is faster than splitting and reassembling.
_PARALLEL_MIN_PIXELS = 1_000_000


def height_pass_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Pillow's pass order for a two-pass resize (Resample.c, ImagingResampleInner)."""
    shrink_h = in_h - out_h
    return _PILLOW_MAJOR >= 13 and shrink_h > 0 and shrink_h > 2 * (in_w - out_w)


def _pass(
    image: Image.Image,
    out_w: int,
    out_h: int,
    along_width: bool,
    threads: int,
    place: Callable[[int, Image.Image], None],
) -> None:
    """One resize pass along one axis, in strips across the other, each handed to `place`.

    Along the width the strips are row ranges (width becomes out_w); along the height they are
    column ranges (height becomes out_h). `place(offset, strip)` runs on the strip's own thread,
    so copying the strips out is parallel too.
    """
    width, height = image.size

    def strip(span: tuple[int, int]) -> None:
        start, stop = span
        if along_width:
            piece = image.crop((0, start, width, stop)).resize((out_w, stop - start), _BILINEAR)
        else:
            piece = image.crop((start, 0, stop, height)).resize((stop - start, out_h), _BILINEAR)
        place(start, piece)

    map_threads(threads, strip, cuts(height if along_width else width, threads))


def resize_into(
    image: Image.Image,
    out_w: int,
    out_h: int,
    canvas: NDArray[np.uint8],
    *,
    threads: int = 1,
    min_parallel_pixels: int = _PARALLEL_MIN_PIXELS,
) -> None:
    """Write `image.resize((out_w, out_h), BILINEAR)` (an RGB image) into canvas[:out_h, :out_w].

    canvas: (H ≥ out_h, W ≥ out_w, 3) uint8; the rest of it is left untouched.
    threads: strips per pass; images under `min_parallel_pixels` are resized in one piece.
    """
    in_w, in_h = image.size
    if (in_w, in_h) == (out_w, out_h):
        canvas[:out_h, :out_w] = np.asarray(image)
        return
    if threads <= 1 or in_w * in_h < min_parallel_pixels:
        canvas[:out_h, :out_w] = np.asarray(image.resize((out_w, out_h), _BILINEAR))
        return
    order = [True, False]  # along the width, then along the height
    if height_pass_first(in_w, in_h, out_w, out_h):
        order.reverse()
    passes = [axis for axis in order if (in_w != out_w if axis else in_h != out_h)]
    if len(passes) == 2:
        middle = Image.new("RGB", (out_w, in_h) if passes[0] else (in_w, out_h), None)

        def paste(start: int, piece: Image.Image) -> None:
            middle.paste(piece, (0, start) if passes[0] else (start, 0))

        _pass(image, out_w, out_h, passes[0], threads, paste)
        image = middle

    def write(start: int, piece: Image.Image) -> None:
        region = np.asarray(piece)  # (strip_h, strip_w, 3)
        if passes[-1]:
            canvas[start : start + region.shape[0], :out_w] = region
        else:
            canvas[:out_h, start : start + region.shape[1]] = region

    _pass(image, out_w, out_h, passes[-1], threads, write)
