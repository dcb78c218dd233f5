"""ONNX engines on ONNX Runtime's GPU providers keep their K/V caches in GPU memory
(`ort_device.py`: `DeviceSteps` over IO binding). onnxruntime-gpu is on no machine we have, so
the same bindings run here on ONNX Runtime's CPU provider over the fake of cuda-python, whose
"device" memory is host memory at real addresses: ONNX Runtime reads every K/V input from, and
writes every K/V output into, the caches' own buffers by pointer, and the verdicts equal the
host-cache engine's bit for bit. What differs on a GPU is the memory's name ("cuda") and
ONNX Runtime's CUDA stream, which this cannot exercise."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guardrt.runtime.engine import Engine
from guardrt.runtime.engine import onnx_engine as oe
from guardrt.runtime.engine.cuda_memory import Cuda, DeviceArray
from guardrt.runtime.engine.device_steps import DeviceSteps
from guardrt.runtime.engine.graph_steps import GraphSteps
from guardrt.runtime.engine.manifest import GraphEntry, Manifest, TensorSpec, read_manifest
from guardrt.runtime.engine.ort_device import OrtDeviceRunner, bind_dims, resolved_shape
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.prepare import Preparer
from tests.fake_tensorrt import FakeCudart
from tests.test_onnx_engine import checked_in_session, onnx_engine, requests

KV = TensorSpec("present_kv", "float32", (3, 2, "batch", 2, "tokens", 8))


def test_bind_dims_and_resolved_shape() -> None:
    sizes: dict[str, int] = {}
    bind_dims(TensorSpec("input_ids", "int64", ("batch", "tokens")), (2, 5), sizes)
    bind_dims(
        TensorSpec("past_kv", "float32", (3, 2, "batch", 2, "past", 8)), (3, 2, 2, 2, 0, 8), sizes
    )
    assert sizes == {"batch": 2, "tokens": 5, "past": 0}
    assert resolved_shape(KV, sizes) == (3, 2, 2, 2, 5, 8)
    with pytest.raises(ValueError, match=r"past_kv has shape \(3, 2, 2, 4, 0, 8\)"):
        bind_dims(
            TensorSpec("past_kv", "float32", (3, 2, "batch", 2, "past", 8)),
            (3, 2, 2, 4, 0, 8),
            sizes,
        )
    with pytest.raises(ValueError, match="has shape"):  # rank
        bind_dims(TensorSpec("num_tiles", "int64", ("batch",)), (2, 1), sizes)
    with pytest.raises(ValueError, match="num_tiles's dim 'batch' is 3, another input's is 2"):
        bind_dims(TensorSpec("num_tiles", "int64", ("batch",)), (3,), sizes)
    with pytest.raises(ValueError, match=r"dims \['tokens'\] are no input's"):
        resolved_shape(KV, {"batch": 1})


class CpuAsGpu(oe.OrtRunner):
    """CPU sessions that report ONNX Runtime's CUDA provider on GPU 0 unless asked for the CPU."""

    def __init__(self, directory: Path, manifest: Manifest, device: str, threads: int) -> None:
        super().__init__(directory, manifest, "cpu", threads)
        if device != "cpu":
            self.providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]


class HostMemoryRunner(OrtDeviceRunner):
    """The device runner binding its pointers as ONNX Runtime's CPU memory (the fake's)."""

    def __init__(self, sessions: Any, graphs: dict[str, GraphEntry], cuda: Cuda) -> None:
        super().__init__(sessions, graphs, cuda, memory="cpu")


@pytest.fixture
def cudart(monkeypatch: pytest.MonkeyPatch) -> FakeCudart:
    """An ONNX engine asked for `cuda` loads as on a GPU, over the fake's memory."""
    fake = FakeCudart()
    monkeypatch.setattr(oe, "OrtRunner", CpuAsGpu)
    monkeypatch.setattr(oe, "OrtDeviceRunner", HostMemoryRunner)
    monkeypatch.setattr(oe, "import_cudart", lambda: fake)
    monkeypatch.delenv("GUARDRT_ORT_KV", raising=False)
    return fake


def _gpu_engine(directory: Path, **settings: object) -> Engine:
    return onnx_engine(directory, device="cuda", **settings)


