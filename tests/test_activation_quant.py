"""The fused per-token activation quantization (`guardrt/kernels/row_quant.py`) against its
references, bit for bit, when it runs, and the load-time check that refuses it.

The kernel runs under Triton's CPU interpreter here (conftest.py sets TRITON_INTERPRET=1); its
roundings are exact fp32 arithmetic, so the interpreter checks bf16 too. On a GPU
(GUARDRT_TEST_DEVICE=cuda with TRITON_INTERPRET=0, scripts/gpu_check.sh) the last test runs it
compiled at the 11B model's widths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from guardrt.export.quantize import QuantKind, quantize_model
from guardrt.kernels import activation_quant, device
from guardrt.kernels.activation_quant import as_bits
from guardrt.kernels.fp8_linear import fp8_linear, quantize_rows
from guardrt.kernels.int8_dynamic import int8_dynamic_linear, quantize_rows_int8
from guardrt.kernels.scaling import rescale
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.tune import NO_ACTIVATION_QUANT, activation_widths, tune_for_device
from tests.models import DEVICE
from tests.torch_support import need_cpu_rowwise_scaled_mm

HOPPER: device.Capability = (9, 0)
Reference = Callable[[torch.Tensor], "Quantized"]
REFERENCES: dict[QuantKind, Reference] = {
    "fp8": quantize_rows,
    "int8": quantize_rows_int8,
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def kernel() -> ModuleType:
    pytest.importorskip("triton", reason="the test extra installs triton (x86-64 Linux)")
    return activation_quant._kernel()


@pytest.fixture(autouse=True)
def _unrefused() -> Iterator[None]:
    """Each test starts and ends with the kernel not refused (the state is per process)."""
    activation_quant._refused.clear()
    yield
    activation_quant._refused.clear()


Quantized = tuple[torch.Tensor, torch.Tensor]


def _assert_same(got: Quantized, want: Quantized) -> None:
    (q, s), (rq, rs) = got, want
    assert (q.dtype, q.shape, s.dtype, s.shape) == (rq.dtype, rq.shape, rs.dtype, rs.shape)
    assert torch.equal(s, rs)
    if q.dtype == torch.float8_e4m3fn:  # NaN's sign bit is the hardware's: compare NaN-ness
        nan, want_nan = q.float().isnan(), rq.float().isnan()
        assert torch.equal(nan, want_nan)
        q, rq = q.view(torch.uint8)[~nan], rq.view(torch.uint8)[~want_nan]
    assert torch.equal(as_bits(q), as_bits(rq))


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "width"), [(1, 7), (3, 64), (5, 1280), (2, 5000)])
def test_bit_exact_with_the_reference(
    kernel: ModuleType, kind: QuantKind, dtype: torch.dtype, rows: int, width: int
) -> None:
    """Rows from 1e-8 to 1e3 in magnitude (fp16's subnormals included), widths that are not
    multiples of the kernel's block, and one more than a block (5,000)."""
    generator = torch.Generator().manual_seed(rows * width)
    x = torch.randn(rows, width, generator=generator) * torch.logspace(-8, 3, rows)[:, None]
    x = x.to(dtype)
    _assert_same(kernel.quantize_rows(x, kind), REFERENCES[kind](x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_round_to_even_and_signs_are_kept(kernel: ModuleType, dtype: torch.dtype) -> None:
    """Rows whose largest value makes the scale exactly 1, so x itself is rounded: e4m3 ties
    (1.0625 between 1 and 1.125, 17 between 16 and 18, 1.5·2⁻⁹ between two subnormals) go to
    the even neighbour, int8 ties (2.5, 3.5, −0.5) too, and −0 stays −0."""
    fp8_row = [448.0, 1.0625, 17.0, 1.5 * 2**-9, 2.5 * 2**-9, -0.0, -1.1875, 240.0, 0.0]
    int8_row = [127.0, 2.5, 3.5, -0.5, -0.0, 126.5, -2.5, 0.25, 0.0]
    rows: dict[QuantKind, list[float]] = {"fp8": fp8_row, "int8": int8_row}
    for kind, row in rows.items():
        x = torch.tensor([row, [-v for v in row]]).to(dtype)
        got, want = kernel.quantize_rows(x, kind), REFERENCES[kind](x)
        _assert_same(got, want)
        assert torch.equal(got[1], torch.ones(2, 1))
    q, _ = kernel.quantize_rows(torch.tensor([fp8_row]).to(dtype), "fp8")
    assert q.float()[0, :5].tolist() == [448.0, 1.0, 16.0, 2 * 2**-9, 2 * 2**-9]
    assert q.view(torch.uint8)[0, 5] == 0x80  # −0


def test_nan_inf_zero_and_subnormal_rows(kernel: ModuleType) -> None:
    """A row with a NaN: scale 1 and the NaN kept (the reference's where(scale > 0)); with an
    infinity: scale ∞ (inf/inf is NaN, the rest 0); all zeros: scale 1; fp32 subnormals."""
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    x[0, 5], x[1, 3], x[2], x[3] = float("nan"), float("inf"), 0.0, 1e-40
    for kind, reference in REFERENCES.items():
        got, want = kernel.quantize_rows(x, kind), reference(x)
        assert torch.equal(got[1], want[1])
        assert got[1][:3].flatten().tolist() == [1.0, float("inf"), 1.0]
        if kind == "fp8":
            _assert_same(got, want)
            assert got[0].float()[0, 5].isnan()
        else:  # int8 of NaN is the platform's; the rest agrees
            keep = ~x.isnan() & ~x.isinf()
            assert torch.equal(got[0][keep], want[0][keep])


def test_strided_rows_and_what_it_refuses(kernel: ModuleType) -> None:
    """A view with a padded row stride quantizes as its contiguous copy; other layouts are
    refused (the dispatch never sends them)."""
    wide = torch.randn(6, 80, generator=torch.Generator().manual_seed(2)).half()
    view = wide[:, :64]
    for kind in ("fp8", "int8"):
        _assert_same(kernel.quantize_rows(view, kind), REFERENCES[kind](view.contiguous()))
    with pytest.raises(ValueError, match="unit stride"):
        kernel.quantize_rows(wide.t(), "fp8")
    with pytest.raises(ValueError, match="unit stride"):
        kernel.quantize_rows(wide[None], "int8")


@pytest.fixture
def epilogue() -> ModuleType:
    pytest.importorskip("triton", reason="the test extra installs triton (x86-64 Linux)")
    return activation_quant._rescale_kernel()


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "cols"), [(1, 48), (37, 200), (70, 129)])
def test_epilogue_bit_exact_with_the_reference(
    epilogue: ModuleType,
    out_dtype: torch.dtype,
    acc_dtype: torch.dtype,
    rows: int,
    cols: int,
) -> None:
    """(acc · sx) · sw + b in fp32, rounded once: with and without the activations' scales and
    the bias, int8 products' magnitudes (to 1.3e8), outputs that round at bf16's and fp16's
    half-ulps, from a product with a padded row stride."""
    generator = torch.Generator().manual_seed(rows * cols)
    wide = torch.randint(-(2**27), 2**27, (rows, cols + 8), generator=generator)
    acc = wide.to(acc_dtype)[:, :cols]  # a row stride of cols + 8
    x_scales = torch.rand(rows, 1, generator=generator) * 1e-3
    w_scales = torch.rand(cols, 1, generator=generator) * 1e-3
    bias = torch.randn(cols, generator=generator).to(out_dtype)
    for sx in (x_scales, None):
        for b in (bias, None):
            got = epilogue.rescale(acc, sx, w_scales, b, out_dtype)
            want = rescale(acc, sx, w_scales, b, out_dtype)
            assert got.dtype == out_dtype
            assert got.is_contiguous()
            assert torch.equal(got, want)


def test_epilogue_overflow_nan_and_refusals(epilogue: ModuleType) -> None:
    """Outputs past the dtype's range become ±inf and NaN stays NaN, as the reference's casts
    give; layouts and dtypes the dispatch never sends are refused."""
    acc = torch.tensor([[2**30, -(2**30), 0, 7]], dtype=torch.int32)
    w_scales = torch.tensor([1e30, 1e30, float("nan"), 1.0])
    for dtype in (torch.bfloat16, torch.float16):
        got = epilogue.rescale(acc, None, w_scales, None, dtype).float()
        want = rescale(acc, None, w_scales, None, dtype).float()
        assert got[0, :2].tolist() == [float("inf"), float("-inf")] == want[0, :2].tolist()
        assert got[0, 2].isnan()
        assert want[0, 2].isnan()
        assert got[0, 3] == want[0, 3] == 7.0
    with pytest.raises(ValueError, match="unit stride"):
        epilogue.rescale(acc.t(), None, torch.ones(1), None, torch.float32)
    with pytest.raises(ValueError, match="writes bf16, fp16 or fp32"):
        epilogue.rescale(acc, None, w_scales, None, torch.int32)


def test_when_the_kernel_runs() -> None:
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    assert activation_quant.can_fuse(x, HOPPER, True)
    assert activation_quant.can_fuse(x.float(), (8, 0), True)
    assert not activation_quant.can_fuse(x, None, True)  # not CUDA
    assert not activation_quant.can_fuse(x, HOPPER, False)  # no triton
    assert not activation_quant.can_fuse(x, (7, 5), True)  # before Ampere
    assert not activation_quant.can_fuse(x.t(), HOPPER, True)  # columns not contiguous
    assert not activation_quant.can_fuse(x[None], HOPPER, True)  # not (M, K)
    assert not activation_quant.can_fuse(x[:0], HOPPER, True)  # no rows
    assert not activation_quant.can_fuse(x.to(torch.float64), HOPPER, True)
    product = torch.zeros(3, 48, dtype=torch.int32)
    assert not activation_quant.can_fuse(product, HOPPER, True)  # not an activation
    assert activation_quant.can_fuse(product, HOPPER, True, activation_quant.PRODUCT_DTYPES)
    assert not activation_quant.applies(x)  # the CPU


def _fuse_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Let the kernels run (interpreted) on CPU tensors, as on a GPU; count the calls. `verify`
    probes fewer rows (the interpreter runs a program at a time)."""
    calls: list[str] = []
    monkeypatch.setattr(activation_quant, "_PROBE_ROWS", (1, 5))

    def applies(x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = device.KERNEL_DTYPES) -> bool:
        calls.append("call")
        fuses = activation_quant.can_fuse(x, HOPPER, True, dtypes)
        return not activation_quant._refused and fuses

    monkeypatch.setattr(activation_quant, "applies", applies)
    return calls


def test_the_linears_quantize_through_the_kernel(
    kernel: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp8 `_scaled_mm` and int8 `_int_mm` linears (both run on the CPU in torch 2.13) give the
    same output with the kernels quantizing their activations (and scaling the int8 product)
    as with the references."""
    need_cpu_rowwise_scaled_mm()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 20, 64, generator=generator).bfloat16()
    fp8_weight = torch.randn(48, 64, generator=generator).to(torch.float8_e4m3fn)
    int8_weight = torch.randint(-127, 128, (48, 64), generator=generator, dtype=torch.int8)
    scales = torch.rand(48, 1, generator=generator)
    bias = torch.randn(48, generator=generator).bfloat16()
    want = (
        fp8_linear(x, fp8_weight, scales, bias),
        int8_dynamic_linear(x, int8_weight, scales, bias),
    )
    calls = _fuse_on_the_cpu(monkeypatch)
    got = (
        fp8_linear(x, fp8_weight, scales, bias),
        int8_dynamic_linear(x, int8_weight, scales, bias),
    )
    assert len(calls) == 3  # fp8 and int8 activations, the int8 product's epilogue
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_verify_uses_a_kernel_that_agrees(
    kernel: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fuse_on_the_cpu(monkeypatch)
    assert activation_quant.verify(torch.device("cpu"), torch.float16, [3, 40]) == "used"
    assert not activation_quant._refused


@pytest.mark.parametrize(
    ("broken", "why"),
    [("fp8 byte", "fp8 values of 1×3 torch.float16 (row stride 19) differ"),
     ("int8 scale", "int8 scales of 1×3"),
     ("epilogue", "the epilogue of 1×48 int32 → torch.float16 without bias differs"),
     ("raise", "RuntimeError: no kernel image")],
)  # fmt: skip
def test_verify_refuses_a_kernel_that_differs_or_fails(
    kernel: ModuleType, monkeypatch: pytest.MonkeyPatch, broken: str, why: str
) -> None:
    """One e4m3 byte off, one scale one ulp off, an epilogue 1% off, or a kernel that cannot
    run: refused for the process, said why, and from then on the references run."""
    calls = _fuse_on_the_cpu(monkeypatch)

    def broken_kernel(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        if broken == "raise":
            raise RuntimeError("no kernel image is available for execution on the device\n...")
        q, s = kernel.quantize_rows(x, kind)
        if broken == "fp8 byte" and kind == "fp8":
            q.view(torch.uint8)[0, -1] += 1
        if broken == "int8 scale" and kind == "int8":
            s = torch.nextafter(s, torch.full_like(s, float("inf")))
        return q, s

    epilogue = activation_quant._rescale_kernel()

    def broken_epilogue(acc: torch.Tensor, *args: Any) -> torch.Tensor:
        out: torch.Tensor = epilogue.rescale(acc, *args)
        return out * 1.01 if broken == "epilogue" else out

    fake: Any = SimpleNamespace(quantize_rows=broken_kernel, rescale=broken_epilogue)
    monkeypatch.setattr(activation_quant, "_kernel", lambda: fake)
    monkeypatch.setattr(activation_quant, "_rescale_kernel", lambda: fake)
    result = activation_quant.verify(torch.device("cpu"), torch.float16, [3, 64])
    assert result.startswith("refused: "), result
    assert why in result, result
    assert activation_quant.verify(torch.device("cpu"), torch.float16, [3]) == result  # kept
    x = torch.randn(2, 8, dtype=torch.float16)
    before = len(calls)
    got = activation_quant.quantize_activations(x, "fp8", quantize_rows)
    _assert_same(got, quantize_rows(x))
    assert len(calls) == before + 1  # asked, and refused


def test_verify_on_the_cpu_uses_nothing() -> None:
    result = activation_quant.verify(torch.device("cpu"), torch.bfloat16, [64])
    assert result.startswith("not used")
    assert not activation_quant._refused


@pytest.mark.parametrize(("kind", "compute"), [("fp8", False), ("int8", True), ("int8", False)])
def test_load_tuning_names_the_widths_that_quantize_activations(
    checkpoint: Path, kind: str, compute: bool
) -> None:
    """fp8 layers and int8 weight+activation ones quantize their activations: their input
    widths are what `verify` compiles; weight-only int8 has none. On the CPU nothing is used;
    on a GPU (gpu_check.sh) the compiled kernel is checked at those widths and used."""
    device = torch.device(DEVICE)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    model = load_model(checkpoint, device=device, dtype=dtype)
    quantize_model(model, kind, compute)  # type: ignore[arg-type]
    widths = activation_widths(model)
    text, vision = model.config.text, model.config.vision
    if kind == "int8" and not compute:
        assert widths == set()
    else:
        assert {text.hidden_size, text.intermediate_size, vision.hidden_size} <= widths
    tuning = tune_for_device(model)
    on_gpu = "used" if DEVICE == "cuda" else "not used (the references run"
    expected = NO_ACTIVATION_QUANT if not widths else on_gpu
    assert tuning.activation_quant.startswith(expected)
    assert tuning.to_json()["fused_activation_quant"] == tuning.activation_quant


@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels need CUDA (gpu_check.sh)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_kernels_quantize_rows_on_the_gpu(dtype: torch.dtype) -> None:
    """At the 11B model's widths (text 4,096 and 14,336, vision 1,280 and 5,120), compiled, and
    on a vision-sized step (6,432 rows) with the special values; the epilogue on a vision-sized
    int32 product (6,432 × 3,840, the fused q/k/v)."""
    assert activation_quant.verify(torch.device(DEVICE), dtype, [1280, 4096, 5120, 14336]) == "used"
    x = torch.randn(6432, 1280, device=DEVICE).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), -0.0, 1e-30, 3.0], device=DEVICE).to(dtype)
    x[1, 7] = float("inf")
    for kind, reference in REFERENCES.items():
        got, want = activation_quant._kernel().quantize_rows(x, kind), reference(x)
        assert torch.equal(got[1], want[1])
        keep = slice(2, None) if kind == "int8" else slice(None)  # int8 of NaN: the platform's
        a, b = (as_bits(t[keep]).cpu() for t in (got[0], want[0]))
        if kind == "fp8":
            nan = got[0][keep].float().isnan().cpu()
            assert torch.equal(nan, want[0][keep].float().isnan().cpu())
            a, b = a[~nan], b[~nan]
        assert torch.equal(a, b)
    acc = torch.randint(-(2**27), 2**27, (6432, 3840), device=DEVICE, dtype=torch.int32)
    x_scales = torch.rand(6432, 1, device=DEVICE) * 1e-3
    w_scales, bias = torch.rand(3840, device=DEVICE) * 1e-3, torch.randn(3840, device=DEVICE)
    got = activation_quant._rescale_kernel().rescale(acc, x_scales, w_scales, bias.to(dtype), dtype)
    assert torch.equal(got, rescale(acc, x_scales, w_scales, bias.to(dtype), dtype))
