"""TensorRT engines from the exported ONNX graphs: `vision.plan` and `decoder.plan`.

Strongly typed networks: the ONNX graphs carry their own types (fp32 / fp16 / bf16 weights, int8
and float8 weights behind DequantizeLinear), and TensorRT keeps every tensor at the type the graph
gives it. So no precision flags (FP16, INT8, ...) are set: those would let TensorRT pick other
types, and the plan would no longer compute what the parity-checked graph computes.

One optimization profile per graph; its min / opt / max shapes come from the graph's symbolic
dims (`profile_shapes`, pure, tested without TensorRT):

    images      1..max_batch   opt 1      images per vision call
    batch       1..max_batch   opt 1      decoder rows
    tokens      1..max_seq     opt 512    this step's tokens (a prefill's; a decode step has 1)
    past        0..max_seq     opt 0      cached positions; 0 (an empty tensor) for a prefill
    image_keys  1..L           opt L      L = tiles × patches (the vision output); 1 for text
    rows        1..16          opt 2      logit rows per request (the runtime asks for ≤ 4)
    vocab_ids   1..vocab       opt 32     token ids a step's head returns (a constrained step
                                          asks for ~20; every id only for greedy decoding)

TensorRT accepts a 0 minimum: IOptimizationProfile::setDimensions requires
0 <= min <= opt <= max (NvInferRuntime.h), and empty tensors are supported.

The builder's timing cache (the measured speed of each kernel per layer and shape) persists at
cache_root()/tensorrt-timing.cache, so a rebuild on the same GPU skips most of the tuning.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardrt.export.errors import ExportError
from guardrt.runtime.model.resolve import cache_root

if TYPE_CHECKING:  # both import torch; the build itself needs neither
    from guardrt.export.build import BuildOptions
    from guardrt.export.graphs import GraphSpec
    from guardrt.export.progress import Progress

TIMING_CACHE = "tensorrt-timing.cache"
# Scratch for the kernels' tactics (split-K GEMMs, fused attention); bounded so the tuning beside
# ~22 GB of bf16 weights cannot take the whole device. Tactics that need more are skipped.
WORKSPACE_BYTES = 8 << 30
MAX_ROWS = 16
OPT_TOKENS = 512
OPT_VOCAB_IDS = 32
PLANS = ("vision", "decoder")

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]  # input name → (min, opt, max)


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class ProfileLimits:
    """What the plans are built for: the engine's max batch and sequence, the image keys of one
    image (the vision output's size), the vocabulary's size, and the logit rows a decoder step
    may ask for."""

    max_batch: int
    max_seq: int
    image_keys: int
    vocab_size: int
    max_rows: int = MAX_ROWS

    def ranges(self) -> dict[str, DimRange]:
        """min / opt / max of every symbolic dim the two graphs use, by name."""
        batch = DimRange(1, 1, self.max_batch)
        return {
            "images": batch,
            "batch": batch,
            "tokens": DimRange(1, min(OPT_TOKENS, self.max_seq), self.max_seq),
            # A prefill has no past (opt 0); decode steps, with a past, run one token each and
            # cost far less than the prefill the profile is tuned for.
            "past": DimRange(0, 0, self.max_seq),
            "image_keys": DimRange(1, self.image_keys, self.image_keys),
            "rows": DimRange(1, min(2, self.max_rows), self.max_rows),
            "vocab_ids": DimRange(1, min(OPT_VOCAB_IDS, self.vocab_size), self.vocab_size),
        }


def image_keys(vision: GraphSpec) -> int:
    """L of the vision output cross_kv (C, 2, images, Hkv, L, d): the keys of one image."""
    (output,) = vision.outputs
    keys = output.shape[4]
    if not isinstance(keys, int):
        raise ExportError(f"the vision graph's {output.name} has a symbolic key count {keys!r}")
    return keys


def limits_for(
    specs: dict[str, GraphSpec], max_batch: int, max_seq: int, vocab_size: int
) -> ProfileLimits:
    return ProfileLimits(max_batch, max_seq, image_keys(specs["vision"]), vocab_size)


def profile_shapes(spec: GraphSpec, limits: ProfileLimits) -> ProfileShapes:
    """(min, opt, max) shapes of each input of `spec`: fixed dims as they are, symbolic dims
    from `limits`. A symbolic dim without a range is an error (the graph changed)."""
    ranges = limits.ranges()
    shapes: ProfileShapes = {}
    for tensor in spec.inputs:
        dims: list[DimRange] = []
        for dim in tensor.shape:
            if isinstance(dim, int):
                dims.append(DimRange(dim, dim, dim))
            elif dim in ranges:
                dims.append(ranges[dim])
            else:
                raise ExportError(
                    f"{spec.path.name}: input {tensor.name} has dim {dim!r}, which has no "
                    f"TensorRT profile range (known: {', '.join(ranges)})"
                )
        shapes[tensor.name] = (
            tuple(d.min for d in dims),
            tuple(d.opt for d in dims),
            tuple(d.max for d in dims),
        )
    return shapes


def describe(limits: ProfileLimits) -> str:
    """The profile ranges in one line, e.g. 'batch 1..4 (opt 1), tokens 1..8192 (opt 512)'."""
    return ", ".join(
        f"{name} {r.min}..{r.max} (opt {r.opt})" for name, r in limits.ranges().items()
    )


def require_tensorrt() -> Any:
    """The `tensorrt` module, or an ExportError saying how to get it."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise ExportError(
            "--format tensorrt needs TensorRT's Python package, which is not installed: "
            "pip install 'guardrt[tensorrt]' (TensorRT ≥ 10; it needs an NVIDIA GPU with CUDA). "
            "--format onnx builds an engine without it."
        ) from exc


