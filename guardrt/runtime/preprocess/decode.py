"""Untrusted image input → an RGB `PIL.Image`, or a typed `ImageError`.

Order matters: everything that can be refused from the header (byte count, format, pixel count,
frame count) is refused before a single pixel is decoded.

Decisions (reference §4.1 step 0 and §10), each a deliberate choice:
- Formats: JPEG (and MPO, the multi-picture JPEG phones write, judged on its primary picture),
  PNG, GIF, WebP, BMP, TIFF. Pillow's other parsers (EPS runs Ghostscript, PSD, ICO, ...) are
  never reached with untrusted bytes.
- Transparency (an alpha band or a `transparency` entry) is composited onto white, exactly as
  transformers 5.x does (`convert("RGBA")`, `alpha_composite` over white, `convert("RGB")`).
- EXIF orientation is applied (the image is judged the way a person sees it). transformers and
  Meta's reference do not apply it; for images without an orientation tag nothing changes.
- 16-bit greyscale (I;16*) keeps its high byte. Pillow's own conversion clips at 255, which
  would turn most 16-bit images white. 32-bit integer and float modes are refused.
- Animated images (GIF, APNG, WebP) and multi-page TIFFs are refused: judging frame 0 alone
  would let the other frames through unseen.
- ICC profiles are ignored, as in transformers.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    MpoImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from guardrt.runtime.errors import ImageError, ImageReason
from guardrt.runtime.preprocess.config import ImageLimits

ImageInput: TypeAlias = (
    "bytes | bytearray | memoryview | str | os.PathLike[str] | Image.Image | NDArray[np.uint8]"
)

# Pillow format names passed to Image.open; a JPEG with an MP extension opens as "MPO".
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# Importing a plugin registers it; `Image.open(formats=...)` only looks among registered ones.
_PLUGINS = (
    BmpImagePlugin,
    GifImagePlugin,
    JpegImagePlugin,
    MpoImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)
# Formats whose extra frames are auxiliary pictures of the same scene, not content.
_SINGLE_SCENE_FORMATS = frozenset({"MPO"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_REFUSED_MODES = frozenset({"I", "F"})
_EXIF_ORIENTATION = 0x0112
# EXIF orientation → the transposition that undoes it (same table as PIL.ImageOps.exif_transpose).
_ORIENTATION_FIX: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# What a malformed file can make Pillow's parsers raise; all of it means "corrupt".
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ArithmeticError,
)


@dataclass(frozen=True)
class OpenedImage:
    """An image whose header has passed the limits; pixels may not be decoded yet."""

    image: Image.Image  # lazily decoded when guardrt opened it, as given otherwise
    orientation: int  # EXIF orientation, 1 when absent or meaningless
    owned: bool  # True when guardrt opened it (so it may be drafted and decoded in place)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as a viewer shows it, after EXIF orientation."""
        width, height = self.image.size
        return (height, width) if self.orientation in (5, 6, 7, 8) else (width, height)


def open_image(image: ImageInput, limits: ImageLimits) -> OpenedImage:
    """Check an image against the limits from its header only. Raises ImageError."""
    if isinstance(image, Image.Image):
        return _admit(image, limits, owned=False)
    if isinstance(image, np.ndarray):
        return _admit(_from_array(image), limits, owned=False)
    if isinstance(image, (bytes, bytearray, memoryview)):
        _check_bytes(len(image), limits, "image data")
        return _admit(_open_encoded(bytes(image)), limits, owned=True)
    if isinstance(image, (str, os.PathLike)):
        return _admit(_open_encoded(_read_path(os.fspath(image), limits)), limits, owned=True)
    raise ImageError(
        ImageReason.BAD_INPUT,
        f"unsupported image input type {type(image).__name__} "
        "(expected bytes, a path, a PIL.Image.Image or an HxWx3 uint8 array)",
    )


