"""GPU memory for the TensorRT back end through cuda-python's runtime, without torch.

`Cuda` makes the few runtime calls the back end needs on one GPU and checks each: cuda-python's
calls return `(error, *values)` tuples (`cuda.bindings.runtime`; `cuda.cudart` before 12.6).
`DeviceArray` is a C-contiguous array in GPU memory; `DeviceBuffers` owns named, reusable ones.

`Cuda.copy_rows` moves K/V between the caches and the graphs' feeds inside the GPU. Every K/V
tensor the back end handles is 5-D, (slices, rows, Hkv, positions, d): slices are the layers
times K and V, rows are cache rows or batch rows. Any run of positions of consecutive rows,
across every slice and head, is a box of cudaMemcpy3D: rows·Hkv lines of `count·d` elements per
slice, the lines `positions·d` elements apart and the slices `rows·Hkv` lines apart. So one call
gathers or stores them whatever the number of layers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from guardrt.runtime.errors import ConfigError, GuardrtError

INSTALL = "pip install 'guardrt[tensorrt]'"
# Every I/O tensor needs a non-null address, 256-byte aligned (IExecutionContext::
# setTensorAddress), empty ones too (a prefill's past): cudaMalloc of at least this much.
MIN_BUFFER = 256


class DeviceError(GuardrtError):
    """A CUDA or TensorRT call that failed at run time; the message names the call."""


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


def byte_size(shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    """Bytes of a C-contiguous array of `shape` and `dtype`."""
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def host_array(value: np.ndarray) -> np.ndarray:
    """`value` C-contiguous for a copy to the GPU, copied only if it is not, its shape kept.
    Not `np.ascontiguousarray`: that turns a 0-D array into shape (1,), which a graph's scalar
    input would refuse (or, bound, read as a vector)."""
    return np.asarray(value, order="C")


@dataclass(frozen=True)
class DeviceArray:
    """A C-contiguous array in GPU memory. It owns nothing: whoever allocated `pointer` frees it."""

    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return byte_size(self.shape, self.dtype)


@dataclass(frozen=True)
class RowRun:
    """Positions `start`..`start+count-1` of rows `row`..`row+rows-1` of a 5-D K/V array."""

    row: int
    start: int
    count: int
    rows: int = 1


class Cuda:
    """The CUDA runtime calls the back end makes, on one GPU, each checked."""

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

    def zero(self, pointer: int, nbytes: int, stream: Any) -> None:
        if nbytes:
            self._call("cudaMemsetAsync", self.rt.cudaMemsetAsync(pointer, 0, nbytes, stream))

    def copy_rows(
        self, dst: DeviceArray, dst_run: RowRun, src: DeviceArray, src_run: RowRun, stream: Any
    ) -> None:
        """Positions of rows of `src` into rows of `dst`, every slice and head: both (slices,
        rows, Hkv, positions, d) of one dtype, their rows and positions may differ. Consecutive
        rows are consecutive lines in both, so any number of them is still one box."""
        slices, _, heads, _, head_dim = dst.shape
        if (src.shape[0], src.shape[2], src.shape[4], src.dtype) != (
            slices,
            heads,
            head_dim,
            dst.dtype,
        ):
            raise ValueError(f"cannot copy K/V rows of {src.shape} into {dst.shape}")
        for array, run in ((dst, dst_run), (src, src_run)):
            rows_fit = 0 <= run.row <= array.shape[1] - run.rows
            if not (rows_fit and 0 <= run.start <= array.shape[3] - run.count):
                raise IndexError(f"{run} lies outside K/V of shape {array.shape}")
        if (dst_run.count, dst_run.rows) != (src_run.count, src_run.rows):
            raise ValueError(f"{src_run} and {dst_run} differ in size")
        if not (dst_run.count and dst_run.rows and slices):
            return
        line = head_dim * dst.dtype.itemsize  # bytes of one position of one head
        parms = self.rt.cudaMemcpy3DParms()
        parms.srcPtr, parms.srcPos = _pitched(self.rt, src, src_run, line)
        parms.dstPtr, parms.dstPos = _pitched(self.rt, dst, dst_run, line)
        # (bytes of the run, rows·Hkv lines, slices): linear memory counts its extent in bytes.
        extent = (dst_run.count * line, dst_run.rows * heads, slices)
        parms.extent = self.rt.make_cudaExtent(*extent)
        parms.kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._call("cudaMemcpy3DAsync", self.rt.cudaMemcpy3DAsync(parms, stream))

    def synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))


def _pitched(rt: Any, array: DeviceArray, run: RowRun, line: int) -> tuple[Any, Any]:
    """cudaMemcpy3D's view of a (slices, rows, Hkv, positions, d) array and of `run` in it: a
    line is one head's positions (pitch `positions·line` bytes), a slice `rows·Hkv` lines; the
    run starts `start·line` bytes into line `row·Hkv`."""
    _, rows, heads, positions, _ = array.shape
    pitch = positions * line
    pointer = rt.make_cudaPitchedPtr(array.pointer, pitch, pitch, rows * heads)
    return pointer, rt.make_cudaPos(run.start * line, run.row * heads, 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class DeviceBuffers:
    """One device buffer per name, reused between calls and grown when too small."""

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
        size = max(nbytes, 2 * capacity, MIN_BUFFER)
        pointer = self.cuda.malloc(size)
        self.buffers[name] = (pointer, size)
        return pointer

    def array(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> DeviceArray:
        """`name`'s buffer as an array of `shape` (contents undefined)."""
        return DeviceArray(self.address(name, byte_size(shape, dtype)), shape, dtype)

    def release(self) -> None:
        for pointer, _ in self.buffers.values():
            self.cuda.free(pointer)
        self.buffers.clear()