def timing_cache_path() -> Path:
    return cache_root() / TIMING_CACHE


def build_plans(
    trt: Any,
    specs: dict[str, GraphSpec],
    engine_dir: Path,
    work: Path,
    options: BuildOptions,
    progress: Progress,
    vocab_size: int,
) -> str:
    """Build engine_dir/vision.plan and engine_dir/decoder.plan from the ONNX graphs of `specs`
    (in `work`, with their external weights beside them) of a model with `vocab_size` tokens;
    returns a one-line summary."""
    limits = limits_for(specs, options.max_batch, options.max_seq, vocab_size)
    for name in PLANS:
        if not specs[name].path.is_file():
            raise ExportError(f"{specs[name].path} is missing (the {name} graph, in {work})")
    _select_device(options.device)
    logger = trt.Logger(trt.Logger.WARNING)
    for index, name in enumerate(PLANS):
        progress.update(index, len(PLANS), "TensorRT engines built")
        _build_plan(trt, logger, specs[name], limits, engine_dir / f"{name}.plan")
    progress.update(len(PLANS), len(PLANS), "TensorRT engines built")
    return f"TensorRT {trt.__version__}, strongly typed, profiles: {describe(limits)}"


def _select_device(device: str) -> None:
    """The builder builds on the calling thread's current GPU: GPU N for --device cuda:N, else
    CUDA's default, GPU 0 (--device cpu converts on the CPU, and builds on GPU 0)."""
    if not device.startswith("cuda:"):
        return
    from guardrt.runtime.engine.cuda_memory import (  # noqa: PLC0415 (needs cuda-python)
        Cuda,
        DeviceError,
        import_cudart,
    )
    from guardrt.runtime.engine.tensorrt_engine import cuda_device_index  # noqa: PLC0415

    try:
        Cuda(import_cudart(), cuda_device_index(device))
    except DeviceError as exc:
        raise ExportError(f"--device {device}: {exc}") from exc


def _build_plan(
    trt: Any, logger: Any, spec: GraphSpec, limits: ProfileLimits, target: Path
) -> None:
    """Parse one ONNX graph into a strongly typed network, build it with one profile, and
    write the serialized engine to `target`."""
    builder = trt.Builder(logger)
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(strongly_typed)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(spec.path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(
            f"TensorRT cannot parse {spec.path.name}: " + ("; ".join(errors) or "no error given")
        )
    _check_network(network, spec)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(spec, limits).items():
        profile.set_shape(name, low, opt, high)  # raises when min ≤ opt ≤ max fails
    config.add_optimization_profile(profile)
    cache = _attach_timing_cache(config)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT could not build {target.name} from {spec.path.name} (its messages above "
            "say why)"
        )
    _write_atomically(target, serialized)
    _write_atomically(timing_cache_path(), cache.serialize())


def _parser_error(error: Any) -> str:
    """One parser error by node: `node 'name' (Op): description`."""
    return f"node {error.node_name()!r} ({error.node_operator()}): {error.desc()}"


def _check_network(network: Any, spec: GraphSpec) -> None:
    """The parsed network's inputs and outputs are the graph's (by name)."""
    for kind, count, get, declared in (
        ("inputs", network.num_inputs, network.get_input, spec.inputs),
        ("outputs", network.num_outputs, network.get_output, spec.outputs),
    ):
        got = sorted(get(i).name for i in range(count))
        want = sorted(t.name for t in declared)
        if got != want:
            raise ExportError(
                f"TensorRT parsed {spec.path.name} with {kind} {got}, not the graph's {want}"
            )


def _attach_timing_cache(config: Any) -> Any:
    """The persisted timing cache, attached to `config`; an empty one where there is none or
    it was measured on another device or TensorRT (refused by set_timing_cache)."""
    path = timing_cache_path()
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, False):
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, False):
            raise ExportError("TensorRT refused an empty timing cache")
    return config.get_timing_cache()


def _write_atomically(path: Path, data: Any) -> None:
    """Write a buffer (bytes, or TensorRT's IHostMemory) so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    with scratch.open("wb") as stream:
        stream.write(data)
    scratch.replace(path)
