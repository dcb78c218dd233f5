"""guardrt's kernels against their plain-PyTorch references, and the dispatch that picks them.

The int8 Triton kernel runs under Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1
before anything imports triton). The interpreter has no bfloat16 (`tl.dot` multiplies bf16 bit
patterns; triton-lang/triton#11584), so its tests run fp16 and fp32: bf16, the GPU's dtype, is
checked by benchmarks/kernels.py on the GPU only. The fp8 path's `torch._scaled_mm` runs on the
CPU in torch 2.13, so it is tested here against `scaled_mm_reference`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from guardrt.export import quantize
from guardrt.export.quantize import (
    QuantizedLinear,
    QuantizedWeight,
    QuantKind,
    dequantize,
    quantize_weight,
)
from guardrt.kernels import dispatch
from guardrt.kernels.device import Capability
from guardrt.kernels.dispatch import INT8_TRITON_MAX_ROWS
from guardrt.kernels.fp8_linear import E4M3_MAX, fp8_linear, quantize_rows, scaled_mm_reference
from guardrt.kernels.int8_cast import dequantize_to, int8_cast_linear
from guardrt.kernels.int8_dynamic import (
    int8_dynamic_linear,
    int8_dynamic_reference,
    quantize_rows_int8,
)
from guardrt.kernels.scaling import rescale
from tests.torch_support import need_cpu_rowwise_scaled_mm

HOPPER: Capability = (9, 0)


@pytest.fixture
def int8() -> ModuleType:
    """guardrt.kernels.int8_linear (imports triton: the test extra installs it on x86-64 Linux)."""
    pytest.importorskip("triton", reason="the test extra installs triton (x86-64 Linux)")
    return dispatch._int8_module()


def _layer(
    n: int, k: int, kind: QuantKind, bias: bool, seed: int, group_size: int | None = None
) -> QuantizedLinear:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator)
    bias_tensor = torch.randn(n, generator=generator) if bias else None
    return QuantizedLinear(quantize_weight(weight, group_size, kind), bias_tensor)


def _bias(layer: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
    assert layer.bias is not None
    return layer.bias.to(dtype)


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got − expected| / max |expected|, in fp32."""
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


# --- the int8 Triton kernel ---------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 48), (5, 96, 130), (13, 64, 40), (33, 128, 64)])
def test_int8_linear_equals_the_reference(
    int8: ModuleType, m: int, k: int, n: int, bias: bool
) -> None:
    """Shapes off the block sizes on every axis (M 2/10/26/66 rows: blocks of 16, 32, 64; K 96;
    N 40/48/130)."""
    reference = _layer(n, k, "int8", bias, seed=m * k + n)
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(m))  # a leading batch dim
    with torch.inference_mode():
        expected = reference(x)
        got = int8.int8_linear(x, reference.qweight, reference.scales, reference.bias)
    assert got.shape == expected.shape == (2, m, n)
    assert got.dtype == x.dtype
    assert _relative(got, expected) <= 1e-5


@pytest.mark.parametrize("m", [1, 40])  # 16 and 64 rows a program
def test_every_block_shape_equals_the_reference(int8: ModuleType, m: int) -> None:
    """Each (block_n, block_k) the load-time measurement may choose, off the block sizes (N 40,
    K 300: not multiples of 16 or 256)."""
    reference = _layer(40, 300, "int8", bias=True, seed=m)
    x = torch.randn(m, 300, generator=torch.Generator().manual_seed(m))
    with torch.inference_mode():
        expected = reference(x)
        for block in int8.BLOCKS:
            blocks = {int8.block_m(m): block}
            got = int8.int8_linear(x, reference.qweight, reference.scales, reference.bias, blocks)
            assert _relative(got, expected) <= 1e-5, block
    with pytest.raises(ValueError, match=r"blocks \(8, 8\) not among"):
        int8.int8_linear(x, reference.qweight, reference.scales, None, {int8.block_m(m): (8, 8)})


def test_int8_linear_in_fp16_equals_the_reference(int8: ModuleType) -> None:
    """fp16, a dtype the dispatch sends to the kernel (bf16 cannot run in the interpreter)."""
    reference = _layer(48, 64, "int8", bias=True, seed=3)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3)).half()
    with torch.inference_mode():
        expected = reference(x)
        got = int8.int8_linear(
            x, reference.qweight, reference.scales, _bias(reference, torch.float16)
        )
    assert got.dtype == torch.float16
    assert _relative(got, expected) <= 2e-3  # fp16 output rounding (2⁻¹¹) and operand order


