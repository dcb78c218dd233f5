"""Engine back ends behind one small protocol, chosen through a lazy registry.

An engine turns a batch of `PreparedRequest`s into `Decoded` outputs. Back ends are named
`"module:Class"` strings imported on first use, so no back end (and no CUDA) is touched at
import and serving an ONNX/TensorRT engine never imports torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from guardrt.runtime.engine.manifest import is_engine_dir, read_manifest
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.requests import Decoded, PreparedRequest

BACKENDS = {
    "torch": "guardrt.runtime.engine.torch_engine:TorchEngine",
    "onnx": "guardrt.runtime.engine.onnx_engine:OnnxEngine",
    "tensorrt": "guardrt.runtime.engine.tensorrt_engine:TensorrtEngine",
}


@dataclass(frozen=True)
class EngineOptions:
    """How to load an engine (from the CLI or the server config)."""

    model: Path  # a checkpoint directory (torch) or an engine directory
    device: str = "auto"  # auto: the back end's GPU when it has one, else the CPU
    dtype: str | None = None  # None: float32 on the CPU, the stored dtype elsewhere (torch)
    semantics: str | None = None  # None: "meta" for a checkpoint, an engine's own
    decode: str = "constrained"
    max_batch: int = 4
    max_seq: int = 8192
    max_sessions: int = 4  # cache slots kept for streaming checks (each costs a full K/V row)
    max_prefixes: int = 1  # cache rows of shared policy prefixes (prefixes.py; each a K/V row)
    cuda_graphs: bool = True  # torch on a GPU: small steps replay CUDA graphs (static_steps.py)
    # torch on a GPU: warm-up captures the common steps of batches up to this many requests
    # (more: a slower start, fewer first-use captures under load; 1: only batch 1)
    warmup_max_batch: int = 4
    quantize: str | None = None  # torch: "int8" / "fp8" weights made at load (engines: at build)
    int8_compute: str = "weight-only"  # or "weight+activation": int8 large steps on _int_mm
    # engine directories: tokens per decoder-graph run; longer prompts prefill in blocks
    # (`engine/step_blocks.py`: the graphs' attention holds a block's scores, not a prompt's)
    max_step_tokens: int = 1024

    @property
    def cache_rows(self) -> int:
        """K/V cache rows: the batch's, the streaming sessions', the shared prefixes'."""
        return self.max_batch + self.max_sessions + self.max_prefixes

    @property
    def image_rows(self) -> int:
        """The first cache rows, which alone may hold an image's K/V: the batch's and the
        sessions' (a shared prefix never has an image)."""
        return self.max_batch + self.max_sessions

    def check_sizes(self) -> None:
        """A ConfigError naming the first size out of range (every back end asks first)."""
        for name, low in (
            ("max_batch", 1),
            ("max_seq", 64),
            ("max_sessions", 0),
            ("max_prefixes", 0),
            ("max_step_tokens", 1),
        ):
            value = getattr(self, name)
            if value < low:
                raise ConfigError(f"{name} {value} must be ≥ {low}")


def check_positions(
    config: ModelConfig, max_seq: int, what: str = "max_seq", error: type[ConfigError] = ConfigError
) -> None:
    """An `error` if `max_seq` (named `what`) is over the positions the model has: RoPE past
    them is extrapolation the model never saw."""
    limit = config.text.max_position_embeddings
    if max_seq > limit:
        raise error(
            f"{what} {max_seq} is over the model's {limit} positions (max_position_embeddings)"
        )


def out_of_memory(exc: BaseException) -> bool:
    """Whether an allocation failed for want of memory: numpy's MemoryError, a GPU's
    `torch.OutOfMemoryError`, or torch's CPU allocator's RuntimeError (no type of its own, only
    its message). torch is not imported for this: engine directories serve without it."""
    torch = sys.modules.get("torch")
    return (
        isinstance(exc, MemoryError)
        or (torch is not None and isinstance(exc, torch.OutOfMemoryError))
        or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))
    )


def memory_refusal(options: EngineOptions, device: str, when: str, exc: Exception) -> ConfigError:
    """The error for an engine that ran out of memory at load, naming what sizes its caches."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(
        f"out of memory on {device} {when} ({detail}); the K/V caches have "
        f"{options.cache_rows} rows (max_batch {options.max_batch} + max_sessions "
        f"{options.max_sessions} + max_prefixes {options.max_prefixes}): lower --max-batch-size "
        "or --max-streams"
    )


@dataclass(frozen=True)
class EngineInfo:
    backend: str
    device: str
    dtype: str
    semantics: str
    decode: str
    max_batch: int
    max_seq: int


class Engine(Protocol):
    """load (the constructor) → warmup → execute* → close. `execute` runs one batch of at most
    `info.max_batch` requests on the calling thread and may raise; the caller fails those
    requests only."""

    info: EngineInfo

    def warmup(self, sample: Sequence[PreparedRequest]) -> None: ...

    def execute(self, batch: Sequence[PreparedRequest]) -> list[Decoded]: ...

    def open_session(self) -> int | None:
        """A cache session for requests that extend each other (None: none free)."""
        ...

    def close_session(self, session: int) -> None: ...

    def close(self) -> None: ...


def backend_for(directory: Path) -> str:
    """The back end a model directory needs: an engine directory's format (its manifest),
    else torch for a checkpoint."""
    if not is_engine_dir(directory):
        return "torch"
    return read_manifest(directory, verify=False).engine_format


def load_engine(backend: str, options: EngineOptions) -> Engine:
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[backend].split(":")
    engine_class = getattr(importlib.import_module(module_name), class_name)
    engine: Engine = engine_class(options)
    return engine
