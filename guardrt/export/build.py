"""`guardrt export build`: checkpoint → engine directory, as a chain of checked steps.

    source   hash the checkpoint's files (the manifest names what was built from what)
    convert  HF checkpoint → guardrt's torch model in the build's dtype; parity vs the fp32 model
             (the weights as stored, computed in fp32: no fp32 copy of them, `reference.py`)
    quantize int8 / fp8 weights (per output channel; the head stays full precision; int8 also
             the token embedding, per row), made from the stored weights a chunk at a time;
             parity vs convert (skipped for fp32 / fp16 / bf16)
    build    trace the vision and decoder graphs to ONNX (and build TensorRT engines from them),
             in a child process that converts the checkpoint as above (the exporter's memory
             returns when it exits, `child.py`); parity of the engine, run by ONNX Runtime /
             TensorRT, vs the step before
    manifest files, hashes, graphs, tool versions, parity, deviation from fp32

Every parity check runs the same fixed probes (`parity.py`). The build happens in a scratch
directory beside the output and is renamed into place at the end, so a failed build never
leaves a directory that looks like an engine.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import importlib.metadata
import platform
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guardrt import __version__
from guardrt.export.decoder import conditional_cross_for, cross_layers_note
from guardrt.export.engine_model import (
    COMPUTE_DTYPE,
    EIGHT_BIT,
    quantize_for_engine,
    traced_in_child,
)
from guardrt.export.errors import ExportError
from guardrt.export.graphs import GraphSpec
from guardrt.export.parity import Deviation, deviation, probe_digest, probe_logits, probes
from guardrt.export.progress import Progress
from guardrt.export.reference import computed_in_fp32
from guardrt.export.scratch import (
    check_free_space,
    directory_size,
    full_disk_named,
    least_engine_bytes,
    nearest_existing,
    scratch_directories,
    stale_scratch,
)
from guardrt.runtime.classify import TorchSteps
from guardrt.runtime.decoding import StepModel
from guardrt.runtime.engine import check_positions
from guardrt.runtime.engine.graph_steps import StepsRunner
from guardrt.runtime.engine.manifest import (
    ENGINE_FORMATS,
    FORMAT,
    PRECISIONS,
    VERSION,
    file_entries,
    parse_manifest,
    sha256_file,
    write_manifest,
)
from guardrt.runtime.engine.onnx_engine import OrtRunner
from guardrt.runtime.engine.torch_device import usable_device
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.jsonfile import read_json_object
from guardrt.runtime.model.checkpoint import load_model, read_entries
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.model.mllama import SEMANTICS, MllamaModel, Semantics
from guardrt.runtime.prepare import load_preparer
from guardrt.runtime.requests import PreparedRequest

INT8_COMPUTE = ("weight-only", "weight+activation")
COPIED = (
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class BuildOptions:
    model: Path
    output: Path
    precision: str = "fp32"
    engine_format: str = "onnx"
    max_batch: int = 4
    max_seq: int = 8192
    semantics: str = "meta"
    int8_compute: str = "weight-only"
    device: str = "cpu"  # torch device for converting and for the torch side of parity
    force: bool = False  # replace an existing output directory


def check_options(options: BuildOptions) -> None:
    checks = (
        (options.precision in PRECISIONS, f"--precision {options.precision!r}", PRECISIONS),
        (
            options.engine_format in ENGINE_FORMATS,
            f"--format {options.engine_format!r}",
            ENGINE_FORMATS,
        ),
        (options.semantics in SEMANTICS, f"--semantics {options.semantics!r}", SEMANTICS),
        (
            options.int8_compute in INT8_COMPUTE,
            f"--int8-compute {options.int8_compute!r}",
            INT8_COMPUTE,
        ),
    )
    for ok, what, allowed in checks:
        if not ok:
            raise ExportError(f"{what} is not one of {', '.join(allowed)}")
    if options.int8_compute != "weight-only" and options.precision != "int8":
        raise ExportError(
            f"--int8-compute {options.int8_compute} is for --precision int8, not "
            f"{options.precision}"
        )
    if options.max_batch < 1:
        raise ExportError(f"--max-batch-size {options.max_batch} must be ≥ 1")
    if options.max_seq < 64:
        raise ExportError(f"--max-seq-len {options.max_seq} must be ≥ 64")
    if not (options.model / "config.json").is_file():
        raise ExportError(f"--model {options.model} is not a checkpoint directory (no config.json)")
    config = ModelConfig.from_checkpoint(options.model)
    check_positions(config, options.max_seq, "--max-seq-len", ExportError)
    above = nearest_existing(options.output)  # the output itself, or where mkdir starts
    if not above.is_dir():
        raise ExportError(f"-o {options.output}: {above} is a file, not a directory")
    if options.output.exists() and any(options.output.iterdir()) and not options.force:
        raise ExportError(f"-o {options.output} exists and is not empty (--force replaces it)")
    if options.output.resolve() == options.model.resolve():
        raise ExportError("-o must not be the checkpoint directory")
    usable_device(options.device, "--device")


def tool_versions(*extra: str) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "guardrt": __version__}
    for name in ("numpy", "torch", "onnx", "onnxscript", "onnxruntime", *extra):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_hashes(directory: Path, progress: Progress) -> dict[str, Any]:
    """sha256 of every file of the checkpoint, and one over them all (name order)."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    hashes = {}
    for index, path in enumerate(files):
        progress.update(index, len(files), "files hashed")
        hashes[path.name] = sha256_file(path)
    listing = "".join(f"{name}\0{digest}\n" for name, digest in hashes.items())
    combined = hashlib.sha256(listing.encode()).hexdigest()
    return {"path": str(directory.resolve()), "sha256": combined, "files": hashes}


