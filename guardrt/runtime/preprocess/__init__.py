"""Image preprocessing for Llama Guard 3 Vision: untrusted input → up to 4 tiles of 560×560."""

from guardrt.runtime.preprocess.canvas import CanvasPlan, plan_canvas, supported_aspect_ratios
from guardrt.runtime.preprocess.config import DEFAULT_IMAGE_CONFIG, ImageConfig, ImageLimits
from guardrt.runtime.preprocess.decode import ALLOWED_FORMATS, ImageInput
from guardrt.runtime.preprocess.normalize import PixelDType
from guardrt.runtime.preprocess.tiling import (
    PackedImages,
    TiledImage,
    common_layout,
    pack_images,
    preprocess_image,
    stack_pixels,
)

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_IMAGE_CONFIG",
    "CanvasPlan",
    "ImageConfig",
    "ImageInput",
    "ImageLimits",
    "PackedImages",
    "PixelDType",
    "TiledImage",
    "common_layout",
    "pack_images",
    "plan_canvas",
    "preprocess_image",
    "stack_pixels",
    "supported_aspect_ratios",
]
