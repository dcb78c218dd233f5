"""Weight quantization (int8, fp8): one implementation for the export path and the GPU engine.

Two steps, as in gpt-fast: `quantize_weight` makes symmetric 8-bit weights with per-output-channel
(or per-group) fp32 scales offline; `quantize_linears` swaps a model's `nn.Linear`s for
`QuantizedLinear`s holding them. The forward dequantizes through one custom op,
`guardrt::dequantize` (plain PyTorch here, the reference for fused kernels later); the ONNX
exporter translates it to a `DequantizeLinear` on the stored 8-bit weight (`onnx_ops.py`), so
exported graphs keep the weights in 8 bits.

Symmetric, zero-point free: w ≈ scale · q with scale = max|w| / QMAX over the channel (or group
of `group_size` input columns). int8: q = round(w / scale) ∈ [-127, 127]. fp8 (e4m3, QMAX 448):
q = w / scale rounded to the nearest e4m3 value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from guardrt.kernels.dispatch import INT8_TRITON_MAX_ROWS, run_fast_path, select_path

QuantKind = Literal["int8", "fp8"]
QMAX = 127
QMAX_BY_KIND: dict[QuantKind, float] = {"int8": 127.0, "fp8": 448.0}
STORAGE_BY_KIND: dict[QuantKind, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


@torch.library.custom_op("guardrt::dequantize", mutates_args=())
def dequantize(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 (out, in) = scale · q for 8-bit q (out, in) and fp32 scales (out, groups)."""
    out, columns = qweight.shape
    grouped = qweight.view(out, scales.shape[1], -1).to(torch.float32)  # (out, g, in/g)
    return (grouped * scales[..., None]).reshape(out, columns)


@dequantize.register_fake
def _(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.new_empty(qweight.shape, dtype=torch.float32)


@dataclass(frozen=True)
class QuantizedWeight:
    qweight: torch.Tensor  # int8 or float8_e4m3fn (out, in)
    scales: torch.Tensor  # fp32 (out, groups); groups = 1 for per-channel
    group_size: int  # input columns per scale (= in for per-channel)

    @property
    def kind(self) -> QuantKind:
        return "int8" if self.qweight.dtype == torch.int8 else "fp8"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) weights in `dtype`: scale · q, group by group."""
        result: torch.Tensor = torch.ops.guardrt.dequantize(self.qweight, self.scales)
        return result.to(dtype)


# Rows are quantized a chunk at a time: the fp32 temporaries of a chunk stay ~64 MB however
# large the weight (the token embedding is 525 M weights, 2.1 GB in fp32 at once), and a weight
# mapped from a file reaches the device one chunk at a time, never whole in full precision.
_CHUNK_ELEMENTS = 1 << 24


def quantize_weight(
    weight: torch.Tensor,
    group_size: int | None = None,
    kind: QuantKind = "int8",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Symmetric 8-bit `kind` of an (out, in) weight, per output channel or per `group_size`
    columns, on `device` (the weight's by default), from the weight cast to `dtype` (its own by
    default) as the model would hold it."""
    return quantize_measured(weight, group_size, kind, device=device, dtype=dtype)[0]


