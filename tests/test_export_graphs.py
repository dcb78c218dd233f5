"""The exported vision graph, run by ONNX Runtime, against guardrt's torch model."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from guardrt.export.decoder import DecoderGraph, decoder_example
from guardrt.export.errors import ExportError
from guardrt.export.graphs import (
    GraphSpec,
    VisionGraph,
    check_traced,
    export_vision,
    vision_example,
)
from guardrt.runtime.engine.manifest import TensorSpec
from guardrt.runtime.model import functional
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.mllama import MllamaModel
from tests.models import image, small_config, write_small

ort: Any = importlib.import_module("onnxruntime")  # untyped


BLOCK = 5  # query rows per block of the traced attention: 7 blocks of 32 tokens, the last short


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[MllamaModel, GraphSpec]:
    directory = write_small(tmp_path_factory.mktemp("graph"), small_config("gqa2-cross2,4"), 17)
    model = load_model(directory)
    with pytest.MonkeyPatch.context() as patch:  # several blocks, as a full-size image has
        patch.setattr(functional, "TRACED_QUERY_BLOCK", BLOCK)
        return model, export_vision(model, directory / "vision.onnx", max_batch=4)


@pytest.mark.parametrize("tile_counts", [(1,), (4,), (2, 3), (1, 2, 3, 4)], ids=str)
def test_vision_graph_matches_torch(
    exported: tuple[MllamaModel, GraphSpec], tile_counts: tuple[int, ...]
) -> None:
    model, spec = exported
    tiled = [image(count, seed=count) for count in tile_counts]
    pixels = np.stack([t.pixel_values for t in tiled])  # (N, T, 3, H, W)
    ids = np.array([t.aspect_ratio_id for t in tiled], dtype=np.int64)
    masks = np.stack([t.aspect_ratio_mask for t in tiled])
    session = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    feeds = {"pixel_values": pixels, "aspect_ratio_ids": ids, "aspect_ratio_mask": masks}
    (onnx_kv,) = session.run(None, feeds)
    with torch.inference_mode():
        torch_kv = VisionGraph(model)(*(torch.from_numpy(x) for x in (pixels, ids, masks)))
    assert onnx_kv.shape == tuple(torch_kv.shape)
    error = np.abs(onnx_kv - torch_kv.numpy()).max()
    assert error <= 1e-4 * np.abs(torch_kv.numpy()).max()


def test_vision_graph_spec(exported: tuple[MllamaModel, GraphSpec]) -> None:
    _, spec = exported
    assert [t.name for t in spec.inputs] == [
        "pixel_values",
        "aspect_ratio_ids",
        "aspect_ratio_mask",
    ]
    (output,) = spec.outputs
    assert output.shape == (2, 2, "images", 2, 4 * 5, 8)  # 2 cross layers, K and V, 4 tiles × 5
    session = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [t.name for t in spec.inputs]
    assert str(session.get_inputs()[0].shape[0]) == "images"  # dynamic in the number of images
    config = small_config("gqa2-cross2,4")["vision_config"]
    layers = config["num_hidden_layers"] + config["num_global_layers"]
    tokens = config["max_num_tiles"] * 8  # 5 patches per tile, padded to 8
    blocks = -(-tokens // BLOCK)
    softmaxes = [node for node in onnx.load(str(spec.path)).graph.node if node.op_type == "Softmax"]
    assert len(softmaxes) == layers * blocks  # one block of query rows at a time


def _identity_graph(path: Path, dims: list[int | str]) -> None:
    """An ONNX file whose one input x and output y have `dims` (ints fixed, strings symbolic)."""
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [value("x", onnx.TensorProto.FLOAT, dims)],
        [value("y", onnx.TensorProto.FLOAT, dims)],
    )
    onnx.save(onnx.helper.make_model(graph), str(path))


def test_a_traced_graph_must_keep_its_dynamic_dims(tmp_path: Path) -> None:
    """What torch 2.11's exporter did to the vision graph traced from one example image: the
    `images` dim fixed at 1. The build refuses such a graph, naming the tensor; a symbolic dim
    where the spec has a fixed one is accepted."""
    spec = GraphSpec(
        tmp_path / "g.onnx",
        (TensorSpec("x", "float32", ("images", 3)),),
        (TensorSpec("y", "float32", ("images", 3)),),
    )
    _identity_graph(spec.path, ["images", 3])
    assert check_traced(spec) is spec
    _identity_graph(spec.path, ["n", "k"])
    assert check_traced(spec) is spec
    _identity_graph(spec.path, [1, 3])
    with pytest.raises(ExportError, match=r"input x as \(1, 3\), expected \('images', 3\)"):
        check_traced(spec)
    _identity_graph(spec.path, ["images", 4])
    with pytest.raises(ExportError, match="input x"):
        check_traced(spec)
    _identity_graph(spec.path, ["images"])
    with pytest.raises(ExportError, match="input x"):
        check_traced(spec)
    renamed = GraphSpec(spec.path, (TensorSpec("z", "float32", ("images",)),), spec.outputs)
    with pytest.raises(ExportError, match=r"traced inputs \['x'\], expected \['z'\]"):
        check_traced(renamed)


@pytest.mark.parametrize("conditional_cross", [False, True])
def test_the_examples_trace_a_model_off_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, conditional_cross: bool
) -> None:
    """`export build --device cuda` traces a model whose weights are on the GPU: the example
    tensors must be there too (CPU ones fail: "Tensor on device meta is not on the expected
    device cpu!", and on a GPU the same mismatch). The meta device stands in for the GPU: both
    graphs trace from their examples on a meta model, with the dims the exports declare."""
    directory = write_small(tmp_path, small_config("gqa2-cross2,4"), 17)
    model = load_model(directory).to("meta")
    monkeypatch.setattr(functional, "TRACED_QUERY_BLOCK", BLOCK)
    vision, dynamic = vision_example(model, max_batch=4)
    assert {t.device.type for t in vision} == {"meta"}
    traced = torch.export.export(VisionGraph(model), vision, dynamic_shapes=dynamic)
    (pixels,) = (n for n in traced.graph.nodes if n.name == "pixel_values")
    assert isinstance(pixels.meta["val"].shape[0], torch.SymInt)  # dynamic in images
    decoder, dynamic = decoder_example(model, max_batch=4, max_seq=64)
    assert {t.device.type for t in decoder} == {"meta"}
    torch.export.export(DecoderGraph(model, conditional_cross), decoder, dynamic_shapes=dynamic)
    with pytest.raises(RuntimeError, match="device"):  # what CPU examples did
        torch.export.export(
            VisionGraph(model), tuple(torch.zeros_like(t, device="cpu") for t in vision)
        )
