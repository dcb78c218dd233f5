"""transformers' `MllamaForConditionalGeneration` (eager, SDPA, bf16) sharing guardrt's weights.

The baseline runs in the same process on the same weights: transformers' modules are built on
the device, then every parameter is replaced by guardrt's tensor of the same name (the names
map as the checkpoint loader maps transformers 5.x names), so no second copy stays and both
models compute from identical weights. A verdict's cost there is `generate` of the path's
token count (min = max new tokens, greedy): prefill plus one forward per further token.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from typing import Any

import numpy as np
import torch

from guardrt.runtime.model.checkpoint import canonical_name
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.requests import PreparedRequest
from guardrt.testing.references import hf_inputs

# Tokens each verdict writes: \n\n safe <|eot_id|>; \n\n unsafe \n S 1 <|eot_id|>.
PATH_TOKENS = {"safe": 3, "unsafe": 6}


def sharing_model(model: MllamaModel, document: dict[str, Any]) -> Any:
    """transformers' model on `model`'s device, holding `model`'s weights."""
    transformers: Any = importlib.import_module("transformers")
    # A copy: transformers rewrites the nested dicts it is given (rope keys), and `document` may
    # be a module-level constant (TINY_CONFIG) that others read.
    config = transformers.MllamaConfig(**copy.deepcopy(document))
    config._attn_implementation = "sdpa"
    with torch.device(model.device):
        hf = transformers.MllamaForConditionalGeneration._from_config(
            config, dtype=model.weight_dtype
        )
    ours = model.state_dict()
    names = [name for name, _ in hf.named_parameters()]
    hf.load_state_dict(
        {name: ours[canonical_name(name)] for name in names}, strict=False, assign=True
    )
    missing = [
        n for n, p in hf.named_parameters() if p.data_ptr() != ours[canonical_name(n)].data_ptr()
    ]
    if missing:
        raise RuntimeError(f"transformers parameters not shared: {missing[:5]}")
    return hf.eval()


def with_pixels(request: PreparedRequest) -> PreparedRequest:
    """The request with its image's pixels normalized once: transformers' timings start from
    its processor's output, float32 tiles, as they did before images were queued as uint8."""
    if request.image is None:
        return request
    return dataclasses.replace(request, image=request.image.with_pixels())


def inputs(request: PreparedRequest, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    tensors = hf_inputs(list(request.prompt), request.image)
    return {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in tensors.items()
    }


@torch.inference_mode()
def generate(hf: Any, request: PreparedRequest, tokens: int, dtype: torch.dtype) -> Any:
    feeds = inputs(request, hf.device, dtype)
    return hf.generate(
        **feeds, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=128004
    )


@torch.inference_mode()
def label_logits(hf: Any, request: PreparedRequest, dtype: torch.dtype) -> np.ndarray:
    """transformers' fp32 logits (vocab,) at the label row (after `\\n\\n`)."""
    tokens = request.grammar.tokens
    extended = PreparedRequest((*request.prompt, tokens.blank), request.image, request.grammar)
    result: np.ndarray = (
        hf(**inputs(extended, hf.device, dtype)).logits[0, -1].float().cpu().numpy()
    )
    return result
