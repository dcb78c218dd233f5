"""How guardrt's custom torch ops become ONNX: the exporter's translation table.

`guardrt::dequantize` → `DequantizeLinear(q, scales, axis=0)`: the weight stays 8-bit in the
graph (int8 or float8e4m3fn initializers), and runtimes fuse it with the following MatMul
(ONNX Runtime: `MatMulNBits`; TensorRT: weight-only / fp8 GEMMs). ONNX's per-axis
`DequantizeLinear` takes one scale per output channel, so exported graphs use per-channel scales;
per-group scales (blocked quantization, opset 21) would need the exporter to translate at
opset 21, which torch's exporter does not (it translates at 18 and converts after).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from onnxscript import opset18 as op

import guardrt.export.quantize  # noqa: F401  (registers torch.ops.guardrt.dequantize)

OPSET = 21  # float8 DequantizeLinear needs ≥ 19; 21 is what ONNX Runtime and TensorRT 10 read


def _dequantize(qweight: Any, scales: Any) -> Any:
    """scales (out, 1) → (out,) per-axis scales on axis 0."""
    shape: Any = op.Constant(value_ints=[-1])
    flat = op.Reshape(scales, shape)
    return op.DequantizeLinear(qweight, flat, axis=0)


TRANSLATIONS: dict[Any, Any] = {torch.ops.guardrt.dequantize.default: _dequantize}


def check_exportable(model: torch.nn.Module) -> None:
    """Refuse per-group quantized layers before tracing (the exporter would fail obscurely)."""
    for name, module in model.named_modules():
        scales = getattr(module, "scales", None)
        if isinstance(scales, torch.Tensor) and scales.dim() == 2 and scales.shape[1] != 1:
            raise ValueError(
                f"{name} has per-group scales ({scales.shape[1]} groups); exported graphs take "
                "per-channel scales (quantize with group_size=None)"
            )


def trace(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    inputs: Sequence[str],
    outputs: Sequence[str],
    dynamic_shapes: tuple[dict[int, Any], ...] | None = None,
) -> None:
    """Trace `module` to ONNX at `path` as every guardrt graph is: torch's dynamo exporter at
    `OPSET`, with guardrt's translations, after `check_exportable`."""
    check_exportable(module)
    with _quiet_exporter():
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            dynamo=True,
            opset_version=OPSET,
            custom_translation_table=TRANSLATIONS,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )


# What torch's exporter says on every guardrt export and that asks nothing of the user: a
# deprecation inside torch, dims it renames, and torchvision ops it skips registering.
_NOISE = (
    (FutureWarning, r".*LeafSpec.* is deprecated"),
    (UserWarning, r"# The axis name: .* will not be used"),
)
_REGISTRATION_LOG = "torch.onnx._internal.exporter._registration"


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's known noise silenced (nothing else: other warnings still show)."""
    registration = logging.getLogger(_REGISTRATION_LOG)
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..."
    try:
        with warnings.catch_warnings():
            for category, message in _NOISE:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        registration.setLevel(level)
