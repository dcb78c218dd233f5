"""int8 weight quantization: one implementation for the export path and the GPU engine.

Two steps, as in gpt-fast: `quantize_weight` makes symmetric int8 weights with per-output-channel
(or per-group) fp32 scales offline; `quantize_linears` swaps a model's `nn.Linear`s for
`Int8Linear`s holding them. `Int8Linear`'s forward here is the plain-PyTorch reference
(dequantize, then matmul); fused kernels reading int8 directly come with the GPU engine and are
tested against it.

Symmetric, zero-point free: w ≈ scale · q with q = round(w / scale) ∈ [-127, 127] and
scale = max|w| / 127 over the channel (or group of `group_size` input columns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

QMAX = 127


@dataclass(frozen=True)
class QuantizedWeight:
    qweight: torch.Tensor  # int8 (out, in)
    scales: torch.Tensor  # fp32 (out, groups); groups = 1 for per-channel
    group_size: int  # input columns per scale (= in for per-channel)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) weights in `dtype`: scale · q, group by group."""
        out, columns = self.qweight.shape
        grouped = self.qweight.view(out, -1, self.group_size).to(torch.float32)  # (out, g, gs)
        return (grouped * self.scales[..., None]).reshape(out, columns).to(dtype)


def quantize_weight(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """Symmetric int8 of an (out, in) weight, per output channel or per `group_size` columns."""
    out, columns = weight.shape
    size = columns if group_size is None else group_size
    if columns % size:
        raise ValueError(f"group size {size} does not divide the {columns} input columns")
    grouped = weight.detach().to(torch.float32).reshape(out, columns // size, size)
    scales = grouped.abs().amax(dim=-1) / QMAX  # (out, groups)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero rows stay 0
    q = torch.clamp(torch.round(grouped / scales[..., None]), -QMAX, QMAX).to(torch.int8)
    return QuantizedWeight(q.reshape(out, columns), scales, size)


class Int8Linear(nn.Module):
    """A bias-free or biased Linear whose weight is int8 with fp32 scales (reference forward)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.group_size = weight.group_size
        self.qweight: torch.Tensor
        self.scales: torch.Tensor
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.in_features, self.out_features = weight.qweight.shape[1], weight.qweight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = QuantizedWeight(self.qweight, self.scales, self.group_size)
        return nn.functional.linear(x, weight.dequantize(x.dtype), self.bias)


@dataclass(frozen=True)
class QuantizationReport:
    layers: int  # Linear layers swapped
    int8_bytes: int  # int8 weights + fp32 scales
    original_bytes: int  # the same weights as they were
    worst_layer_error: float  # max over layers of max|w - ŵ| / max|w|


def quantize_linears(
    model: nn.Module,
    *,
    group_size: int | None = None,
    keep: Callable[[str], bool] = lambda name: False,
) -> QuantizationReport:
    """Swap every `nn.Linear` of `model` (except those `keep(name)` is true for) for an
    `Int8Linear`, in place."""
    swapped, int8_bytes, original_bytes, worst = 0, 0, 0, 0.0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or keep(full):
                continue
            columns = child.in_features
            size = group_size if group_size is not None and columns % group_size == 0 else None
            quantized = quantize_weight(child.weight, size)
            original = child.weight.detach().float()
            error = (quantized.dequantize() - original).abs().max()
            scale = original.abs().max().clamp_min(1e-12)
            worst = max(worst, float(error / scale))
            setattr(module, child_name, Int8Linear(quantized, child.bias))
            swapped += 1
            int8_bytes += quantized.qweight.numel() + 4 * quantized.scales.numel()
            original_bytes += child.weight.numel() * child.weight.element_size()
    return QuantizationReport(swapped, int8_bytes, original_bytes, worst)


@dataclass(frozen=True)
class Deviation:
    """How far a quantized model is from the reference, over a set of inputs."""

    max_relative_logit_error: float  # max|Δlogit| / max|logit| over all compared positions
    max_abs_delta_p_unsafe: float  # max |ΔP(unsafe)| over the verdict positions


def deviation(
    reference: Iterable[torch.Tensor], candidate: Iterable[torch.Tensor], unsafe_id: int
) -> Deviation:
    """Compare matching (positions, vocab) logits; the last row of each is the verdict row."""
    worst_logit, worst_p = 0.0, 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        if not torch.isfinite(cand).all():
            raise ValueError("the candidate model produced non-finite logits")
        scale = float(ref.abs().max())
        worst_logit = max(worst_logit, float((cand - ref).abs().max()) / max(scale, 1e-12))
        p_ref = torch.softmax(ref[-1].float(), -1)[unsafe_id]
        p_cand = torch.softmax(cand[-1].float(), -1)[unsafe_id]
        worst_p = max(worst_p, abs(float(p_cand - p_ref)))
    return Deviation(worst_logit, worst_p)
