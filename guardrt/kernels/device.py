"""This process's facts the kernels' dispatch decides on: the CUDA device's compute capability,
whether triton is importable, whether a tracer is recording, and which of those let a Triton
kernel run. One module below the dispatchers (`dispatch.py`, `fused.py`, `activation_quant.py`),
importing none of them, so they share one gate without an import cycle."""

from __future__ import annotations

import functools
import importlib.util

import torch

Capability = tuple[int, int]  # CUDA compute capability (major, minor)

TRITON_MIN_CAPABILITY: Capability = (8, 0)  # bf16 tl.dot
# What the elementwise Triton kernels (fused norm / RoPE / SwiGLU, activation quantization)
# take: fp32 too, since they use no tensor cores.
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_runs(capability: Capability | None, has_triton: bool) -> bool:
    """Whether Triton kernels run on a CUDA device of `capability` (None: not a CUDA device):
    triton importable and bf16 `tl.dot` (sm ≥ 8.0)."""
    return has_triton and capability is not None and capability >= TRITON_MIN_CAPABILITY


def recording() -> bool:
    """Whether a tracer or compiler is recording ops (torch.jit.trace, torch.export and so the
    dynamo ONNX exporter, torch.compile): exported graphs must see the references' plain ops."""
    # torch._C._is_tracing is what torch.jit.is_tracing returns outside TorchScript (the public
    # name is untyped); is_compiling is true under torch.export, hence the dynamo ONNX exporter.
    # is_compiling goes first: inside torch.cond's branches dynamo traces this function, and it
    # folds is_compiling to True but cannot trace _is_tracing (a builtin returning a bool).
    return bool(torch.compiler.is_compiling() or torch._C._is_tracing())


def cuda_capability(device: torch.device) -> Capability | None:
    """(major, minor) of a CUDA device; None for any other device, ROCm's included (its fp8 is
    e4m3fnuz on MI300, and the Triton kernel has not run there)."""
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index)


@functools.cache
def _capability(index: int) -> Capability:
    return torch.cuda.get_device_capability(index)


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (the test extra installs it on x86-64 Linux; serving
    machines may lack it), without importing it."""
    return importlib.util.find_spec("triton") is not None
