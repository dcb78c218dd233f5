"""Tiny random mllama checkpoints: the embedded default model and the tests' fixtures.

`write_tiny_random(directory, seed)` writes a complete HF checkpoint (config.json, safetensors,
tokenizer.json, tokenizer_config.json with the chat template, preprocessor_config.json,
generation_config.json) that transformers and guardrt both load. It has the real tokenizer,
image pipeline and prompt, and random weights: **its verdicts are meaningless**. It exists so the
runtime, servers and tests run end to end without the 21 GB checkpoint.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.model.safetensors_io import write_safetensors
from guardrt.runtime.preprocess.config import CLIP_MEAN, CLIP_STD
from guardrt.runtime.tokenizer import default_tokenizer_path
from guardrt.runtime.tokenizer_files import SPECIAL_NAMES, read_tiktoken_file, tokenizer_json

# The hub config's shape with tiny sizes. The tile stays 560 px so the real image pipeline
# feeds it; 56-px patches keep the vision sequence short (4 × 104 tokens).
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["MllamaForConditionalGeneration"],
    "model_type": "mllama",
    "image_token_index": 128256,
    "torch_dtype": "float32",
    "text_config": {
        "model_type": "mllama_text_model",
        "vocab_size": 128256,
        "hidden_size": 64,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
        "cross_attention_layers": [1, 3],
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "pad_token_id": 128004,
    },
    "vision_config": {
        "model_type": "mllama_vision_model",
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_global_layers": 2,
        "attention_heads": 2,
        "intermediate_size": 64,
        "vision_output_dim": 96,
        "image_size": 560,
        "patch_size": 56,
        "norm_eps": 1e-5,
        "max_num_tiles": 4,
        "intermediate_layers_indices": [1, 3],
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        "num_channels": 3,
        "hidden_act": "gelu",
    },
}

PREPROCESSOR_CONFIG: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(CLIP_MEAN),
    "image_processor_type": "MllamaImageProcessor",
    "image_std": list(CLIP_STD),
    "max_image_tiles": 4,
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 560, "width": 560},
}


def tiny_config(**overrides: Mapping[str, Any]) -> dict[str, Any]:
    """TINY_CONFIG with `text_config` / `vision_config` entries replaced by the overrides."""
    document = copy.deepcopy(TINY_CONFIG)
    for section, values in overrides.items():
        document[section].update(values)
    return document


# Scalar tanh gates (vision global layers, tile embeddings, cross-attention layers).
_GATES = frozenset({"gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate"})


def random_state(config: ModelConfig, seed: int, scale: float = 0.08) -> dict[str, torch.Tensor]:
    """Random fp32 weights for every tensor of the model (hub names), reproducible by seed.

    Norm weights sit near 1 and gates well away from 0, so every path of the network (the
    cross-attention layers included) changes the output.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in MllamaModel(config).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        # On the CPU explicitly: the generator is a CPU one, whatever the default device is.
        noise = torch.randn(shape, generator=generator, device="cpu")
        if "norm" in name and name.endswith("weight"):
            state[name] = 1.0 + 0.1 * noise
        elif name.rsplit(".", 1)[-1] in _GATES:
            state[name] = 0.3 + 0.4 * torch.rand(shape, generator=generator, device="cpu")
        else:
            state[name] = scale * noise
    return state


def _tokenizer_files(directory: Path) -> None:
    tables = read_tiktoken_file(default_tokenizer_path())
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json(tables)))
    template = importlib.resources.files("guardrt.runtime") / "chat_template.jinja"
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_NAMES[0],
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "model_max_length": 131072,
        "chat_template": template.read_text(),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def write_checkpoint(
    directory: Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> None:
    """A complete HF checkpoint directory for `config` with the given weights."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(directory / "model.safetensors", state)
    vision = config["vision_config"]
    preprocessor = PREPROCESSOR_CONFIG | {
        "size": {"height": vision["image_size"], "width": vision["image_size"]},
        "max_image_tiles": vision["max_num_tiles"],
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    generation = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
    generation |= {"pad_token_id": 128004, "do_sample": False}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    _tokenizer_files(directory)


def write_tiny_random(
    directory: Path, seed: int = 0, config: Mapping[str, Any] | None = None
) -> Path:
    """Write the tiny random checkpoint (meaningless verdicts) into `directory`."""
    document = dict(config or TINY_CONFIG)
    write_checkpoint(directory, document, random_state(ModelConfig.from_dict(document), seed))
    return directory
