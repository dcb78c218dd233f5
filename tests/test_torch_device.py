"""`--device` names a device this process can use, or the command stops at once saying why
(whatever the machine: CUDA's presence is set here, not read)."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from guardrt.cli import main
from guardrt.runtime.engine import EngineOptions, torch_engine
from guardrt.runtime.engine.torch_device import on_device, usable_device
from guardrt.runtime.engine.torch_engine import TorchEngine
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.prepare import Preparer


def cuda_present(monkeypatch: pytest.MonkeyPatch, gpus: int, build: str | None = "13.0") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: build is not None)


@pytest.mark.parametrize(
    ("name", "gpus", "build", "message"),
    [
        ("foo", 1, "13.0", "--device 'foo' is not a torch device (cpu, cuda, cuda:N)"),
        ("cuda", 0, None, "--device 'cuda' cannot be used: this torch (" + torch.__version__),
        ("cuda:0", 0, "13.0", "--device 'cuda:0' cannot be used: torch sees no CUDA GPU"),
        ("cuda:1", 1, "13.0", "--device 'cuda:1' cannot be used: torch sees 1 CUDA GPU(s)"),
    ],
    ids=["not-a-device", "cpu-build", "no-gpu", "index-past-the-gpus"],
)
def test_unusable_devices_are_named(
    monkeypatch: pytest.MonkeyPatch, name: str, gpus: int, build: str | None, message: str
) -> None:
    cuda_present(monkeypatch, gpus, build)
    with pytest.raises(ConfigError, match=re.escape(message)):
        usable_device(name, "--device")


@pytest.mark.parametrize(
    ("name", "gpus", "expected"),
    [("auto", 0, "cpu"), ("auto", 2, "cuda"), ("cuda:1", 2, "cuda:1"), ("cpu", 0, "cpu")],
)
def test_usable_devices(
    monkeypatch: pytest.MonkeyPatch, name: str, gpus: int, expected: str
) -> None:
    cuda_present(monkeypatch, gpus)
    assert usable_device(name) == torch.device(expected)


def test_serve_on_a_missing_gpu_stops_before_loading(
    monkeypatch: pytest.MonkeyPatch, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cuda_present(monkeypatch, 0, None)
    monkeypatch.setattr(
        "guardrt.runtime.engine.torch_engine.load_model",
        lambda *a, **k: pytest.fail("the checkpoint was loaded"),
    )
    argv = ["serve", "--model", str(checkpoint), "--device", "cuda", "--grpc-port", "0"]
    assert main([*argv, "--http-port", "-1", "--max-seq", "1024"]) == 2
    assert "guardrt: error: device 'cuda' cannot be used: this torch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 73.24 GiB. GPU 0 has ..."),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 78647132160 bytes. Error code 12"
        ),
    ],
    ids=["gpu", "cpu"],
)
def test_caches_the_device_cannot_hold_are_named(
    monkeypatch: pytest.MonkeyPatch, checkpoint: Path, error: RuntimeError
) -> None:
    """Too many rows for the device (say --max-batch-size 100000) is an error naming the rows
    and what to lower, not the allocator's traceback."""

    def allocate(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(torch_engine, "setup_steps", allocate)
    options = EngineOptions(checkpoint, device="cpu", max_batch=100_000, max_seq=1024)
    expected = (
        f"out of memory on cpu allocating the K/V caches ({str(error).splitlines()[0]}); the K/V "
        "caches have 100005 rows (max_batch 100000 + max_sessions 4 + max_prefixes 1): lower "
        "--max-batch-size or --max-streams"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        TorchEngine(options)


def test_other_errors_of_the_cache_set_up_are_not_called_memory(
    monkeypatch: pytest.MonkeyPatch, checkpoint: Path
) -> None:
    def allocate(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(torch_engine, "setup_steps", allocate)
    with pytest.raises(RuntimeError, match=r"^a bug$"):
        TorchEngine(EngineOptions(checkpoint, device="cpu", max_seq=1024))


def test_more_positions_than_the_model_has_are_refused_before_loading(
    monkeypatch: pytest.MonkeyPatch, checkpoint: Path
) -> None:
    monkeypatch.setattr(
        torch_engine, "load_model", lambda *a, **k: pytest.fail("the checkpoint was loaded")
    )
    options = EngineOptions(checkpoint, device="cpu", max_seq=131_073)
    message = "max_seq 131073 is over the model's 131072 positions (max_position_embeddings)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        TorchEngine(options)


def test_a_cuda_device_is_made_current_for_the_block() -> None:
    """The current CUDA device is per thread (cuda:0 by default); an engine on cuda:1 must be
    current where its graphs are captured and its kernels launched."""
    scope = on_device(torch.device("cuda:1"))
    assert isinstance(scope, torch.cuda.device)
    assert scope.idx == 1
    assert isinstance(on_device(torch.device("cpu")), contextlib.nullcontext)


def test_the_engine_loads_warms_up_and_runs_on_its_device(
    monkeypatch: pytest.MonkeyPatch, checkpoint: Path, preparer: Preparer
) -> None:
    """Loading (allocation, graph capture, kernel tuning), the warm-up and every batch run
    with the engine's device current, whichever thread calls them."""
    inside: list[str] = []

    @contextlib.contextmanager
    def recorded(device: torch.device) -> Iterator[None]:
        inside.append(str(device))
        with on_device(device):
            yield

    monkeypatch.setattr(torch_engine, "on_device", recorded)

    def checked_load(*args: Any, **kwargs: Any) -> Any:
        assert inside == ["cpu"], "loaded outside the device's scope"
        return load_model(*args, **kwargs)

    monkeypatch.setattr(torch_engine, "load_model", checked_load)
    engine = TorchEngine(EngineOptions(checkpoint, device="cpu", max_batch=2, max_seq=1024))
    request = preparer.prepare([{"role": "user", "content": "Hi."}])
    engine.warmup([request])
    warmed = len(inside)
    assert warmed > 1
    thread = threading.Thread(target=engine.execute, args=([request],))
    thread.start()
    thread.join(60)
    assert inside == ["cpu"] * (warmed + 1)
