"""The TensorRT back end: an engine directory from `guardrt export build --format tensorrt`,
served without torch.

vision.plan and decoder.plan are deserialized onto one NVIDIA GPU (`device` auto / cuda /
cuda:N) and checked against the manifest: every I/O tensor's name, direction, dtype and fixed
dims. The K/V caches live on the GPU (`DeviceSteps`): a plan's K/V inputs are bound where they
already are and its K/V outputs stay there. Host inputs (tokens, positions, pixels) are copied
into device buffers (kept between calls, grown by doubling), the plan runs on a CUDA stream, and
the head's picked logits and normalisers come back. CUDA is reached through cuda-python
(`cuda_memory.py`).
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from guardrt.runtime.engine import EngineOptions
from guardrt.runtime.engine.cuda_memory import (
    INSTALL,
    Cuda,
    DeviceArray,
    DeviceBuffers,
    DeviceError,
    host_array,
    import_cudart,
)
from guardrt.runtime.engine.device_steps import DeviceSteps
from guardrt.runtime.engine.graph_steps import (
    EngineSteps,
    HeadScores,
    StepsRunner,
    vision_feeds,
)
from guardrt.runtime.engine.manifest import EngineDirError, GraphEntry, Manifest, TensorSpec
from guardrt.runtime.engine.onnx_engine import GraphEngine
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.model.config import ModelConfig

__all__ = ["DeviceError", "TensorrtEngine", "TrtRunner", "import_cudart", "import_tensorrt"]
MIN_TENSORRT = 10  # INT64 I/O tensors (the ids) arrived in TensorRT 10
# numpy dtype of the manifest → TensorRT DataType member. bf16 has no numpy type: the graphs
# take and give fp32 at their boundaries whatever they compute in.
TRT_DTYPES = {
    "float32": "FLOAT",
    "float16": "HALF",
    "int64": "INT64",
    "int32": "INT32",
    "int8": "INT8",
    "uint8": "UINT8",
    "bool": "BOOL",
}


def import_tensorrt() -> Any:
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise ConfigError(
            f"serving a TensorRT engine needs TensorRT's Python package: {INSTALL} "
            "(TensorRT runs on NVIDIA GPUs only; an ONNX engine serves on the CPU)"
        ) from exc
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < MIN_TENSORRT:
        raise ConfigError(
            f"TensorRT {trt.__version__} is older than {MIN_TENSORRT}: {INSTALL} --upgrade"
        )
    return trt


def cuda_device_index(device: str) -> int:
    """The GPU index of `device`: auto and cuda are GPU 0, cuda:N is GPU N."""
    if device in ("auto", "cuda"):
        return 0
    if device == "cpu":
        raise ConfigError(
            "device 'cpu' cannot serve a TensorRT engine: TensorRT runs on NVIDIA GPUs only "
            "(use auto, cuda or cuda:N, or export --format onnx to serve on the CPU)"
        )
    index = device.removeprefix("cuda:")
    if device.startswith("cuda:") and index.isdigit():
        return int(index)
    raise ConfigError(f"device {device!r} is not auto, cuda or cuda:N")


def check_io(trt: Any, engine: Any, graph: GraphEntry, where: str) -> None:
    """The engine's I/O tensors are the manifest's: names, direction, dtype, fixed dims."""
    found = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        found[name] = (
            engine.get_tensor_mode(name),
            engine.get_tensor_dtype(name),
            tuple(engine.get_tensor_shape(name)),
        )
    for kind, mode, declared in (
        ("input", trt.TensorIOMode.INPUT, graph.inputs),
        ("output", trt.TensorIOMode.OUTPUT, graph.outputs),
    ):
        for spec in declared:
            if spec.name not in found:
                raise EngineDirError(f"{where} has no {kind} {spec.name} (the manifest lists it)")
            actual_mode, dtype, shape = found.pop(spec.name)
            if actual_mode != mode:
                raise EngineDirError(f"{where}: {spec.name} is not an {kind} ({actual_mode})")
            if spec.dtype not in TRT_DTYPES:
                raise EngineDirError(
                    f"{where}: the manifest's {spec.name} is {spec.dtype}, not one of "
                    f"{', '.join(TRT_DTYPES)}"
                )
            if dtype != getattr(trt.DataType, TRT_DTYPES[spec.dtype]):
                raise EngineDirError(
                    f"{where}: {kind} {spec.name} is {dtype}, the manifest says {spec.dtype}"
                )
            if not _shape_fits(shape, spec.shape):
                raise EngineDirError(
                    f"{where}: {kind} {spec.name} has shape {shape}, the manifest says {spec.shape}"
                )
    if found:
        raise EngineDirError(f"{where} has I/O tensors the manifest lacks: {sorted(found)}")


def _shape_fits(shape: tuple[int, ...], declared: tuple[str | int, ...]) -> bool:
    """Same rank; fixed dims equal (symbolic dims are -1 in the engine, or any size)."""
    return len(shape) == len(declared) and all(
        isinstance(want, str) or got == want for got, want in zip(shape, declared, strict=True)
    )


class Plan:
    """One deserialized engine, its execution context and its device buffers."""

    def __init__(self, trt: Any, runtime: Any, cuda: Cuda, path: Path, graph: GraphEntry) -> None:
        if not path.is_file():
            raise EngineDirError(f"{path} is missing")
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineDirError(
                f"TensorRT {trt.__version__} cannot load {path} (built by another TensorRT "
                "version or for another GPU? build it again here with guardrt export build "
                "--format tensorrt)"
            )
        check_io(trt, engine, graph, str(path))
        context = engine.create_execution_context()
        if context is None:
            raise EngineDirError(f"TensorRT cannot create an execution context for {path}")
        self.engine, self.context, self.cuda, self.path = engine, context, cuda, path
        self.inputs, self.outputs = graph.inputs, graph.outputs
        self.buffers = DeviceBuffers(cuda)

    def run(
        self,
        feeds: Mapping[str, np.ndarray | DeviceArray],
        stream: Any,
        keep: Collection[str] = (),
    ) -> tuple[dict[str, np.ndarray], dict[str, DeviceArray]]:
        """The outputs for `feeds` (every input, by name; a `DeviceArray` is bound where it is,
        a host array copied in): those named in `keep` left on the GPU, in this plan's buffers
        until its next run; the others copied to the host."""
        self.cuda.select()
        for spec in self.inputs:
            value = feeds[spec.name]
            if isinstance(value, DeviceArray):
                self._shape(spec, value.dtype, value.shape)
                self._bind(spec.name, value.pointer)
                continue
            array = host_array(value)
            self._shape(spec, array.dtype, array.shape)
            pointer = self.buffers.address(spec.name, array.nbytes)
            self.cuda.to_device(pointer, array, stream)
            self._bind(spec.name, pointer)
        outputs = []
        for spec in self.outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            if any(dim < 0 for dim in shape):
                raise DeviceError(f"{self.path.name}: output {spec.name} has no shape ({shape})")
            output = self.buffers.array(spec.name, shape, np.dtype(spec.dtype))
            self._bind(spec.name, output.pointer)
            outputs.append((spec.name, output))
        if not self.context.execute_async_v3(int(stream)):
            raise DeviceError(
                f"{self.path.name}: execute_async_v3 failed (TensorRT's log says why)"
            )
        host = {}
        for name, output in outputs:
            if name not in keep:
                host[name] = np.empty(output.shape, output.dtype)
                self.cuda.to_host(host[name], output.pointer, stream)
        self.cuda.synchronize(stream)
        return host, {name: output for name, output in outputs if name in keep}

    def _shape(self, spec: TensorSpec, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
        """An input's dtype checked and its shape set on the context."""
        if dtype != np.dtype(spec.dtype):
            raise ValueError(f"{self.path.name}: {spec.name} is {dtype}, not {spec.dtype}")
        if not self.context.set_input_shape(spec.name, shape):
            low, _, high = self.engine.get_tensor_profile_shape(spec.name, 0)
            raise DeviceError(
                f"{self.path.name}: {spec.name} shape {shape} is outside the built "
                f"profile {tuple(low)}..{tuple(high)}"
            )

    def _bind(self, name: str, pointer: int) -> None:
        if not self.context.set_tensor_address(name, pointer):
            raise DeviceError(f"{self.path.name}: set_tensor_address({name}) failed")

    def close(self) -> None:
        self.buffers.release()


