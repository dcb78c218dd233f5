"""The card's measured ceilings and the floors they put under each verdict (same run).

Measured, not datasheet: device-to-device copy bandwidth (bytes read + written) and the bf16
matmul rate of an n×n×n product (and fp8 e4m3 via `torch._scaled_mm` where the card has it).
A verdict's floor: its prefill can be no faster than max(FLOPs / matmul rate, weight bytes /
bandwidth), and each decode step no faster than the text-side weight bytes / bandwidth.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from guardrt.bench.timing import times_ms
from guardrt.runtime.model.mllama import MllamaModel


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float
    bf16_flops_per_s: float
    fp8_flops_per_s: float | None

    def to_json(self) -> dict[str, float | None]:
        return asdict(self)


def _timed(run: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median seconds of `run()` after one warm-up."""
    return statistics.median(times_ms(run, device, repeat)) / 1e3


def measure(device: torch.device, copy_mib: int = 1024, n: int = 8192) -> Ceilings:
    source = torch.empty(copy_mib << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_s = _timed(lambda: target.copy_(source), device, 10)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul_s = _timed(lambda: a @ b, device, 10)
    fp8 = None
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.t().contiguous().to(torch.float8_e4m3fn).t()  # column-major second operand
        one = torch.ones((), device=device)
        fp8_s = _timed(
            lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), device, 10
        )
        fp8 = 2 * n**3 / fp8_s
    return Ceilings(2 * source.numel() / copy_s, 2 * n**3 / matmul_s, fp8)


def _linear_params(module: nn.Module) -> int:
    """Weights of the Linear (and quantized Linear) layers under `module`."""
    total = 0
    for child in module.modules():
        features = (getattr(child, "in_features", None), getattr(child, "out_features", None))
        if isinstance(features[0], int) and isinstance(features[1], int):
            total += features[0] * features[1]
    return total


@dataclass(frozen=True)
class Work:
    """What one verdict must do, whatever the implementation."""

    text_params: int  # decoder projection weights read and multiplied by every forward
    head_params: int  # lm_head: read every forward, multiplied for a few rows only
    vision_params: int
    weight_bytes: float  # per parameter (2: bf16; 1: int8 / fp8)

    @classmethod
    def of(cls, model: MllamaModel, weight_bytes: float) -> Work:
        return cls(
            _linear_params(model.language_model.model),
            _linear_params(model.language_model.lm_head),
            _linear_params(model.vision_model) + _linear_params(model.multi_modal_projector),
            weight_bytes,
        )

    def floor_s(
        self, model: MllamaModel, tokens: int, tiles: int, steps: int, c: Ceilings
    ) -> float:
        """Prefill of `tokens` (+ an image of `tiles` tiles), then `steps` decode steps."""
        vision = model.config.vision
        flops = 2.0 * self.text_params * tokens
        read = (self.text_params + self.head_params) * self.weight_bytes
        if tiles:
            length = vision.max_num_tiles * vision.padded_patches  # the joint local attention
            layers = vision.num_layers + vision.num_global_layers
            flops += (
                2.0 * self.vision_params * length + 4.0 * layers * length**2 * vision.hidden_size
            )
            read += self.vision_params * self.weight_bytes
        prefill = max(flops / c.bf16_flops_per_s, read / c.copy_bytes_per_s)
        step = (self.text_params + self.head_params) * self.weight_bytes / c.copy_bytes_per_s
        return prefill + steps * step
