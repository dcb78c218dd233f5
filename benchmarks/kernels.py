"""guardrt's Triton kernels against their references on this GPU (decode-step shapes).

Usage: python benchmarks/kernels.py [--repeat N]

For each of the 11B model's projection shapes at M = 1, 2 and 8 rows (a decode step, a category
step, a batch): the int8 weight-only kernel (`guardrt/kernels/int8_linear.py`), the reference
forward it replaces (dequantize, then a bf16 matmul) and a plain bf16 matmul; median µs and the
weight bytes per second each reaches (a decode step's floor is its weight bytes over the copy
bandwidth). Checks the kernel equals the reference before timing. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch

from guardrt.bench.timing import times_ms
from guardrt.export.quantize import QuantizedLinear, quantize_weight
from guardrt.kernels.int8_linear import int8_linear

SHAPES = {  # (out, in) of the text decoder's projections
    "q/o 4096x4096": (4096, 4096),
    "k/v 1024x4096": (1024, 4096),
    "gate/up 14336x4096": (14336, 4096),
    "down 4096x14336": (4096, 14336),
}


def _median_us(run: Callable[[], object], repeat: int) -> float:
    """Median µs of `run()` over `repeat` calls after 3 warm-ups."""
    return statistics.median(times_ms(run, torch.device("cuda"), repeat, warmup=3)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device))
    print(f"{'shape':<22}{'M':>3}{'int8 kernel':>14}{'reference':>12}{'bf16':>10}  GB/s (kernel)")
    for name, (out, inner) in SHAPES.items():
        weight = torch.randn(out, inner, device=device) * 0.02
        layer = QuantizedLinear(quantize_weight(weight), None)
        dense = weight.to(torch.bfloat16)
        for m in (1, 2, 8):
            x = torch.randn(m, inner, device=device, dtype=torch.bfloat16)
            with torch.inference_mode():
                expected = layer(x).float()
                got = int8_linear(x, layer.qweight, layer.scales, None).float()
            error = float((got - expected).abs().max() / expected.abs().max())
            if error > 2e-2:
                raise SystemExit(f"{name} M={m}: kernel differs from the reference by {error:.2e}")
            kernel = _median_us(
                functools.partial(int8_linear, x, layer.qweight, layer.scales, None), args.repeat
            )
            reference = _median_us(functools.partial(layer, x), args.repeat)
            plain = _median_us(functools.partial(torch.matmul, x, dense.T), args.repeat)
            rate = out * inner / (kernel * 1e-6) / 1e9
            print(
                f"{name:<22}{m:>3}{kernel:>12.1f}µs{reference:>10.1f}µs{plain:>8.1f}µs  {rate:.0f}"
            )


if __name__ == "__main__":
    main()
