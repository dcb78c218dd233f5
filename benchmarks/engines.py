"""Verdict latency by back end and precision: torch vs the exported ONNX engines (this CPU).

Usage: python benchmarks/engines.py [--size tiny|medium] [--repeat N] [--work DIR]

Builds a random checkpoint (`tiny`: the embedded tiny-random; `medium`: hidden 1024, 8 text
layers, 2 of them cross, intermediate 3584, vision hidden 256 — big enough that matmuls, not
overheads, dominate), exports it with `guardrt export build` as ONNX fp32, int8, and int8 with
activations quantized too, and times one verdict at batch 1 (`Engine.execute`, constrained
decoding, after warm-up) for a text prompt and a 4-tile image prompt on each. Prints the build's
measured deviations beside the times. Random weights have no activation outliers, so the int8
deviations here understate what a real checkpoint shows; the times are what this CPU does.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from guardrt.export.build import BuildOptions, build
from guardrt.export.progress import Progress
from guardrt.runtime.engine import Engine, EngineOptions, load_engine
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.model.resolve import resolve_model
from guardrt.runtime.model.tiny import random_state, tiny_config, write_checkpoint
from guardrt.runtime.prepare import load_preparer
from guardrt.testing.timing import machine, medians_ms

MEDIUM = tiny_config(
    text_config={
        "hidden_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 3584,
        "cross_attention_layers": [3, 7],
    },
    vision_config={
        "hidden_size": 256,
        "attention_heads": 4,
        "intermediate_size": 1024,
        "vision_output_dim": 768,
    },
)
MAX_SEQ = 1024


def checkpoint(size: str, work: Path) -> Path:
    if size == "tiny":
        return resolve_model("tiny-random")
    directory = work / "medium-random"
    if not (directory / "config.json").is_file():
        write_checkpoint(directory, MEDIUM, random_state(ModelConfig.from_dict(MEDIUM), seed=0))
    return directory


def engines(source: Path, work: Path) -> dict[str, tuple[EngineOptions, str, dict[str, Any]]]:
    """name → (options, backend, deviation from fp32 recorded by the build)."""
    built: dict[str, tuple[EngineOptions, str, dict[str, Any]]] = {
        "torch fp32": (EngineOptions(source, device="cpu", max_seq=MAX_SEQ), "torch", {}),
    }
    for precision, compute in (
        ("fp32", "weight-only"),
        ("int8", "weight-only"),
        ("int8", "weight+activation"),
    ):
        name = f"onnx {precision}" + (f" {compute}" if precision == "int8" else "")
        target = work / name.replace(" ", "-").replace("+", "-")
        if not (target / "manifest.json").is_file():
            options = BuildOptions(
                source, target, precision, max_seq=MAX_SEQ, int8_compute=compute, force=True
            )
            build(options, Progress(5, io.StringIO()))
        document = json.loads((target / "manifest.json").read_text())
        built[name] = (
            EngineOptions(target, device="cpu", max_seq=MAX_SEQ),
            "onnx",
            document["deviation"],
        )
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=["tiny", "medium"], default="tiny")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--work", type=Path, help="keep checkpoints and engines here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="guardrt-engines-"))
    source = checkpoint(args.size, work)
    preparer = load_preparer(source, MAX_SEQ)
    picture = (np.random.default_rng(0).random((900, 1000, 3)) * 255).astype(np.uint8)
    question = "How do I pick a lock without the key?"
    cases = {
        "text": preparer.prepare([{"role": "user", "content": question}]),
        "image 4 tiles": preparer.prepare(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": picture},
                        {"type": "text", "text": question},
                    ],
                }
            ]
        ),
    }
    loaded: dict[str, Engine] = {}
    deviations = {}
    for name, (options, backend, deviation) in engines(source, work).items():
        loaded[name] = load_engine(backend, options)
        deviations[name] = deviation
    print(machine())
    print(f"model: {args.size}-random ({source})")
    print(f"batch 1, constrained decoding, median of {args.repeat} runs after warm-up")
    print(
        f"{'engine':<28}"
        + "".join(f"{case:>16}" for case in cases)
        + "   deviation from fp32 (logit err, |ΔP(unsafe)|)"
    )
    for name, engine in loaded.items():
        runs: dict[str, Callable[[], object]] = {
            case: functools.partial(engine.execute, [request]) for case, request in cases.items()
        }
        times = medians_ms(runs, args.repeat)
        deviation = deviations[name]
        shown = "(reference)"
        if deviation:
            logit, p_unsafe = (
                deviation[k] for k in ("max_relative_logit_error", "max_abs_delta_p_unsafe")
            )
            shown = f"{logit:.1e}, {p_unsafe:.1e}"
        print(f"{name:<28}" + "".join(f"{times[case]:>13.1f} ms" for case in cases) + f"   {shown}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
