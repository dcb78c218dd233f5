"""A checkpoint computed in fp32 without an fp32 copy of it.

`guardrt export build` measures every step against the checkpoint in fp32. Loading the 11B
model in fp32 for that is ~43 GB of memory, twice its bf16 size, and an int8 or fp8 build needs
no fp32 model afterwards: its weights are quantized from the stored ones (`quantize_model` with
`dtype=float32` casts each chunk first, so the result is the same). So the build loads the
weights as stored (on the CPU they stay mapped from the files) and `computed_in_fp32` makes
every module read each floating parameter as its fp32 cast, made where it is read and dropped
after. A bf16 or fp16 value is exactly representable in fp32, so the probes' logits are those
of a model loaded in fp32, bit for bit; the price is the casts, once per parameter per forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize


class _Fp32(nn.Module):
    """A parametrization: the stored parameter, read as fp32."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


@contextmanager
def computed_in_fp32(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` computes as if loaded in fp32: each floating parameter not
    already fp32 is read through an fp32 cast, and such buffers are cast (they are small).
    On leaving, the parameters are as stored again (the buffers stay fp32)."""
    wrapped: list[tuple[nn.Module, str]] = []
    try:
        for module in list(model.modules()):
            for name, param in list(module._parameters.items()):
                if param is not None and param.is_floating_point() and param.dtype != torch.float32:
                    parametrize.register_parametrization(module, name, _Fp32(), unsafe=True)
                    wrapped.append((module, name))
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.is_floating_point() and not buffer.is_meta:
                    module._buffers[name] = buffer.float()
        yield model
    finally:
        for module, name in wrapped:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
