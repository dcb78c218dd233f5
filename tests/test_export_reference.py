"""`guardrt export build` from a bf16 checkpoint without an fp32 copy of it
(`guardrt/export/reference.py`): the weights as stored, computed in fp32 for the reference,
give the fp32 model's logits bit for bit; 8-bit weights quantized from them equal those
quantized from the fp32 model; and engines built from a bf16 checkpoint and from its fp32
twin (the same values) are the same bytes."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.nn.utils import parametrize

from guardrt.export.build import BuildOptions, _torch_steps, build, run_probes
from guardrt.export.engine_model import quantize_for_engine
from guardrt.export.parity import probes
from guardrt.export.progress import Progress
from guardrt.export.reference import computed_in_fp32
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.model.tiny import random_state, write_checkpoint
from guardrt.runtime.prepare import load_preparer
from tests.models import small_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same weights stored in bf16 and in fp32."""
    root = tmp_path_factory.mktemp("twins")
    config = small_config("gqa2-cross2,4")
    state = random_state(ModelConfig.from_dict(config), seed=3)
    stored = {name: tensor.to(torch.bfloat16) for name, tensor in state.items()}
    write_checkpoint(root / "bf16", config | {"torch_dtype": "bfloat16"}, stored)
    write_checkpoint(root / "fp32", config, {name: t.float() for name, t in stored.items()})
    return root / "bf16", root / "fp32"


def test_stored_weights_computed_in_fp32_are_the_fp32_model(twins: tuple[Path, Path]) -> None:
    bf16, fp32 = twins
    requests = probes(load_preparer(bf16, 1024))
    stored, full = load_model(bf16), load_model(fp32)
    assert (stored.weight_dtype, full.weight_dtype) == (torch.bfloat16, torch.float32)
    expected = run_probes(_torch_steps(full, 1024), requests, Progress(1, io.StringIO()))
    with computed_in_fp32(stored):
        assert stored.weight_dtype == torch.float32
        got = run_probes(_torch_steps(stored, 1024), requests, Progress(1, io.StringIO()))
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)
    assert stored.weight_dtype == torch.bfloat16  # as stored again, nothing left wrapped
    assert not any(parametrize.is_parametrized(module) for module in stored.modules())


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_from_stored_weights_equals_from_fp32(
    twins: tuple[Path, Path], precision: str
) -> None:
    bf16, fp32 = twins
    stored, full = load_model(bf16), load_model(fp32)
    assert quantize_for_engine(stored, precision, CPU) == quantize_for_engine(full, precision, CPU)
    a, b = stored.state_dict(), full.state_dict()
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert tensor.dtype == b[name].dtype, name
        assert torch.equal(tensor.view(torch.uint8), b[name].view(torch.uint8)), name


def _strip(graph: onnx.GraphProto) -> None:
    """Drop what records the tracing, not the graph: node metadata (the exporter's stack
    traces name `<eval_with_key>.N` counters, which differ between any two builds)."""
    for node in graph.node:
        del node.metadata_props[:]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _strip(attribute.g)


def _digests(directory: Path) -> dict[str, str]:
    """sha256 of each weight file's bytes and of each graph without its tracing metadata."""
    digests = {}
    for path in sorted(directory.glob("*.onnx*")):
        if path.suffix == ".onnx":
            model = onnx.load(str(path), load_external_data=False)
            _strip(model.graph)
            data = model.SerializeToString(deterministic=True)
        else:
            data = path.read_bytes()
        digests[path.name] = hashlib.sha256(data).hexdigest()
    return digests


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_engine_from_bf16_checkpoint_equals_from_fp32_twin(
    twins: tuple[Path, Path], tmp_path: Path, precision: str
) -> None:
    built = {}
    for source in twins:
        out = tmp_path / f"{source.name}-{precision}"
        options = BuildOptions(source, out, precision, max_batch=2, max_seq=256)
        build(options, Progress(5, io.StringIO()))
        built[source.name] = out
    assert _digests(built["bf16"]) == _digests(built["fp32"])
    assert len(_digests(built["bf16"])) == 4  # two graphs, two weight files
    documents = [  # (a parity not run names its engine directory)
        json.loads((d / "manifest.json").read_text().replace(str(d), "ENGINE"))
        for d in built.values()
    ]
    assert documents[0]["steps"] == documents[1]["steps"]  # every step's parity, the same
    assert documents[0]["deviation"] == documents[1]["deviation"]
