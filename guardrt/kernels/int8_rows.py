"""Up to how many rows each int8 layer runs the Triton kernel: measured on the GPU at load.

Below some step size the weight-only kernel wins (it reads 1 byte a weight where the reference
dequantizes to 2 and reads those again); above it, dequantize-then-cuBLAS (or, with quantized
activations, `_int_mm`) wins. Where that crossover lies depends on the GPU, the layer's shape and
the Triton build, so it is measured, not guessed: for each distinct int8 layer shape the engine
times both paths at the step sizes of `ROWS` and gives every layer of that shape the largest size
up to which the kernel was the faster at every size measured. The kernel's output is checked
against the reference first; a kernel that is wrong on this GPU is never used (limit 0).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from guardrt.export.quantize import QuantizedLinear
from guardrt.kernels.dispatch import (
    FAST_DTYPES,
    TRITON_MIN_CAPABILITY,
    cuda_capability,
    run_fast_path,
    triton_available,
)
from guardrt.kernels.timer import Timer, cuda_timer

# The step sizes measured: a decode step, category steps, prefill widths of short and long
# prompts (a text verdict past the shared policy head is ~220 tokens).
ROWS = (1, 16, 64, 128, 256, 512)
# The kernel's output against the reference's, max |Δ| / max |reference|: both accumulate in
# fp32, so they differ by output rounding (2⁻⁸ in bf16), not by this much unless broken.
_TOLERANCE = 2e-2


@dataclass(frozen=True)
class RowsTuning:
    """What was measured: per layer shape "N×K", the limit set, each size's times (ms) by path,
    and why a shape's kernel was refused."""

    limits: dict[str, int] = field(default_factory=dict)
    timings_ms: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def _kernel_layers(layers: Iterable[torch.nn.Module]) -> list[QuantizedLinear]:
    return [
        layer
        for layer in layers
        if isinstance(layer, QuantizedLinear)
        and layer.qweight.dtype == torch.int8
        and layer.scales.numel() == layer.out_features  # per-channel: what the kernel takes
        and not layer.force_reference
    ]


def _kernel(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """The Triton kernel on x (M, K)."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return run_fast_path("int8_triton", x, layer.qweight, layer.scales, bias)


def _otherwise(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """What the layer runs on x when the kernel declines (reference, or `_int_mm`)."""
    saved, layer.triton_rows = layer.triton_rows, 0
    try:
        result: torch.Tensor = layer(x)
    finally:
        layer.triton_rows = saved
    return result


def _reference(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    layer.force_reference = True
    try:
        result: torch.Tensor = layer(x)
    finally:
        layer.force_reference = False
    return result


def _measure(
    layer: QuantizedLinear, dtype: torch.dtype, rows: Iterable[int], timer: Timer
) -> tuple[int, dict[int, dict[str, float]], str | None]:
    """(limit, times by size and path, why refused) for one layer."""
    device, k = layer.qweight.device, layer.in_features
    generator = torch.Generator(device=device).manual_seed(0)
    limit = 0
    times: dict[int, dict[str, float]] = {}
    for m in sorted(rows):
        x = torch.randn((m, k), generator=generator, device=device, dtype=dtype)  # (M, K)
        expected = _reference(layer, x).float()
        try:
            got = _kernel(layer, x).float()
        except Exception as exc:  # noqa: BLE001 (a kernel that fails to build or run here is refused)
            return 0, times, f"{m} rows: {type(exc).__name__}: {str(exc)[:200]}"
        error = float((got - expected).abs().max())
        scale = max(float(expected.abs().max()), 1e-6)
        if not error / scale <= _TOLERANCE:  # NaN fails too
            return 0, times, f"{m} rows: max |Δ| / max |reference| {error / scale:.3g}"
        times[m] = {
            "int8_triton": timer(functools.partial(_kernel, layer, x)),
            "otherwise": timer(functools.partial(_otherwise, layer, x)),
        }
        if times[m]["int8_triton"] >= times[m]["otherwise"]:
            break
        limit = m
    return limit, times, None


@torch.inference_mode()
def tune(
    layers: Iterable[torch.nn.Module],
    dtype: torch.dtype,
    timer: Timer | None = None,
    rows: Iterable[int] = ROWS,
) -> RowsTuning:
    """Measure each distinct int8 layer shape among `layers` (those that run: the fused ones,
    `fuse.modules_in_use`) with `dtype` activations and set every such layer's `triton_rows`.
    Only on a CUDA device with triton importable, unless a `timer` is given (the tests')."""
    kernel_layers = _kernel_layers(layers)
    if not kernel_layers:
        return RowsTuning()
    if timer is None:  # on a GPU where the dispatch would consider the kernel at all
        capability = cuda_capability(kernel_layers[0].qweight.device)
        if (
            capability is None
            or capability < TRITON_MIN_CAPABILITY
            or dtype not in FAST_DTYPES
            or not triton_available()
        ):
            return RowsTuning()
    groups: dict[tuple[int, int, bool], list[QuantizedLinear]] = {}
    for layer in kernel_layers:
        key = (layer.out_features, layer.in_features, layer.activations)
        groups.setdefault(key, []).append(layer)
    tuning = RowsTuning()
    for (n, k, activations), group in groups.items():
        name = f"{n}×{k}" + (" (weight+activation)" if activations else "")
        limit, times, why = _measure(group[0], dtype, rows, timer or cuda_timer)
        tuning.limits[name], tuning.timings_ms[name] = limit, times
        if why is not None:
            tuning.refused[name] = why
        for layer in group:
            layer.triton_rows = limit
    return tuning
