"""The CUDA code paths on fake CUDA tensors (`tests/fake_cuda.py`), CUDA graph captures and
compiling every Triton launch for the card included, faking an H100 and an A100, where torch
is its CUDA build and no GPU is present; in a child process, since the check patches torch
and triton."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("gpu", "arch"), [("h100", 90), ("a100", 80)])
def test_the_cuda_paths_run_on_fake_cuda_tensors(gpu: str, arch: int) -> None:
    if not torch.backends.cuda.is_built():  # type: ignore[no-untyped-call]
        pytest.skip(
            f"torch {torch.__version__} is a CPU build, which can't make CUDA tensors even fake"
            " ones: run it in a venv with torch's CUDA wheel (README, torch versions)"
        )
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the GPU tests run these paths for real")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "tests.fake_cuda", "--gpu", gpu], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    summary = result.stdout[result.stdout.rfind("faked:") :]
    assert result.returncode == 0, summary or result.stderr[-3000:]
    assert "bench: ok" in summary
    assert "serve: ok" in summary
    assert "scripts: ok" in summary
    assert ", 0 refused" in summary  # every CUDA graph capture took nothing it must not
    # The 8-bit and fused kernels' paths were taken (their launches checked), not fallbacks.
    for kernel in ("_int8_linear_kernel", "_quantize_rows_kernel", "_rms_norm_kernel"):
        assert kernel in summary
    # Every launch compiled for the card's architecture and fits its shared memory.
    assert f"Triton kernels compiled for sm_{arch}: " in summary
    assert "does not compile or fit" not in summary