def quantize_measured(
    weight: torch.Tensor,
    group_size: int | None = None,
    kind: QuantKind = "int8",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[QuantizedWeight, float]:
    """`quantize_weight`, and how far it moved the weight: max |ŵ − w| / max |w|. Rows go a
    chunk at a time (`_CHUNK_ELEMENTS`), each moved to `device` and cast to `dtype` first;
    rows (and their groups) are quantized independently, so chunking changes no value."""
    out, columns = weight.shape
    size = columns if group_size is None else group_size
    if columns % size:
        raise ValueError(f"group size {size} does not divide the {columns} input columns")
    if kind not in QMAX_BY_KIND:
        raise ValueError(f"quantization kind {kind!r} is not one of {', '.join(QMAX_BY_KIND)}")
    qmax = QMAX_BY_KIND[kind]
    target = weight.device if device is None else torch.device(device)
    q = torch.empty((out, columns), dtype=STORAGE_BY_KIND[kind], device=target)
    scales = torch.empty((out, columns // size), dtype=torch.float32, device=target)
    error = torch.zeros((), device=target)  # max |ŵ − w| so far
    magnitude = torch.zeros((), device=target)  # max |w| so far
    step = max(1, _CHUNK_ELEMENTS // max(columns, 1))
    for start in range(0, out, step):
        rows = weight[start : start + step].detach().to(device=target, dtype=dtype or weight.dtype)
        grouped = rows.to(torch.float32).reshape(-1, columns // size, size)  # (r, groups, size)
        chunk_scales = grouped.abs().amax(dim=-1) / qmax  # (r, groups)
        chunk_scales = torch.where(chunk_scales > 0, chunk_scales, torch.ones_like(chunk_scales))
        scaled = torch.clamp(grouped / chunk_scales[..., None], -qmax, qmax)
        chunk_q = (torch.round(scaled) if kind == "int8" else scaled).to(STORAGE_BY_KIND[kind])
        q[start : start + step] = chunk_q.reshape(-1, columns)
        scales[start : start + step] = chunk_scales
        restored = chunk_q.to(torch.float32) * chunk_scales[..., None]  # = `dequantize`
        error = torch.maximum(error, (restored - grouped).abs().amax())
        magnitude = torch.maximum(magnitude, grouped.abs().amax())
    return QuantizedWeight(q, scales, size), float(error / magnitude.clamp_min(1e-12))


class QuantizedLinear(nn.Module):
    """A bias-free or biased Linear whose weight is 8-bit with fp32 scales.

    The forward runs a fast GPU kernel where `guardrt.kernels.dispatch.select_path` finds one (the
    int8 Triton kernel for few rows, fp8 `_scaled_mm`) and the reference otherwise: dequantize to
    the input's dtype, then `F.linear`. Tracers and exporters always see the reference.
    `force_reference` (settable on a built layer) pins the reference, for parity checks and
    benchmarks. `activations` (int8, settable too) allows quantizing the activations per token
    for steps too large for the weight-only kernel ("weight+activation" compute, `torch._int_mm`
    on the int8 tensor cores); off by default, as the export's default is weight-only.
    """

    def __init__(
        self, weight: QuantizedWeight, bias: torch.Tensor | None, *, force_reference: bool = False
    ) -> None:
        super().__init__()
        self.force_reference = force_reference
        self.activations = False
        # The most rows (tokens) the int8 Triton kernel takes for this layer, and its block
        # shapes by rows per program; set per shape from measurements on the GPU
        # (`guardrt/kernels/int8_rows.py`).
        self.triton_rows = INT8_TRITON_MAX_ROWS
        self.triton_blocks: dict[int, tuple[int, int]] = {}
        self.group_size = weight.group_size
        self.qweight: torch.Tensor
        self.scales: torch.Tensor
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.in_features, self.out_features = weight.qweight.shape[1], weight.qweight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → (..., out) in x's dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        path = (
            "reference"
            if self.force_reference
            else select_path(x, self.qweight, self.scales, self.activations, self.triton_rows)
        )
        if path != "reference":
            return run_fast_path(path, x, self.qweight, self.scales, bias, self.triton_blocks)
        weight = QuantizedWeight(self.qweight, self.scales, self.group_size)
        return nn.functional.linear(x, weight.dequantize(x.dtype), bias)


@dataclass(frozen=True)
class QuantizationReport:
    layers: int  # Linear layers swapped
    int8_bytes: int  # 8-bit weights + fp32 scales
    original_bytes: int  # the same weights as they were
    worst_layer_error: float  # max over layers of max|w - ŵ| / max|w|

    def __add__(self, other: QuantizationReport) -> QuantizationReport:
        return QuantizationReport(
            self.layers + other.layers,
            self.int8_bytes + other.int8_bytes,
            self.original_bytes + other.original_bytes,
            max(self.worst_layer_error, other.worst_layer_error),
        )


@dataclass(frozen=True)
class _Swap:
    """A child's 8-bit weight, how far quantizing moved it, the bytes it had in the dtype the
    model holds, and the module that replaces the child."""

    weight: QuantizedWeight
    error: float
    original_bytes: int
    replacement: nn.Module


def _swap_children(
    model: nn.Module, convert: Callable[[str, nn.Module], _Swap | None]
) -> QuantizationReport:
    """Replace, in place, every child module `convert(full name, child)` returns a swap for;
    the report counts what was swapped and how far each weight moved."""
    swapped, int8_bytes, original_bytes, worst = 0, 0, 0, 0.0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            swap = convert(f"{name}.{child_name}" if name else child_name, child)
            if swap is None:
                continue
            setattr(module, child_name, swap.replacement)
            swapped += 1
            int8_bytes += swap.weight.qweight.numel() + 4 * swap.weight.scales.numel()
            original_bytes += swap.original_bytes
            worst = max(worst, swap.error)
    return QuantizationReport(swapped, int8_bytes, original_bytes, worst)


def _held_bytes(weight: torch.Tensor, dtype: torch.dtype | None) -> int:
    return weight.numel() * (dtype or weight.dtype).itemsize


def quantize_linears(
    model: nn.Module,
    *,
    group_size: int | None = None,
    kind: QuantKind = "int8",
    keep: Callable[[str], bool] = lambda name: False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> QuantizationReport:
    """Swap every `nn.Linear` of `model` (except those `keep(name)` is true for) for a
    `QuantizedLinear`, in place; its 8-bit weight (and bias, cast to `dtype`) on `device` (each
    layer's own device by default)."""

    def convert(name: str, child: nn.Module) -> _Swap | None:
        if not isinstance(child, nn.Linear) or keep(name):
            return None
        columns = child.in_features
        size = group_size if group_size is not None and columns % group_size == 0 else None
        quantized, error = quantize_measured(child.weight, size, kind, device=device, dtype=dtype)
        bias = None
        if child.bias is not None:
            bias = child.bias.detach().to(quantized.qweight.device, dtype or child.bias.dtype)
        return _Swap(
            quantized, error, _held_bytes(child.weight, dtype), QuantizedLinear(quantized, bias)
        )

    return _swap_children(model, convert)


class QuantizedEmbedding(nn.Module):
    """An `nn.Embedding` whose table is int8 with one fp32 scale per row (`quantize_weight` of
    the (rows, dim) table, per output channel): a lookup dequantizes the rows it reads, exactly
    as dequantizing the whole table would, into the table's original dtype."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        if weight.scales.shape[1] != 1:
            raise ValueError("an embedding table takes one scale per row, not per group")
        self.dtype = dtype
        self.qweight: torch.Tensor
        self.scales: torch.Tensor
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.num_embeddings, self.embedding_dim = weight.qweight.shape

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) int64 → (..., dim) in the table's original dtype."""
        rows = self.qweight[ids].to(torch.float32) * self.scales[ids]  # (..., dim) · (..., 1)
        return rows.to(self.dtype)


def keeps_full_precision(name: str) -> bool:
    """The head stays in the model's dtype: P(unsafe) is its softmax over the whole vocabulary."""
    return name.endswith("lm_head")


# The token embedding's table is 525 M parameters (1.05 GB in bf16): as int8 it takes the
# engine's int8 weights from 11.8 GB to 11.3 GB, under the 13 GB batch-1 target with room.
_QUANTIZED_EMBEDDINGS = ("embed_tokens",)


def quantize_embeddings(
    model: nn.Module,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> QuantizationReport:
    """Swap the token embedding (`nn.Embedding`s named `embed_tokens`) for an int8
    `QuantizedEmbedding`, in place, on `device`, looking rows up in `dtype` (the table's own by
    default). Lookups read a few rows, so this saves memory, not time."""

    def convert(name: str, child: nn.Module) -> _Swap | None:
        if (
            not isinstance(child, nn.Embedding)
            or name.rsplit(".", 1)[-1] not in _QUANTIZED_EMBEDDINGS
        ):
            return None
        table = child.weight
        quantized, error = quantize_measured(table, None, "int8", device=device, dtype=dtype)
        replacement = QuantizedEmbedding(quantized, dtype or table.dtype)  # one scale per row
        return _Swap(quantized, error, _held_bytes(table, dtype), replacement)

    return _swap_children(model, convert)


def quantize_model(
    model: nn.Module,
    kind: QuantKind,
    activations: bool = False,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    keep: Callable[[str], bool] | None = None,
) -> QuantizationReport:
    """A whole model's linears (the head kept, and those `keep(name)` is true for) as 8-bit
    per-channel `kind`, and for int8 the
    token embedding too, as the torch engine serves them and the benchmark measures them;
    `activations`: int8 layers may quantize their activations too ("weight+activation"
    compute). With `device` / `dtype`, the 8-bit weights are made there from the weights cast
    to `dtype`, a chunk at a time (`load_model(quantize=...)`: a checkpoint mapped from disk is
    quantized onto the GPU without ever being there whole in bf16). The export's engines are
    quantized by this too, so an exported engine holds what the torch engine serves."""
    kept = keeps_full_precision if keep is None else (
        lambda name: keeps_full_precision(name) or keep(name)
    )  # fmt: skip
    report = quantize_linears(model, kind=kind, keep=kept, device=device, dtype=dtype)
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear):
            layer.activations = activations
    if kind != "int8":  # e4m3's 3 mantissa bits would move every token's embedding ~3%
        return report
    return report + quantize_embeddings(model, device=device, dtype=dtype)