def test_int8_linear_refuses_what_it_does_not_compute(int8: ModuleType) -> None:
    weight = torch.randn(16, 32)
    grouped = quantize_weight(weight, group_size=8)
    with pytest.raises(ValueError, match="one scale per channel"):
        int8.int8_linear(torch.randn(2, 32), grouped.qweight, grouped.scales, None)
    with pytest.raises(ValueError, match="must be int8"):
        int8.int8_linear(torch.randn(2, 32), weight, torch.ones(16), None)


# --- fp8: rowwise activation quantization and the _scaled_mm math --------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_rows_round_trip(dtype: torch.dtype) -> None:
    """Rows of very different magnitudes each get their own scale; each row's largest value
    maps to ±448; the round trip is within half an e4m3 step; an all-zero row stays zero."""
    generator = torch.Generator().manual_seed(4)
    magnitude = torch.tensor([1e-3, 1.0, 1e3, 0.0])[:, None]  # (4, 1): the last row all zero
    x = (torch.randn(2, 4, 80, generator=generator) * magnitude).to(dtype)  # (2, 4, K)
    xq, scales = quantize_rows(x)
    assert xq.dtype == torch.float8_e4m3fn
    assert xq.shape == x.shape
    assert scales.dtype == torch.float32
    assert scales.shape == (2, 4, 1)
    wide = x.float()
    restored = xq.float() * scales
    # 3 mantissa bits: half a step is 2⁻⁴ of the value (normal range); the subnormal floor
    # (steps of 2⁻⁹ below 2⁻⁶) is 2⁻¹⁰ of the row's scale.
    bound = (wide.abs() * 2.0**-4 + scales * 2.0**-10) * (1 + 1e-6)  # + fp32 rounding
    assert torch.all((restored - wide).abs() <= bound)
    live = xq[:, :3].float().abs().amax(dim=-1)  # (2, 3): the nonzero rows
    assert torch.equal(live, torch.full_like(live, E4M3_MAX))
    assert torch.equal(scales[:, 3], torch.ones(2, 1))
    assert torch.equal(restored[:, 3], torch.zeros(2, 80))


def test_quantize_rows_keeps_subnormal_rows_finite() -> None:
    """fp32 subnormal rows: max|x| / 448 rounds coarsely (668 / 448 of the least subnormal
    rounds to 1 of it) and x / scale overshoots 448. The values stay finite and the zero stays
    zero (a reciprocal scale would be inf here, and 0 · inf NaN). torch 2.13's cast saturates,
    so the clamp before it shows only on older torch (NaN from 480 up)."""
    tiny = torch.tensor([[668.0, -300.0, 0.0]]) * 2.0**-149  # (1, 3): multiples of the least
    assert float(tiny[0, 0] / (tiny[0, 0] / E4M3_MAX)) > E4M3_MAX  # the overshoot is real
    xq, scales = quantize_rows(tiny)
    assert torch.isfinite(xq.float()).all()
    assert float(xq[0, 2].float()) == 0.0
    assert float(xq.float().abs().max()) == E4M3_MAX
    assert torch.all(scales > 0)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_scaled_mm_reference_is_the_dequantized_matmul(bias: bool) -> None:
    """Scales applied to the accumulator equal scales applied to the operands first."""
    layer = _layer(48, 64, "fp8", bias, seed=5)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(5))
    xq, x_scales = quantize_rows(x)
    got = scaled_mm_reference(xq, x_scales, layer.qweight, layer.scales, layer.bias, torch.float32)
    weight = dequantize(layer.qweight, layer.scales)  # (N, K) fp32
    expected = torch.nn.functional.linear(xq.float() * x_scales, weight, layer.bias)
    assert got.shape == (7, 48)
    assert _relative(got, expected) <= 1e-6
    half = scaled_mm_reference(xq, x_scales, layer.qweight, layer.scales, layer.bias, torch.float16)
    assert torch.equal(half, got.half())  # one rounding, at the end


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_fp8_linear_equals_the_scaled_mm_reference(m: int, dtype: torch.dtype) -> None:
    """torch._scaled_mm (CPU) with rowwise scales and a bias in the output dtype, M off 16."""
    need_cpu_rowwise_scaled_mm()
    layer = _layer(48, 64, "fp8", bias=True, seed=m)
    x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = _bias(layer, dtype)
    with torch.inference_mode():
        got = fp8_linear(x, layer.qweight, layer.scales, bias)
    xq, x_scales = quantize_rows(x)
    expected = scaled_mm_reference(xq, x_scales, layer.qweight, layer.scales, bias, torch.float32)
    assert got.shape == (m, 48)
    assert got.dtype == dtype
    assert _relative(got, expected) <= 2.0**-7  # one rounding to bf16 (2⁻⁸ relative, per value)
    # Quantizing the activations costs a few e4m3 steps against the W8A16 reference:
    assert _relative(got, layer(x)) <= 0.05


