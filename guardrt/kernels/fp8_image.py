"""Which of an fp8 model's image products stay in bf16: measured on the GPU before quantizing.

An image's products always see thousands of rows (the vision tower's 6,432 for a 4-tile image;
the projector's and the cross layers' k/v 6,404), at widths where fp8, with the per-token
quantization of its activations, can lose to bf16. On an H200 (2026-11-29,
benchmarks/results/h200-2026-11-29/kernels.txt, at those rows) fp8 took 63 µs against bf16's
37 for the tower's 1,280×1,280 products, 131 against 114 for its 1,280×5,120 fc2, 125 against
127 for its fc1 and 106 against 80 for the cross k/v; its image verdicts were 1.17× bf16's
(the profile: 8.2 ms of the tower's quantizations alone). So when an fp8 model loads on a GPU,
each distinct shape of these products is timed both ways on random data of the image's rows,
as a served step runs it (`timer.cuda_timer`), before anything is quantized, and the layers of
the shapes where fp8 is not faster keep their bf16 weights (their 8-bit copy would take half
the memory: the tower's 0.9 B parameters are ~0.9 GB more in bf16).

The decoder's per-token products are not candidates: their rows run from a decode step's 1 to
a prefill's hundreds in the same layer, and fp8 wins on the whole there (6.8 against 8.0 ms of
GPU time for a text verdict, same run). On the CPU, or in an fp32 model, nothing is measured
and every product is quantized, as before.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from guardrt.export.quantize import QuantizedLinear, quantize_weight
from guardrt.kernels.dispatch import FAST_DTYPES
from guardrt.kernels.timer import Timer, cuda_timer, on_device

if TYPE_CHECKING:  # a type only (the model's module names this one's choice)
    from guardrt.runtime.model.mllama import MllamaModel


@dataclass(frozen=True)
class Product:
    """One image product's shape: (out, in) features, the rows a 4-tile image gives it (at the
    model's most tiles) and whether it adds a bias."""

    out_features: int
    in_features: int
    rows: int
    bias: bool

    @property
    def name(self) -> str:
        return f"{self.out_features}×{self.in_features} at {self.rows} rows"


@dataclass(frozen=True)
class Fp8ImageChoice:
    """What was measured: the layers kept in bf16, and per product shape the ms of each way (or
    why fp8 could not run)."""

    kept: frozenset[str] = frozenset()  # layer names
    timings_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # shape → why fp8 failed there
    measured: bool = False

    def keeps(self, name: str) -> bool:
        return name in self.kept

    def lines(self) -> list[str]:
        """For the log: shapes and times only."""
        if not self.measured:
            return []
        out = []
        for shape, ms in self.timings_ms.items():
            faster = "fp8" if fp8_faster(ms) else "bf16"
            out.append(
                f"fp8 image product {shape}: bf16 {ms['bf16']:.3f} ms, fp8 "
                f"{ms.get('fp8', float('nan')):.3f} ms: {faster}"
                + (f" (fp8 failed: {self.failed[shape]})" if shape in self.failed else "")
            )
        out.append(f"fp8 image products kept in bf16: {len(self.kept)} layers")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "measured": self.measured,
            "kept_bf16_layers": len(self.kept),
            "ms": self.timings_ms,
            "failed": self.failed,
        }


def fp8_faster(ms: Mapping[str, float]) -> bool:
    """Whether fp8 was strictly faster than bf16: a tie, a NaN or a failed fp8 (no "fp8" time)
    keeps bf16."""
    return ms.get("fp8", float("inf")) < ms["bf16"]


def image_products(model: MllamaModel) -> dict[str, Product]:
    """The linears that only ever read an image's rows, by name: the vision tower's (its tiles
    padded, as the model pads them), the projector and the cross layers' k/v projections (the
    image's patches)."""
    vision = model.config.vision
    rows_of = {
        id(m): vision.max_num_tiles * vision.padded_patches for m in model.vision_model.modules()
    }
    patches = [model.multi_modal_projector, *model.image_kv_projections()]
    rows_of |= {id(m): vision.max_num_tiles * vision.num_patches for m in patches}
    return {
        name: Product(module.out_features, module.in_features, rows_of[id(module)],
                      module.bias is not None)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) in rows_of
    }  # fmt: skip


def measuring_timer(device: torch.device, dtype: torch.dtype) -> Timer | None:
    """The timer for the choice on `device` with `dtype` weights: CUDA events on a GPU with
    bf16 or fp16 weights (fp8 serves those only), else None (nothing is measured)."""
    if device.type != "cuda" or dtype not in FAST_DTYPES:
        return None
    return cuda_timer


@torch.inference_mode()
def choose(
    products: Mapping[str, Product],
    device: torch.device,
    dtype: torch.dtype,
    timer: Timer | None,
) -> Fp8ImageChoice:
    """Time each distinct product shape as bf16 (`F.linear`) and as fp8 (`QuantizedLinear`, the
    served path, its activation quantization included) with `timer`, on random `dtype` data on
    `device`; keep in bf16 every layer whose shape fp8 does not make faster. No `timer`:
    nothing measured, nothing kept."""
    if timer is None or not products:
        return Fp8ImageChoice()
    generator = torch.Generator(device=device).manual_seed(0)
    timings: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    slower: set[Product] = set()
    for product in dict.fromkeys(products.values()):  # distinct, in model order
        ms = _time_both(product, device, dtype, timer, generator, failed)
        timings[product.name] = ms
        if not fp8_faster(ms):
            slower.add(product)
    kept = frozenset(name for name, product in products.items() if product in slower)
    return Fp8ImageChoice(kept, timings, failed, measured=True)


def _time_both(
    product: Product,
    device: torch.device,
    dtype: torch.dtype,
    timer: Timer,
    generator: torch.Generator,
    failed: dict[str, str],
) -> dict[str, float]:
    """{"bf16": ms, "fp8": ms} of one shape; "fp8" absent (and why in `failed`) if it raised."""

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        drawn = torch.randn(shape, generator=generator, device=device) * scale
        return drawn.to(dtype)

    n, k = product.out_features, product.in_features
    weight = randn(n, k, scale=k**-0.5)  # (N, K)
    bias = randn(n) if product.bias else None
    x = randn(product.rows, k)  # (M, K): random, never zeros (they run faster)
    ms: dict[str, float] = {}
    with on_device(device):  # the timer times the current CUDA device
        ms["bf16"] = timer(functools.partial(F.linear, x, weight, bias))
        try:
            layer = QuantizedLinear(quantize_weight(weight, None, "fp8"), bias)
            ms["fp8"] = timer(functools.partial(layer, x))
        except Exception as exc:  # noqa: BLE001 (fp8 that cannot run here keeps bf16)
            failed[product.name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return ms
