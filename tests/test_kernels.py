"""Triton kernels against their plain-PyTorch references, under Triton's CPU interpreter."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch

from guardrt.export.quantize import QuantizedLinear, quantize_weight

# conftest.py sets TRITON_INTERPRET=1 before anything imports triton (the CPU interpreter).
pytest.importorskip("triton", reason="the test extra installs triton (x86-64 Linux)")
kernels: Any = importlib.import_module("guardrt.kernels.int8_linear")


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 48), (5, 96, 130), (33, 128, 64)])
def test_int8_linear_equals_the_reference(m: int, k: int, n: int, bias: bool) -> None:
    """Shapes off the block sizes on every axis (M 1/5/33, K 96, N 48/130)."""
    generator = torch.Generator().manual_seed(m * k + n)
    linear = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=generator))
    reference = QuantizedLinear(quantize_weight(linear.weight), linear.bias)
    x = torch.randn(2, m, k, generator=generator)  # a leading batch dim too
    with torch.inference_mode():
        expected = reference(x)
        got = kernels.int8_linear(x, reference.qweight, reference.scales, reference.bias)
    assert got.shape == expected.shape == (2, m, n)
    assert got.dtype == x.dtype
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_int8_linear_refuses_what_it_does_not_compute() -> None:
    weight = torch.randn(16, 32)
    grouped = quantize_weight(weight, group_size=8)
    with pytest.raises(ValueError, match="one scale per channel"):
        kernels.int8_linear(torch.randn(2, 32), grouped.qweight, grouped.scales, None)
    with pytest.raises(ValueError, match="must be int8"):
        kernels.int8_linear(torch.randn(2, 32), weight, torch.ones(16), None)