# --- the dispatch -------------------------------------------------------------------------


def _case(
    kind: QuantKind, m: int, dtype: torch.dtype, k: int = 64, n: int = 48, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) in `dtype`, qweight (N, K) of `kind`, scales (N, groups): CPU tensors."""
    storage = torch.int8 if kind == "int8" else torch.float8_e4m3fn
    return (
        torch.zeros(m, k, dtype=dtype),
        torch.zeros(n, k).to(storage),
        torch.ones(n, groups),
    )


ROWS = INT8_TRITON_MAX_ROWS
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    ("case", "capability", "triton", "expected"),
    [
        (_case("int8", 1, BF16), HOPPER, True, "int8_triton"),
        (_case("int8", ROWS, FP16), HOPPER, True, "int8_triton"),
        (_case("int8", ROWS + 1, BF16), HOPPER, True, "int8_cast_mm"),  # prefill: cuBLAS
        (_case("int8", ROWS + 1, FP16), HOPPER, True, "int8_cast_mm"),  # fp16 too
        (_case("int8", 1, BF16), HOPPER, False, "int8_cast_mm"),  # no triton
        (_case("int8", 1, BF16), None, True, "reference"),  # not CUDA
        (_case("int8", 1, BF16), (7, 5), True, "int8_cast_mm"),  # Turing: no bf16 tl.dot
        (_case("int8", 1, FP32), HOPPER, True, "reference"),  # fp32: TF32 in tl.dot
        (_case("int8", 1, BF16, groups=4), HOPPER, True, "reference"),  # per-group
        (_case("int8", 0, BF16), HOPPER, True, "reference"),  # no rows
        (_case("fp8", 1, BF16), HOPPER, True, "fp8_scaled_mm"),
        (_case("fp8", 6432, FP16), (8, 9), False, "fp8_scaled_mm"),  # any M, Ada, no triton
        (_case("fp8", 1, BF16), (8, 6), True, "reference"),  # Ampere: no fp8 tensor cores
        (_case("fp8", 1, BF16), None, True, "reference"),
        (_case("fp8", 1, FP32), HOPPER, True, "reference"),  # no bias with fp32 output
        (_case("fp8", 1, BF16, k=72), HOPPER, True, "reference"),  # K % 16
        (_case("fp8", 1, BF16, n=40), HOPPER, True, "reference"),  # N % 16
        (_case("fp8", 1, BF16, groups=4), HOPPER, True, "reference"),  # per-group
    ],
)
def test_choose_path(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    capability: Capability | None,
    triton: bool,
    expected: dispatch.LinearPath,
) -> None:
    _check_path(case, capability, triton, expected, activations=False)


def _check_path(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    capability: Capability | None,
    triton: bool,
    expected: dispatch.LinearPath,
    activations: bool,
) -> None:
    x, qweight, scales = case
    assert dispatch.choose_path(x, qweight, scales, capability, triton, activations) == expected


@pytest.mark.parametrize(
    ("case", "capability", "triton", "expected"),
    [
        (_case("int8", ROWS + 1, BF16), HOPPER, True, "int8_int_mm"),  # prefill: int8 cores
        (_case("int8", 6432, FP16), (7, 5), False, "int8_int_mm"),  # Turing has them too
        (_case("int8", 1, BF16), HOPPER, True, "int8_triton"),  # decode: weight-only still
        (_case("int8", 1, BF16), HOPPER, False, "int8_cast_mm"),  # _int_mm needs M > 16
        (_case("int8", ROWS + 1, FP32), HOPPER, True, "reference"),
        (_case("int8", ROWS + 1, BF16), (7, 0), True, "int8_cast_mm"),  # Volta
        (_case("int8", ROWS + 1, BF16, k=68), HOPPER, True, "int8_cast_mm"),  # K % 8
        (_case("int8", ROWS + 1, BF16, n=44), HOPPER, True, "int8_cast_mm"),  # N % 8
        (_case("int8", ROWS + 1, BF16, groups=4), HOPPER, True, "reference"),  # per-group
        (_case("fp8", ROWS + 1, BF16), HOPPER, True, "fp8_scaled_mm"),  # fp8 unaffected
    ],
)
def test_choose_path_with_quantized_activations(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    capability: Capability | None,
    triton: bool,
    expected: dispatch.LinearPath,
) -> None:
    _check_path(case, capability, triton, expected, activations=True)


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_quantize_rows_int8(dtype: torch.dtype) -> None:
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[1] = 0  # an all-zero row
    xq, scales = quantize_rows_int8(x)
    assert xq.dtype == torch.int8
    assert scales.shape == (4, 1)
    assert scales.dtype == torch.float32
    assert xq[1].abs().sum() == 0
    assert scales[1, 0] == 1
    live = xq[[0, 2, 3]].abs().amax(dim=-1)
    assert (live == 127).all()  # each row's largest magnitude lands on ±127
    error = (xq.float() * scales - x.float()).abs()
    assert (error <= scales / 2 * (1 + 1e-6)).all()  # rounding: at most half a step


@pytest.mark.parametrize(("m", "bias"), [(17, False), (40, True)])
def test_int8_dynamic_linear_equals_its_reference(m: int, bias: bool) -> None:
    """`torch._int_mm` (on the CPU here) against the same math in exact accumulation, and
    both against the weight-only reference within the activation rounding."""
    layer = _layer(48, 64, "int8", bias, seed=m)
    x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m)).bfloat16()
    b = None if layer.bias is None else layer.bias.to(BF16)
    with torch.inference_mode():
        got = int8_dynamic_linear(x, layer.qweight, layer.scales, b)
        xq, xs = quantize_rows_int8(x)
        exact = int8_dynamic_reference(xq, xs, layer.qweight, layer.scales, b, BF16)
        weight_only = layer(x)
    assert got.dtype == BF16
    assert torch.equal(got, exact)
    assert _relative(got, weight_only) <= 0.03


@pytest.mark.usefixtures("on_hopper")
def test_forward_runs_int_mm_only_when_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(48, 64, "int8", bias=True, seed=9)
    x = torch.randn(ROWS + 6, 64, generator=torch.Generator().manual_seed(9)).bfloat16()
    calls = _spy(monkeypatch, torch, "_int_mm")
    with torch.inference_mode():
        weight_only = layer(x)  # too many rows for the Triton kernel: the cast path
        assert calls == []
        layer.activations = True
        got = layer(x)
    assert len(calls) == 1
    assert _relative(got, weight_only) <= 0.03


def test_choose_path_counts_the_rows_of_every_leading_dim() -> None:
    _, qweight, scales = _case("int8", 1, BF16)
    half = INT8_TRITON_MAX_ROWS // 2
    for lead, expected in (((2, half), "int8_triton"), ((2, half + 1), "int8_cast_mm")):
        x = torch.zeros(*lead, 64, dtype=BF16)  # (B, T, K): M = B·T rows
        assert dispatch.choose_path(x, qweight, scales, HOPPER, True) == expected


def test_choose_path_needs_a_row_major_fp8_weight() -> None:
    x, qweight, scales = _case("fp8", 1, BF16)
    transposed = qweight.t().contiguous().t()  # (N, K) column-major: its .t() is row-major
    assert dispatch.choose_path(x, transposed, scales, HOPPER, True) == "reference"


@pytest.mark.parametrize(
    ("kind", "capability", "warned"),
    [
        ("fp8", (8, 0), True),  # A100: no fp8 tensor cores
        ("fp8", (8, 6), True),  # A10, RTX 30xx
        ("fp8", (8, 9), False),  # L40S, L4
        ("fp8", (9, 0), False),  # H100
        ("fp8", None, False),  # not a CUDA device
        ("int8", (8, 0), False),
        (None, (8, 0), False),
    ],
)
def test_fp8_where_the_gpu_has_no_fp8_tensor_cores_is_warned_of(
    kind: str | None, capability: tuple[int, int] | None, warned: bool
) -> None:
    warning = dispatch.precision_warning(kind, capability)
    assert (warning is not None) == warned
    if warning:
        assert capability is not None
        # The warning agrees with the path every fp8 layer then takes, and names the way out.
        x, qweight, scales = _case("fp8", 1, BF16)
        assert dispatch.choose_path(x, qweight, scales, capability, True) == "reference"
        assert f"compute capability {capability[0]}.{capability[1]}" in warning
        assert "--quantize int8" in warning


@pytest.fixture
def on_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every device reads as an sm 9.0 CUDA device with triton: the CPU runs the fast paths."""
    monkeypatch.setattr(dispatch, "cuda_capability", lambda device: HOPPER)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)


