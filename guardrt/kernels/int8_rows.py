"""Up to how many rows each int8 layer runs the Triton kernel: measured on the GPU at load.

Below some step size the weight-only kernel wins (it reads 1 byte a weight where the other
path casts to 2 and reads those again); above it, cast-then-cuBLAS (`int8_cast.py`, or, with
quantized activations, `_int_mm`) wins. Where that crossover lies depends on the GPU, the
layer's shape and the Triton build, so it is measured, not guessed: for each distinct int8 layer
shape the engine times both paths at the step sizes of `ROWS` and gives every layer of that
shape the largest size up to which the kernel was the faster at every size measured. The
kernel's output is checked against the reference first; a kernel that is wrong on this GPU is
never used (limit 0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from guardrt.export.quantize import QuantizedLinear
from guardrt.kernels.device import cuda_capability, triton_available, triton_runs
from guardrt.kernels.dispatch import FAST_DTYPES, _int8_module, run_fast_path
from guardrt.kernels.timer import Timer, cuda_timer, on_device

# The step sizes measured: a decode step, category steps, prefill widths of short and long
# prompts (a text verdict past the shared policy head is ~220 tokens).
ROWS = (1, 16, 64, 128, 256, 512)
# The kernel's output against the reference's, max |Δ| / max |reference|: both accumulate in
# fp32, so they differ by output rounding (2⁻⁸ in bf16), not by this much unless broken.
_TOLERANCE = 2e-2


@dataclass(frozen=True)
class RowsTuning:
    """What was measured: per layer shape "N×K", the limit set, the kernel's block shapes by
    rows per program, each size's times (ms) by path, and why a shape's kernel was refused."""

    limits: dict[str, int] = field(default_factory=dict)
    blocks: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
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


def _kernel(layer: QuantizedLinear, x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The Triton kernel on x (M, K) with (block_n, block_k) = `block`."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    blocks = {_int8_module().block_m(x.shape[0]): block}
    return run_fast_path("int8_triton", x, layer.qweight, layer.scales, bias, blocks)


def _wrong(
    layer: QuantizedLinear, x: torch.Tensor, expected: torch.Tensor, block: tuple[int, int]
) -> str | None:
    """Why the kernel with `block` fails or is wrong on x; None when it matches the reference."""
    try:
        got = _kernel(layer, x, block).float()
    except Exception as exc:  # noqa: BLE001 (a kernel that fails to build or run here is refused)
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    error = float((got - expected).abs().max())
    scale = max(float(expected.abs().max()), 1e-6)
    if not error / scale <= _TOLERANCE:  # NaN fails too
        return f"max |Δ| / max |reference| {error / scale:.3g}"
    return None


def _forward_with(
    layer: QuantizedLinear, x: torch.Tensor, setting: str, value: object
) -> torch.Tensor:
    """The layer's forward on x with one of its settings changed for the call."""
    saved = getattr(layer, setting)
    setattr(layer, setting, value)
    try:
        result: torch.Tensor = layer(x)
    finally:
        setattr(layer, setting, saved)
    return result


def _otherwise(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """What the layer runs on x when the kernel declines (the weight cast for cuBLAS, or
    `_int_mm`)."""
    return _forward_with(layer, x, "triton_rows", 0)


def _reference(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    return _forward_with(layer, x, "force_reference", True)


@dataclass(frozen=True)
class _Measured:
    limit: int  # the most rows the kernel takes (0: none)
    blocks: dict[int, tuple[int, int]]  # the fastest (block_n, block_k) by rows per program
    times: dict[int, dict[str, float]]  # ms by rows, then path (and each block shape tried)
    refused: str | None = None  # why the kernel is never used


def _measure(
    layer: QuantizedLinear, dtype: torch.dtype, rows: Iterable[int], timer: Timer
) -> _Measured:
    """Time the kernel (each block shape, the first time a rows-per-program bucket comes up)
    against what the layer runs otherwise, size by size, until the kernel loses."""
    device, k = layer.qweight.device, layer.in_features
    generator = torch.Generator(device=device).manual_seed(0)
    limit = 0
    blocks: dict[int, tuple[int, int]] = {}
    times: dict[int, dict[str, float]] = {}
    for m in sorted(rows):
        x = torch.randn((m, k), generator=generator, device=device, dtype=dtype)  # (M, K)
        expected = _reference(layer, x).float()
        bucket = _int8_module().block_m(m)
        tried = [blocks[bucket]] if bucket in blocks else list(_int8_module().BLOCKS)
        timed: dict[tuple[int, int], float] = {}
        wrong: dict[tuple[int, int], str] = {}
        for block in tried:
            why = _wrong(layer, x, expected, block)
            if why is None:
                timed[block] = timer(functools.partial(_kernel, layer, x, block))
            else:
                wrong[block] = why
        if not timed:
            reasons = "; ".join(f"blocks {b}: {why}" for b, why in wrong.items())
            return _Measured(0, {}, times, f"{m} rows: {reasons}")
        best = min(timed, key=lambda b: timed[b])
        blocks[bucket] = best
        times[m] = {f"int8_triton {bn}x{bk}": ms for (bn, bk), ms in timed.items()}
        times[m] |= {f"int8_triton {bn}x{bk}": math.nan for (bn, bk) in wrong}
        times[m] |= {
            "int8_triton": timed[best],
            "otherwise": timer(functools.partial(_otherwise, layer, x)),
        }
        if times[m]["int8_triton"] >= times[m]["otherwise"]:
            break
        limit = m
    return _Measured(
        limit, {b: blocks[b] for b in blocks if b <= _int8_module().block_m(max(limit, 1))}, times
    )


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
        if not triton_runs(capability, triton_available()) or dtype not in FAST_DTYPES:
            return RowsTuning()
    groups: dict[tuple[int, int, bool], list[QuantizedLinear]] = {}
    for layer in kernel_layers:
        key = (layer.out_features, layer.in_features, layer.activations)
        groups.setdefault(key, []).append(layer)
    tuning = RowsTuning()
    for (n, k, activations), group in groups.items():
        name = f"{n}×{k}" + (" (weight+activation)" if activations else "")
        with on_device(group[0].qweight.device):  # the timer times the current CUDA device
            measured = _measure(group[0], dtype, rows, timer or cuda_timer)
        tuning.limits[name], tuning.timings_ms[name] = measured.limit, measured.times
        tuning.blocks[name] = measured.blocks
        if measured.refused is not None:
            tuning.refused[name] = measured.refused
        for layer in group:
            layer.triton_rows, layer.triton_blocks = measured.limit, dict(measured.blocks)
    return tuning
