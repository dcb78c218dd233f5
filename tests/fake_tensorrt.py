"""Fakes of `tensorrt` and of cuda-python's runtime (`cudart`) for the TensorRT tests.

TensorRT and CUDA cannot run on the CI machines, so the build (`build_plans`) and the back end
(`TrtRunner`) are driven through these instead: they follow TensorRT 10's Python API (builder,
network, ONNX parser, optimization profile, timing cache, runtime, engine, execution context)
and cuda-python's cudart calling pattern ((error, value) tuples), record what they were asked,
and compute in numpy with "device" memory in host memory."""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guardrt.export.graphs import GraphSpec
from guardrt.export.tensorrt_build import ProfileLimits, profile_shapes
from guardrt.runtime.engine.cuda_memory import DeviceArray

Shape = tuple[int, ...]


# --- tensorrt: the build side ---------------------------------------------------------------


class Flag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1  # TensorRT 10's value


class DataType(enum.Enum):
    FLOAT = "float32"
    INT64 = "int64"
    HALF = "float16"


class Mode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class FakeLogger:
    WARNING = "warning"

    def __init__(self, severity: str) -> None:
        self.severity = severity


class Named:
    def __init__(self, name: str) -> None:
        self.name = name


class Network:
    def __init__(self, flags: int, calls: dict[str, Any]) -> None:
        self.flags, self.calls = flags, calls
        self.inputs: list[Named] = []
        self.outputs: list[Named] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, index: int) -> Named:
        return self.inputs[index]

    def get_output(self, index: int) -> Named:
        return self.outputs[index]


class ParserError:
    def node_name(self) -> str:
        return "/layers.0/Attention"

    def node_operator(self) -> str:
        return "FancyOp"

    def desc(self) -> str:
        return "no importer registered for op FancyOp"


class FakeTrt:
    """`tensorrt` as `build_plans` and `TrtRunner` use it; `graphs` says what each ONNX file
    holds (input and output names), `engines` what each plan's bytes deserialize to."""

    __version__ = "10.99.0"
    NetworkDefinitionCreationFlag = Flag
    DataType = DataType
    TensorIOMode = Mode
    Logger = FakeLogger

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    def __init__(self, graphs: dict[str, GraphSpec], fail_parse: bool = False) -> None:
        self.graphs, self.fail_parse = graphs, fail_parse
        self.builds: list[dict[str, Any]] = []
        self.engines: dict[bytes, FakeEngine] = {}

    def Builder(self, logger: FakeLogger) -> Builder:  # noqa: N802 (tensorrt's name)
        return Builder(self)

    def OnnxParser(self, network: Network, logger: FakeLogger) -> Parser:  # noqa: N802
        return Parser(self, network)

    def Runtime(self, logger: FakeLogger) -> Runtime:  # noqa: N802
        return Runtime(self)


class Parser:
    def __init__(self, trt: FakeTrt, network: Network) -> None:
        self.trt, self.network, self.num_errors = trt, network, 0

    def parse_from_file(self, path: str) -> bool:
        self.network.calls["onnx"] = path
        if self.trt.fail_parse:
            self.num_errors = 1
            return False
        spec = next(s for s in self.trt.graphs.values() if str(s.path) == path)
        self.network.inputs = [Named(t.name) for t in spec.inputs]
        self.network.outputs = [Named(t.name) for t in spec.outputs]
        return True

    def get_error(self, index: int) -> ParserError:
        return ParserError()


class Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Shape, Shape, Shape]] = {}

    def set_shape(self, name: str, low: Shape, opt: Shape, high: Shape) -> None:
        self.shapes[name] = (low, opt, high)


class TimingCache:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def serialize(self) -> bytes:
        return self.blob + b"+timed"


class Config:
    def __init__(self, calls: dict[str, Any]) -> None:
        self.calls, self.cache = calls, TimingCache(b"")
        calls["profiles"] = []

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.calls["pool"] = (pool, size)

    def add_optimization_profile(self, profile: Profile) -> int:
        self.calls["profiles"].append(profile.shapes)
        return 0

    def create_timing_cache(self, blob: bytes) -> TimingCache:
        self.calls.setdefault("timing_blobs", []).append(bytes(blob))
        return TimingCache(bytes(blob))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return cache.blob != b"from another GPU"  # a mismatched cache is refused

    def get_timing_cache(self) -> TimingCache:
        return self.cache


class Builder:
    def __init__(self, trt: FakeTrt) -> None:
        self.trt = trt
        self.calls: dict[str, Any] = {}
        trt.builds.append(self.calls)

    def create_network(self, flags: int) -> Network:
        self.calls["flags"] = flags
        return Network(flags, self.calls)

    def create_builder_config(self) -> Config:
        return Config(self.calls)

    def create_optimization_profile(self) -> Profile:
        return Profile()

    def build_serialized_network(self, network: Network, config: Config) -> bytes:
        return f"plan of {Path(self.calls['onnx']).stem}".encode()


# --- the runtime side: engines computing in numpy, "device" memory in host memory ---------


