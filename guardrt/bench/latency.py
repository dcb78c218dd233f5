"""`guardrt bench` / `benchmarks/latency.py`: verdict latency on this machine's GPU, in one run.

    guardrt bench [--model DIR] [--precisions bf16,int8,fp8,int8-wa] [--repeat 20] [--results DIR]
                  [--budget-s S]

(This is the torch engine's run; `--model ENGINE_DIR` runs `engine_dir.py` instead.)

Builds Llama-Guard-3-11B-Vision's architecture with random weights on the device (or loads
`--model`), measures the card's ceilings, then for each precision: p50/p90/p99 end-to-end
verdict latency at batch 1 for a ~350-token prompt, the same with a 4-tile image, and a
response classification with an image, each on the `safe` and the `unsafe` + one category path;
then throughput at concurrency 8 and 32 through the scheduler. Then the same cases with
transformers eager bf16 on the same weights, and our probabilities (bf16,
`semantics="transformers"`) against transformers' on the same inputs (this phase runs right
after bf16). Prints a table with the ratios to transformers and to the floor. Under the results
folder, the JSON and the table (.txt) are rewritten as each part of a phase lands, and the PNG
(when matplotlib is installed) as each phase ends; with `--budget-s` a phase that would end past
the budget is skipped and named, so a time-boxed run ends with its files written.

Our side runs as the torch engine serves on a GPU: q/k/v and gate/up fused, small steps replayed
as CUDA graphs (`--no-cuda-graphs`: eager), one shared policy-prefix row. Latency runs with caches
sized for batch 1 (so its peak memory is a batch-1 deployment's), throughput with caches for the
largest concurrency; the warm-up (graph captures included) of each is timed and reported.
int8 / fp8 take `QuantizedLinear`'s GPU paths (Triton int8 kernel for small steps, fp8
`torch._scaled_mm`), falling back to dequantize-then-matmul where those can't run; int8-wa is
int8 with "weight+activation" compute (larger steps on `torch._int_mm`, activations per token).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from guardrt.bench import baseline, cases, roofline
from guardrt.bench import report as report_files
from guardrt.bench.fullsize import SIZES, random_model
from guardrt.bench.options import PRECISIONS, quantization
from guardrt.bench.timing import sync, times_ms
from guardrt.export.parity import probe_logits
from guardrt.kernels.device import cuda_capability
from guardrt.kernels.dispatch import precision_warning
from guardrt.runtime.classify import TorchSteps
from guardrt.runtime.decoding import Decoder
from guardrt.runtime.engine import EngineInfo
from guardrt.runtime.engine.torch_device import usable_device
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.model.checkpoint import load_model, quantize_for_serving
from guardrt.runtime.model.fuse import fuse_projections
from guardrt.runtime.model.mllama import MllamaModel, Semantics
from guardrt.runtime.model.tune import tune_for_device
from guardrt.runtime.prepare import Preparer, load_preparer
from guardrt.runtime.preprocess import ImageConfig
from guardrt.runtime.scores import prefill_vocab, probability
from guardrt.runtime.static_steps import StaticSteps, setup_steps, uses_graphs
from guardrt.runtime.tokenizer import load_tokenizer
from guardrt.testing.timing import machine

BASELINE = "transformers"  # the phase that times transformers eager bf16
EIGHT_BIT = ("fp8", "int8-wa")  # precisions whose large products run on 8-bit tensor cores


def _model(
    args: argparse.Namespace, device: torch.device, semantics: Semantics, precision: str = "bf16"
) -> MllamaModel:
    """The model in `precision`, as the engine loads it (a checkpoint is quantized while it
    loads; random weights are made in bf16, then quantized)."""
    kind, activations = quantization(precision)
    if args.model is not None:
        return load_model(
            args.model, device=device, dtype=torch.bfloat16, semantics=semantics,
            quantize=kind, activations=activations,
        )  # fmt: skip
    model = random_model(SIZES[args.size], device, torch.bfloat16, semantics)
    if kind is not None:
        quantize_for_serving(model, kind, activations)  # as the engine loads it
    return model


def _preparer(args: argparse.Namespace) -> Preparer:
    if args.model is not None:
        return load_preparer(args.model, cases.MAX_SEQ)
    return Preparer(load_tokenizer(), ImageConfig(), cases.MAX_SEQ)


def _free(device: torch.device) -> None:
    """Let go of what the last phase held. Never raises: it runs in failure handlers, and after
    a failed CUDA graph capture torch 2.11's `empty_cache` can assert (the allocator still
    believes a capture is under way); the next phase then runs with the memory held."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError as exc:
            print(f"empty_cache failed ({type(exc).__name__}: {str(exc)[:200]}); carrying on")


def _note_precision(device: torch.device, precision: str, run: dict[str, Any]) -> None:
    """fp8 on a card without fp8 tensor cores is measured all the same, with a note of why it is
    slower than bf16 (the warning the engine logs when it loads such weights)."""
    warning = precision_warning(precision, cuda_capability(device))
    if warning:
        run["warning"] = warning
        print(f"{precision}: {warning}")


