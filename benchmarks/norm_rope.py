"""The fused RMSNorm, RoPE, SwiGLU and activation-quantization kernels against their references
on this GPU, at the model's sizes.

Usage: python benchmarks/norm_rope.py [--out FILE]
       python benchmarks/norm_rope.py --dry-run   (CPU, tiny shapes, the interpreter: the check)

For rows from a decode step (1) to a batch-32 prefill, the µs of the decoder's RMSNorm (4,096
wide), its residual add and RMSNorm in one (the plain reference: an add, then the norm), the
cross layers' q norm (128 wide, on a transposed view), RoPE on q and k (strided
views of the fused qkv projection's output), SwiGLU's silu(gate)·up (the halves of the fused
gate/up output) and the fp8
layers' per-token activation quantization at the text (4,096, 14,336) and vision (1,280, 5,120)
input widths, each as the reference's plain PyTorch ops and as the fused kernel
(`guardrt/kernels/norm_rope.py`, `silu_mul.py`, `row_quant.py`), timed as a served step runs
them (GPU time only, no launch cost: `guardrt/kernels/timer.py`), with the kernel's largest
difference from the reference. Then what one text prefill of that many rows saves: 63 residual
adds with the norm after each (two per layer of 32 self-attention layers, but the first layer's
input norm, which has nothing to add), 2 norms (that one and the final norm), 32 RoPEs of q and
k and 32 SwiGLU products; in fp8 also 32 × 4 activation quantizations (q/k/v, o, gate/up at
4,096, down at 14,336); and what the fp8 vision tower saves at that many rows (40 layers ×
q/k/v, o, fc1 at 1,280 and fc2 at 5,120; an image is 6,432 rows).
Writes the table to stdout and JSON to benchmarks/results/norm-rope-<GPU name>.json (or --out);
exits 1 if a kernel disagrees with its reference.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# decode, batch-32 decode, a text prefill, a whole prompt, an image's vision tower, 32 prompts
ROWS = (1, 32, 221, 357, 6432, 7072)
DRY_ROWS = (1, 5)
FULL = {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "intermediate": 14336,
        "vision_hidden": 1280, "vision_intermediate": 5120}  # fmt: skip
DRY = {"hidden": 128, "heads": 4, "kv_heads": 2, "head_dim": 32, "intermediate": 96,
       "vision_hidden": 32, "vision_intermediate": 64}  # fmt: skip
# The text path: 32 self-attention layers (2 norms, each after a residual add but the first
# layer's input norm; a RoPE of q and k, a SwiGLU each) and the final norm; in fp8, each layer
# quantizes 3 inputs of the hidden width (q/k/v, o, gate/up) and 1 of the intermediate width
# (down). The vision tower: 40 layers, 3 inputs of its hidden width (q/k/v, o, fc1) and 1 of
# its intermediate width (fc2).
ADD_NORMS_PER_PREFILL, NORMS_PER_PREFILL, ROPES_PER_PREFILL, SILUS_PER_PREFILL = 63, 2, 32, 32
TEXT_LAYERS, VISION_LAYERS = 32, 40


Call = Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]


def _cases(
    rows: int, size: dict[str, int], device: torch.device, dtype: torch.dtype
) -> dict[str, tuple[Call, Call]]:
    """name → (reference, fused) calls on inputs shaped as the model has them."""
    from guardrt.kernels import fused  # noqa: PLC0415 (after TRITON_INTERPRET is set)

    kernels = fused._kernels()
    hidden, heads, kv, d = size["hidden"], size["heads"], size["kv_heads"], size["head_dim"]
    x = torch.randn(1, rows, hidden, device=device).to(dtype)  # (1, S, D)
    delta = torch.randn(1, rows, hidden, device=device).to(dtype)  # a branch's output
    w = torch.ones(hidden, device=device, dtype=dtype)
    q_heads = torch.randn(1, rows, heads, d, device=device).to(dtype).transpose(1, 2)
    wq = torch.ones(d, device=device, dtype=dtype)
    qkv = torch.randn(1, rows, (heads + 2 * kv) * d, device=device).to(dtype)
    # q and k heads of the fused qkv output, (1, H + Hkv, S, d) strided: one RoPE call
    qk = qkv.view(1, rows, heads + 2 * kv, d).transpose(1, 2)[:, : heads + kv]
    gate, up = torch.randn(1, rows, 2 * size["intermediate"], device=device).to(dtype).chunk(2, -1)
    silu = fused._silu_kernel()
    angles = torch.randn(1, rows, d // 2, device=device) * 100
    cos, sin = (torch.cat((a, a), dim=-1).to(dtype) for a in (angles.cos(), angles.sin()))
    cases: dict[str, tuple[Call, Call]] = {
        f"rms_norm {hidden}": (
            lambda: fused.rms_norm_reference(x, w, 1e-5),
            lambda: kernels.rms_norm(x, w, 1e-5),
        ),
        f"add+rms_norm {hidden}": (
            lambda: fused.add_rms_norm_reference(x, delta, w, 1e-5),
            lambda: kernels.add_rms_norm(x, delta, w, 1e-5),
        ),
        f"q norm {d} (cross)": (
            lambda: fused.rms_norm_reference(q_heads, wq, 1e-5),
            lambda: kernels.rms_norm(q_heads, wq, 1e-5),
        ),
        f"silu·up {size['intermediate']}": (
            lambda: fused.silu_mul_reference(gate, up),
            lambda: silu.silu_mul(gate, up),
        ),
        "rope q+k": (
            lambda: fused.rope_reference(qk, cos, sin),
            lambda: kernels.rope(qk, cos, sin),
        ),
    }
    widths = (hidden, size["intermediate"], size["vision_hidden"], size["vision_intermediate"])
    for width in widths:
        cases[f"quantize fp8 {width}"] = _quantize_case(rows, width, device, dtype)
    return cases


def _quantize_case(
    rows: int, width: int, device: torch.device, dtype: torch.dtype
) -> tuple[Call, Call]:
    """(reference, fused) per-token e4m3 quantization of (rows, width) activations."""
    from guardrt.kernels.activation_quant import _kernel  # noqa: PLC0415
    from guardrt.kernels.fp8_linear import quantize_rows  # noqa: PLC0415

    x = (torch.randn(rows, width, device=device) * 3).to(dtype)  # (M, K)
    return functools.partial(quantize_rows, x), functools.partial(_kernel().quantize_rows, x, "fp8")


def _tensors(result: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def _us(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        from guardrt.kernels.timer import cuda_timer  # noqa: PLC0415

        return cuda_timer(run) * 1e3
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def run(dry_run: bool) -> dict[str, Any]:
    from guardrt.kernels import fused  # noqa: PLC0415
    from guardrt.kernels.activation_quant import as_bits  # noqa: PLC0415

    device = torch.device("cpu" if dry_run else "cuda")
    dtype = torch.float16 if dry_run else torch.bfloat16  # the interpreter has no bf16
    size, rows_list = (DRY, DRY_ROWS) if dry_run else (FULL, ROWS)
    cells = []
    # op name → (what it is counted as, how many a prefill runs of it)
    counts = {
        f"rms_norm {size['hidden']}": ("text", NORMS_PER_PREFILL),
        f"add+rms_norm {size['hidden']}": ("text", ADD_NORMS_PER_PREFILL),
        "rope q+k": ("text", ROPES_PER_PREFILL),
        f"silu·up {size['intermediate']}": ("text", SILUS_PER_PREFILL),
        f"quantize fp8 {size['hidden']}": ("fp8 text", 3 * TEXT_LAYERS),
        f"quantize fp8 {size['intermediate']}": ("fp8 text", TEXT_LAYERS),
        f"quantize fp8 {size['vision_hidden']}": ("fp8 vision", 3 * VISION_LAYERS),
        f"quantize fp8 {size['vision_intermediate']}": ("fp8 vision", VISION_LAYERS),
    }
    for rows in rows_list:
        saved = {"text": 0.0, "fp8 text": 0.0, "fp8 vision": 0.0}
        for name, (reference, kernel) in _cases(rows, size, device, dtype).items():
            pairs = list(zip(_tensors(kernel()), _tensors(reference()), strict=True))
            error = max(float((got.float() - want.float()).abs().max()) for got, want in pairs)
            exact = name.startswith(("rope", "quantize"))
            ok = all(
                torch.equal(as_bits(got), as_bits(want)) if exact else torch.allclose(
                    got.float(), want.float(), rtol=fused.TWO_ULPS[dtype], atol=1e-6
                ) for got, want in pairs
            )  # fmt: skip
            ref_us, fused_us = _us(reference, device), _us(kernel, device)
            if name in counts:
                kind, count = counts[name]
                saved[kind] += count * (ref_us - fused_us)
            cells.append({"rows": rows, "op": name, "reference_us": ref_us, "fused_us": fused_us,
                          "max_abs_diff": error, "ok": ok})  # fmt: skip
            check = "OK" if ok else "WRONG"
            ratio = ref_us / max(fused_us, 1e-9)
            print(f"| {rows} | {name} | {ref_us:.1f} | {fused_us:.1f} | {ratio:.1f}x "
                  f"| {error:.2g} | {check} |")  # fmt: skip
        cells.append({"rows": rows, "op": "saved per text prefill", "saved_us": saved["text"]})
        cells.append({"rows": rows, "op": "saved per fp8 text prefill, activation quantization",
                      "saved_us": saved["fp8 text"]})  # fmt: skip
        cells.append({"rows": rows, "op": "saved per fp8 vision tower, activation quantization",
                      "saved_us": saved["fp8 vision"]})  # fmt: skip
        what = (f"{ADD_NORMS_PER_PREFILL} adds + norms, {NORMS_PER_PREFILL} norms, "
                f"{ROPES_PER_PREFILL} RoPEs, {SILUS_PER_PREFILL} SwiGLUs")  # fmt: skip
        print(f"| {rows} | saved per text prefill ({what}) | | {saved['text']:.0f} µs | | | |")
        print(f"| {rows} | saved per fp8 text prefill ({4 * TEXT_LAYERS} quantizations) | "
              f"| {saved['fp8 text']:.0f} µs | | | |")  # fmt: skip
        print(f"| {rows} | saved per fp8 vision tower ({4 * VISION_LAYERS} quantizations) | "
              f"| {saved['fp8 vision']:.0f} µs | | | |")  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    return {"device": name, "torch": torch.__version__, "dtype": str(dtype), "cells": cells}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--out", type=Path, help="JSON path (dry run: none unless given)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreter")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --dry-run)")
    print("| rows | op | reference µs | fused µs | ratio | max |Δ| | check |")
    print("|---|---|---|---|---|---|---|")
    report = run(args.dry_run)
    out = args.out
    if out is None and not args.dry_run:
        out = Path("benchmarks/results") / f"norm-rope-{report['device'].replace(' ', '-')}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    wrong = [c for c in report["cells"] if c.get("ok") is False]
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