def _spy(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """Wrap owner.name so that calls are counted; returns the counter (one entry per call)."""
    calls: list[int] = []
    original: Callable[..., torch.Tensor] = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.usefixtures("on_hopper")
def test_forward_runs_the_int8_kernel(int8: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(48, 64, "int8", bias=True, seed=6)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(6)).half()
    calls = _spy(monkeypatch, int8, "int8_linear")
    with torch.inference_mode():
        got = layer(x)
        assert len(calls) == 1
        assert torch.equal(
            got, int8.int8_linear(x, layer.qweight, layer.scales, _bias(layer, torch.float16))
        )
        layer.force_reference = True
        expected = layer(x)
    assert len(calls) == 2  # the direct call above; the forced forward did not add one
    assert _relative(got, expected) <= 2e-3


@pytest.mark.usefixtures("on_hopper")
def test_forward_runs_scaled_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    need_cpu_rowwise_scaled_mm()
    layer = _layer(48, 64, "fp8", bias=True, seed=7)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(7)).bfloat16()
    calls = _spy(monkeypatch, torch, "_scaled_mm")
    with torch.inference_mode():
        got = layer(x)
        assert len(calls) == 1
        assert torch.equal(
            got, fp8_linear(x, layer.qweight, layer.scales, _bias(layer, torch.bfloat16))
        )
        layer.force_reference = True
        expected = layer(x)
    assert len(calls) == 2
    assert _relative(got, expected) <= 0.05


