"""The ONNX Runtime back end: an engine directory from `guardrt export build --format onnx`,
served without torch.

Execution providers: `device="cpu"` runs on the CPU; `"cuda"` / `"cuda:N"` asks for ONNX
Runtime's TensorRT provider (when present) then its CUDA provider, and fails if neither is;
`"auto"` takes the best provider this onnxruntime has (TensorRT, CUDA, else CPU). int8 engines
apply the manifest's compute mode: ONNX Runtime fuses each `DequantizeLinear` + `MatMul` into
`MatMulNBits`, which computes in fp32 from int8 weights ("weight-only") or quantizes activations
to int8 per block on the fly ("weight+activation").
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from guardrt.runtime.decoding import Decoder, parse_decode
from guardrt.runtime.engine import EngineInfo, EngineOptions, check_positions
from guardrt.runtime.engine.cuda_memory import Cuda, DeviceError, import_cudart
from guardrt.runtime.engine.graph_steps import (
    EngineSteps,
    GraphSteps,
    HeadScores,
    StepsRunner,
    vision_feeds,
)
from guardrt.runtime.engine.manifest import (
    EngineDirError,
    GraphEntry,
    Manifest,
    dtype_precision,
    read_manifest,
)
from guardrt.runtime.engine.ort_device import OrtDeviceRunner
from guardrt.runtime.engine.step_blocks import BlockedSteps
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.requests import Decoded, PreparedRequest

log = logging.getLogger(__name__)

# MatMulNBits accuracy levels (onnxruntime's session.qdq_matmulnbits_accuracy_level):
# 1 = fp32 compute, 4 = int8 compute.
_ACCURACY = {"weight-only": "1", "weight+activation": "4"}
# Each session's CPU arena keeps every chunk its runs ever allocated (vision runs, prefills and
# decode steps of every shape) until the session closes; at the end of each run this hands the
# free chunks back to the OS (`arena_shrinkage`).
ARENA_SHRINKAGE = ("memory.enable_memory_arena_shrinkage", "cpu:0")
_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


def _ort() -> Any:
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ConfigError(
            "serving an ONNX engine needs onnxruntime: pip install 'guardrt[onnx]' "
            "(or 'guardrt[onnx-gpu]' for CUDA)"
        ) from exc


def providers_for(device: str, available: Sequence[str]) -> list[Any]:
    """ONNX Runtime providers for `device` (cpu, auto, cuda, cuda:N) among `available`."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    index = 0
    if device.startswith("cuda:"):
        try:
            index = int(device.removeprefix("cuda:"))
        except ValueError as exc:
            raise ConfigError(f"device {device!r} is not cpu, auto, cuda or cuda:N") from exc
    elif device not in ("cuda", "auto"):
        raise ConfigError(f"device {device!r} is not cpu, auto, cuda or cuda:N")
    gpu = [
        (name, {"device_id": index})
        for name in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        if name in available
    ]
    if not gpu and device != "auto":
        raise ConfigError(
            f"device {device!r} needs onnxruntime's CUDA or TensorRT provider; this onnxruntime "
            f"has {', '.join(available)} (install onnxruntime-gpu: pip install 'guardrt[onnx-gpu]')"
        )
    return [*gpu, "CPUExecutionProvider"]


def arena_shrinkage(ort: Any) -> Any:
    """Run options that shrink the CPU arena after each run. Measured on this project's 2-core
    CPU with a full-width int8 engine (3 of the 11B's 40 text layers, 5 of its 40 vision
    layers): a batch of 2 image requests peaked at 10.3 GB without, 8.7 GB with; a batch of 4
    at 16.8 GB and 13.8 GB; the time of text and image verdicts did not move beyond the
    machine's noise (±7%)."""
    options = ort.RunOptions()
    options.add_run_config_entry(*ARENA_SHRINKAGE)
    return options


