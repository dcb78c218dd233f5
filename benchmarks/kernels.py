"""The quantized-linear paths against their references on this GPU, at the 11B model's shapes.

Usage: python benchmarks/kernels.py [--repeat N] [--budget SECONDS] [--out FILE]
       python benchmarks/kernels.py --dry-run   (CPU, tiny shapes: the script's own check)

For every projection shape of the full-size model (text, head, vision) and M rows from a decode
step (1) to a full image prefill (6432), the µs of the ways to compute x · Wᵀ (+ b):
"dense", F.linear on the unquantized weight in bf16 (fp16 in the dry run); the int8 reference
(`QuantizedLinear` forced to dequantize, then F.linear); the int8 Triton kernel
(`guardrt/kernels/int8_linear.py`); the int8 cast path (`int8_cast.py`: the weight dequantized
in one pass, then cuBLAS; equal to the reference); int8 weight+activation on `_int_mm`; the fp8
reference; the fp8 `_scaled_mm` path
(`guardrt/kernels/fp8_linear.py`, activation quantization included). With them: each kernel's
max relative error against its reference (fp8 also against the exact fp32 math of the same
quantized operands), the path `choose_path` takes there, and the fastest.
The engine measures the same crossover per layer shape when it loads (`int8_rows.py`); this
table is the whole sweep, and shows whether `INT8_TRITON_MAX_ROWS` (the limit before any
measurement, guardrt/kernels/dispatch.py) is a fair default.

Rows run in increasing M, so the decode shapes come first if `--budget` (total seconds, default
90) runs out; a cell that fails records its error and the run goes on. Writes the table to stdout
and JSON to benchmarks/results/kernels-<GPU name>.json (or --out).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from guardrt.bench.timing import times_ms
from guardrt.export.quantize import QuantizedLinear, quantize_weight
from guardrt.kernels.device import cuda_capability
from guardrt.kernels.dispatch import choose_path
from guardrt.kernels.fp8_linear import fp8_linear, quantize_rows, scaled_mm_reference
from guardrt.kernels.int8_cast import int8_cast_linear
from guardrt.kernels.int8_dynamic import (
    int8_dynamic_linear,
    int8_dynamic_reference,
    int_mm_takes,
    quantize_rows_int8,
)
from guardrt.kernels.timer import cuda_timer

log = logging.getLogger("benchmarks.kernels")

SHAPES: dict[str, tuple[int, int, bool]] = {  # name: (N out, K in, bias)
    "q/o 4096x4096": (4096, 4096, False),
    "k/v 1024x4096": (1024, 4096, False),
    "qkv 6144x4096": (6144, 4096, False),
    "gate/up 14336x4096": (14336, 4096, False),
    "gate_up 28672x4096": (28672, 4096, False),
    "down 4096x14336": (4096, 14336, False),
    "head 128256x4096": (128256, 4096, False),
    "vis qkvo 1280x1280": (1280, 1280, False),
    "vis fc1 5120x1280+b": (5120, 1280, True),
    "vis fc2 1280x5120+b": (1280, 5120, True),
}
ROWS = (1, 2, 8, 32, 350, 700, 6432)  # decode, 2 and 8 sequences, 32, prefills, one image
DRY_SHAPES: dict[str, tuple[int, int, bool]] = {
    "tiny 48x64+b": (48, 64, True),
    "tiny 64x32": (64, 32, False),
}
DRY_ROWS = (1, 5, 24)  # 24: past _int_mm's 16-row minimum
METHODS = ("dense", "int8 ref", "int8 triton", "int8 cast", "int8 mm", "fp8 ref", "fp8 mm")
# bf16 output rounding over K-long sums; beyond this a kernel is wrong, not imprecise.
TOLERANCE = 2e-2
CELL_SECONDS = 0.25  # timing per method and cell, at most (but at least 3 calls)

Linear = Callable[[torch.Tensor], torch.Tensor]
T = TypeVar("T")


@dataclass
class Layers:
    """One shape's weights in every form the methods read."""

    dense: torch.Tensor  # (N, K) in the activation dtype
    bias: torch.Tensor | None  # (N,) in the activation dtype
    int8: QuantizedLinear  # force_reference: the reference forward
    fp8: QuantizedLinear


