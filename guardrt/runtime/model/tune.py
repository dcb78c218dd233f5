"""What the runtime measures on the GPU when it loads a model, and keeps: which attention kernel
the vision tower runs (`attention_plan.py`), up to how many rows each int8 layer runs the
Triton kernel (`guardrt/kernels/int8_rows.py`), and whether the fused norm / RoPE / SwiGLU
kernels (`guardrt/kernels/fused.py`) and the fused activation quantization of fp8 and int8
weight+activation layers (`guardrt/kernels/activation_quant.py`) agree with their references on
this GPU. One call, after quantizing and fusing, shared by the engine, the benchmark and the
profile; on the CPU it measures nothing and changes nothing."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from guardrt.export.quantize import QuantizedLinear
from guardrt.kernels import activation_quant, fused, int8_rows
from guardrt.kernels.fp8_image import Fp8ImageChoice
from guardrt.runtime.model.attention_plan import DEFAULT_PLAN, Tuning
from guardrt.runtime.model.fuse import modules_in_use
from guardrt.runtime.model.mllama import MllamaModel

NO_ACTIVATION_QUANT = "not used (no layer quantizes its activations)"


@dataclass(frozen=True)
class LoadTuning:
    attention: Tuning
    int8_rows: int8_rows.RowsTuning
    fused: str  # the fused norm / RoPE / SwiGLU kernels: "used", "not used (…)", "refused: why"
    # the fused per-token activation quantization (fp8, int8 weight+activation), the same words
    activation_quant: str = NO_ACTIVATION_QUANT
    # which image products an fp8 load kept in bf16 (measured before quantizing; None: not fp8)
    fp8_image: Fp8ImageChoice | None = None

    def lines(self) -> list[str]:
        """What was chosen, for the log (shapes and times only)."""
        out = [
            f"fused RMSNorm/RoPE/SwiGLU kernels: {self.fused}",
            f"fused activation quantization: {self.activation_quant}",
        ]
        attention = self.attention
        if attention.timings_ms:
            out.append(
                f"vision attention: {attention.plan.name}, "
                f"{attention.timings_ms[attention.plan.name]:.2f} ms per layer (torch's default "
                f"{attention.timings_ms.get(DEFAULT_PLAN.name, float('nan')):.2f} ms; "
                f"{len(attention.timings_ms)} ways timed, {len(attention.rejected)} refused)"
            )
        out += self.fp8_image.lines() if self.fp8_image is not None else []
        for shape, limit in self.int8_rows.limits.items():
            why = self.int8_rows.refused.get(shape)
            blocks = self.int8_rows.blocks.get(shape) or {}
            shapes = ", ".join(
                f"{bn}x{bk} at {bm} rows a program" for bm, (bn, bk) in blocks.items()
            )
            out.append(
                f"int8 {shape}: the Triton kernel up to {limit} rows"
                + (f" ({shapes})" if shapes else "")
                + (f" (refused: {why})" if why else "")
            )
        return out

    def to_json(self) -> dict[str, Any]:
        attention = self.attention
        return {
            "vision_attention": {
                "plan": attention.plan.name,
                "ms": attention.timings_ms,
                "refused": attention.rejected,
            },
            "int8_rows": asdict(self.int8_rows),
            "fused_norm_rope": self.fused,
            "fused_activation_quant": self.activation_quant,
        } | ({"fp8_image": self.fp8_image.to_json()} if self.fp8_image is not None else {})


def tune_for_device(model: MllamaModel) -> LoadTuning:
    """Measure and set the choices on `model` (quantized and fused already)."""
    text = model.config.text
    shapes = fused.Shapes(
        text.hidden_size, text.num_heads, text.num_kv_heads, text.head_dim, text.rms_norm_eps,
        text.intermediate_size,
    )  # fmt: skip
    checked = fused.verify(model.device, model.weight_dtype, shapes)
    attention = model.vision_model.tune_attention()
    # The decoder's layers that run per step. The vision tower's, the projector's and the cross
    # layers' k/v projections (which read the image's states once) always see thousands of
    # rows (6,404 per image), where the kernel is not a candidate: timing them would only
    # compile kernels nothing runs.
    image_only = {id(projection) for projection in model.image_kv_projections()}
    decoder = [m for m in modules_in_use(model.language_model) if id(m) not in image_only]
    rows = int8_rows.tune(decoder, model.weight_dtype)
    widths = activation_widths(model)
    quantizing = (
        activation_quant.verify(model.device, model.weight_dtype, widths)
        if widths
        else NO_ACTIVATION_QUANT
    )
    return LoadTuning(attention, rows, checked, quantizing, model.fp8_image)


def activation_widths(model: torch.nn.Module) -> set[int]:
    """The input widths of the layers that quantize their activations per token: fp8 ones, and
    int8 ones with weight+activation compute (the fused kernel compiles once per width)."""
    return {
        m.in_features
        for m in model.modules()
        if isinstance(m, QuantizedLinear)
        and (m.qweight.dtype == torch.float8_e4m3fn or m.activations)
    }
