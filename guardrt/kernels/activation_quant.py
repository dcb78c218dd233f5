"""The 8-bit products that take quantized activations (fp8 `_scaled_mm`, int8 weight+activation
`_int_mm`): their per-token activation quantization and the int8 product's epilogue, by fused
Triton kernels (`row_quant.py`, `rescale_kernel.py`) where they apply, by the plain-PyTorch
references (`fp8_linear.quantize_rows`, `int8_dynamic.quantize_rows_int8`, `scaling.rescale`)
everywhere else.

The kernels run for CUDA tensors (sm ≥ 8.0, not ROCm), 2-D with unit stride along the last dim,
of bf16, fp16 or fp32 (and int32 products), when triton is importable, nothing is tracing or
compiling, and no load-time check on this process's GPU has refused them: `verify` runs them at
the model's own layer widths against the references when the engine loads
(`guardrt/runtime/model/tune.py`) and demands the same bits; kernels that raise or differ are
never used again in the process.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from guardrt.kernels import device
from guardrt.kernels.scaling import rescale

if TYPE_CHECKING:  # a type only: export.quantize imports the dispatch, which imports this
    from guardrt.export.quantize import QuantKind

log = logging.getLogger(__name__)

Quantized = tuple[torch.Tensor, torch.Tensor]  # (xq (M, K) 8-bit, scales (M, 1) fp32)
PRODUCT_DTYPES = (torch.int32, *device.KERNEL_DTYPES)  # what the epilogue reads
# a decode step, a prefill, a padded bucket (the kernel's few-row variant), a larger step
_PROBE_ROWS = (1, 37, 64, 160)
_refused: list[str] = []  # why the kernel was refused in this process (empty: not refused)


def can_fuse(
    x: torch.Tensor,
    capability: device.Capability | None,
    has_triton: bool,
    dtypes: tuple[torch.dtype, ...] = device.KERNEL_DTYPES,
) -> bool:
    """The decision on tensor metadata on a CUDA device of `capability` (None: not CUDA)."""
    if not device.triton_runs(capability, has_triton):
        return False
    return x.dim() == 2 and x.dtype in dtypes and x.stride(-1) == 1 and x.numel() > 0


def applies(x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = device.KERNEL_DTYPES) -> bool:
    """Whether a fused kernel takes x (of one of `dtypes`) in this process, now."""
    if _refused or x.device.type != "cuda" or device.recording():
        return False
    return can_fuse(x, device.cuda_capability(x.device), device.triton_available(), dtypes)


def quantize_activations(
    x: torch.Tensor, kind: QuantKind, reference: Callable[[torch.Tensor], Quantized]
) -> Quantized:
    """x (M, K) → (xq, scales) as `reference` computes them: by the fused kernel where it
    applies, else by `reference` itself."""
    if applies(x):
        result: Quantized = _kernel().quantize_rows(x, kind)
        return result
    return reference(x)


def rescale_product(
    acc: torch.Tensor,
    x_scales: torch.Tensor | None,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`scaling.rescale` of an (M, N) product: by the fused kernel where it applies."""
    if out_dtype in device.KERNEL_DTYPES and applies(acc, PRODUCT_DTYPES):
        result: torch.Tensor = _rescale_kernel().rescale(acc, x_scales, w_scales, bias, out_dtype)
        return result
    return rescale(acc, x_scales, w_scales, bias, out_dtype)


def verify(target: torch.device, dtype: torch.dtype, widths: Iterable[int]) -> str:
    """Run the quantization kernel for both kinds at each layer input width (a model has a few:
    Triton compiles one variant per width) and 1, 37, 64 and 160 rows, contiguous, with a padded
    row stride and unaligned, and the epilogue on int32 products into `dtype`, against the
    references on `target`; refuse both for the process on any error or difference. Returns
    "used", "not used (...)" or "refused: why"."""
    if _refused:
        return f"refused: {_refused[0]}"
    if not applies(torch.empty((1, 1), dtype=dtype, device=target)):
        return "not used (the references run: not a CUDA GPU with triton, or not bf16/fp16/fp32)"
    try:
        quantized = (p for width in sorted(set(widths)) if (p := _difference(target, dtype, width)))
        problem = next(quantized, "") or _rescale_difference(target, dtype)
    except Exception as exc:  # noqa: BLE001 (a kernel that cannot run here is refused)
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    if problem:
        _refused.append(problem)
        log.warning(
            "fused activation quantization and epilogue refused on this GPU (%s); references run",
            problem,
        )
        return f"refused: {problem}"
    return "used"