class OrtRunner:
    """The two graphs in ONNX Runtime sessions, their inputs and outputs checked against the
    manifest."""

    def __init__(self, directory: Path, manifest: Manifest, device: str, threads: int) -> None:
        ort = _ort()
        self.providers = providers_for(device, ort.get_available_providers())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if manifest.int8_compute is not None:
            if manifest.int8_compute not in _ACCURACY:
                raise EngineDirError(
                    f"{directory}: int8 compute {manifest.int8_compute!r} is not one of "
                    f"{', '.join(_ACCURACY)}"
                )
            level = _ACCURACY[manifest.int8_compute]
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
        self.sessions = {
            name: self._session(ort, directory, name, graph, options)
            for name, graph in manifest.graphs.items()
        }
        self.run_options = arena_shrinkage(ort)

    def _session(
        self, ort: Any, directory: Path, name: str, graph: GraphEntry, options: Any
    ) -> Any:
        try:
            session = ort.InferenceSession(
                str(directory / graph.file), options, providers=self.providers
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineDirError(
                f"{directory}: onnxruntime cannot load {graph.file}: {str(exc)[:300]}"
            ) from exc
        for kind, declared, actual in (
            ("input", graph.inputs, session.get_inputs()),
            ("output", graph.outputs, session.get_outputs()),
        ):
            got = [(t.name, t.type) for t in actual]
            want = [(t.name, _ORT_TYPES.get(t.dtype, t.dtype)) for t in declared]
            if got != want:
                raise EngineDirError(
                    f"{directory}: the {name} graph's {kind}s {got} are not the manifest's {want}"
                )
        return session

    def vision(
        self, pixel_values: np.ndarray, aspect_ratio_ids: np.ndarray, aspect_ratio_mask: np.ndarray
    ) -> np.ndarray:
        feeds = vision_feeds(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        (kv,) = self.sessions["vision"].run(None, feeds, self.run_options)
        result: np.ndarray = kv
        return result

    def decoder(self, feeds: dict[str, np.ndarray]) -> tuple[HeadScores, np.ndarray]:
        logits, normaliser, present = self.sessions["decoder"].run(
            None, feeds, self.run_options
        )  # in the manifest's order
        return HeadScores(logits, normaliser), present

    def steps(
        self, config: ModelConfig, rows: int, max_seq: int, image_rows: int | None = None
    ) -> EngineSteps:
        return GraphSteps(self, config, rows, max_seq, image_rows)

    def close(self) -> None:
        """Nothing to free by hand: the sessions go with this object."""


def check_options(
    options: EngineOptions, manifest: Manifest, directory: Path, bounded: bool
) -> None:
    """What an engine directory can serve: its semantics and precision; with `bounded`
    (TensorRT: optimization profiles), no more rows or positions than it was built for.
    ONNX Runtime's graphs are dynamic in both."""
    if options.semantics is not None and options.semantics != manifest.semantics:
        raise ConfigError(
            f"{directory} was exported with semantics {manifest.semantics!r}, not "
            f"{options.semantics!r} (export again with --semantics {options.semantics})"
        )
    if options.quantize is not None:
        raise ConfigError(
            f"{directory} is a {manifest.precision} engine; quantize={options.quantize!r} applies "
            "to a checkpoint (an engine's precision is chosen by `guardrt export build`)"
        )
    if options.dtype is not None and dtype_precision(options.dtype) != manifest.precision:
        raise ConfigError(
            f"{directory} is a {manifest.precision} engine; dtype {options.dtype!r} cannot be "
            "chosen at load time (export another precision)"
        )
    options.check_sizes()
    if bounded and options.max_batch > manifest.max_batch:
        raise ConfigError(
            f"max_batch {options.max_batch} exceeds the {manifest.max_batch} {directory} was "
            "built for (export again with a larger --max-batch-size)"
        )
    if bounded and options.max_seq > manifest.max_seq:
        raise ConfigError(
            f"max_seq {options.max_seq} exceeds the {manifest.max_seq} {directory} was built "
            "for (export again with a larger --max-seq-len, or serve with a smaller one)"
        )


def engine_threads() -> int:
    """Intra-op threads from $GUARDRT_ORT_THREADS (0: onnxruntime's default)."""
    value = os.environ.get("GUARDRT_ORT_THREADS", "0")
    if not value.isdigit():
        raise ConfigError(f"GUARDRT_ORT_THREADS {value!r} is not a thread count")
    return int(value)


class GraphEngine:
    """An engine over an engine directory's two graphs: the manifest checked, the runner's K/V
    caches (host for ONNX Runtime, GPU for TensorRT), the shared decoding loop. Subclasses say
    which format they serve and how to run the graphs (`_runner`)."""

    backend = ""
    bounded = False  # built for at most the manifest's max_batch / max_seq

    def __init__(self, options: EngineOptions) -> None:
        directory = Path(options.model)
        manifest = read_manifest(directory)
        if manifest.engine_format != self.backend:
            raise EngineDirError(
                f"{directory} holds a {manifest.engine_format} engine, not {self.backend}"
            )
        check_options(options, manifest, directory, self.bounded)
        config = ModelConfig.from_dict(manifest.config)
        check_positions(config, options.max_seq)
        self.runner, device = self._runner(directory, manifest, options)
        try:
            self.steps = self.runner.steps(
                config, options.cache_rows, options.max_seq, options.image_rows
            )
        except Exception:  # caches that do not fit: free what the runner holds, then say why
            self.runner.close()
            raise
        decode = parse_decode(options.decode)
        blocked = BlockedSteps(self.steps, options.max_step_tokens)
        self.decoder = Decoder(blocked, decode, options.max_sessions, options.max_prefixes)
        self.info = EngineInfo(
            backend=self.backend,
            device=device,
            dtype=manifest.precision,
            semantics=manifest.semantics,
            decode=options.decode,
            max_batch=options.max_batch,
            max_seq=options.max_seq,
        )
        self.manifest = manifest

    def _runner(
        self, directory: Path, manifest: Manifest, options: EngineOptions
    ) -> tuple[StepsRunner, str]:
        """The graph runner and the device it runs on, in words."""
        raise NotImplementedError

    def warmup(self, sample: Sequence[PreparedRequest]) -> None:
        self.execute(sample)

    def execute(self, batch: Sequence[PreparedRequest]) -> list[Decoded]:
        return self.decoder.run(batch)

    def open_session(self) -> int | None:
        return self.decoder.sessions.open()

    def close_session(self, session: int) -> None:
        self.decoder.sessions.close(session)

    def close(self) -> None:
        self.steps.release()
        self.runner.close()


def kv_placement() -> str:
    """Where an engine on ONNX Runtime's GPU providers keeps its K/V caches, from
    $GUARDRT_ORT_KV: "device" (the default: GPU memory, `ort_device.py`) or "host"."""
    value = os.environ.get("GUARDRT_ORT_KV", "device")
    if value not in ("device", "host"):
        raise ConfigError(f"GUARDRT_ORT_KV {value!r} is not device or host")
    return value


class OnnxEngine(GraphEngine):
    backend = "onnx"

    def _runner(
        self, directory: Path, manifest: Manifest, options: EngineOptions
    ) -> tuple[StepsRunner, str]:
        runner = OrtRunner(directory, manifest, options.device, engine_threads())
        first = runner.providers[0]
        if isinstance(first, str):  # the CPU: host caches
            return runner, first
        provider, index = first[0], int(first[1]["device_id"])
        on_host = f"{provider} on cuda:{index} (K/V caches in host memory)"
        if kv_placement() == "host":
            return runner, on_host
        try:
            cuda = Cuda(import_cudart(), index)
        except ConfigError:
            # Served all the same, at the price of copying every step's K/V across PCIe.
            log.warning(
                "cuda-python is not installed: the K/V caches stay in host memory and every "
                "step copies its K/V to the GPU (pip install 'guardrt[onnx-gpu]')"
            )
            return runner, on_host
        except DeviceError as exc:
            raise ConfigError(f"device {options.device!r}: {exc}") from exc
        device_runner = OrtDeviceRunner(runner.sessions, manifest.graphs, cuda)
        return device_runner, f"{provider} on cuda:{index}"