@dataclass(frozen=True)
class PitchedPtr:
    ptr: int
    pitch: int
    xsize: int
    ysize: int


@dataclass(frozen=True)
class Pos:
    x: int
    y: int
    z: int


@dataclass(frozen=True)
class Extent:
    width: int
    height: int
    depth: int


class FakeCudart:
    """cuda-python's runtime: (error, value) tuples; device buffers are host buffers."""

    class cudaError_t(enum.Enum):  # noqa: N801 (cuda-python's names)
        cudaSuccess = 0  # noqa: N815
        cudaErrorMemoryAllocation = 2  # noqa: N815

    class cudaMemcpyKind(enum.Enum):  # noqa: N801
        cudaMemcpyHostToDevice = 1  # noqa: N815
        cudaMemcpyDeviceToHost = 2  # noqa: N815
        cudaMemcpyDeviceToDevice = 3  # noqa: N815

    class cudaMemcpy3DParms:  # noqa: N801
        """Zero-initialised, as cuda-python's struct (its fields are set one by one)."""

        def __init__(self) -> None:
            self.srcPtr = self.dstPtr = PitchedPtr(0, 0, 0, 0)
            self.srcPos = self.dstPos = Pos(0, 0, 0)
            self.extent = Extent(0, 0, 0)
            self.kind: Any = None

    def __init__(self) -> None:
        self.live: dict[int, np.ndarray] = {}
        self.mallocs: list[int] = []
        self.device = -1
        self.fail_malloc = False
        self.max_malloc: int | None = None  # larger allocations fail (a GPU out of memory)
        self.copies: list[str] = []  # the kind of each copy or memset, in order

    @staticmethod
    def make_cudaPitchedPtr(ptr: int, pitch: int, xsize: int, ysize: int) -> PitchedPtr:  # noqa: N802
        return PitchedPtr(ptr, pitch, xsize, ysize)

    @staticmethod
    def make_cudaPos(x: int, y: int, z: int) -> Pos:  # noqa: N802
        return Pos(x, y, z)

    @staticmethod
    def make_cudaExtent(width: int, height: int, depth: int) -> Extent:  # noqa: N802
        return Extent(width, height, depth)

    def _inside(self, pointer: int, count: int) -> int:
        """The start of the live allocation holding bytes pointer..pointer+count-1 (outside
        every one, a real GPU would have written over something else, or faulted)."""
        for start, block in self.live.items():
            if start <= pointer and pointer + count <= start + block.nbytes:
                return start
        raise AssertionError(f"{count} bytes at {pointer:#x} lie outside every allocation")

    def cudaSetDevice(self, index: int) -> tuple[Any]:  # noqa: N802
        self.device = index
        return (self.cudaError_t.cudaSuccess,)

    def cudaMalloc(self, size: int) -> tuple[Any, int | None]:  # noqa: N802
        if self.fail_malloc or (self.max_malloc is not None and size > self.max_malloc):
            return self.cudaError_t.cudaErrorMemoryAllocation, None
        block = np.zeros(size, np.uint8)
        self.live[block.ctypes.data] = block
        self.mallocs.append(size)
        return self.cudaError_t.cudaSuccess, block.ctypes.data

    def cudaFree(self, pointer: int) -> tuple[Any]:  # noqa: N802
        del self.live[pointer]
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamCreate(self) -> tuple[Any, int]:  # noqa: N802
        return self.cudaError_t.cudaSuccess, 77

    def cudaStreamDestroy(self, stream: int) -> tuple[Any]:  # noqa: N802
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, stream: int) -> tuple[Any]:  # noqa: N802
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(  # noqa: N802
        self, dst: int, src: int, count: int, kind: Any, stream: int
    ) -> tuple[Any]:
        device = {self.cudaMemcpyKind.cudaMemcpyHostToDevice: dst}.get(kind, src)
        self._inside(device, count)
        ctypes.memmove(dst, src, count)
        self.copies.append(kind.name)
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemsetAsync(self, pointer: int, value: int, count: int, stream: int) -> tuple[Any]:  # noqa: N802
        self._inside(pointer, count)
        ctypes.memset(pointer, value, count)
        self.copies.append("memset")
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpy3DAsync(self, p: cudaMemcpy3DParms, stream: int) -> tuple[Any]:  # noqa: N802
        """Linear memory: byte (x, y, z) of a pitched pointer is at ptr + (z·ysize + y)·pitch
        + x. CUDA refuses a box wider than a pitch or past its rows; so does this."""
        assert p.kind == self.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        width, height, depth = p.extent.width, p.extent.height, p.extent.depth
        for ptr, pos in ((p.srcPtr, p.srcPos), (p.dstPtr, p.dstPos)):
            assert pos.x + width <= ptr.pitch, (ptr, pos)
            assert pos.y + height <= ptr.ysize, (ptr, pos)
        # "The source and destination objects may not overlap": never within one allocation.
        assert self._inside(p.srcPtr.ptr, 1) != self._inside(p.dstPtr.ptr, 1)
        for z in range(depth):
            for y in range(height):
                src, dst = (
                    ptr.ptr + ((pos.z + z) * ptr.ysize + pos.y + y) * ptr.pitch + pos.x
                    for ptr, pos in ((p.srcPtr, p.srcPos), (p.dstPtr, p.dstPos))
                )
                self._inside(src, width)
                self._inside(dst, width)
                ctypes.memmove(dst, src, width)
        self.copies.append("3d")
        return (self.cudaError_t.cudaSuccess,)

    def cudaGetErrorName(self, error: Any) -> tuple[Any, bytes]:  # noqa: N802
        return self.cudaError_t.cudaSuccess, error.name.encode()

    def cudaGetErrorString(self, error: Any) -> tuple[Any, bytes]:  # noqa: N802
        return self.cudaError_t.cudaSuccess, b"out of memory"


