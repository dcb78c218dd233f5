"""The fused RMSNorm and RoPE kernels against their references, when they run, and the check
that refuses them on a GPU where they are wrong.

The kernels run under Triton's CPU interpreter here (conftest.py sets TRITON_INTERPRET=1), in
fp16 and fp32: the interpreter has no correct bf16. On a GPU (GUARDRT_TEST_DEVICE=cuda with
TRITON_INTERPRET=0, scripts/gpu_check.sh) the last test runs them compiled, in bf16 too.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from guardrt.kernels import device, fused
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.fuse import fuse_projections
from tests.models import DEVICE, mixed_batch_logits, small_config, write_small

HOPPER: device.Capability = (9, 0)
SHAPES = fused.Shapes(hidden=256, heads=4, kv_heads=2, head_dim=64, eps=1e-5, intermediate=96)


@pytest.fixture
def kernels() -> ModuleType:
    pytest.importorskip("triton", reason="the test extra installs triton (x86-64 Linux)")
    return fused._kernels()


@pytest.fixture(autouse=True)
def _unrefused() -> Iterator[None]:
    """Each test starts and ends with the kernels not refused (the state is per process)."""
    fused._refused.clear()
    yield
    fused._refused.clear()


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _qk(dtype: torch.dtype, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, 4, S, 64) and k (B, 2, S, 64) as the model has them: strided views of one fused
    qkv projection's output."""
    qkv = _randn(batch, tokens, (4 + 2 + 2) * 64, seed=1).to(dtype)  # (B, S, (H + 2·Hkv)·d)
    q, k, _ = torch.split(qkv, [256, 128, 128], dim=-1)
    return (
        q.view(batch, tokens, 4, 64).transpose(1, 2),  # (B, H, S, d)
        k.view(batch, tokens, 2, 64).transpose(1, 2),  # (B, Hkv, S, d)
    )


def _bits(t: torch.Tensor) -> list[int]:
    """The values' bit patterns, signs of zeros included (torch.equal takes −0 for +0)."""
    ints = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
    return t.contiguous().view(ints[t.dtype]).flatten().tolist()


def _layout(t: torch.Tensor) -> tuple[int, ...]:
    """The strides that place t's values in memory (a size-1 dim's stride places nothing)."""
    return tuple(stride for stride, size in zip(t.stride(), t.shape, strict=True) if size > 1)


