"""`guardrt bench --model ENGINE_DIR`: an engine directory's latency and throughput, as it serves.

The directory `guardrt export build` made is loaded by the back end that serves it (ONNX
Runtime or TensorRT, `load_engine`, with its device placement and blocked prefill) and measured
on the torch run's cases (`cases.py`): p50/p90/p99 verdict latency at batch 1 for a ~350-token
prompt, the same with a 4-tile image, and a response with an image, each on the `safe` path
and the `unsafe` + one category path (forced by editing the logits the decoding loop reads,
after every forward ran in full: `forced.py`), after warm-up; then throughput at each
`--concurrency` through the scheduler; then each case's P(unsafe) through the engine's own,
unforced path. The engine's load time is reported too.

No torch here (an engine serves without it), so there is no transformers baseline and no
roofline floor in this run: the torch run (`guardrt bench` without an engine directory) has both.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from guardrt.bench import cases
from guardrt.bench import report as report_files
from guardrt.runtime.engine import EngineOptions, load_engine
from guardrt.runtime.engine.manifest import read_manifest
from guardrt.runtime.engine.onnx_engine import GraphEngine
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.prepare import load_preparer
from guardrt.runtime.requests import PreparedRequest
from guardrt.testing.timing import machine

_RUNTIME = {"onnx": "onnxruntime", "tensorrt": "tensorrt"}


def _engine(args: argparse.Namespace, backend: str, batch: int) -> GraphEngine:
    """The directory's engine with caches for `batch` requests and the shared prefix row (no
    session rows: the cases are single verdicts)."""
    options = EngineOptions(
        args.model,
        device=args.device or "auto",
        max_batch=batch,
        max_seq=cases.MAX_SEQ,
        max_sessions=0,
        max_prefixes=cases.PREFIXES,
    )
    engine = load_engine(backend, options)
    if not isinstance(engine, GraphEngine):  # every engine-directory back end is one
        engine.close()
        raise ConfigError(f"{args.model}: the {backend} back end is not a graph engine")
    return engine


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _latency(
    engine: GraphEngine,
    args: argparse.Namespace,
    requests: dict[str, PreparedRequest],
    run: dict[str, Any],
    save: Callable[[], object],
) -> None:
    """Batch 1: the forced cases, then P(unsafe) on the engine's own path."""
    steps = engine.decoder.model  # what the engine decodes with (blocked prefill included)
    run["warmup_s"] = cases.warm_up(steps, list(requests.values()), cases.no_sync)
    latencies = run.setdefault("latency", {})
    for name, request in requests.items():
        for path in cases.PATHS:
            measured = cases.time_ours(steps, request, path, args.repeat, cases.no_sync)
            latencies[f"{name} {path}"] = asdict(measured)
        save()
    run["p_unsafe_served"] = {
        name: engine.execute([request])[0].unsafe_probability for name, request in requests.items()
    }
    save()


def _throughput(
    engine: GraphEngine,
    args: argparse.Namespace,
    requests: dict[str, PreparedRequest],
    run: dict[str, Any],
    save: Callable[[], object],
) -> None:
    """At each concurrency, through the scheduler (batches of at most the concurrency)."""
    rates = run.setdefault("throughput", {})
    for name in ("text", "image+text"):
        for clients in args.concurrency:
            key = f"{name} c={clients}"
            try:
                measured = cases.throughput(
                    engine.decoder.model,
                    requests[name],
                    clients,
                    args.requests,
                    cases.no_sync,
                    engine.info,
                )
                rates[key] = asdict(measured)
            except Exception as exc:  # noqa: BLE001 (an out-of-memory batch, say: recorded)
                rates[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            save()


def run(args: argparse.Namespace) -> int:
    directory: Path = args.model
    manifest = read_manifest(directory)
    backend = manifest.engine_format
    preparer = load_preparer(directory, cases.MAX_SEQ)
    requests = cases.requests(preparer)
    precision = manifest.precision + (
        f" {manifest.int8_compute}" if manifest.int8_compute is not None else ""
    )
    report: dict[str, Any] = {
        "device": args.device or "auto",  # replaced by the engine's own words once loaded
        "runtime": f"{backend} engine on {_RUNTIME[backend]} {_version(_RUNTIME[backend])}",
        "model": f"{directory} ({backend}, {precision}, built for batch ≤ "
        f"{manifest.max_batch}, ≤ {manifest.max_seq} tokens)",
        "batch": 1,
        "decode": "constrained",
        "prompt_tokens": {name: len(r.prompt) for name, r in requests.items()},
        "host": machine(),
        "preprocess_ms": cases.preprocess_ms(preparer, max(3, args.repeat)),
        "precisions": {},
        "phase_s": {},
    }
    run = report["precisions"].setdefault(precision, {})
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)

    def stem() -> Path:  # named after the device, known once the engine is loaded
        device = str(report["device"]).split(" (")[0].replace(" ", "-").replace(":", "")
        return results / f"latency-{backend}-{manifest.precision}-{device}"

    def save() -> bool:
        return report_files.save(report, stem())

    # One engine for both phases, with caches for the largest concurrency: the batch-1 cases
    # run batch-1 steps in it, and a second engine would hold a second copy of the weights.
    began = time.perf_counter()
    try:
        engine = _engine(args, backend, max(args.concurrency))
    except Exception as exc:  # noqa: BLE001 (recorded, as a phase's failure is)
        report.setdefault("errors", {})["load"] = f"{type(exc).__name__}: {exc}"[:2000]
    else:
        run["load_s"] = time.perf_counter() - began
        report["device"] = engine.info.device
        phases: dict[str, Callable[[], None]] = {
            "latency": functools.partial(_latency, engine, args, requests, run, save),
            "throughput": functools.partial(_throughput, engine, args, requests, run, save),
        }
        try:
            for phase, measure in phases.items():
                began = time.perf_counter()
                try:
                    measure()
                except Exception as exc:  # noqa: BLE001 (recorded: a run keeps the rest)
                    report.setdefault("errors", {})[phase] = f"{type(exc).__name__}: {exc}"[:2000]
                report["phase_s"][phase] = time.perf_counter() - began
                report_files.save(report, stem(), plot=True)  # as each phase ends
        finally:
            engine.close()
    plotted = report_files.save(report, stem(), plot=True)
    print(report_files.table(report))
    written = f"{stem()}.json, {stem()}.txt" + (f" and {stem()}.png" if plotted else " (no PNG)")
    print(f"wrote {written}")
    return 1 if "errors" in report else 0
