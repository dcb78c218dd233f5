"""The transformers objects guardrt is proved against, configured as the real checkpoint."""

from __future__ import annotations

import functools
import importlib
import importlib.resources
from pathlib import Path
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


def converted_tokenizer_json(out_dir: Path) -> Path:
    """`tokenizer.json` made by transformers' own converter from the default tokenizer.model.

    This is how the HF checkpoint's file was made (reference §2.1); guardrt's reader and writer
    are checked against it.
    """
    # Imported as Any: transformers' converter is untyped.
    converters: Any = importlib.import_module("transformers.convert_slow_tokenizer")
    from guardrt.runtime.tokenizer import default_tokenizer_path  # noqa: PLC0415
    from guardrt.runtime.tokenizer_files import SPECIAL_NAMES  # noqa: PLC0415

    converter = converters.TikTokenConverter(
        vocab_file=str(default_tokenizer_path()), extra_special_tokens=list(SPECIAL_NAMES)
    )
    path = out_dir / "tokenizer.json"
    converter.converted().save(str(path))
    return path


def hf_tokenizer(tokenizer_json: Path) -> Any:
    """transformers' fast tokenizer over `tokenizer_json`, with the checkpoint's chat template."""
    transformers: Any = importlib.import_module("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=chat_template_text(),
    )


def chat_template_text() -> str:
    """The checkpoint's chat template (reference §3.1), as guardrt ships it."""
    return (importlib.resources.files("guardrt.runtime") / "chat_template.jinja").read_text()


def render_with_jinja(messages: Any, **kwargs: Any) -> str:
    """The template rendered by jinja2 the way transformers' `apply_chat_template` sets it up
    (sandboxed, `trim_blocks`/`lstrip_blocks`, `raise_exception`)."""
    import jinja2.sandbox  # noqa: PLC0415

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(chat_template_text()).render(messages=messages, **kwargs)


def hf_model(directory: Path, *, dtype: Any = None) -> Any:
    """transformers' `MllamaForConditionalGeneration` (SDPA attention) from a checkpoint dir."""
    import torch  # noqa: PLC0415

    transformers: Any = importlib.import_module("transformers")
    model = transformers.MllamaForConditionalGeneration.from_pretrained(
        str(directory), dtype=dtype or torch.float32, attn_implementation="sdpa"
    )
    return model.eval()


def hf_inputs(prompt: list[int], image: Any = None) -> dict[str, Any]:
    """The tensors `MllamaProcessor` would give transformers for a prompt and a `TiledImage`:
    input_ids (1, S) and, with an image, pixel_values (1, 1, T, 3, H, W), aspect_ratio_ids
    (1, 1), aspect_ratio_mask (1, 1, T) and cross_attention_mask (1, S, 1, T) (rows from the
    `<|image|>` token on see the image's real tiles)."""
    import torch  # noqa: PLC0415

    from guardrt.runtime.tokenizer import IMAGE_ID  # noqa: PLC0415

    inputs: dict[str, Any] = {"input_ids": torch.tensor([prompt])}
    if image is None:
        return inputs
    pixels = image.pixel_values  # (T, 3, H, W); normalized on access unless held
    tiles = pixels.shape[0]
    cross = torch.zeros(1, len(prompt), 1, tiles, dtype=torch.long)
    cross[0, prompt.index(IMAGE_ID) :, 0, : image.num_tiles] = 1
    inputs |= {
        "pixel_values": torch.from_numpy(pixels)[None, None],
        "aspect_ratio_ids": torch.tensor([[image.aspect_ratio_id]]),
        "aspect_ratio_mask": torch.from_numpy(image.aspect_ratio_mask)[None, None],
        "cross_attention_mask": cross,
    }
    return inputs
