"""Llama-Guard-3-11B-Vision's architecture with random weights, made on the device directly.

For benchmarks without the 21 GB checkpoint: the same shapes (reference §1: 40 text layers, 8
of them cross-attention, hidden 4096, 32 heads / 8 kv heads, intermediate 14336; vision 32 + 8
layers of width 1280, 14-px patches, 4 tiles of 560 px) and so the same work per token.
Verdicts are meaningless; latency is not.
"""

from __future__ import annotations

from typing import Any

import torch

from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.model.functional import rope_inv_freq
from guardrt.runtime.model.mllama import MllamaModel, Semantics
from guardrt.runtime.model.tiny import TINY_CONFIG, tiny_config

FULL_CONFIG: dict[str, Any] = tiny_config(
    text_config={
        "hidden_size": 4096,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
    },
    vision_config={
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_global_layers": 8,
        "attention_heads": 16,
        "intermediate_size": 5120,
        "vision_output_dim": 7680,
        "patch_size": 14,
        "intermediate_layers_indices": [3, 7, 15, 23, 30],
    },
)
SIZES: dict[str, dict[str, Any]] = {"full": FULL_CONFIG, "tiny": TINY_CONFIG}
_GATES = ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")


def random_model(
    document: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    semantics: Semantics = "meta",
    seed: int = 0,
) -> MllamaModel:
    """The architecture with random weights made on `device` (no host copy): N(0, 0.02)
    weights, unit norms, gates at 0.5 (so the cross layers contribute). Same seed, same weights."""
    config = ModelConfig.from_dict(document)
    with torch.device("meta"):
        model = MllamaModel(config, semantics)
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                tensor.fill_(1.0)
            elif name.rsplit(".", 1)[-1] in _GATES:
                tensor.fill_(0.5)
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
    model.inv_freq = rope_inv_freq(config.text.rope, config.text.head_dim).to(device)
    return model.eval()