def run_probes(
    model: StepModel, requests: Sequence[PreparedRequest], progress: Progress
) -> list[np.ndarray]:
    logits = []
    for index, request in enumerate(requests):
        progress.update(index, len(requests), "probes")
        logits.append(probe_logits(model, request))
    return logits


def _parity(
    against: str, reference: list[np.ndarray], candidate: list[np.ndarray], ids: tuple[int, int]
) -> dict[str, Any]:
    measured: Deviation = deviation(reference, candidate, *ids)
    return {"against": against, **measured.to_json()}


def _release(device: torch.device) -> None:
    """Return a dropped model's memory now (its tensors may sit in reference cycles, and on a
    GPU in torch's cache) rather than while the child needs it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _torch_steps(model: MllamaModel, max_seq: int) -> TorchSteps:
    model.setup_caches(1, max_seq)
    return TorchSteps(model)


def _graphs_json(specs: dict[str, GraphSpec], files: dict[str, str], engine_format: str) -> Any:
    """The manifest's `graphs`: each graph's file, inputs and outputs; and for the decoder,
    whether its cross layers run in all-text batches."""
    graphs: dict[str, dict[str, Any]] = {
        name: {
            "file": files[name],
            "inputs": [t.to_json() for t in spec.inputs],
            "outputs": [t.to_json() for t in spec.outputs],
        }
        for name, spec in specs.items()
    }
    graphs["decoder"]["cross_layers"] = cross_layers_note(conditional_cross_for(engine_format))
    return graphs


def _copy_side_files(source: Path, target: Path) -> list[str]:
    copied = []
    for name in COPIED:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def _provisional(document: dict[str, Any], compute: str | None) -> Any:
    """The manifest the back ends would read, before the files are listed (for parity runs)."""
    draft = dict(document, files={})
    if compute is not None:
        draft["quantization"] = dict(draft["quantization"], compute=compute)
    return parse_manifest(draft)


def _engine_logits(
    make_runner: Callable[[], StepsRunner],
    config: ModelConfig,
    requests: Sequence[PreparedRequest],
    max_seq: int,
    progress: Progress,
) -> tuple[list[np.ndarray] | None, str | None]:
    """The engine's probe logits, or None and why it could not run here."""
    try:
        runner = make_runner()
    except ConfigError as exc:
        return None, str(exc)  # the scratch directory's name is replaced by the caller
    try:
        steps = runner.steps(config, rows=1, max_seq=max_seq)  # the caches it serves with
        try:
            return run_probes(steps, requests, progress), None
        finally:
            steps.release()
    except ConfigError as exc:  # its caches do not fit on this GPU
        return None, str(exc)
    finally:
        runner.close()


def _summary(parity: dict[str, Any] | None) -> str:
    if not parity:
        return ""
    if "not_run" in parity:
        return f"parity not run: {parity['not_run']}"
    return (
        f"max rel logit err {parity['max_relative_logit_error']:.2e}, "
        f"max |ΔP(unsafe)| {parity['max_abs_delta_p_unsafe']:.2e} vs {parity['against']}"
    )