def _layers(n: int, k: int, bias: bool, device: torch.device, dtype: torch.dtype) -> Layers:
    weight = torch.randn(n, k, device=device) * 0.02  # (N, K) fp32, a trained layer's scale
    vector = torch.randn(n, device=device) * 0.02 if bias else None
    int8 = QuantizedLinear(quantize_weight(weight), vector, force_reference=True)
    fp8 = QuantizedLinear(quantize_weight(weight, kind="fp8"), vector, force_reference=True)
    dense = weight.to(dtype)
    return Layers(dense, None if vector is None else vector.to(dtype), int8, fp8)


def _methods(layers: Layers, int8_linear: Any, m: int) -> dict[str, Linear]:
    """Every method that takes M rows ("int8 mm", weight+activation int8 on `torch._int_mm`,
    needs M > 16)."""
    bias, int8, fp8 = layers.bias, layers.int8, layers.fp8
    methods: dict[str, Linear] = {
        "dense": lambda x: torch.nn.functional.linear(x, layers.dense, bias),
        "int8 ref": int8,
        "int8 triton": lambda x: int8_linear(x, int8.qweight, int8.scales, bias),
        "int8 cast": lambda x: int8_cast_linear(x, int8.qweight, int8.scales, bias),
        "fp8 ref": fp8,
        "fp8 mm": lambda x: fp8_linear(x, fp8.qweight, fp8.scales, bias),
    }
    if int_mm_takes(m, *int8.qweight.shape):
        methods["int8 mm"] = lambda x: int8_dynamic_linear(x, int8.qweight, int8.scales, bias)
    return methods


def relative_error(got: torch.Tensor, expected: torch.Tensor, chunk: int = 1024) -> float:
    """max |got − expected| / max |expected| over (M, N) outputs, in fp32 `chunk` rows at a
    time (a (6432, 128256) fp32 copy is 3.3 GB)."""
    worst, scale = 0.0, 0.0
    for start in range(0, got.shape[0], chunk):
        a, b = got[start : start + chunk].float(), expected[start : start + chunk].float()
        worst = max(worst, float((a - b).abs().max()))
        scale = max(scale, float(b.abs().max()))
    return worst / max(scale, 1e-30)


# error name: (output, the output it is measured against)
CHECKS = {
    "int8 ref vs dense": ("int8 ref", "dense"),  # the quantization itself (information)
    "int8 triton vs ref": ("int8 triton", "int8 ref"),
    "int8 cast vs ref": ("int8 cast", "int8 ref"),
    "fp8 mm vs ref": ("fp8 mm", "fp8 ref"),  # + the activations' e4m3 rounding (information)
    "fp8 mm vs math": ("fp8 mm", "fp8 math"),
    "int8 mm vs ref": ("int8 mm", "int8 ref"),  # + the activations' int8 rounding (information)
    "int8 mm vs math": ("int8 mm", "int8 math"),
}
GATED = (
    "int8 triton vs ref",
    "int8 cast vs ref",
    "fp8 mm vs math",
    "int8 mm vs math",
)  # beyond TOLERANCE: the cell is NOT OK


def _attempt(failures: dict[str, str], what: str, work: Callable[[], T]) -> T | None:
    """work(), or None with the failure recorded (and its traceback logged): one method failing
    (a Triton compile error, an out-of-memory) must not lose the cell's other methods."""
    try:
        return work()
    except Exception as error:  # Triton's compile errors are not RuntimeErrors
        log.exception("%s failed", what)
        failures[what] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
        torch.cuda.empty_cache()  # a no-op where CUDA never started
        return None


