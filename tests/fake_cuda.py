"""guardrt's CUDA code paths on a machine without a GPU, with torch's CUDA build (issue 8).

    PYTHONPATH=. VENV/bin/python -m tests.fake_cuda [--size full] [--gpu h100|h200|a100|l40s]
    # VENV: torch's CUDA wheel

A lent GPU comes rarely and for minutes; a fault that only shows on CUDA tensors (an index made
on the CPU beside CUDA weights, a kernel wrapper allocating its output on the wrong device, a
shape CUDA's own checks refuse) should not be what that time finds. `FakeTensorMode` gives each
tensor a device and runs every op's shape, dtype and device rules without computing anything,
so such a fault raises here as it would on the GPU. CI's torch is the CPU wheel, which cannot
make CUDA tensors, even fake ones; torch's CUDA wheel can, on any machine.

Three checks, exit 1 if any fails:
- `bench`: `guardrt bench --device cuda` on the tiny model (`--size full`: the 11B
  architecture, its parameters fake too, ~5 minutes) for every precision (steps padded to
  buckets, the prefix row, forced paths, the scheduler's throughput), without the
  transformers baseline (its generate loop decides on values);
- `serve`: the torch engine as `Guard` serves on "cuda" (load, 8-bit weights made while
  loading, load-time tuning, warm-up, mixed batches with and without images, a session), on
  the tiny model, for every precision and both decode modes, each as a fresh process whose
  serving after warm-up must compile no Triton kernel (a request would wait on it);
- `scripts`: the GPU-only benchmark scripts `scripts/gpu_check.sh` runs, `norm_rope.py` and
  `kernels.py` at the 11B model's shapes, `profile_gpu.py` on the tiny model.

CUDA graph capture is checked for what a capture refuses or gets wrong: inside
`torch.cuda.graph`, an op reading a host tensor (a copy to the GPU, or a CPU scalar baked into
the graph as a constant), a readback (`.item()`, `.cpu()`, `nonzero`, a Python `bool` of a CUDA
tensor) or a synchronize raises and is listed; replays return the captured outputs.

Every Triton launch is compiled, for the faked card's architecture, by Triton's own compiler
and the ptxas it ships (they need no GPU; only loading and launching the result do): each
specialization a launch asks for (its dtypes, constexprs, and the alignment and integer
specializations Triton makes) once, as a GPU process's first launches compile them. A kernel
that does not compile for that architecture, or needs more shared memory than the card lets a
block have (Triton checks it at launch), fails its launch. The compile times are printed:
what a fresh GPU machine's warm-up spends compiling, on this machine's CPU.

`--gpu` picks the card: an H100 (sm 9.0, the default: fp8, int8 and fused kernels), an H200
(the H100's chip with more memory and L2: the card the device tool lends now), an A100 (sm 8.0:
no fp8 tensor cores, so fp8 weights take the reference path) or an L40S (sm 8.9: fp8, and 99 KB
of shared memory a block against the H100's 227 KB).

What it cannot check, so stubs stand in (each patch below says why): values (readbacks give
zeros, so verdicts are meaningless: constrained decoding answers `unsafe` on zeros), the
Triton kernels' results (their launches run nothing), timings, memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import runpy
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

# The compiled kernels' paths, as on the GPU (the tests' conftest turns the interpreter on).
os.environ["TRITON_INTERPRET"] = "0"
MODE = FakeTensorMode(allow_non_fake_inputs=True)


class _DeviceRules(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """A device rule FakeTensorMode does not apply: torch on a GPU refuses to index a host
    tensor with device indices ("indices should be either on cpu or on the same device as the
    indexed tensor"), where fake tensors, like meta ones, let it through. (A table left on the
    host and gathered by CUDA indices failed no check here, found in review.)"""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.index.Tensor:
            source, indices = args[0], args[1]
            elsewhere = [i.device for i in indices if i is not None and i.device.type != "cpu"]
            if source.device.type == "cpu" and elsewhere:
                raise RuntimeError(
                    f"indices on {elsewhere[0]} index a host tensor {tuple(source.shape)}: "
                    "indices should be either on cpu or on the same device as the indexed tensor"
                )
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _faked() -> Iterator[None]:
    """Fake CUDA tensors, with the device rule FakeTensorMode leaves out (`_DeviceRules`)."""
    with MODE, _DeviceRules():  # type: ignore[no-untyped-call]
        yield


LAUNCHES: list[str] = []  # the Triton kernels launched, by name
COMPILED: dict[str, list[float]] = {}  # kernel → seconds each of its specializations compiled in
COMPILE_FAULTS: list[str] = []  # a kernel that did not compile, or does not fit the card
# The cards the fake device can be: each one's compute capability (which picks the fp8, int8
# and fused-kernel paths), Triton's compile target, and the limits a launch is checked against
# (`shared`: the most shared memory a block may opt in to, which Triton checks at launch).
GPUS: dict[str, dict[str, Any]] = {
    "h100": {"name": "fake H100", "capability": (9, 0), "arch": 90, "sms": 132,
             "memory": 80 << 30, "l2": 50 << 20, "shared": 232448},
    "a100": {"name": "fake A100", "capability": (8, 0), "arch": 80, "sms": 108,
             "memory": 80 << 30, "l2": 40 << 20, "shared": 166912},
    "l40s": {"name": "fake L40S", "capability": (8, 9), "arch": 89, "sms": 142,
             "memory": 48 << 30, "l2": 96 << 20, "shared": 101376},
    # The kind the device tool lends now: the H100's chip (sm 9.0, its SMs and shared memory)
    # with 141 GB of HBM3e and, as PyTorch reported there (KINDS.md), 60 MB of L2.
    "h200": {"name": "fake H200", "capability": (9, 0), "arch": 90, "sms": 132,
             "memory": 143771 << 20, "l2": 60 << 20, "shared": 232448},
}  # fmt: skip
GPU: dict[str, Any] = dict(GPUS["h100"])  # the card the run fakes (`--gpu`); a copy, as main
# updates it in place (the patches read it) and GPUS must keep every card's own figures
CAPTURED: list[str] = []  # each capture: "ok" or what it refused
_STATE = {"capturing": False, "warm": False}  # inside torch.cuda.graph; serving after warm-up
SEEN: set[tuple[str, Any]] = set()  # (kernel, specialization) compiled so far, for the times
LATE: list[str] = []  # kernels compiled while serving after warm-up: a first request's stall
_NUMPY_DTYPES = {
    torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32,
    torch.bool: np.bool_, torch.float16: np.float16, torch.uint8: np.uint8, torch.int8: np.int8,
}  # fmt: skip


def _zeros(tensor: torch.Tensor) -> np.ndarray:
    return np.zeros(tuple(tensor.shape), dtype=_NUMPY_DTYPES.get(tensor.dtype, np.float32))


def _fake(tensor: torch.Tensor) -> torch.Tensor:
    """A fake tensor of `tensor`'s shape, strides, dtype and device, holding no constant: moving
    a real CPU tensor (or a fake one that keeps its small value as a constant) to "cuda" makes
    FakeTensorMode run the copy for real, which initialises CUDA and fails without a driver."""
    if isinstance(tensor, FakeTensor) and tensor.constant is None:
        return tensor
    with _faked():
        return torch.empty_strided(
            tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device
        )


def _on_fake(method: Callable[..., Any], fake: Callable[..., Any]) -> Callable[..., Any]:
    def patched(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self, FakeTensor):
            if _STATE["capturing"] and self.device.type == "cuda":
                raise _CaptureError(f"{method.__name__}() of a CUDA tensor waits for the GPU")
            return fake(self, *args, **kwargs)
        return method(self, *args, **kwargs)

    return patched


def _numpy(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> np.ndarray:
    if tensor.device.type != "cpu":  # as torch refuses a CUDA tensor's numpy()
        raise TypeError(f"can't convert {tensor.device} tensor to numpy (copy it to the host)")
    return _zeros(tensor)


def _nonzero(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A tenth of the elements: the count is data (the vision tower's padding tokens)."""
    with _faked():
        rows = max(1, tensor.numel() // 10)
        return torch.empty((rows, tensor.dim()), dtype=torch.int64, device=tensor.device)


def _patch_tensors() -> None:
    """Readbacks of fake tensors give zeros (FakeTensorMode raises: it has no data)."""
    t = torch.Tensor
    t.numpy = _on_fake(t.numpy, _numpy)  # type: ignore[method-assign]
    t.item = _on_fake(t.item, lambda x: 0.0 if x.dtype.is_floating_point else 0)  # type: ignore[method-assign]
    t.tolist = _on_fake(t.tolist, lambda x: _zeros(x).tolist())  # type: ignore[method-assign]
    t.__bool__ = _on_fake(t.__bool__, lambda x: False)  # type: ignore[method-assign]
    t.__float__ = _on_fake(t.__float__, lambda x: 0.0)  # type: ignore[method-assign]
    t.__int__ = _on_fake(t.__int__, lambda x: 0)  # type: ignore[method-assign]
    t.nonzero = _on_fake(t.nonzero, _nonzero)  # type: ignore[method-assign]
    t.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]  # needs a driver
    to = t.to

    def moved(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        target = kwargs.get("device") or next(
            (a for a in args if isinstance(a, (str, torch.device))), None
        )
        if target is not None and torch.device(target).type == "cuda":
            self = _fake(self)
        return to(self, *args, **kwargs)

    setattr(t, "to", moved)  # noqa: B010 (an overloaded method: mypy refuses a plain assignment)
    t.cuda = lambda self, *a, **k: moved(self, "cuda")  # type: ignore[method-assign]
    # The load-time kernel checks compare kernels with their references: no values to compare.
    allclose, equal = torch.allclose, torch.equal
    torch.allclose = lambda a, b, *x, **k: (
        True if isinstance(a, FakeTensor) or isinstance(b, FakeTensor) else allclose(a, b, *x, **k)
    )
    torch.equal = lambda a, b: (  # type: ignore[assignment]
        True if isinstance(a, FakeTensor) or isinstance(b, FakeTensor) else equal(a, b)
    )
    for name in ("as_tensor", "tensor"):  # made on the host, then moved as above
        make = getattr(torch, name)

        def made(
            data: Any, *args: Any, _make: Any = make, device: Any = None, **kwargs: Any
        ) -> Any:
            value = _make(data, *args, **kwargs)
            return value if device is None else value.to(device)

        setattr(torch, name, made)


class _Event:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def elapsed_time(self, other: Any) -> float:
        return 1.0  # every candidate times the same: the load-time choices take their defaults


class _Stream(_Event):
    def wait_stream(self, *args: Any) -> None:
        pass


class _CaptureError(RuntimeError):
    pass


def _not_capturing(*args: Any, **kwargs: Any) -> None:
    """A synchronize (or cache release) inside a capture: CUDA refuses it."""
    if _STATE["capturing"]:
        raise _CaptureError("the GPU was synchronized during a capture")


class _Graph:
    def replay(self) -> None:
        pass


class _RefuseHost(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """What a capture gets wrong with host tensors: a copy to or from the GPU (refused while
    capturing, or recorded as a copy from an address the next replay no longer holds) and a
    CPU scalar tensor (read once, baked into the graph as a constant)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        hosts = [t for t in leaves if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        if hosts:
            shapes = [tuple(t.shape) for t in hosts]
            raise _CaptureError(f"{func} read host tensors {shapes} during a capture")
        out = func(*args, **kwargs)
        if any(
            isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in pytree.tree_leaves(out)
        ):
            raise _CaptureError(f"{func} copied to the host during a capture")
        return out


@contextlib.contextmanager
def _capture(graph: Any, pool: Any = None, **kwargs: Any) -> Iterator[None]:
    """torch.cuda.graph: the forward runs as it would be captured, refusing what CUDA would;
    each capture's outcome is recorded (StaticSteps carries on eagerly after a failed one, so
    a failure would otherwise show only as fewer graphs)."""
    _STATE["capturing"] = True
    try:
        with _RefuseHost():  # type: ignore[no-untyped-call]
            yield
    except Exception as exc:
        CAPTURED.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        raise
    else:
        CAPTURED.append("ok")
    finally:
        _STATE["capturing"] = False


def _patch_cuda() -> None:
    """The CUDA runtime calls guardrt makes, answered as `GPU` would (an H100 by default: sm 9.0,
    so fp8 and the Triton kernels are chosen); none needs a driver. A graph "capture" runs its
    step under `_capture`'s checks, and a replay returns what that run returned."""
    cuda = torch.cuda
    major, minor = GPU["capability"]
    properties = types.SimpleNamespace(
        name=GPU["name"], major=major, minor=minor, multi_processor_count=GPU["sms"],
        total_memory=GPU["memory"], L2_cache_size=GPU["l2"],
    )  # fmt: skip
    stubs: dict[str, Any] = {
        "Event": _Event, "Stream": _Stream, "current_stream": lambda *a, **k: _Stream(),
        "stream": lambda stream: contextlib.nullcontext(), "synchronize": _not_capturing,
        "empty_cache": _not_capturing, "reset_peak_memory_stats": lambda *a, **k: None,
        "max_memory_allocated": lambda *a, **k: 0, "memory_allocated": lambda *a, **k: 0,
        "get_device_name": lambda *a, **k: properties.name,
        "get_device_capability": lambda *a, **k: (major, minor),
        "get_device_properties": lambda *a, **k: properties,
        "current_device": lambda: 0, "device_count": lambda: 1,
        "device": lambda *a, **k: contextlib.nullcontext(), "_sleep": lambda cycles: None,
        "graph_pool_handle": object, "CUDAGraph": _Graph, "graph": _capture,
    }  # fmt: skip
    for name, stub in stubs.items():
        setattr(cuda, name, stub)
    generator = torch.Generator

    class CpuGenerator(generator):  # type: ignore[misc,valid-type]
        """A CUDA generator needs a driver; fake tensors take any."""

        def __new__(cls, device: Any = None) -> Any:
            return generator()

    torch.Generator = CpuGenerator  # type: ignore[misc]


class _Pointer:
    """What Triton's binder reads of a tensor argument: its dtype and its address, for the
    address's alignment. A fake tensor has no address: its storage offset in bytes stands in,
    as the caching allocator's blocks start 512-byte aligned, so the remainder mod 16 (which
    Triton specializes on) is the offset's."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.dtype = tensor.dtype
        self._address = int(tensor.storage_offset()) * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


class _Target:
    """Triton's driver, as far as compiling for `GPU`'s architecture needs one: the compiler
    (Triton's own, and the ptxas it ships) runs on any machine; only loading and launching the
    result need the GPU."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        compiler: Any = importlib.import_module("triton.backends.compiler")
        return compiler.GPUTarget("cuda", GPU["arch"], 32)


def _compile(kernel: Any, run: Callable[..., Any], args: Any, kwargs: Any) -> None:
    """Compile this launch's specialization for `GPU` (a launch the JIT has compiled already is
    a cache hit): a kernel that does not compile, or needs more shared memory than the card has,
    fails its launch, as it would there."""
    name = kernel.__name__
    pointers = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
    named = {k: _Pointer(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    cache = kernel.device_caches[0][0]  # the JIT's compiled kernels, by specialization
    known = set(cache)
    started = time.perf_counter()
    try:
        compiled = run(kernel, *pointers, **{**named, "warmup": True})
    except Exception as exc:
        COMPILE_FAULTS.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
        raise RuntimeError(f"Triton kernel {name} does not compile for sm_{GPU['arch']}") from exc
    new = [(name, key) for key in cache if key not in known]
    if not new:
        return
    if _STATE["warm"]:
        LATE.append(name)
    # One an earlier "process" (`_new_process`) compiled comes from Triton's disk cache: its
    # time is not a compile's, and it is counted once.
    if not SEEN.issuperset(new):
        SEEN.update(new)
        COMPILED.setdefault(name, []).append(time.perf_counter() - started)
    shared = compiled.metadata.shared
    if shared > GPU["shared"]:
        fault = f"{name}: {shared} bytes of shared memory, {GPU['name']} has {GPU['shared']}"
        COMPILE_FAULTS.append(fault)
        raise RuntimeError(f"Triton kernel {fault}")


def _patch_triton() -> None:
    """A launch checks its tensors are on CUDA (a CPU one is a fault the GPU would show as an
    illegal address), compiles its specialization for `GPU`'s architecture with Triton's real
    compiler (`_compile`), records the kernel, and runs nothing."""
    # (importlib: triton has no type information; torch's CUDA wheel brings it)
    autotuner: Any = importlib.import_module("triton.runtime.autotuner")
    jit: Any = importlib.import_module("triton.runtime.jit")
    importlib.import_module("triton.runtime.driver").driver.set_active(_Target())
    run = jit.JITFunction.run

    def launch(kernel: Any, *args: Any, **kwargs: Any) -> None:
        name = getattr(kernel, "__name__", str(kernel))
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.device.type != "cuda":
                raise RuntimeError(f"Triton kernel {name} got a {value.device} tensor")
        _compile(kernel, run, args, kwargs)
        LAUNCHES.append(name)

    def tuned(self: Any, *args: Any, **kwargs: Any) -> None:
        """An autotuned launch compiles every config, as the autotuner's first call does."""
        for config in self.configs:
            launch(self.fn, *args, **{**kwargs, **config.all_kwargs()})

    def heuristic(self: Any, *args: Any, **kwargs: Any) -> None:
        for value, rule in self.values.items():  # as triton's Heuristics.run
            kwargs[value] = rule({**dict(zip(self.arg_names, args, strict=False)), **kwargs})
        self.fn.run(*args, **kwargs)

    jit.JITFunction.run = launch
    autotuner.Autotuner.run = tuned
    autotuner.Heuristics.run = heuristic


def _patch_threads() -> None:
    """The scheduler's engine thread runs in the mode too (modes are per thread)."""
    run = threading.Thread.run

    def patched(self: threading.Thread) -> None:
        if self.name != "guardrt-engine":
            return run(self)
        with _faked():
            return run(self)

    threading.Thread.run = patched  # type: ignore[method-assign]


def _patch_random_model() -> None:
    """`random_model` makes its parameters as fake tensors on the device, built on `meta`:
    no memory at any size, so the 11B architecture runs here too. (The real one makes them
    on the device and casts them in place, which fake parameters can't be swapped for.)"""
    from guardrt.bench import fullsize, latency  # noqa: PLC0415
    from guardrt.runtime.model.config import ModelConfig  # noqa: PLC0415
    from guardrt.runtime.model.functional import rope_inv_freq  # noqa: PLC0415
    from guardrt.runtime.model.mllama import MllamaModel  # noqa: PLC0415

    def made(
        document: Any,
        device: torch.device,
        dtype: torch.dtype = torch.bfloat16,
        semantics: Any = "meta",
        seed: int = 0,
    ) -> MllamaModel:
        config = ModelConfig.from_dict(document)
        with torch.device("meta"):
            model = MllamaModel(config, semantics)
        with _faked():
            for module in model.modules():
                for name, value in module._parameters.items():
                    if value is not None:
                        fake = torch.empty(value.shape, dtype=dtype, device=device)
                        module._parameters[name] = nn.Parameter(fake, requires_grad=False)
                for name, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[name] = torch.empty_like(buffer, device=device)
            model.inv_freq = rope_inv_freq(config.text.rope, config.text.head_dim).to(device)
        return model.eval()

    setattr(latency, "random_model", made)  # noqa: B010 (imported there by name)
    fullsize.random_model = made  # profile_gpu.py imports it when it runs


def install() -> None:
    if not torch.backends.cuda.is_built():  # type: ignore[no-untyped-call]
        raise SystemExit(f"torch {torch.__version__} is a CPU build: fake CUDA tensors need CUDA's")
    if torch.cuda.is_available():
        raise SystemExit("this machine has a GPU: run the GPU tests (scripts/gpu_check.sh)")
    _patch_tensors()
    _patch_cuda()
    _patch_triton()
    _patch_threads()
    _patch_random_model()


def check_bench(results: Path, size: str = "tiny") -> list[str]:
    """`guardrt bench` on "cuda", every precision, the model of `size` (full: the 11B's
    shapes, at gpu_check's concurrencies; ~5 minutes): the faults the report records."""
    from guardrt.bench import latency, options  # noqa: PLC0415

    concurrency = "8,32" if size == "full" else "2,4"
    argv = ["--size", size, "--device", "cuda", "--no-baseline", "--repeat", "2",
            "--requests", "8", "--concurrency", concurrency, "--results", str(results)]  # fmt: skip
    with _faked():
        latency.main(argv)
    (written,) = results.glob("latency-*.json")
    report = json.loads(written.read_text())
    faults = [f"{phase}: {error}" for phase, error in report.get("errors", {}).items()]
    for precision in options.PRECISIONS:
        run = report["precisions"].get(precision, {})
        if len(run.get("latency", {})) != 6:
            faults.append(f"{precision}: {len(run.get('latency', {}))} of 6 latency cases")
        rates = run.get("throughput", {})
        faults += [f"{precision} {k}: {v['error']}" for k, v in rates.items() if "error" in v]
        if len(rates) != 4:
            faults.append(f"{precision}: {len(rates)} of 4 throughput runs")
    return faults


def _conversations() -> list[list[dict[str, Any]]]:
    image = {"type": "image", "image": np.full((600, 900, 3), 128, dtype=np.uint8)}
    return [
        [{"role": "user", "content": "How do I pick a lock?"}],
        [{"role": "user", "content": [image, {"type": "text", "text": "Is this safe?"}]}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    ] * 2


def _where(exc: BaseException) -> str:
    """The error and the innermost line of guardrt or its benchmarks it came through (not
    torch's internals)."""
    ours = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/guardrt/" in f.filename or "/benchmarks/" in f.filename
    ]
    at = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno} ({ours[-1].line})" if ours else ""
    return f"{type(exc).__name__}: {str(exc)[:300]}{at}"


SERVED: tuple[dict[str, Any], ...] = (
    {},
    {"quantize": "int8"},
    {"quantize": "fp8"},
    {"quantize": "int8", "int8_compute": "weight+activation"},
    {"decode": "greedy"},
    {"dtype": "float32"},
)


def _new_process() -> None:
    """Forget the Triton kernels compiled in this process, as a new serving process starts
    without them (Triton's disk cache, like a GPU machine's, keeps them: loading from it is
    fast, but a load after warm-up is still a launch that waits on it)."""
    jit: Any = importlib.import_module("triton.runtime.jit")
    for name, module in list(sys.modules.items()):
        if name.startswith("guardrt.kernels"):
            for value in vars(module).values():
                if isinstance(value, jit.JITFunction):
                    value.device_caches.clear()


def check_serve() -> list[str]:
    """The torch engine as served on "cuda", with each of `SERVED`'s options, each as a fresh
    process: after its warm-up, serving must compile no Triton kernel (a request would wait)."""
    from guardrt.runtime.guard import Guard  # noqa: PLC0415
    from guardrt.runtime.verdict import Label  # noqa: PLC0415

    faults = []
    for options in SERVED:
        _new_process()
        late = served_late = len(LATE)
        try:
            with _faked():
                guard = Guard.load("tiny-random", device="cuda", max_seq=2048, **options)
                sample = [guard.prepare(c) for c in _conversations()[:3]]
                guard.engine.warmup(sample)
                _STATE["warm"] = True
                verdicts = guard.moderate_batch(_conversations())
                verdicts += guard.moderate_batch(_conversations()[1:2])
                served_late = len(LATE)
                if not options:  # token logprobs, as the HTTP API's `logprobs` asks them
                    asked = [dataclasses.replace(r, top_logprobs=3) for r in sample]
                    if any(d.content_logprobs() is None for d in guard.engine.execute(asked)):
                        faults.append(f"{options}: token logprobs missing")
                if guard.engine.open_session() is None:
                    faults.append(f"{options}: no session row")
                guard.engine.close()
        except Exception as exc:  # noqa: BLE001 (every fault is listed, then the run fails)
            faults.append(f"{options}: {_where(exc)}")
            continue
        finally:
            _STATE["warm"] = False
        if served_late > late:
            compiled = sorted(set(LATE[late:served_late]))
            faults.append(f"{options}: compiled after warm-up: {compiled}")
        # Zeros for scores make a constrained verdict `unsafe`; greedy decoding generates
        # token 0 and the verdict parser refuses it, which is fine here.
        if options.get("decode") != "greedy" and any(v.label == Label.ERROR for v in verdicts):
            faults.append(f"{options}: error verdicts {[v.error for v in verdicts]}")
    return faults


_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = (  # as scripts/gpu_check.sh runs them ({out}: a temporary folder)
    ("norm_rope.py", ["--out", "{out}/norm_rope.json"]),
    ("kernels.py", ["--budget", "60", "--out", "{out}/kernels.json"]),
    ("profile_gpu.py", ["--size", "tiny", "--batch", "4", "--out", "{out}"]),
)


def check_scripts(out: Path) -> list[str]:
    """`SCRIPTS`, each as its own `__main__`. They refuse to run where torch sees no GPU, so
    this check comes last and from here on torch says it has one (FakeTensorMode, which
    would then initialise CUDA for every fake CUDA tensor, is kept from it)."""
    import torch._subclasses.fake_tensor as fake_tensor  # noqa: PLC0415

    setattr(fake_tensor, "init_gpu_context", lambda device: None)  # noqa: B010 (typed as cached)
    setattr(fake_tensor.FakeTensorMode, "avoid_device_init", property(lambda self: True))  # noqa: B010
    torch.cuda.is_available = lambda: True
    faults = []
    for name, args in SCRIPTS:
        script = _ROOT / "benchmarks" / name
        argv = sys.argv
        sys.argv = [str(script), *(a.format(out=out) for a in args)]
        try:
            with _faked():
                runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exit_:
            if exit_.code not in (None, 0):
                faults.append(f"{name}: exit {exit_.code}")
        except Exception as exc:  # noqa: BLE001 (every fault is listed, then the run fails)
            faults.append(f"{name}: {_where(exc)}")
        finally:
            sys.argv = argv
    return faults


def compile_summary() -> list[str]:
    """What compiling the launched kernels for `GPU` took, kernel by kernel (each launch's
    specialization once, as a GPU process's first launches compile them)."""
    times = [t for each in COMPILED.values() for t in each]
    lines = [
        f"Triton kernels compiled for sm_{GPU['arch']}: {len(times)} specializations of "
        f"{len(COMPILED)} kernels in {sum(times):.1f} s (this machine's CPU, an empty cache)"
    ]
    for name, each in sorted(COMPILED.items(), key=lambda item: -sum(item[1])):
        lines.append(f"  {name}: {len(each)} in {sum(each):.1f} s (slowest {max(each):.1f} s)")
    return lines + [f"  does not compile or fit: {fault}" for fault in COMPILE_FAULTS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--size", choices=("tiny", "full"), default="tiny", help="the bench check's model"
    )
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="the card faked")
    args = parser.parse_args(argv)
    GPU.update(GPUS[args.gpu])
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as cache:
        # Compiles start from an empty cache, as on a fresh GPU machine, so their times count.
        os.environ["TRITON_CACHE_DIR"] = cache
        install()
        faults = {"bench": check_bench(Path(folder), args.size), "serve": check_serve()}
        faults["scripts"] = check_scripts(Path(folder))
    print(f"faked: {GPU['name']} (sm_{GPU['arch']})")
    for name, found in faults.items():
        print(f"{name}: {'ok' if not found else 'FAILED'}")
        for fault in found:
            print(f"  {fault}")
    refused = [c for c in CAPTURED if c != "ok"]
    print(f"captures: {len(CAPTURED) - len(refused)} ok, {len(refused)} refused")
    for reason in sorted(set(refused)):
        print(f"  {reason}")
    print("Triton kernels launched:", ", ".join(sorted(set(LAUNCHES))) or "none")
    print("\n".join(compile_summary()))
    failed = any(faults.values()) or refused or not CAPTURED or COMPILE_FAULTS
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
