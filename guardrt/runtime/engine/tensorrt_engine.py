"""The TensorRT back end: an engine directory from `guardrt export build --format tensorrt`,
served without torch.

vision.plan and decoder.plan are deserialized onto one NVIDIA GPU (`device` auto / cuda /
cuda:N) and checked against the manifest: every I/O tensor's name, direction, dtype and fixed
dims. The K/V caches stay in host memory (`GraphSteps`, shared with ONNX Runtime), so a call
copies its inputs into device buffers (kept between calls, grown by doubling, since the past K/V
grows a position per decode step), runs the plan on a CUDA stream, and copies the outputs back.

CUDA is reached through cuda-python (`cuda.bindings.runtime`; `cuda.cudart` before 12.6), whose
calls return `(error, *values)` tuples: `Cuda` makes each call and checks it in one place.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from guardrt.runtime.engine import EngineOptions
from guardrt.runtime.engine.graph_steps import GraphRunner, vision_feeds
from guardrt.runtime.engine.manifest import EngineDirError, GraphEntry, Manifest, TensorSpec
from guardrt.runtime.engine.onnx_engine import GraphEngine
from guardrt.runtime.errors import ConfigError, GuardrtError

INSTALL = "pip install 'guardrt[tensorrt]'"
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
# Every I/O tensor needs a non-null address, 256-byte aligned (IExecutionContext::
# setTensorAddress), empty ones too (a prefill's past): cudaMalloc of at least this much.
_MIN_BUFFER = 256


class DeviceError(GuardrtError):
    """A CUDA or TensorRT call that failed at run time; the message names the call."""


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


def import_cudart() -> Any:
    """cuda-python's CUDA runtime module (cuda.bindings.runtime, or the older cuda.cudart)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ConfigError(
        f"serving a TensorRT engine needs cuda-python: pip install cuda-python (or {INSTALL})"
    )


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


