"""Fused projections: q/k/v of each self-attention layer and gate/up of each MLP as one matmul
(the vision tower's q/k/v too).

A batch-1 step is a chain of small matmuls; one (6144 × 4096) matmul instead of three, and one
(28672 × 4096) instead of two, halves the launches of those layers and lets each read its weights
in one pass. The checkpoint's names stay: the fused weight is allocated once and the separate
modules' weights become views into it, so loading, export, the transformers baseline (which shares
our tensors) and the state dict see the same parameters, and no weight is stored twice.

Works for `nn.Linear` (no bias) and for per-channel or per-group `QuantizedLinear` (8-bit rows and
their scales concatenate along the output channels). Fuse after the model is on its device and
quantized (and with the layers' compute settings made): moving the model afterwards would move the
views, not the fused tensor, and the fused modules are not among `model.modules()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from guardrt.export.quantize import QuantizedLinear, QuantizedWeight
from guardrt.runtime.model.text import MLP, SelfAttention
from guardrt.runtime.model.vision import VisionAttention


def _fused_linear(parts: Sequence[nn.Linear]) -> nn.Linear:
    first = parts[0]
    weight = torch.cat([part.weight.detach() for part in parts])  # (Σ out, in)
    fused = nn.Linear(first.in_features, weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    views = torch.split(weight, [p.out_features for p in parts])
    for part, view in zip(parts, views, strict=True):
        part.weight = nn.Parameter(view, requires_grad=False)  # a view: no second copy
    return fused


def _fused_quantized(parts: Sequence[QuantizedLinear]) -> QuantizedLinear:
    sizes = [part.out_features for part in parts]
    qweight = torch.cat([part.qweight for part in parts])  # (Σ out, in) 8-bit
    scales = torch.cat([part.scales for part in parts])  # (Σ out, groups) fp32
    fused = QuantizedLinear(QuantizedWeight(qweight, scales, parts[0].group_size), None)
    fused.activations, fused.force_reference = parts[0].activations, parts[0].force_reference
    pairs = zip(parts, torch.split(qweight, sizes), torch.split(scales, sizes), strict=True)
    for part, q, s in pairs:
        part.qweight, part.scales = q, s  # views into the fused buffers
    return fused


def fuse_linears(parts: Sequence[nn.Module]) -> nn.Module | None:
    """One module computing `cat([p(x) for p in parts], -1)`, the parts' weights turned into
    views of its weight; None (nothing changed) when the parts can't be fused (biases, mixed
    kinds, different inputs or group sizes)."""
    if all(type(p) is nn.Linear and p.bias is None for p in parts):
        linears = [p for p in parts if isinstance(p, nn.Linear)]
        if len({(p.in_features, p.weight.dtype, p.weight.device) for p in linears}) == 1:
            return _fused_linear(linears)
        return None
    if all(isinstance(p, QuantizedLinear) and p.bias is None for p in parts):
        quantized = [p for p in parts if isinstance(p, QuantizedLinear)]
        keys = {
            (p.in_features, p.group_size, p.qweight.dtype, p.qweight.device, p.activations,
             p.force_reference)
            for p in quantized
        }  # fmt: skip
        if len(keys) == 1:
            return _fused_quantized(quantized)
    return None


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v of every self-attention layer (decoder and vision tower) and gate/up of every
    decoder MLP, in place; returns how many groups were fused. Idempotent."""
    fused = 0
    for module in model.modules():
        if isinstance(module, SelfAttention | VisionAttention) and module.qkv is None:
            qkv = fuse_linears([module.q_proj, module.k_proj, module.v_proj])
            if qkv is not None:
                module.fuse(qkv)
                fused += 1
        elif isinstance(module, MLP) and module.gate_up is None:
            gate_up = fuse_linears([module.gate_proj, module.up_proj])
            if gate_up is not None:
                module.fuse(gate_up)
                fused += 1
    return fused


def modules_in_use(model: nn.Module) -> list[nn.Module]:
    """The modules a forward runs: `model.modules()` with each fused group's parts replaced by
    the fused module (the parts are views, never called; the fused modules are outside the
    module tree)."""
    parts: set[int] = set()
    fused: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, SelfAttention | VisionAttention) and module.qkv is not None:
            parts |= {id(module.q_proj), id(module.k_proj), id(module.v_proj)}
            fused.append(module.qkv)
        elif isinstance(module, MLP) and module.gate_up is not None:
            parts |= {id(module.gate_proj), id(module.up_proj)}
            fused.append(module.gate_up)
    return [m for m in model.modules() if id(m) not in parts] + fused
