"""A device name (`auto`, `cpu`, `cuda`, `cuda:N`) as a torch device this process can use.

Checked where it is given, so that `--device cuda` on a machine whose torch has no CUDA, or
`cuda:3` on a one-GPU host, is an error naming the flag and why, not an assertion deep in the
first weight's copy (after the checkpoint's files were read).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from guardrt.runtime.errors import ConfigError


def usable_device(name: str, what: str = "device") -> torch.device:
    """`name` as a torch device; `auto` is the GPU when torch sees one, else the CPU. A
    ConfigError says `what` (the flag) and why when it is no device or not one here."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"{what} {name!r} is not a torch device (cpu, cuda, cuda:N)") from exc
    if device.type != "cuda":
        return device
    # device_count, not is_available: it asks the same of the driver, and it is what a fake
    # CUDA run (tests/fake_cuda.py) answers while is_available stays False for FakeTensorMode.
    count = torch.cuda.device_count()
    if count == 0:
        why = (
            "torch sees no CUDA GPU (check the driver and CUDA_VISIBLE_DEVICES)"
            if torch.backends.cuda.is_built()  # type: ignore[no-untyped-call]
            else f"this torch ({torch.__version__}) is a CPU build"
        )
        raise ConfigError(f"{what} {name!r} cannot be used: {why}")
    if device.index is not None and device.index >= count:
        raise ConfigError(
            f"{what} {name!r} cannot be used: torch sees {count} CUDA GPU(s), cuda:0 to "
            f"cuda:{count - 1}"
        )
    return device


def on_device(device: torch.device) -> AbstractContextManager[object]:
    """Make `device` the thread's current CUDA device for a block (nothing for the CPU).

    The current device is per thread, and cuda:0 by default: an engine on cuda:1, loaded on
    one thread and run on the scheduler's, would capture its CUDA graphs and launch its Triton
    kernels on the current device's stream, not its own. Every engine entry point runs in it."""
    if device.type != "cuda":
        return nullcontext()
    return torch.cuda.device(device)