def build(options: BuildOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Build the engine directory at `options.output`; returns its manifest document."""
    check_options(options)
    trt = None
    if options.engine_format == "tensorrt":
        from guardrt.export.tensorrt_build import require_tensorrt  # noqa: PLC0415

        trt = require_tensorrt()  # before any long step: fail fast where TensorRT is absent
    progress = progress or Progress(5)
    output = options.output
    entries = read_entries(options.model).values()
    needed = least_engine_bytes(entries, options.precision, options.engine_format)
    check_free_space(output, needed)
    scratch, work = scratch_directories(output)
    for stale in stale_scratch(output, (scratch, work)):
        progress.note(
            f"note: {stale} ({directory_size(stale)}) is left from an interrupted build of "
            f"{output}; delete it unless another build of {output} is running"
        )
    try:
        with full_disk_named(output, needed):
            document = _build_into(scratch, work, options, progress, trt)
        if output.exists():
            shutil.rmtree(output)
        scratch.rename(output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return document


def _build_engine(
    specs: dict[str, GraphSpec],
    document: dict[str, Any],
    engine_dir: Path,
    work: Path,
    options: BuildOptions,
    trt: Any,
    probe_run: Callable[[Callable[[], StepsRunner]], tuple[list[np.ndarray] | None, str | None]],
    progress: Progress,
    vocab_size: int,
) -> tuple[list[np.ndarray] | None, str | None]:
    """Fill the document's graphs (and artifact); the engine's probe logits or why not run."""
    if trt is None:
        files = {name: spec.path.name for name, spec in specs.items()}
        document["graphs"] = _graphs_json(specs, files, options.engine_format)
        document["artifact"] = "ONNX graphs (vision.onnx, decoder.onnx, weights in .data files)"
        manifest = _provisional(document, None)
        return probe_run(lambda: OrtRunner(engine_dir, manifest, "cpu", 0))
    from guardrt.export.tensorrt_build import build_plans  # noqa: PLC0415
    from guardrt.runtime.engine.tensorrt_engine import TrtRunner  # noqa: PLC0415

    summary = build_plans(trt, specs, engine_dir, work, options, progress, vocab_size)
    plans = {name: f"{name}.plan" for name in specs}
    document["graphs"] = _graphs_json(specs, plans, options.engine_format)
    document["artifact"] = f"TensorRT engines (vision.plan, decoder.plan): {summary}"
    manifest = _provisional(document, None)
    # --device names the torch device for converting; TensorRT runs on a GPU whatever it says.
    gpu = "cuda" if options.device == "cpu" else options.device
    return probe_run(lambda: TrtRunner(engine_dir, manifest, gpu))


def _quantize_step(
    model: MllamaModel,
    options: BuildOptions,
    converted: list[np.ndarray],
    requests: Sequence[PreparedRequest],
    ids: tuple[int, int],
    progress: Progress,
) -> tuple[dict[str, Any] | None, list[np.ndarray], dict[str, Any]]:
    """Quantize in place (int8 / fp8): the quantization record, probe logits, the step."""
    if options.precision not in EIGHT_BIT:
        return None, converted, {"name": "quantize", "skipped": f"{options.precision} has none"}
    quantization = quantize_for_engine(model, options.precision, torch.device(options.device))
    if options.precision == "int8":
        quantization["compute"] = options.int8_compute
    quantized = run_probes(_torch_steps(model, options.max_seq), requests, progress)
    step = {
        "name": "quantize",
        "artifact": f"torch model with {quantization['weights']} weights",
        "parity": _parity("convert", converted, quantized, ids),
    }
    return quantization, quantized, step


def _build_into(
    engine_dir: Path, work: Path, options: BuildOptions, progress: Progress, trt: Any
) -> dict[str, Any]:
    semantics: Semantics = "meta" if options.semantics == "meta" else "transformers"
    tensorrt = trt is not None
    progress.step("source: hash the checkpoint")
    source = source_hashes(options.model, progress)
    config = ModelConfig.from_checkpoint(options.model)  # validates before anything heavy
    requests = probes(load_preparer(options.model, options.max_seq))
    grammar = requests[0].grammar.tokens
    ids = (grammar.unsafe, grammar.safe)

    def probe_run(
        make_runner: Callable[[], StepsRunner],
    ) -> tuple[list[np.ndarray] | None, str | None]:
        return _engine_logits(make_runner, config, requests, options.max_seq, progress)

    progress.done(f"sha256 {source['sha256'][:16]}… over {len(source['files'])} files")

    progress.step(f"convert: checkpoint → torch model for {options.precision}")
    device = torch.device(options.device)
    # The weights as stored (on the CPU still mapped from the files), computed in fp32 for the
    # reference: no 43 GB fp32 copy of the 11B model unless the engine is fp32 (`reference.py`).
    model = load_model(options.model, device=device, semantics=semantics)
    with computed_in_fp32(model):
        reference = run_probes(_torch_steps(model, options.max_seq), requests, progress)
    model.setup_caches(0, 0)  # (the reference's fp32 caches)
    dtype = COMPUTE_DTYPE[options.precision]
    converted = reference  # an fp32 model computes the reference's numbers
    if options.precision not in EIGHT_BIT:  # 8-bit: quantized from the stored weights
        model = model.to(dtype)
        if dtype != torch.float32:
            converted = run_probes(_torch_steps(model, options.max_seq), requests, progress)
    steps: list[dict[str, Any]] = [
        {
            "name": "convert",
            "artifact": f"guardrt torch model, {str(dtype).removeprefix('torch.')}",
            "parity": _parity("the checkpoint in fp32", reference, converted, ids),
        }
    ]
    progress.done(_summary(steps[-1]["parity"]))

    progress.step("quantize")
    quantization, before, step = _quantize_step(model, options, converted, requests, ids, progress)
    before_name = "quantize" if quantization is not None else "convert"
    steps.append(step)
    progress.done(_summary(step.get("parity")) or "skipped")
    del model  # before the child makes its own: the two never coexist
    _release(device)

    progress.step(f"build: {options.engine_format} graphs")
    # Traced in a child from the checkpoint, converted as above: the memory the exporter
    # keeps returns before ONNX Runtime or TensorRT loads the engine (`child.py`).
    specs = traced_in_child(options, work if tensorrt else engine_dir)
    document: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "engine_format": options.engine_format,
        "precision": options.precision,
        "quantization": quantization,
        "semantics": options.semantics,
        "max_batch": options.max_batch,
        "max_seq": options.max_seq,
        "source": source,
        "config": read_json_object(options.model / "config.json", "model config"),
        "tools": tool_versions("tensorrt") if tensorrt else tool_versions(),
        "graphs": {},
        "copied": _copy_side_files(options.model, engine_dir),
        "probes": {"count": len(requests), "sha256": probe_digest(requests)},
    }
    logits, why = _build_engine(
        specs, document, engine_dir, work, options, trt, probe_run, progress, config.text.vocab_size
    )
    if why is not None:  # name the engine directory as it will be, not the scratch one
        why = why.replace(str(engine_dir), str(options.output))
    runtime = "TensorRT" if tensorrt else "ONNX Runtime (CPU)"
    parity = (
        _parity(f"{before_name} (engine run by {runtime})", before, logits, ids)
        if logits is not None
        else {"against": before_name, "not_run": why}
    )
    steps.append({"name": "build", "artifact": document.pop("artifact"), "parity": parity})
    progress.done(_summary(parity))

    progress.step("manifest")
    document["steps"] = steps
    document["deviation"] = (
        _parity("fp32 model", reference, logits, ids) if logits is not None else {"not_run": why}
    )
    if options.precision == "int8" and not tensorrt:
        document["alternatives"] = _int8_alternatives(
            engine_dir, document, reference, ids, probe_run
        )
    document["files"] = file_entries(engine_dir)
    parse_manifest(document)  # what we write must be what the back ends read
    write_manifest(engine_dir, document)
    progress.done(f"{len(document['files'])} files")
    return document


def _int8_alternatives(
    engine_dir: Path,
    document: dict[str, Any],
    reference: list[np.ndarray],
    ids: tuple[int, int],
    probe_run: Callable[[Callable[[], StepsRunner]], tuple[list[np.ndarray] | None, str | None]],
) -> dict[str, Any]:
    """Both int8 compute modes measured on the same graphs (the choice's evidence). The
    engine's own mode was measured by the build step (its `deviation`): not run again, since a
    probe run of the 11B engine on the CPU takes minutes."""
    built = document["quantization"]["compute"]
    measured: dict[str, Any] = {built: document["deviation"]}
    for compute in INT8_COMPUTE:
        if compute == built:
            continue
        manifest = _provisional(document, compute)
        logits, why = probe_run(functools.partial(OrtRunner, engine_dir, manifest, "cpu", 0))
        measured[compute] = (
            _parity("fp32 model", reference, logits, ids)
            if logits is not None
            else {"not_run": why}
        )
    return {compute: measured[compute] for compute in INT8_COMPUTE}