def _read(pointer: int, shape: Shape, dtype: str) -> np.ndarray:
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(ctypes.string_at(pointer, count), dtype).reshape(shape).copy()


def fetch(array: DeviceArray) -> np.ndarray:
    """A copy of a (fake) device array."""
    return _read(array.pointer, array.shape, str(array.dtype))


Compute = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class FakeEngine:
    """An engine over `spec`'s tensors whose outputs `compute` makes from the inputs."""

    def __init__(self, spec: GraphSpec, compute: Compute, limits: ProfileLimits) -> None:
        self.spec, self.compute = spec, compute
        self.profile = profile_shapes(spec, limits)
        self.tensors = {t.name: (Mode.INPUT, t) for t in spec.inputs}
        self.tensors |= {t.name: (Mode.OUTPUT, t) for t in spec.outputs}

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str) -> Mode:
        return self.tensors[name][0]

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType(self.tensors[name][1].dtype)

    def get_tensor_shape(self, name: str) -> Shape:
        return tuple(d if isinstance(d, int) else -1 for d in self.tensors[name][1].shape)

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[Shape, Shape, Shape]:
        return self.profile[name]

    def create_execution_context(self) -> Context:
        return Context(self)


class Context:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, Shape] = {}
        self.addresses: dict[str, int] = {}
        self.computed: tuple[Any, dict[str, np.ndarray]] | None = None

    def set_input_shape(self, name: str, shape: Shape) -> bool:
        low, _, high = self.engine.profile[name]
        fits = len(shape) == len(low) and all(
            a <= s <= b for a, s, b in zip(low, shape, high, strict=True)
        )
        self.shapes[name] = shape
        return fits

    def _outputs(self) -> dict[str, np.ndarray]:
        """The outputs of the inputs as bound now (the fake's copies are synchronous, so they
        are what a real run would read at its turn in the stream), computed once a run."""
        spec = self.engine.spec
        feeds = {
            t.name: _read(self.addresses[t.name], self.shapes[t.name], t.dtype) for t in spec.inputs
        }
        key = tuple((name, value.shape, value.tobytes()) for name, value in feeds.items())
        if self.computed is None or self.computed[0] != key:
            self.computed = key, self.engine.compute(feeds)
        return self.computed[1]

    def get_tensor_shape(self, name: str) -> Shape:
        return self._outputs()[name].shape

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream: int) -> bool:
        assert stream == 77
        declared = {t.name: np.dtype(t.dtype) for t in self.engine.spec.outputs}
        for name, value in self._outputs().items():
            assert value.dtype == declared[name]  # else the copy would overrun the buffer
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        return True


class Runtime:
    def __init__(self, trt: FakeTrt) -> None:
        self.trt = trt

    def deserialize_cuda_engine(self, blob: bytes) -> FakeEngine | None:
        return self.trt.engines.get(blob)


def vision_compute(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """cross_kv (2, 2, N, 2, 20, 8): each image's id plus its tile count, everywhere."""
    images = feeds["aspect_ratio_ids"] + feeds["aspect_ratio_mask"].sum(1)  # (N,)
    kv = np.ones((2, 2, len(images), 2, 20, 8), np.float32)
    return {"cross_kv": kv * images[None, None, :, None, None, None].astype(np.float32)}


def decoder_compute(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """logits: the token at each logit index, at every id asked for (so the normaliser over the
    128,256 equal logits is that plus log 128256); present_kv: each position plus the past
    length."""
    ids, positions, rows = feeds["input_ids"], feeds["position_ids"], feeds["logit_index"]
    picked = np.take_along_axis(ids, rows, axis=1).astype(np.float32)  # (B, R)
    logits = np.repeat(picked[:, :, None], len(feeds["vocab"]), axis=2)  # (B, R, V)
    normaliser = picked + np.float32(np.log(128256))  # (B, R)
    past = feeds["past_kv"].shape[4] + feeds["past_kv"].sum()
    present = np.ones((3, 2, *ids.shape[:1], 2, ids.shape[1], 8), np.float32)  # (Ls,2,B,Hkv,S,d)
    present *= (positions + past)[None, None, :, None, :, None]
    return {"logits": logits, "normaliser": normaliser, "present_kv": present}
