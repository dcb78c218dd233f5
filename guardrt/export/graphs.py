"""The vision graph, and the graph descriptions both exported graphs share.

The split TensorRT-LLM and Qualcomm's exporter converged on: a vision graph that turns an
image's tiles into the cross-attention K/V of every cross layer (6,404 vision tokens projected
once per image), and a decoder graph for prefill and decode steps (`decoder.py`). Both are
traced from guardrt's own model with torch's dynamo exporter; tensors cross their boundaries in
fp32 whatever the precision inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from guardrt.export.errors import ExportError
from guardrt.export.onnx_ops import trace
from guardrt.runtime.engine.manifest import TensorSpec
from guardrt.runtime.model.mllama import MllamaModel


@dataclass(frozen=True)
class GraphSpec:
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


VISION_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


class VisionGraph(nn.Module):
    """pixel_values (N, T, 3, H, W) f32, aspect_ratio_ids (N,) i64, aspect_ratio_mask (N, T) i64
    → cross_kv (C, 2, N, Hkv, T·P, d): K then V of each of the C cross layers."""

    def __init__(self, model: MllamaModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor,
        aspect_ratio_mask: torch.Tensor,
    ) -> torch.Tensor:
        pixels = pixel_values.to(self.model.weight_dtype)
        states = self.model.encode_images(pixels, aspect_ratio_ids, aspect_ratio_mask)
        return self.model.image_kv(states).to(torch.float32)  # (C, 2, N, Hkv, L, d)


def export_vision(model: MllamaModel, path: Path, max_batch: int) -> GraphSpec:
    """Trace the vision graph (dynamic in the number of images) to ONNX at `path`."""
    example, dynamic = vision_example(model, max_batch)
    trace(VisionGraph(model), example, path, VISION_INPUTS, ["cross_kv"], dynamic)
    return check_traced(vision_spec(model, path))


def vision_example(
    model: MllamaModel, max_batch: int
) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, Any], ...]]:
    """The tensors the vision graph is traced from, on the model's device (`export build
    --device cuda` traces a model on the GPU; CPU examples would not meet its weights), and
    their dynamic dims."""
    config = model.config
    tiles, side = config.vision.max_num_tiles, config.vision.image_size
    # Two example images, not one: torch's exporter specializes a dim whose example is 1
    # (torch 2.11 gave a graph fixed at one image whatever `Dim` said; 2.13 did not).
    count, device = min(2, max_batch), model.device
    example = (
        torch.zeros(count, tiles, 3, side, side, device=device),
        torch.ones(count, dtype=torch.int64, device=device),
        torch.ones(count, tiles, dtype=torch.int64, device=device),
    )
    images = torch.export.Dim("images", min=1, max=max_batch)
    return example, ({0: images}, {0: images}, {0: images})


def vision_spec(model: MllamaModel, path: Path) -> GraphSpec:
    """The vision graph's inputs and outputs (symbolic dims by name)."""
    config = model.config
    tiles, side = config.vision.max_num_tiles, config.vision.image_size
    text = config.text
    layers = len(text.cross_attention_layers)
    output = (layers, 2, "images", text.num_kv_heads, model.image_keys, text.head_dim)
    return GraphSpec(
        path,
        (
            TensorSpec(VISION_INPUTS[0], "float32", ("images", tiles, 3, side, side)),
            TensorSpec(VISION_INPUTS[1], "int64", ("images",)),
            TensorSpec(VISION_INPUTS[2], "int64", ("images", tiles)),
        ),
        (TensorSpec("cross_kv", "float32", output),),
    )


def check_traced(spec: GraphSpec) -> GraphSpec:
    """`spec` once the traced file at `spec.path` is checked to declare its inputs and outputs:
    same names and ranks, fixed dims equal, and every dim the spec names symbolic. An exporter
    that fixes a dynamic dim (torch's specializes one whose example is 1) would otherwise give
    an engine that fails at serve time on the first batch of another size."""
    graph = onnx.load(str(spec.path), load_external_data=False).graph
    for kind, declared, actual in (
        ("input", spec.inputs, graph.input),
        ("output", spec.outputs, graph.output),
    ):
        found = {value.name: value.type.tensor_type.shape.dim for value in actual}
        if list(found) != [t.name for t in declared]:
            raise ExportError(
                f"{spec.path.name}: traced {kind}s {list(found)}, expected "
                f"{[t.name for t in declared]}"
            )
        for tensor in declared:
            dims = found[tensor.name]
            traced = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)
            fixed = any(
                isinstance(got, int) and got != want
                for want, got in zip(tensor.shape, traced, strict=False)
            )  # a fixed dim where the spec has another size, or a name
            if len(traced) != len(tensor.shape) or fixed:
                raise ExportError(
                    f"{spec.path.name}: torch {torch.__version__}'s exporter traced {kind} "
                    f"{tensor.name} as {traced}, expected {tensor.shape} (symbolic dims must "
                    "stay symbolic); try another torch version or report it"
                )
    return spec
