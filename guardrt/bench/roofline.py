"""The card's measured ceilings and the floors they put under each verdict (same run).

Measured, not datasheet: device-to-device copy bandwidth (bytes read + written) and the bf16
matmul rate of an n×n×n product (and fp8 e4m3 via `torch._scaled_mm` where the card has it).
A verdict's floor: its prefill can be no faster than max(FLOPs / matmul rate, weight bytes /
bandwidth), and each decode step no faster than the text-side weight bytes / bandwidth, where
a text-only verdict's text side is the self-attention layers (and the head) only. The
weights' FLOPs (`Work.linear_flops`) are checked against torch's FlopCounterMode over a served
verdict on the tiny model (`tests/test_bench.py`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from guardrt.bench.timing import times_ms
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.model.text import CrossAttentionLayer


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


def _decoder_params(model: MllamaModel) -> tuple[int, int, int]:
    """Linear weights of the decoder's self-attention layers; of its cross-attention layers,
    less their k/v projections; and of those k/v projections (which read the image's states,
    not the text)."""
    own = cross = cross_kv = 0
    for layer in model.language_model.model.layers:
        if isinstance(layer, CrossAttentionLayer):
            attention = layer.cross_attn
            kv = _linear_params(attention.k_proj) + _linear_params(attention.v_proj)
            cross += _linear_params(layer) - kv
            cross_kv += kv
        else:
            own += _linear_params(layer)
    return own, cross, cross_kv


@dataclass(frozen=True)
class Work:
    """What one verdict must do, whatever the implementation."""

    self_params: int  # the self-attention layers' weights: every verdict's every forward
    cross_params: int  # the cross-attention layers' (less k/v): forwards of image verdicts
    cross_kv_params: int  # the cross layers' k/v projections: once per image, over its patches
    head_params: int  # lm_head: read every forward, multiplied for a few rows only
    vision_params: int  # the vision tower's: over every token of its (padded) tiles
    projector_params: int  # the projector's: over the image's patches
    weight_bytes: float  # per parameter (2: bf16; 1: int8 / fp8)
    # Whether the large products run on 8-bit tensor cores (fp8; int8 with quantized
    # activations, whose int8 rate on Hopper is fp8's): their floor takes the measured fp8
    # rate, where the card has one; otherwise the bf16 rate.
    eight_bit_products: bool = False

    @classmethod
    def of(cls, model: MllamaModel, weight_bytes: float, eight_bit_products: bool = False) -> Work:
        own, cross, cross_kv = _decoder_params(model)
        return cls(
            own,
            cross,
            cross_kv,
            _linear_params(model.language_model.lm_head),
            _linear_params(model.vision_model),
            _linear_params(model.multi_modal_projector),
            weight_bytes,
            eight_bit_products,
        )

    def _text_params(self, tiles: int) -> int:
        """A text-only verdict runs the self-attention layers only (its cross layers are
        skipped: they would add nothing); one with an image runs the cross layers too."""
        return self.self_params + (self.cross_params if tiles else 0)

    def linear_flops(self, model: MllamaModel, tokens: int, tiles: int) -> float:
        """The weights' products in a prefill of `tokens` (+ an image of `tiles` tiles), less
        the head's (a few rows): the decoder layers the verdict runs, over its tokens; for an
        image, the vision tower over its tiles (each padded as the model pads it), and the
        projector and the cross layers' k/v projections over its patches."""
        flops = 2.0 * self._text_params(tiles) * tokens
        if tiles:
            vision = model.config.vision
            flops += 2.0 * self.vision_params * tiles * vision.padded_patches
            flops += (
                2.0 * (self.projector_params + self.cross_kv_params) * tiles * vision.num_patches
            )
        return flops

    def floor_s(
        self, model: MllamaModel, tokens: int, tiles: int, steps: int, c: Ceilings
    ) -> float:
        """Prefill of `tokens` (+ an image of `tiles` tiles), then `steps` decode steps: the
        weights' products (`linear_flops`), the vision tower's joint attention and the cross
        attention over the image's patches. Left out, as under 2% of any case: the decoder's
        self-attention products, and the K/V caches each step reads."""
        text = self._text_params(tiles)
        flops = self.linear_flops(model, tokens, tiles)
        read = (text + self.head_params) * self.weight_bytes
        if tiles:
            vision, config = model.config.vision, model.config.text
            length = tiles * vision.padded_patches  # the joint attention's tokens
            layers = vision.num_layers + vision.num_global_layers
            flops += 4.0 * layers * length**2 * vision.hidden_size
            keys = tiles * vision.num_patches  # the cross layers' keys
            flops += 4.0 * len(config.cross_attention_layers) * tokens * keys * config.hidden_size
            image = self.vision_params + self.projector_params + self.cross_kv_params
            read += image * self.weight_bytes
        rate = c.bf16_flops_per_s
        if self.eight_bit_products and c.fp8_flops_per_s:
            rate = c.fp8_flops_per_s
        prefill = max(flops / rate, read / c.copy_bytes_per_s)
        step = (text + self.head_params) * self.weight_bytes / c.copy_bytes_per_s
        return prefill + steps * step