class Cuda:
    """The few CUDA runtime calls the runner makes, on one GPU, each checked."""

    def __init__(self, cudart: Any, index: int) -> None:
        self.rt, self.index = cudart, index
        self.select()

    def _call(self, what: str, result: Any) -> Any:
        """The value of a cuda-python call returning (error,) or (error, value)."""
        error, *values = result
        if error != self.rt.cudaError_t.cudaSuccess:
            _, name = self.rt.cudaGetErrorName(error)
            _, text = self.rt.cudaGetErrorString(error)
            raise DeviceError(f"{what} on cuda:{self.index} failed: {_text(name)}: {_text(text)}")
        return values[0] if values else None

    def select(self) -> None:
        """Make this GPU the calling thread's (CUDA's current device is per thread)."""
        self._call("cudaSetDevice", self.rt.cudaSetDevice(self.index))

    def malloc(self, nbytes: int) -> int:
        return int(self._call(f"cudaMalloc({nbytes})", self.rt.cudaMalloc(nbytes)))

    def free(self, pointer: int) -> None:
        self._call("cudaFree", self.rt.cudaFree(pointer))

    def stream(self) -> Any:
        return self._call("cudaStreamCreate", self.rt.cudaStreamCreate())

    def destroy(self, stream: Any) -> None:
        self._call("cudaStreamDestroy", self.rt.cudaStreamDestroy(stream))

    def to_device(self, pointer: int, array: np.ndarray, stream: Any) -> None:
        if array.nbytes:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            result = self.rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, stream)
            self._call("cudaMemcpyAsync (to the device)", result)

    def to_host(self, array: np.ndarray, pointer: int, stream: Any) -> None:
        if array.nbytes:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            result = self.rt.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, kind, stream)
            self._call("cudaMemcpyAsync (to the host)", result)

    def synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class DeviceBuffers:
    """One device buffer per tensor name, reused between calls and grown when too small."""

    def __init__(self, cuda: Cuda) -> None:
        self.cuda = cuda
        self.buffers: dict[str, tuple[int, int]] = {}  # name → (pointer, bytes)

    def address(self, name: str, nbytes: int) -> int:
        """A device pointer to at least `nbytes` for `name` (its old contents are not kept)."""
        pointer, capacity = self.buffers.get(name, (0, 0))
        if nbytes <= capacity:
            return pointer
        if pointer:
            self.cuda.free(pointer)
            del self.buffers[name]
        # Doubling: the past K/V grows by one position per decode step.
        size = max(nbytes, 2 * capacity, _MIN_BUFFER)
        pointer = self.cuda.malloc(size)
        self.buffers[name] = (pointer, size)
        return pointer

    def release(self) -> None:
        for pointer, _ in self.buffers.values():
            self.cuda.free(pointer)
        self.buffers.clear()


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

    def run(self, feeds: Mapping[str, np.ndarray], stream: Any) -> list[np.ndarray]:
        """The outputs (the manifest's order) for `feeds` (every input, by name)."""
        self.cuda.select()
        arrays = [self._feed(spec, feeds[spec.name]) for spec in self.inputs]
        for spec, array in zip(self.inputs, arrays, strict=True):
            pointer = self.buffers.address(spec.name, array.nbytes)
            self.cuda.to_device(pointer, array, stream)
            self._bind(spec.name, pointer)
        outputs = []
        for spec in self.outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            if any(dim < 0 for dim in shape):
                raise DeviceError(f"{self.path.name}: output {spec.name} has no shape ({shape})")
            array = np.empty(shape, np.dtype(spec.dtype))
            pointer = self.buffers.address(spec.name, array.nbytes)
            self._bind(spec.name, pointer)
            outputs.append((array, pointer))
        if not self.context.execute_async_v3(int(stream)):
            raise DeviceError(
                f"{self.path.name}: execute_async_v3 failed (TensorRT's log says why)"
            )
        for array, pointer in outputs:
            self.cuda.to_host(array, pointer, stream)
        self.cuda.synchronize(stream)
        return [array for array, _ in outputs]

    def _feed(self, spec: TensorSpec, value: np.ndarray) -> np.ndarray:
        """`value` contiguous, its dtype checked, its shape set on the context."""
        array = np.ascontiguousarray(value)
        if array.dtype != np.dtype(spec.dtype):
            raise ValueError(f"{self.path.name}: {spec.name} is {array.dtype}, not {spec.dtype}")
        if not self.context.set_input_shape(spec.name, array.shape):
            low, _, high = self.engine.get_tensor_profile_shape(spec.name, 0)
            raise DeviceError(
                f"{self.path.name}: {spec.name} shape {array.shape} is outside the built "
                f"profile {tuple(low)}..{tuple(high)}"
            )
        return array

    def _bind(self, name: str, pointer: int) -> None:
        if not self.context.set_tensor_address(name, pointer):
            raise DeviceError(f"{self.path.name}: set_tensor_address({name}) failed")

    def close(self) -> None:
        self.buffers.release()


class TrtRunner:
    """The two plans on one GPU, behind the `GraphRunner` protocol."""

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
    ) -> np.ndarray:
        feeds = vision_feeds(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        (kv,) = self.plans["vision"].run(feeds, self.stream)
        return kv  # (C, 2, N, Hkv, L, d)

    def decoder(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        logits, present = self.plans["decoder"].run(feeds, self.stream)
        return logits, present

    def close(self) -> None:
        """Free the device buffers and the stream (the engines go with this object)."""
        self.cuda.select()
        for plan in self.plans.values():
            plan.close()
        self.cuda.destroy(self.stream)


class TensorrtEngine(GraphEngine):
    backend = "tensorrt"
    bounded = True  # profiles built for at most the manifest's max_batch and max_seq
    trt_runner: TrtRunner

    def _runner(
        self, directory: Path, manifest: Manifest, options: EngineOptions
    ) -> tuple[GraphRunner, str]:
        self.trt_runner = TrtRunner(directory, manifest, options.device)
        return self.trt_runner, self.trt_runner.device

    def close(self) -> None:
        super().close()
        self.trt_runner.close()