def decode_rgb(opened: OpenedImage, *, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode (if needed), orient and convert to RGB.

    draft_size: (width, height) after orientation that the caller will resize to; when set and
    the image is a JPEG guardrt opened, libjpeg decodes at 1/2, 1/4 or 1/8 scale but never below
    that size (fast mode: close to, not bit-exact with, the reference).
    """
    image = opened.image
    with _malformed("data"):
        if draft_size is not None and opened.owned and image.format in ("JPEG", "MPO"):
            width, height = draft_size
            if opened.orientation in (5, 6, 7, 8):
                width, height = height, width
            image.draft(image.mode, (width, height))
        image.load()
        fix = _ORIENTATION_FIX.get(opened.orientation)
        if fix is not None:
            image = image.transpose(fix)
        return _to_rgb(image)


@contextlib.contextmanager
def _malformed(part: str) -> Iterator[None]:
    """Turn what Pillow raises on a malformed file into ImageError (the image's `part` is bad)."""
    try:
        yield
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(
            ImageReason.UNKNOWN_FORMAT,
            f"image data is not a supported format ({', '.join(ALLOWED_FORMATS)})",
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(
            ImageReason.TOO_MANY_PIXELS, f"image refused by the decoder: {exc}"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(
            ImageReason.CORRUPT, f"image {part} is truncated or corrupt ({type(exc).__name__})"
        ) from exc


def _check_bytes(size: int, limits: ImageLimits, what: str) -> None:
    if size == 0:
        raise ImageError(ImageReason.EMPTY, f"{what} is empty (0 bytes)")
    if size > limits.max_bytes:
        raise ImageError(
            ImageReason.TOO_MANY_BYTES,
            f"{what} is {size} bytes, over the limit of {limits.max_bytes} bytes",
        )


def _read_path(path: str, limits: ImageLimits) -> bytes:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError as exc:
        raise ImageError(ImageReason.NOT_FOUND, f"image file not found: {path}") from exc
    except OSError as exc:
        raise ImageError(ImageReason.NOT_FOUND, f"image file {path} cannot be read") from exc
    _check_bytes(size, limits, f"image file {path}")
    with open(path, "rb") as handle:
        data = handle.read(limits.max_bytes + 1)
    _check_bytes(len(data), limits, f"image file {path}")
    return data


def _open_encoded(data: bytes) -> Image.Image:
    with _malformed("header"):
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)


def _from_array(array: NDArray[np.uint8]) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(
            ImageReason.BAD_INPUT,
            f"image arrays must be HxWx3 uint8, got shape {array.shape} dtype {array.dtype}",
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(ImageReason.EMPTY, f"image array has no pixels (shape {array.shape})")
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def _admit(image: Image.Image, limits: ImageLimits, *, owned: bool) -> OpenedImage:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(ImageReason.EMPTY, f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageError(
            ImageReason.TOO_MANY_PIXELS,
            f"image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_pixels}",
        )
    with _malformed("header"):  # counting frames may parse more of a malformed file
        frames = int(getattr(image, "n_frames", 1))
    if frames > 1 and image.format not in _SINGLE_SCENE_FORMATS:
        raise ImageError(
            ImageReason.MULTI_FRAME,
            f"{image.format or 'image'} has {frames} frames; animated or multi-page images "
            "are refused (only one still image can be judged)",
        )
    if image.mode in _REFUSED_MODES:
        raise ImageError(
            ImageReason.UNSUPPORTED_MODE, f"image mode {image.mode!r} is not supported"
        )
    with _malformed("header"):  # so may reading EXIF
        orientation = _orientation(image)
    return OpenedImage(image=image, orientation=orientation, owned=owned)


def _orientation(image: Image.Image) -> int:
    value = image.getexif().get(_EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and value in _ORIENTATION_FIX else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        high_bytes = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)  # (H, W)
        return Image.fromarray(high_bytes, "L").convert("RGB")
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(
            ImageReason.UNSUPPORTED_MODE, f"image mode {mode!r} cannot be converted to RGB"
        ) from exc