@pytest.mark.usefixtures("on_hopper")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_tracers_see_the_reference(kind: QuantKind, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.export (what the dynamo ONNX exporter runs) and torch.jit.trace record
    guardrt::dequantize, not a kernel, even where the eager forward takes a fast path."""
    if kind == "fp8":
        need_cpu_rowwise_scaled_mm()
    if kind == "int8":
        pytest.importorskip("triton", reason="the test extra installs triton (x86-64 Linux)")
    layer = _layer(48, 64, kind, bias=False, seed=8)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(8)).half()
    fast = _spy(monkeypatch, quantize, "run_fast_path")
    with torch.inference_mode():
        layer(x)
    assert len(fast) == 1  # eager: the fast path
    exported = torch.export.export(layer, (x,))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert "guardrt.dequantize.default" in targets
    assert not any("scaled_mm" in target or "triton" in target for target in targets)
    traced = torch.jit.trace(layer, (x,), check_trace=False)  # type: ignore[no-untyped-call]
    assert "guardrt::dequantize" in str(traced.graph)
    assert len(fast) == 1


@pytest.mark.usefixtures("on_hopper")
def test_onnx_export_keeps_dequantize_linear(tmp_path: Path) -> None:
    """The exporter guardrt builds engines with, on a layer whose eager forward is the kernel."""
    onnx: Any = pytest.importorskip("onnx")
    from guardrt.export.onnx_ops import trace  # noqa: PLC0415

    layer = _layer(48, 64, "int8", bias=False, seed=9)
    path = tmp_path / "linear.onnx"
    trace(layer, (torch.randn(2, 64).half(),), path, ["x"], ["y"])
    nodes = onnx.load(str(path)).graph.node
    assert "DequantizeLinear" in {node.op_type for node in nodes}
    assert all(node.domain in ("", "ai.onnx") for node in nodes)  # no custom or kernel op


def test_the_int8_reference_is_exact_at_the_largest_sums() -> None:
    """The reference accumulates in float64 (CUDA has no integer matmul): at the model's widest
    K (14,336) with every product ±127², it equals integer arithmetic."""
    k = 14_336
    generator = torch.Generator().manual_seed(3)
    xq = torch.full((2, k), 127, dtype=torch.int8)
    xq[1] = torch.where(torch.rand(k, generator=generator) < 0.5, -127, 127).to(torch.int8)
    wq = torch.full((3, k), 127, dtype=torch.int8)
    wq[2, ::3] = -127
    x_scales, w_scales = torch.rand(2, 1, generator=generator), torch.rand(3, generator=generator)
    got = int8_dynamic_reference(xq, x_scales, wq, w_scales, None, torch.float32)
    exact = xq.to(torch.int64) @ wq.to(torch.int64).t()  # (2, 3), CPU integer matmul
    assert exact[0, 0] == 127 * 127 * k
    assert torch.equal(got, rescale(exact, x_scales, w_scales, None, torch.float32))


# --- the int8 cast path (steps the Triton kernel declines) ---------------------------------


@pytest.mark.parametrize(("lead", "bias"), [((70,), False), ((2, 40), True)])
@pytest.mark.parametrize("magnitude", [1.0, 2000.0])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_int8_cast_linear_equals_the_reference(
    lead: tuple[int, ...], bias: bool, magnitude: float, dtype: torch.dtype
) -> None:
    """Bit for bit the reference forward (dequantize to fp32, round to the dtype, matmul), for
    every leading shape, with and without a bias, with an activation outlier, in bf16 and fp16
    (the weight is dequantized before the product, so fp16 holds it as the reference does)."""
    layer = _layer(48, 64, "int8", bias, seed=len(lead))
    x = torch.randn(*lead, 64, generator=torch.Generator().manual_seed(5))
    x[..., 3] *= magnitude
    x = x.to(dtype)
    b = None if layer.bias is None else layer.bias.to(dtype)
    with torch.inference_mode():
        got = int8_cast_linear(x, layer.qweight, layer.scales, b)
        layer.force_reference = True
        expected = layer(x)
    assert got.shape == (*lead, 48)
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    assert torch.equal(got, expected)


def test_dequantize_to_rounds_once_as_the_reference() -> None:
    """scale · q in fp32, then one rounding: values where rounding the product to bf16 differs
    from multiplying bf16-rounded factors (the weight of the reference's `dequantize(dtype)`)."""
    layer = _layer(48, 64, "int8", bias=False, seed=3)
    weight = QuantizedWeight(layer.qweight, layer.scales, 64)
    for dtype in (BF16, FP16):
        got = dequantize_to(layer.qweight, layer.scales, dtype)
        assert got.dtype == dtype
        assert torch.equal(got, weight.dequantize(dtype))
        crude = layer.qweight.to(dtype) * layer.scales.to(dtype)  # rounded factors
        assert not torch.equal(got, crude)  # the case distinguishes the two roundings


def test_the_cast_path_refuses_fp32() -> None:
    """fp32 steps stay on the reference (the dispatch never sends them; the function says so)."""
    x, qweight, scales = _case("int8", ROWS + 1, FP32)
    assert dispatch.choose_path(x, qweight, scales, HOPPER, True) == "reference"
    with pytest.raises(ValueError, match="bf16 or fp16"):
        int8_cast_linear(x, qweight, scales, None)


@pytest.mark.usefixtures("on_hopper")
def test_a_large_int8_step_casts_instead_of_dequantizing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step the Triton kernel declines runs the cast path, not the reference's fp32
    dequantize (which `guardrt::dequantize` would show)."""
    layer = _layer(48, 64, "int8", bias=True, seed=11)
    x = torch.randn(ROWS + 6, 64, generator=torch.Generator().manual_seed(11)).bfloat16()
    dequantized = _spy(monkeypatch, torch.ops.guardrt, "dequantize")
    with torch.inference_mode():
        got = layer(x)
        assert dequantized == []
        layer.force_reference = True
        expected = layer(x)
    assert dequantized == [1]
    assert torch.equal(got, expected)


def test_the_kernel_benchmark_dry_run(tmp_path: Path) -> None:
    """`benchmarks/kernels.py --dry-run` (tiny shapes, the interpreter): every method of every
    cell runs, and every gated check passes, so the one GPU run measures rather than fails."""
    need_cpu_rowwise_scaled_mm()
    kernels_bench = importlib.import_module("benchmarks.kernels")
    out = tmp_path / "kernels.json"
    assert kernels_bench.main(["--dry-run", "--repeat", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["skipped_cells"] == 0
    for cell in report["cells"]:
        assert cell["ok"], cell
        assert cell["failures"] == {}
        expected = set(kernels_bench.METHODS) - (set() if cell["m"] > 16 else {"int8 mm"})
        assert set(cell["us"]) == expected
        assert {"int8 triton vs ref", "int8 cast vs ref", "fp8 mm vs math"} <= set(cell["errors"])
        assert cell["errors"]["int8 cast vs ref"] == 0  # the reference's math, bit for bit