class TrtRunner:
    """The two plans on one GPU: `DeviceSteps`' runner (K/V outputs stay on the GPU)."""

    def __init__(self, directory: Path, manifest: Manifest, device: str) -> None:
        index = cuda_device_index(device)
        trt = import_tensorrt()
        cudart = import_cudart()
        try:
            self.cuda = Cuda(cudart, index)
            self.stream = self.cuda.stream()
        except DeviceError as exc:
            raise ConfigError(f"device {device!r} cannot run a TensorRT engine: {exc}") from exc
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # outlives the engines it deserialized
        try:
            self.plans = {
                name: Plan(trt, self.runtime, self.cuda, directory / graph.file, graph)
                for name, graph in manifest.graphs.items()
            }
        except Exception:  # a plan that cannot load: give the stream back, then say why
            self.cuda.destroy(self.stream)
            raise
        self.device = f"cuda:{index} (TensorRT {trt.__version__})"

    def vision(
        self, pixel_values: np.ndarray, aspect_ratio_ids: np.ndarray, aspect_ratio_mask: np.ndarray
    ) -> DeviceArray:
        feeds = vision_feeds(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        _, kept = self.plans["vision"].run(feeds, self.stream, keep={"cross_kv"})
        return kept["cross_kv"]  # (C, 2, N, Hkv, L, d)

    def decoder(
        self, feeds: Mapping[str, np.ndarray | DeviceArray]
    ) -> tuple[HeadScores, DeviceArray]:
        host, kept = self.plans["decoder"].run(feeds, self.stream, keep={"present_kv"})
        head = HeadScores(host["logits"], host["normaliser"])  # (B, R, V), (B, R)
        return head, kept["present_kv"]  # (Ls, 2, B, Hkv, S, d)

    def steps(
        self, config: ModelConfig, rows: int, max_seq: int, image_rows: int | None = None
    ) -> EngineSteps:
        return DeviceSteps(self, config, rows, max_seq, image_rows)

    def close(self) -> None:
        """Free the device buffers and the stream (the engines go with this object)."""
        self.cuda.select()
        for plan in self.plans.values():
            plan.close()
        self.cuda.destroy(self.stream)


class TensorrtEngine(GraphEngine):
    backend = "tensorrt"
    bounded = True  # profiles built for at most the manifest's max_batch and max_seq

    def _runner(
        self, directory: Path, manifest: Manifest, options: EngineOptions
    ) -> tuple[StepsRunner, str]:
        runner = TrtRunner(directory, manifest, options.device)
        return runner, runner.device
