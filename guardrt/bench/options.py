"""`guardrt bench`'s command line, shared by its two runs (no torch imported here):

- a checkpoint, or no `--model` (random weights of the 11B's architecture): the torch engine
  for each precision, and transformers as the baseline (`latency.py`);
- an engine directory from `guardrt export build`: that engine as it serves, on ONNX Runtime
  or TensorRT (`engine_dir.py`), which needs no torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from guardrt.runtime.engine.manifest import is_engine_dir
from guardrt.runtime.errors import ConfigError

if TYPE_CHECKING:  # a type only: this module imports no torch
    from guardrt.export.quantize import QuantKind

# int8-wa: int8 with "weight+activation" compute (large steps on the int8 tensor cores); it is
# not one of the precisions, so it runs last.
PRECISIONS = ("bf16", "int8", "fp8", "int8-wa")


def quantization(precision: str) -> tuple[QuantKind | None, bool]:
    """A precision's (`quantize_model` kind, None for bf16; whether its int8 layers quantize
    their activations too)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} not among {PRECISIONS}")
    if precision == "bf16":
        return None, False
    return ("fp8" if precision == "fp8" else "int8"), precision == "int8-wa"


SIZE_NAMES = ("full", "tiny")  # `fullsize.SIZES`
# Options of the torch run that an engine directory answers itself (its manifest's precision;
# graphs, not CUDA graphs; no transformers model to compare, no random weights).
_TORCH_ONLY = ("size", "precisions", "no_baseline", "no_cuda_graphs")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardrt bench",
        description="Verdict latency and throughput on this machine, in one run: of the torch "
        "engine (random weights of the 11B's architecture, or --model CHECKPOINT) in each "
        "precision against transformers, or of an engine directory (--model ENGINE_DIR).",
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="a checkpoint directory, or an engine directory from `guardrt export build` "
        "(default: random weights)",
    )
    parser.add_argument(
        "--size", choices=SIZE_NAMES, default=None, help="random model size (default full)"
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch run: a torch device (default cuda); engine directory: auto, cpu, cuda or "
        "cuda:N (default auto)",
    )
    parser.add_argument(
        "--precisions",
        default=None,
        help=f"torch run: comma-separated, of {', '.join(PRECISIONS)} (default all)",
    )
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per latency case")
    parser.add_argument(
        "--concurrency", default="8,32", help="comma-separated client counts for throughput"
    )
    parser.add_argument("--requests", type=int, default=64, help="per throughput measurement")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="eager steps only")
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("benchmarks/results"),
        help="where the JSON, the table and the PNG are written",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip (and record as skipped) a phase that would start after this many seconds "
        "minus the longest phase so far, so a time-boxed run ends with its files written",
    )
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The options, checked: bad values are a ConfigError naming them."""
    args = parser().parse_args(argv)
    if args.model is not None and not args.model.is_dir():
        raise ConfigError(f"--model {args.model} is not a directory")
    for name in ("repeat", "requests"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)} must be ≥ 1")
    if args.budget_s is not None and not args.budget_s >= 0:  # 0: every phase skipped
        raise ConfigError(f"--budget-s {args.budget_s} must be a number of seconds ≥ 0")
    try:  # made now, not after a run of many minutes that would have nowhere to go
        args.results.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--results {args.results}: cannot make it: {exc.strerror}") from exc
    given = args.concurrency
    try:
        args.concurrency = [int(c) for c in given.split(",") if c]
    except ValueError:
        args.concurrency = []
    if not args.concurrency or min(args.concurrency) < 1:
        raise ConfigError(f"--concurrency {given!r} is not a list of client counts ≥ 1 (as 8,32)")
    if engine_dir(args):
        given = [f"--{name.replace('_', '-')}" for name in _TORCH_ONLY if getattr(args, name)]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: not for an engine directory ({args.model}), whose "
                "precision and graphs are the ones it was built with"
            )
    return args


def engine_dir(args: argparse.Namespace) -> bool:
    return args.model is not None and is_engine_dir(args.model)
