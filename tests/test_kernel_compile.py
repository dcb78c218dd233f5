"""Every Triton kernel compiles for Hopper (sm_90) here, without a GPU (`tests/compile_kernels.py`).

The interpreter the other kernel tests use runs a kernel's Python, not its compilation: code it
accepts may not compile, and a block shape may need more shared memory than an H100 has. This
compiles each kernel as its wrapper launches it, to the cubin an H100 would load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.compile_kernels import HOPPER_SHARED_BYTES

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_hopper(tmp_path: Path) -> None:
    pytest.importorskip("triton", reason="the test extra installs triton (x86-64 Linux)")
    env = os.environ | {"TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}  # no cache
    done = subprocess.run(
        [sys.executable, "-m", "tests.compile_kernels"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    failed = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not failed, failed
    kernels = {name.split()[0] for name in results}
    assert kernels == {"rms_norm", "rope", "silu_mul", "int8_linear", "quantize_rows", "rescale"}
    assert len([n for n in results if n.startswith("int8_linear")]) == 2 * 3 * 3
    for name, result in results.items():
        assert result["cubin_bytes"] > 0
        assert result["shared_bytes"] <= HOPPER_SHARED_BYTES, name
        if name.startswith(("rope", "rescale")):
            assert result["fma"] == 0, f"{name}: FMA contraction would change its roundings"
        if name.startswith("quantize_rows"):  # bit for bit the reference's IEEE divisions
            assert result["approximate_divisions"] == 0, name