def _precision_run(
    args: argparse.Namespace, device: torch.device, precision: str, requests: dict[str, Any],
    ceilings: roofline.Ceilings, concurrency: Sequence[int], run: dict[str, Any],
    save: Callable[[], object],
) -> None:  # fmt: skip
    """Measure one precision into `run`, calling `save` as each part lands (a run killed in
    the middle of a phase keeps the parts measured)."""
    model = _model(args, device, "meta", precision)
    _note_precision(device, precision, run)
    fuse_projections(model)
    run |= tune_for_device(model).to_json()  # as the engine does at load
    _free(device)
    work = roofline.Work.of(
        model, 2.0 if precision == "bf16" else 1.0, eight_bit_products=precision in EIGHT_BIT
    )
    steps = _steps(args, model, device, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prepared = time.perf_counter()
    if isinstance(steps, StaticSteps):  # what the engine captures before serving
        label = len(prefill_vocab([r.grammar for r in requests.values()]))
        steps.prepare(steps.common_keys(label))
    prepare_s = time.perf_counter() - prepared
    barrier = functools.partial(sync, device)
    warmup_s = cases.warm_up(steps, list(requests.values()), barrier)
    graphs = run.setdefault("cuda_graphs", {})
    graphs |= {"batch1_prepare_s": prepare_s, "batch1_warmup_s": warmup_s}
    latencies = run.setdefault("latency", {})
    for name, request in requests.items():
        for path in cases.PATHS:
            measured = cases.time_ours(steps, request, path, args.repeat, barrier)
            tiles = request.image.num_tiles if request.image else 0
            small = 0 if path == "safe" else 1  # forwards after the prefill
            fed = cases.prefill_tokens(request)
            floor = work.floor_s(model, fed, tiles, small, ceilings) * 1e3
            latencies[f"{name} {path}"] = asdict(measured) | {"floor_ms": floor}
        save()
    if device.type == "cuda":  # elsewhere unmeasured, so absent (a 0.0 would read as met)
        run["peak_memory_gb_batch1"] = torch.cuda.max_memory_allocated(device) / 1e9
    run["p_unsafe"] = {name: _p_unsafe(steps, request) for name, request in requests.items()}
    # The same scores through the served path (padded steps / CUDA graphs, the prefix row),
    # unforced: a full-size check of the graphs against the eager step above.
    served = Decoder(steps, prefixes=cases.PREFIXES)
    run["p_unsafe_served"] = {
        name: served.run([r])[0].unsafe_probability for name, r in requests.items()
    }
    graphs["batch1_graphs"] = _graphs(steps)
    save()
    del steps, served  # the decoder holds the steps (and their graphs) too
    _free(device)
    steps = _steps(args, model, device, max(concurrency))
    info = EngineInfo("torch", str(device), precision, model.semantics, "constrained",
                      max(concurrency), cases.MAX_SEQ)  # fmt: skip
    rates = run.setdefault("throughput", {})
    for name in ("text", "image+text"):
        for c in concurrency:
            try:
                rates[f"{name} c={c}"] = asdict(
                    cases.throughput(steps, requests[name], c, args.requests, barrier, info)
                )
            except Exception as exc:  # noqa: BLE001 (an out-of-memory batch, say: recorded)
                rates[f"{name} c={c}"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                _free(device)
            save()
    graphs["graphs_total"] = _graphs(steps)
    model.setup_caches(0, 0)
    del model, steps
    _free(device)


def _p_unsafe(steps: TorchSteps, request: Any) -> float:
    """P(unsafe) at the label row of one request (how far a precision moves the verdict)."""
    return probability(probe_logits(steps, request)[1], request.grammar.tokens.unsafe)


def _steps(
    args: argparse.Namespace, model: MllamaModel, device: torch.device, batch: int
) -> TorchSteps:
    """The engine's steps with caches for `batch` requests and the prefix row."""
    static = uses_graphs(device, not args.no_cuda_graphs)
    return setup_steps(model, batch + cases.PREFIXES, cases.MAX_SEQ, static, image_rows=batch)


def _graphs(steps: TorchSteps) -> dict[str, float]:
    if not isinstance(steps, StaticSteps):
        return {"graphs": 0, "capture_s": 0.0, "eager_steps": 0, "dropped": 0}
    return {
        "graphs": steps.graphs, "capture_s": steps.capture_s, "eager_steps": steps.eager_steps,
        "dropped": steps.dropped,
    }  # fmt: skip


def _baseline_run(
    args: argparse.Namespace, device: torch.device, requests: dict[str, Any]
) -> dict[str, Any]:
    """transformers eager bf16 on the same weights; our probabilities against its."""
    model = _model(args, device, "transformers")
    document = (
        SIZES[args.size]
        if args.model is None
        else json.loads((args.model / "config.json").read_text())
    )
    hf = baseline.sharing_model(model, document)
    _free(device)
    timings = {}
    for name, request in requests.items():
        for path in cases.PATHS:
            tokens = baseline.PATH_TOKENS[path]
            ready = baseline.with_pixels(request)  # its processor's output
            run = functools.partial(baseline.generate, hf, ready, tokens, torch.bfloat16)
            times = times_ms(run, device, max(3, args.repeat // 4))
            ordered = sorted(times)
            timings[f"{name} {path}"] = {
                "p50_ms": ordered[len(ordered) // 2], "min_ms": ordered[0], "runs": len(times),
                "generated_tokens": tokens,
            }  # fmt: skip
    model.setup_caches(1, cases.MAX_SEQ)
    steps = TorchSteps(model)
    agreement = []
    for name, request in requests.items():
        tokens = request.grammar.tokens
        ours = probe_logits(steps, request)[1]  # the label row
        theirs = baseline.label_logits(hf, request, torch.bfloat16)
        p_ours, p_theirs = (probability(x, tokens.unsafe) for x in (ours, theirs))
        labels = [
            "unsafe" if x[tokens.unsafe] >= x[tokens.safe] else "safe" for x in (ours, theirs)
        ]
        agreement.append({
            "input": name, "ours": p_ours, "transformers": p_theirs,
            "abs_delta": abs(p_ours - p_theirs),
            "max_rel_logit_error": float(np.abs(ours - theirs).max() / np.abs(theirs).max()),
            "labels": labels, "agree": labels[0] == labels[1],
        })  # fmt: skip
    del hf, model, steps
    _free(device)
    return {"latency": timings, "probabilities": agreement}


def _phases(args: argparse.Namespace, precisions: Sequence[str]) -> list[str]:
    """The run's phases in order: the transformers baseline right after bf16 (the baseline and
    bf16 are what every comparison needs, so a run cut short still has them), else last."""
    phases = list(precisions)
    if not args.no_baseline:
        phases.insert(phases.index("bf16") + 1 if "bf16" in phases else len(phases), BASELINE)
    return phases


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m guardrt.bench.latency`: as `guardrt bench` (an engine directory included)."""
    from guardrt.bench import command  # noqa: PLC0415 (it imports this module)

    return command.main(sys.argv[1:] if argv is None else list(argv))


def run(args: argparse.Namespace) -> int:
    """The torch engine's run (a checkpoint, or random weights): every precision, then the
    transformers baseline on the same weights."""
    args.size = args.size or "full"
    device = usable_device(args.device or "cuda", "--device")
    precisions = [p for p in (args.precisions or ",".join(PRECISIONS)).split(",") if p]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise ConfigError(f"--precisions {unknown} not among {PRECISIONS}")
    concurrency = args.concurrency
    started = time.perf_counter()
    ceilings = (
        roofline.measure(device) if device.type == "cuda" else roofline.measure(device, 16, 512)
    )
    preparer = _preparer(args)
    requests = cases.requests(preparer)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": str(args.model)
        if args.model
        else f"{args.size} architecture, random bf16 weights",
        "batch": 1,
        "decode": "constrained",
        "ceilings": ceilings.to_json(),
        "prompt_tokens": {name: len(r.prompt) for name, r in requests.items()},
        "host": machine(),
        # What a served verdict pays on the host before the model (the cases below start from
        # prepared requests, as transformers' timings start from its processor's output).
        "preprocess_ms": cases.preprocess_ms(preparer, max(3, args.repeat)),
        "precisions": {},
        "phase_s": {},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"latency-{report['device'].replace(' ', '-')}"
    # Each phase is saved as it ends, and a failing phase is recorded, not fatal: one run on
    # a lent GPU must bring back whatever it measured.
    plotted = False
    for phase in _phases(args, precisions):
        elapsed = time.perf_counter() - started
        longest = max(report["phase_s"].values(), default=0.0)
        if args.budget_s is not None and elapsed + longest > args.budget_s:
            report.setdefault("skipped", []).append(phase)
        else:
            began = time.perf_counter()
            try:
                if phase == BASELINE:
                    report["transformers"] = _baseline_run(args, device, requests)
                else:
                    run = report["precisions"].setdefault(phase, {})
                    _precision_run(
                        args, device, phase, requests, ceilings, concurrency, run,
                        functools.partial(report_files.save, report, stem),
                    )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 (recorded in the report)
                report.setdefault("errors", {})[phase] = f"{type(exc).__name__}: {exc}"[:2000]
                _free(device)
            report["phase_s"][phase] = time.perf_counter() - began
        report["elapsed_s"] = time.perf_counter() - started
        plotted = report_files.save(report, stem, plot=True)
    print(report_files.table(report))
    written = f"{stem}.json, {stem}.txt" + (f" and {stem}.png" if plotted else " (no PNG)")
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