def _difference(target: torch.device, dtype: torch.dtype, width: int) -> str:
    from guardrt.kernels.fp8_linear import quantize_rows  # noqa: PLC0415 (it imports this module)
    from guardrt.kernels.int8_dynamic import quantize_rows_int8  # noqa: PLC0415

    references: dict[QuantKind, Callable[[torch.Tensor], Quantized]] = {
        "fp8": quantize_rows,
        "int8": quantize_rows_int8,
    }
    generator = torch.Generator(device=target).manual_seed(0)
    for rows in _PROBE_ROWS:
        wide = torch.randn((rows, width + 16), generator=generator, device=target)
        wide *= torch.logspace(-6, 4, rows, device=target)[:, None]  # tiny to large rows
        special = torch.tensor([0.0, -0.0, 1e-30, -3.0], device=target)[: min(width, 4)]
        wide[0, : special.numel()] = special  # signed zeros, a value below every scale
        wide[-1, width // 2] = 2000.0  # an outlier
        narrow = wide.to(dtype)
        padded = narrow[:, :width]  # a row stride of width + 16
        odd = torch.zeros((rows, width + 17), device=target, dtype=dtype)
        odd[:, 1:] = narrow
        unaligned = odd[:, 1 : width + 1]  # neither the pointer nor the stride 16-aligned
        # Triton compiles a variant per alignment of the pointer and the row stride
        for x in (padded.contiguous(), padded, unaligned):
            for kind, reference in references.items():
                got, want = _kernel().quantize_rows(x, kind), reference(x)
                for name, a, b in (("values", got[0], want[0]), ("scales", got[1], want[1])):
                    same = a.dtype == b.dtype and a.shape == b.shape
                    if not same or not torch.equal(as_bits(a), as_bits(b)):
                        return (
                            f"{kind} {name} of {rows}×{width} {dtype} "
                            f"(row stride {x.stride(0)}) differ from the reference"
                        )
    return ""


def _rescale_difference(target: torch.device, dtype: torch.dtype) -> str:
    generator = torch.Generator(device=target).manual_seed(1)
    for rows, cols in ((1, 48), (37, 200)):
        acc = torch.randint(-(2**27), 2**27, (rows, cols), generator=generator, device=target)
        acc = acc.to(torch.int32)  # an int8 product's range: up to 127² · 14,336 ≈ 2.3e8
        x_scales = torch.rand((rows, 1), generator=generator, device=target) * 1e-3
        w_scales = torch.rand((cols, 1), generator=generator, device=target) * 1e-3
        bias = torch.randn(cols, generator=generator, device=target).to(dtype)
        for b in (None, bias):
            got = _rescale_kernel().rescale(acc, x_scales, w_scales, b, dtype)
            if not torch.equal(got, rescale(acc, x_scales, w_scales, b, dtype)):
                with_bias = "with" if b is not None else "without"
                return f"the epilogue of {rows}×{cols} int32 → {dtype} {with_bias} bias differs"
    return ""


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor as its bytes, to compare (torch.equal has no fp8 kernel on every device);
    other dtypes as they are."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@functools.cache
def _kernel() -> ModuleType:
    """row_quant.py, imported on first use (it imports triton)."""
    return importlib.import_module("guardrt.kernels.row_quant")


@functools.cache
def _rescale_kernel() -> ModuleType:
    """rescale_kernel.py, imported on first use (it imports triton)."""
    return importlib.import_module("guardrt.kernels.rescale_kernel")