def _cos_sin(dtype: torch.dtype, batch: int, tokens: int, d: int) -> tuple[torch.Tensor, ...]:
    angles = _randn(batch, tokens, d // 2, seed=2, scale=100.0)
    return tuple(torch.cat((a, a), dim=-1).to(dtype) for a in (angles.cos(), angles.sin()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("batch", "tokens"), [(1, 1), (2, 37), (1, 64)])
def test_rope_is_bit_exact_on_strided_heads(
    kernels: ModuleType, dtype: torch.dtype, batch: int, tokens: int
) -> None:
    """Each product rounded as the reference rounds it: identical values, and the output laid
    out as the reference's (B, S, H, D) memory, not transposed."""
    cos, sin = _cos_sin(dtype, batch, tokens, 64)
    for rows in _qk(dtype, batch, tokens):
        got, want = kernels.rope(rows, cos, sin), fused.rope_reference(rows, cos, sin)
        assert _bits(got) == _bits(want), float((got.float() - want.float()).abs().max())
        assert _layout(got) == _layout(want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("batch", "tokens"), [(1, 1), (2, 37)])
def test_rope_heads_rotates_q_and_k_in_place(
    kernels: ModuleType, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, batch: int,
    tokens: int,
) -> None:  # fmt: skip
    """The model's call: the q, k and v heads of one fused qkv output, q and k rotated in one
    launch, written over the projection's output (v untouched beside k), bit for bit the
    reference's values; without the kernel a new tensor of the same values, heads unchanged."""
    qkv = _randn(batch, tokens, (4 + 2 + 2) * 64, seed=1).to(dtype)
    cos, sin = _cos_sin(dtype, batch, tokens, 64)

    def heads_of(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, tokens, 8, 64).transpose(1, 2)  # (B, H + 2·Hkv, S, d)

    before = qkv.clone()
    want = fused.rope_heads(heads_of(qkv), 6, cos, sin)  # the CPU: the reference
    assert torch.equal(qkv, before)  # not written
    q, k = _qk(dtype, batch, tokens)  # the same q and k views of the same values
    assert _bits(want[:, :4]) == _bits(fused.rope_reference(q, cos, sin))
    assert _bits(want[:, 4:6]) == _bits(fused.rope_reference(k, cos, sin))
    assert _bits(want[:, 6:]) == _bits(heads_of(before)[:, 6:])
    calls = _fuse_on_the_cpu(monkeypatch)
    heads = heads_of(qkv)
    got = fused.rope_heads(heads, 6, cos, sin)
    assert calls
    assert got is heads  # in place: k and v still side by side in the projection's output
    assert _bits(heads_of(qkv)) == _bits(want)


def test_rope_in_place_refuses_overlapping_rows(kernels: ModuleType) -> None:
    x = torch.ones(1, 1, 1, 64).expand(1, 3, 1, 64)  # three heads on one row of memory
    cos = torch.ones(1, 1, 64)
    with pytest.raises(ValueError, match="do not overlap"):
        kernels.rope(x, cos, cos, in_place=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rope_keeps_the_sign_of_zeros(kernels: ModuleType, dtype: torch.dtype) -> None:
    """x·cos − x2·sin where both products are zeros of either sign: −0 − (+0) is −0, as the
    reference's −0 + (−0); a kernel that negated by 0 − x would give +0."""
    x, cos, sin = _signed_zeros(torch.device("cpu"), dtype)
    got, want = kernels.rope(x, cos, sin), fused.rope_reference(x, cos, sin)
    assert _bits(got) == _bits(want)
    assert torch.signbit(want).any()  # the case is there


def _signed_zeros(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """x (1, 1, 16, 2) pairing ±0 and ±1, cos (1, 16, 2) of ones, sin (1, 16, 2) of ±1."""
    signed = torch.tensor([0.0, -0.0, 1.0, -1.0])
    x = torch.cartesian_prod(signed, signed).reshape(1, 1, 16, 2)
    cos = torch.tensor([1.0, 1.0]).expand(1, 16, 2).contiguous()
    sin = torch.tensor([1.0, -1.0]).expand(1, 16, 2).contiguous()
    return tuple(t.to(device=device, dtype=dtype) for t in (x, cos, sin))


def test_rope_broadcasts_cos_and_sin(kernels: ModuleType) -> None:
    """cos/sin of one row (1, S, D) for a batch of rows, as the reference broadcasts them."""
    q, _ = _qk(torch.float32, 3, 5)
    cos, sin = _cos_sin(torch.float32, 1, 5, 64)
    assert _bits(kernels.rope(q, cos, sin)) == _bits(fused.rope_reference(q, cos, sin))
    assert fused.broadcasts(q, cos, sin)
    assert not fused.broadcasts(q, cos[:, :4], sin[:, :4])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("shape", "transpose"),
    [((7,), False), ((2, 37, 256), False), ((1, 1, 4096), False), ((3, 5, 100), False),
     ((2, 37, 4, 64), True), ((2, 9, 2, 128), False)],
)  # fmt: skip
def test_rms_norm_within_two_ulps(
    kernels: ModuleType, dtype: torch.dtype, shape: tuple[int, ...], transpose: bool
) -> None:
    """Rows of the decoder's width, a width that is no power of two (masked columns), 16-row
    programs over head-sized rows, and the cross layers' q norm on a transposed view."""
    x = _randn(*shape, seed=3, scale=3.0).to(dtype)
    if transpose:
        x = x.transpose(1, 2)  # (B, H, S, d): the cross layers' q, strided
    weight = (1 + _randn(shape[-1], seed=4) / 4).to(dtype)
    got = kernels.rms_norm(x, weight, 1e-5)
    want = fused.rms_norm_reference(x, weight, 1e-5)
    assert got.dtype == want.dtype
    assert _layout(got) == _layout(want)
    torch.testing.assert_close(got, want, rtol=fused.TWO_ULPS[dtype], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 37, 256), (1, 1, 4096), (3, 5, 100), (9,)])
def test_add_rms_norm_sum_is_exact_and_norm_within_two_ulps(
    kernels: ModuleType, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """The residual add before a norm: the sum bit for bit torch's `x + delta` (one rounding),
    stored laid out as x, the norm of that sum as the plain norm's; delta a strided view (a
    slice of a wider tensor's rows), x's magnitudes cancelling some of delta's."""
    x = _randn(*shape, seed=8, scale=3.0).to(dtype)
    wide = _randn(*shape[:-1], shape[-1] + 16, seed=9, scale=3.0)
    wide[..., : shape[-1]] -= x.float() * 0.999  # near-cancellation: sums far below either
    delta = wide.to(dtype)[..., : shape[-1]]  # unit stride along D, a longer row stride
    weight = (1 + _randn(shape[-1], seed=10) / 4).to(dtype)
    summed, normed = kernels.add_rms_norm(x, delta, weight, 1e-5)
    want_sum, want = fused.add_rms_norm_reference(x, delta, weight, 1e-5)
    assert _bits(summed) == _bits(want_sum)
    assert _layout(summed) == _layout(want_sum)
    assert _layout(normed) == _layout(want)
    torch.testing.assert_close(normed, want, rtol=fused.TWO_ULPS[dtype], atol=1e-6)
    # the norm of the sum is the plain kernel's norm of the reference sum
    assert _bits(normed) == _bits(kernels.rms_norm(want_sum, weight, 1e-5))


def test_add_rms_norm_dispatch(kernels: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """No delta: x itself and its norm. A delta that only broadcasts to x: the reference."""
    calls = _fuse_on_the_cpu(monkeypatch)
    x, weight = _randn(2, 3, 64).half(), torch.ones(64, dtype=torch.float16)
    same, normed = fused.add_rms_norm(x, None, weight, 1e-5)
    assert same is x
    assert _bits(normed) == _bits(kernels.rms_norm(x, weight, 1e-5))
    row = _randn(1, 1, 64, seed=1).half()  # broadcasts over (2, 3)
    summed, _ = fused.add_rms_norm(x, row, weight, 1e-5)
    assert torch.equal(summed, x + row)
    assert len(calls) == 1  # the plain norm asked; the broadcast never reached the kernel
    with pytest.raises(ValueError, match=r"delta \(1, 1, 64\)"):
        kernels.add_rms_norm(x, row, weight, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(7,), (2, 37, 96), (1, 1, 14336), (3, 1500)])
def test_silu_mul_within_two_ulps(
    kernels: ModuleType, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """The halves of a fused gate/up output (strided views), a width past one 1,024-column
    block, gates from −40 to 40 (e^−g overflows to inf, silu to −0)."""
    gate_up = _randn(*shape[:-1], 2 * shape[-1], seed=7, scale=8.0)
    gate_up[..., 0] = -40.0
    gate_up[..., 1] = 40.0
    gate, up = gate_up.to(dtype).chunk(2, dim=-1)
    got = fused._silu_kernel().silu_mul(gate, up)
    want = fused.silu_mul_reference(gate, up)
    assert got.dtype == want.dtype
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=fused.TWO_ULPS[dtype], atol=1e-6)


def test_silu_mul_refuses_what_it_cannot_take(kernels: ModuleType) -> None:
    silu = fused._silu_kernel()
    with pytest.raises(ValueError, match=r"\(2, 3\) torch\.float32 and \(2, 4\)"):
        silu.silu_mul(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="unit stride"):
        silu.silu_mul(torch.ones(4, 2).t(), torch.ones(4, 2).t())


def test_rms_norm_kernel_normalises_each_row_on_its_own(kernels: ModuleType) -> None:
    """Rows of very different scales in one program (16 rows of 64): each gets its own norm."""
    x = _randn(32, 64, seed=5) * torch.logspace(-1, 3, 32)[:, None]  # mean x² ≫ eps
    weight = torch.ones(64)
    got = kernels.rms_norm(x, weight, 1e-6)
    rms = got.pow(2).mean(-1)
    torch.testing.assert_close(rms, torch.ones(32), rtol=1e-3, atol=0)


def test_the_kernels_refuse_what_they_cannot_take(kernels: ModuleType) -> None:
    x = torch.randn(2, 8, 64)
    with pytest.raises(ValueError, match=r"torch\.float16 weight for torch\.float32 input"):
        kernels.rms_norm(x, torch.ones(64, dtype=torch.float16), 1e-5)
    with pytest.raises(ValueError, match="unit stride"):
        kernels.rms_norm(x.transpose(1, 2), torch.ones(8), 1e-5)
    cos = torch.ones(1, 3, 64)
    with pytest.raises(ValueError, match=r"cos/sin \(1, 3, 64\) for x \(1, 2, 4, 64\)"):
        kernels.rope(torch.ones(1, 2, 4, 64), cos, cos)
    with pytest.raises(ValueError, match="even D"):
        kernels.rope(torch.ones(1, 2, 3, 63), torch.ones(1, 3, 63), torch.ones(1, 3, 63))


def test_when_the_kernels_run() -> None:
    """On a CUDA GPU of sm ≥ 8.0 with triton, for bf16/fp16/fp32 with unit-stride rows and
    partners of the same dtype; never on the CPU or while a tracer records."""
    x, w = torch.randn(2, 4, 8), torch.ones(8)
    assert fused.can_fuse(x, (w,), HOPPER, has_triton=True)
    assert fused.can_fuse(x.to(torch.bfloat16), (w.to(torch.bfloat16),), (8, 0), True)
    assert not fused.can_fuse(x, (w,), None, True)  # not a CUDA device
    assert not fused.can_fuse(x, (w,), (7, 5), True)
    assert not fused.can_fuse(x, (w,), HOPPER, has_triton=False)
    assert not fused.can_fuse(x, (w.half(),), HOPPER, True)  # the reference would promote
    assert not fused.can_fuse(x.transpose(1, 2), (w,), HOPPER, True)
    assert not fused.can_fuse(x.double(), (w.double(),), HOPPER, True)
    assert not fused.applies(x, w)  # the CPU


def _fuse_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Let the kernels run (interpreted) on CPU tensors, as on a GPU; count the calls."""
    calls: list[str] = []

    def applies(x: torch.Tensor, *others: torch.Tensor) -> bool:
        calls.append("call")
        return not fused._refused and fused.can_fuse(x, others, HOPPER, True)

    monkeypatch.setattr(fused, "applies", applies)
    return calls


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small(tmp_path_factory.mktemp("norm_rope"), small_config("gqa2-cross2,4"), seed=3)


def test_the_model_with_fused_kernels_scores_as_with_the_references(
    kernels: ModuleType, gqa_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model(gqa_checkpoint)
    fuse_projections(model)
    want = mixed_batch_logits(model, decode=True)
    calls = _fuse_on_the_cpu(monkeypatch)
    sums = []
    original = kernels.add_rms_norm

    def add_rms_norm(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        sums.append(args[0].shape)
        result: tuple[torch.Tensor, torch.Tensor] = original(*args)
        return result

    monkeypatch.setattr(kernels, "add_rms_norm", add_rms_norm)
    got = mixed_batch_logits(model, decode=True)
    assert calls, "the kernels were asked"
    # Every residual add but the last ran in a norm's kernel: both norms of every layer but
    # the first layer's input norm (nothing to add yet), in both steps (each has an image).
    layers = model.config.text.num_layers
    assert len(sums) == 2 * (2 * layers - 1), sums
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_verify_uses_kernels_that_agree(
    kernels: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fuse_on_the_cpu(monkeypatch)
    assert fused.verify(torch.device("cpu"), torch.float16, SHAPES) == "used"
    assert not fused._refused


@pytest.mark.parametrize(
    ("broken", "why"),
    [("rope", "rope on q differs from the reference"),
     ("rms_norm", "rms_norm over the hidden"),
     ("add_sum", "add_rms_norm's sum differs from the reference"),
     ("add_norm", "add_rms_norm's norm differs from the reference"),
     ("silu", "silu_mul differs from the reference"),
     ("raise", "RuntimeError: no kernel image")],
)  # fmt: skip
def test_verify_refuses_kernels_that_disagree_or_fail(
    kernels: ModuleType, monkeypatch: pytest.MonkeyPatch, broken: str, why: str
) -> None:
    """One ulp off in RoPE or in a residual sum, a norm or a SwiGLU product off by 1%, or a
    kernel that cannot run: refused for the process, said why, and from then on every call runs
    the reference."""
    calls = _fuse_on_the_cpu(monkeypatch)

    def rope(
        x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_place: bool = False
    ) -> torch.Tensor:
        out: torch.Tensor = kernels.rope(x, cos, sin, in_place=in_place)
        if broken == "rope":  # one ulp off, in the tensor written (in place: x itself)
            out.view(torch.int16).add_(1)
        return out

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if broken == "raise":
            raise RuntimeError("no kernel image is available for execution on the device\n...")
        out: torch.Tensor = kernels.rms_norm(x, weight, eps)
        return out * 1.01 if broken == "rms_norm" else out

    def add_rms_norm(
        x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        summed, out = kernels.add_rms_norm(x, delta, weight, eps)
        if broken == "add_sum":  # one ulp off in one value of the sum
            summed.view(-1)[:1].view(torch.int16).add_(1)
        return summed, out * 1.01 if broken == "add_norm" else out

    silu = fused._silu_kernel()

    def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = silu.silu_mul(gate, up)
        return out * 1.01 if broken == "silu" else out

    fake: Any = SimpleNamespace(
        rope=rope, rms_norm=rms_norm, add_rms_norm=add_rms_norm, silu_mul=silu_mul
    )
    monkeypatch.setattr(fused, "_kernels", lambda: fake)
    monkeypatch.setattr(fused, "_silu_kernel", lambda: fake)
    result = fused.verify(torch.device("cpu"), torch.float16, SHAPES)
    assert result.startswith("refused: "), result
    assert why in result, result
    assert fused.verify(torch.device("cpu"), torch.float16, SHAPES) == result  # remembered
    x = torch.randn(2, 3, 8, dtype=torch.float16)
    before = len(calls)
    assert torch.equal(fused.rms_norm(x, torch.ones(8, dtype=x.dtype), 1e-5),
                       fused.rms_norm_reference(x, torch.ones(8, dtype=x.dtype), 1e-5))  # fmt: skip
    assert len(calls) == before + 1  # asked, and refused


def test_verify_on_the_cpu_uses_nothing() -> None:
    assert fused.verify(torch.device("cpu"), torch.float32, SHAPES).startswith("not used")
    assert not fused._refused


@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels need CUDA (gpu_check.sh)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_kernels_on_the_gpu(dtype: torch.dtype) -> None:
    """At the full model's sizes (4,096 wide, 32 heads, 8 kv heads of 128), compiled."""
    shapes = fused.Shapes(
        hidden=4096, heads=32, kv_heads=8, head_dim=128, eps=1e-5, intermediate=14336
    )
    assert fused.verify(torch.device(DEVICE), dtype, shapes) == "used"
    x = torch.randn(1, 221, 4096, device=DEVICE).to(dtype)
    assert fused.applies(x, torch.ones(4096, device=DEVICE, dtype=dtype))
    zeros, cos, sin = _signed_zeros(torch.device(DEVICE), dtype)  # bit for bit, signs of 0
    got, want = fused._kernels().rope(zeros, cos, sin), fused.rope_reference(zeros, cos, sin)
    assert _bits(got.cpu()) == _bits(want.cpu())
    q, k = (t.to(DEVICE) for t in _qk(dtype, 2, 37))
    cos, sin = (t.to(DEVICE) for t in _cos_sin(dtype, 2, 37, 64))
    for rows in (q, k):
        got, want = fused._kernels().rope(rows, cos, sin), fused.rope_reference(rows, cos, sin)
        assert _bits(got.cpu()) == _bits(want.cpu())


def test_the_norm_rope_benchmark_dry_run(kernels: ModuleType, tmp_path: Path) -> None:
    """`benchmarks/norm_rope.py --dry-run` (tiny shapes, the interpreter): every op at every
    row count runs and agrees, so the one GPU run measures rather than fails."""
    bench = importlib.import_module("benchmarks.norm_rope")
    out = tmp_path / "norm_rope.json"
    assert bench.main(["--dry-run", "--out", str(out)]) == 0
    cells = json.loads(out.read_text())["cells"]
    ops = {(c["rows"], c["op"]) for c in cells if "ok" in c}
    names = ("rms_norm 128", "add+rms_norm 128", "q norm 32 (cross)", "silu·up 96", "rope q+k",
             *(f"quantize fp8 {width}" for width in (128, 96, 32, 64)))  # fmt: skip
    assert ops == {(r, op) for r in bench.DRY_ROWS for op in names}
    assert all(c["ok"] for c in cells if "ok" in c)
    assert {c["rows"] for c in cells if "saved_us" in c} == set(bench.DRY_ROWS)
    assert len([c for c in cells if "saved_us" in c]) == 3 * len(bench.DRY_ROWS)