@pytest.mark.parametrize("decode", ["constrained", "greedy"])
def test_device_caches_equal_host_caches(
    onnx_fp32: Path, preparer: Preparer, cudart: FakeCudart, decode: str
) -> None:
    """11 requests (text, a response, 1-4 tiles, a custom policy) in batches of up to 4: the
    same bits as the ONNX engine with host caches, with every cache in the fake's memory."""
    batch = requests(preparer)
    batch = [*batch, *reversed(batch[:-2])]
    device = _gpu_engine(onnx_fp32, decode=decode)
    assert isinstance(device, oe.OnnxEngine)
    assert isinstance(device.steps, DeviceSteps)
    assert isinstance(device.runner, OrtDeviceRunner)
    assert device.info.device == "CUDAExecutionProvider on cuda:0"
    host = onnx_engine(onnx_fp32, decode=decode)
    assert isinstance(host, oe.OnnxEngine)
    assert isinstance(host.steps, GraphSteps)
    for a, b in zip(device.execute(batch), host.execute(batch), strict=True):
        assert (a.generated, a.reused_tokens) == (b.generated, b.reused_tokens)
        assert np.isnan(b.unsafe_probability) or a.unsafe_probability == b.unsafe_probability
        assert a.category_probabilities == b.category_probabilities
    caches = device.steps._self, device.steps._images
    assert all(isinstance(c, DeviceArray) and c.pointer in cudart.live for c in caches)
    device.close()
    assert not cudart.live  # caches, feeds and output buffers all freed


def test_device_caches_session_and_int8(
    onnx_fp32: Path, onnx_int8: Path, preparer: Preparer, cudart: FakeCudart
) -> None:
    """A growing answer with an image checked twice in one session (its K/V row copied in the
    fake's memory) = each checked fresh on host caches; an int8 engine (MatMulNBits, If
    branches) through the bindings = on host caches."""
    device = _gpu_engine(onnx_fp32, max_sessions=1)
    in_session, checks = checked_in_session(device, preparer)
    for a, b in zip(in_session, onnx_engine(onnx_fp32).execute(checks), strict=True):
        assert (a.generated, a.unsafe_probability) == (b.generated, b.unsafe_probability)
    device.close()
    batch = requests(preparer)[2:6]
    int8 = _gpu_engine(onnx_int8)
    for a, b in zip(int8.execute(batch), onnx_engine(onnx_int8).execute(batch), strict=True):
        assert (a.generated, a.unsafe_probability) == (b.generated, b.unsafe_probability)
    int8.close()


def test_device_runner_refuses_bad_feeds(onnx_fp32: Path, cudart: FakeCudart) -> None:
    manifest = read_manifest(onnx_fp32)
    runner = HostMemoryRunner(
        CpuAsGpu(onnx_fp32, manifest, "cuda", 0).sessions, manifest.graphs, Cuda(cudart, 0)
    )
    size = read_manifest(onnx_fp32).graphs["vision"].inputs[0].shape[-1]
    assert isinstance(size, int)
    pixels = np.zeros((1, 4, 3, size, size), np.float32)
    with pytest.raises(ValueError, match="vision: aspect_ratio_ids is int32, not int64"):
        runner.vision(pixels, np.ones(1, np.int32), np.ones((1, 4), np.int64))
    with pytest.raises(ValueError, match="aspect_ratio_mask's dim 'images' is 2"):
        runner.vision(pixels, np.ones(1, np.int64), np.ones((2, 4), np.int64))
    runner.close()
    assert not cudart.live


def test_kv_placement_choices(
    onnx_fp32: Path, cudart: FakeCudart, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setenv("GUARDRT_ORT_KV", "host")
    host = _gpu_engine(onnx_fp32)
    assert isinstance(host, oe.OnnxEngine)
    assert isinstance(host.steps, GraphSteps)
    assert host.info.device == "CUDAExecutionProvider on cuda:0 (K/V caches in host memory)"
    assert not cudart.live
    monkeypatch.setenv("GUARDRT_ORT_KV", "gpu")
    with pytest.raises(ConfigError, match="GUARDRT_ORT_KV 'gpu' is not device or host"):
        _gpu_engine(onnx_fp32)
    monkeypatch.setenv("GUARDRT_ORT_KV", "device")

    def missing() -> Any:
        raise ConfigError("serving a TensorRT engine needs cuda-python")

    monkeypatch.setattr(oe, "import_cudart", missing)
    with caplog.at_level(logging.WARNING, logger=oe.__name__):
        fallback = _gpu_engine(onnx_fp32)
    assert isinstance(fallback, oe.OnnxEngine)
    assert isinstance(fallback.steps, GraphSteps)
    assert "cuda-python is not installed" in caplog.text
    assert fallback.info.device.endswith("(K/V caches in host memory)")
    cpu = onnx_engine(onnx_fp32)  # the CPU provider never needs cuda-python
    assert isinstance(cpu, oe.OnnxEngine)
    assert cpu.info.device == "CPUExecutionProvider"
