"""The transformers objects guardrt is proved against, configured as the real checkpoint."""

from __future__ import annotations

import functools
from typing import Any

from guardrt.runtime.preprocess.config import CLIP_MEAN, CLIP_STD


@functools.cache
def image_processor() -> Any:
    """transformers' PIL-backend Mllama processor, set up as Llama Guard 3 Vision's file says.

    The PIL backend is the one bit-exact with Meta's reference; the default torchvision
    backend is not (reference §4.3).
    """
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