def _fp8_math(layers: Layers, x: torch.Tensor) -> torch.Tensor:
    """The fp8 path's exact math (fp32) on the same quantized operands, rounded to x's dtype."""
    xq, x_scales = quantize_rows(x)
    fp8 = layers.fp8
    return scaled_mm_reference(xq, x_scales, fp8.qweight, fp8.scales, layers.bias, x.dtype)


def _int8_math(layers: Layers, x: torch.Tensor) -> torch.Tensor | None:
    """The int8 weight+activation path's exact math (`int8_dynamic_reference`), same operands."""
    int8 = layers.int8
    if not int_mm_takes(x.shape[0], *int8.qweight.shape):
        return None
    xq, x_scales = quantize_rows_int8(x)
    return int8_dynamic_reference(xq, x_scales, int8.qweight, int8.scales, layers.bias, x.dtype)


def _median_us(run: Callable[[], object], device: torch.device, repeat: int) -> float:
    """µs per call. On a GPU as the engine measures at load (`cuda_timer`: calls replayed from a
    CUDA graph, each from a cold L2, so neither a Python launch nor an L2-resident weight is
    timed), over up to `repeat` calls sized to CELL_SECONDS; on the CPU (the dry run) the median
    of synchronized calls. 1 warm-up and 1 call size the run."""
    (first,) = times_ms(run, device, 1, warmup=1)
    count = max(3, min(repeat, int(CELL_SECONDS * 1e3 / max(first, 1e-3))))
    if device.type == "cuda":  # each captured call runs 4 times (1 warm, 3 timed replays)
        return cuda_timer(run, max(1, count // 4)) * 1e3
    return statistics.median(times_ms(run, device, count, warmup=0)) * 1e3


def _cell(
    methods: dict[str, Linear], layers: Layers, m: int, device: torch.device, repeat: int
) -> dict[str, Any]:
    """One (shape, M): every output once and the errors between them, then µs per method, and
    the path the dispatch takes there."""
    x = torch.randn(m, layers.dense.shape[1], device=device, dtype=layers.dense.dtype)  # (M, K)
    failures: dict[str, str] = {}
    with torch.inference_mode():
        outputs = {name: _attempt(failures, name, partial(f, x)) for name, f in methods.items()}
        outputs["fp8 math"] = _attempt(failures, "fp8 math", partial(_fp8_math, layers, x))
        outputs["int8 math"] = _attempt(failures, "int8 math", partial(_int8_math, layers, x))
        errors: dict[str, float] = {}
        for check, (got, expected) in CHECKS.items():
            a, b = outputs.get(got), outputs.get(expected)
            if a is not None and b is not None:
                errors[check] = relative_error(a, b)
        del outputs, a, b  # (M, N) each: 1.6 GB for the head at M = 6432
        us: dict[str, float] = {}
        for name, method in methods.items():
            if name not in failures:
                timing = partial(_median_us, partial(method, x), device, repeat)
                if (median := _attempt(failures, f"{name} timing", timing)) is not None:
                    us[name] = median
    inaccurate = [check for check in GATED if errors.get(check, 0.0) > TOLERANCE]
    problems = [*failures.values(), *(f"{check} beyond {TOLERANCE}" for check in inaccurate)]
    capability = cuda_capability(device)
    int8, fp8 = layers.int8, layers.fp8
    return {
        "us": us,
        "errors": errors,
        "ok": not problems,
        "error": "; ".join(problems) or None,
        "failures": failures,
        "dispatch": {
            "int8": choose_path(x, int8.qweight, int8.scales, capability, True),
            "int8-wa": choose_path(x, int8.qweight, int8.scales, capability, True, True),
            "fp8": choose_path(x, fp8.qweight, fp8.scales, capability, True),
        },
        "fastest": min(us, key=us.__getitem__) if us else None,
    }


def _line(name: str, m: int, cell: dict[str, Any]) -> str:
    """A table row: µs per method, the gated errors and the fp8 cost, the dispatch, any error."""
    if "us" not in cell:
        return f"{name:<21}{m:>5}  ERROR {cell['error']}"
    us, errors = cell["us"], cell["errors"]
    times = "".join(f"{us[method]:>15.1f}" if method in us else f"{'-':>15}" for method in METHODS)
    shown = ("int8 triton vs ref", "int8 cast vs ref", "int8 mm vs math", "fp8 mm vs math",
             "fp8 mm vs ref")  # fmt: skip
    error = "".join(f"{errors[c]:>10.1e}" if c in errors else f"{'-':>10}" for c in shown)
    paths = "/".join(cell["dispatch"][kind] for kind in ("int8", "int8-wa", "fp8"))
    flags = "" if cell["ok"] else f"  NOT OK: {cell['error']}"
    return f"{name:<21}{m:>5}{times}{error}  {paths}{flags}"


HEADER = (
    f"{'shape':<21}{'M':>5}" + "".join(f"{method + ' µs':>15}" for method in METHODS)
    + f"{'i8 err':>10}{'i8c err':>10}{'i8mm err':>10}{'f8 math':>10}{'f8 ref':>10}"
    + "  dispatch int8/int8-wa/fp8"
)  # fmt: skip


def run(args: argparse.Namespace, int8_linear: Any) -> dict[str, Any]:
    """Every (M, shape) cell within the budget; the report `main` writes."""
    device = torch.device("cpu" if args.dry_run else "cuda")
    # The interpreter has no bf16 (see tests/test_kernels.py): the dry run's dtype is fp16.
    dtype = torch.float16 if args.dry_run else torch.bfloat16
    shapes, rows = (DRY_SHAPES, DRY_ROWS) if args.dry_run else (SHAPES, ROWS)
    deadline = time.monotonic() + args.budget
    cells: list[dict[str, Any]] = []
    built: dict[str, Layers] = {}
    skipped = 0
    print(HEADER)
    for m in rows:
        for name, (n, k, bias) in shapes.items():
            if time.monotonic() > deadline:
                skipped += 1
                continue
            cell: dict[str, Any] = {"shape": name, "n": n, "k": k, "bias": bias, "m": m}
            layers = built.get(name)
            failures: dict[str, str] = {}
            if layers is None:  # built at its first M, kept for the others
                layers = _attempt(failures, "weights", partial(_layers, n, k, bias, device, dtype))
                built |= {} if layers is None else {name: layers}
            if layers is None:
                cell |= {"ok": False, "error": failures["weights"]}
            else:
                cell |= _cell(_methods(layers, int8_linear, m), layers, m, device, args.repeat)
            cells.append(cell)
            print(_line(name, m, cell), flush=True)
    if skipped:
        print(f"budget of {args.budget:.0f} s spent: {skipped} cells skipped")
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "capability": cuda_capability(device),
        "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__,
        "dtype": str(dtype),
        "tolerance": TOLERANCE,
        "budget_s": args.budget,
        "skipped_cells": skipped,
        "cells": cells,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=50, help="most timed calls per method")
    parser.add_argument("--budget", type=float, default=90.0, help="total seconds, at most")
    parser.add_argument("--out", type=Path, help="JSON path (dry run: none unless given)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreter")
    args = parser.parse_args(argv)
    if args.dry_run:
        # Triton reads this when first imported, which is below: kernels on the CPU.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --dry-run)")
    logging.basicConfig(level=logging.WARNING)
    kernel = importlib.import_module("guardrt.kernels.int8_linear").int8_linear
    started = time.monotonic()
    report = run(args, kernel)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    out = args.out
    if out is None and not args.dry_run:
        device = str(report["device"]).replace(" ", "-")
        out = Path("benchmarks/results") / f"kernels-{device}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    failed = [cell for cell in report["cells"] if not cell.get("ok")]
    print(f"{len(report['cells'])} cells, {len(failed)} not OK, {report['elapsed_s']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
