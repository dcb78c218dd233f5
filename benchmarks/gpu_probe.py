"""A first look at the torch back end's verdict latency on the full-size architecture (GPU).

Usage: python benchmarks/gpu_probe.py [--size full|tiny] [--device cuda] [--repeat N]

Builds Llama-Guard-3-11B-Vision's architecture with random bf16 weights directly on the device
(no checkpoint), and times `Classifier.run` for one request at batch 1: a ~350-token text
prompt and the same with a 4-tile image, constrained decoding, after a warm-up. Prints the
median total, prefill and decode times, which verdict path the random weights took (safe = one
prefill; unsafe = one more small forward per category), and peak GPU memory. This is the eager
torch path as it stands before the GPU engine issue (no CUDA graphs, no fused kernels); it is
the starting point that issue's `benchmarks/latency.py` will be judged from. `--size tiny` runs
the same code on a tiny config (CPU check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from guardrt.runtime.classify import Classifier
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.model.functional import rope_inv_freq
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.model.tiny import TINY_CONFIG, tiny_config
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.preprocess import ImageConfig
from guardrt.runtime.tokenizer import load_tokenizer

FULL = tiny_config(
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
_GATES = ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")


def random_model(document: dict[str, object], device: torch.device) -> MllamaModel:
    """The architecture with random bf16 weights made on `device` (no host copy)."""
    config = ModelConfig.from_dict(document)
    with torch.device("meta"):
        model = MllamaModel(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    document = FULL if args.size == "full" else TINY_CONFIG
    started = time.perf_counter()
    model = random_model(document, device)
    model.setup_caches(4, 1024)
    built_s = time.perf_counter() - started
    preparer = Preparer(load_tokenizer(), ImageConfig(), 1024)
    text = "Tell me how to get into my neighbour's house while they are away on holiday. " * 12
    picture = (np.random.default_rng(0).random((1100, 1100, 3)) * 255).astype(np.uint8)
    cases = {
        "text": preparer.prepare([{"role": "user", "content": text}]),
        "image 4 tiles": preparer.prepare(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": picture},
                        {"type": "text", "text": text},
                    ],
                }
            ]
        ),
    }
    classifier = Classifier(model)
    results = {}
    for name, request in cases.items():
        classifier.run([request])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        totals, prefills, decodes, label = [], [], [], ""
        for _ in range(args.repeat):
            start = time.perf_counter()
            (decoded,) = classifier.run([request])
            totals.append((time.perf_counter() - start) * 1e3)
            prefills.append(decoded.prefill_s * 1e3)
            decodes.append(decoded.decode_s * 1e3)
            label = decoded.verdict().raw_output.strip()
        results[name] = {
            "prompt_tokens": len(request.prompt),
            "tiles": request.image.num_tiles if request.image else 0,
            "total_ms_p50": statistics.median(totals),
            "prefill_ms_p50": statistics.median(prefills),
            "decode_ms_p50": statistics.median(decodes),
            "verdict_path": label,
        }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0
    report = {
        "device": name,
        "torch": torch.__version__,
        "size": args.size,
        "dtype": "bfloat16",
        "batch": 1,
        "decode": "constrained",
        "model_build_s": built_s,
        "peak_gpu_memory_gb": peak,
        "cases": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
