"""The engine's torch model (the build's dtype, or 8-bit weights) and its graphs traced from it.

`traced_in_child` is how a build gets its graphs: a child process loads the checkpoint,
converts it exactly as the build's convert / quantize steps did (the same functions, so the
same bytes) and traces, and all the memory torch's exporter keeps returns when it exits
(`child.py`). The build's own model is dropped before, so the two never coexist.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from guardrt.export.child import run_in_child
from guardrt.export.decoder import conditional_cross_for, export_decoder
from guardrt.export.graphs import GraphSpec, export_vision
from guardrt.export.quantize import QuantKind, quantize_model
from guardrt.runtime.model.checkpoint import load_model, place_rest
from guardrt.runtime.model.mllama import MllamaModel, Semantics

if TYPE_CHECKING:
    from guardrt.export.build import BuildOptions

EIGHT_BIT = ("int8", "fp8")
COMPUTE_DTYPE = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int8": torch.float32,  # int8 / fp8 weights, fp32 activations (the CPU provider's)
    "fp8": torch.float32,
}


def quantize_for_engine(model: MllamaModel, precision: str, device: torch.device) -> dict[str, Any]:
    """The engine's weights as the torch engine serves them (`quantize_model`): every linear
    but the head 8-bit per output channel, and for int8 the token embedding too (one scale per
    row: 128,264 × 4,096 in fp32 is 2.1 GB of an engine's ~13 GB, 0.53 GB as int8). Made
    from the stored weights cast to fp32 a chunk at a time, as from an fp32 model; the rest
    of the model is then fp32, the engines' compute dtype. Returns the manifest's record."""
    kind: QuantKind = "int8" if precision == "int8" else "fp8"
    report = quantize_model(model, kind, device=device, dtype=torch.float32)
    place_rest(model, device, torch.float32)
    return {
        "weights": "int8" if kind == "int8" else "float8_e4m3fn",
        "scheme": "symmetric, one fp32 scale per output channel, no zero point",
        "layers": report.layers,
        "kept_full_precision": ["lm_head"] if kind == "int8" else ["lm_head", "embed_tokens"],
        "embedding": (
            "int8, one fp32 scale per row, dequantized on lookup"
            if kind == "int8"
            else "full precision (e4m3's 3 mantissa bits would move every token's embedding ~3%)"
        ),
        "quantized_bytes": report.int8_bytes,
        "original_bytes": report.original_bytes,
        "worst_layer_error": report.worst_layer_error,
    }


def export_graphs(
    model: MllamaModel, directory: Path, options: BuildOptions
) -> dict[str, GraphSpec]:
    """Trace the vision and decoder graphs of `model` into `directory` (in this process)."""
    return {
        "vision": export_vision(model, directory / "vision.onnx", options.max_batch),
        "decoder": export_decoder(
            model,
            directory / "decoder.onnx",
            options.max_batch,
            options.max_seq,
            conditional_cross_for(options.engine_format),
        ),
    }


def traced_in_child(options: BuildOptions, directory: Path) -> dict[str, GraphSpec]:
    """The engine's graphs in `directory`, converted and traced in a child process."""
    return run_in_child("tracing the graphs", _load_convert_trace, options, directory)


def _load_convert_trace(options: BuildOptions, directory: Path) -> dict[str, GraphSpec]:
    """(In the child.) The checkpoint as the build converted it, traced."""
    device = torch.device(options.device)
    semantics: Semantics = "meta" if options.semantics == "meta" else "transformers"
    model = load_model(options.model, device=device, semantics=semantics)
    if options.precision in EIGHT_BIT:
        quantize_for_engine(model, options.precision, device)
    else:
        model = model.to(COMPUTE_DTYPE[options.precision])
    return export_graphs(model, directory, options)
