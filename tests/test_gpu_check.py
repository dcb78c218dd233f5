"""scripts/gpu_check.sh's control flow, on the CPU: the one device call of issue 8 must stop at
once on a broken set-up (device time is scarce), run only the parts asked for, and refuse a part
it does not know. `python` is a stub here that logs its arguments and fails where told to."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# A part runs `python -m guardrt.bench.latency`, `python -m pytest ...` or
# `python benchmarks/X.py`; the preflight runs `python -c ...`.
STUB = """#!/usr/bin/env bash
echo "$*" | head -c 400 | tr '\\n' ' ' >> "$STUB_LOG"; echo >> "$STUB_LOG"
if [ "$1" = "-c" ] && [ -n "${STUB_FAIL_PREFLIGHT:-}" ]; then
    echo "ModuleNotFoundError: No module named 'llama_models'" >&2
    exit 3
fi
if [ "$2" = "guardrt.bench.latency" ] && [ "$3" = "--results" ] && [ -n "${STUB_RESULTS:-}" ]; then
    echo '{}' > "$4/latency-stub.json"  # what the bench writes
fi
exit 0
"""

pytestmark = pytest.mark.skipif(
    shutil.which("timeout") is None or shutil.which("tar") is None,
    reason="the script needs coreutils' timeout and tar",
)


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the script with the stub `python` first on the PATH; its result and the stub's calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.txt"
    log.write_text("")
    back = tmp_path / "out"
    back.mkdir(exist_ok=True)
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env={
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "OUT": str(back),
            "GPU_CHECK_WORK": str(tmp_path / "work"),
            "STUB_LOG": str(log),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, [line for line in log.read_text().splitlines() if line]


def _parts_run(calls: list[str]) -> list[str]:
    """The parts the stub saw started, in order (everything but the preflight, the import
    probes and the unpacking of carried wheels)."""
    return [call for call in calls if not call.startswith(("-c", "-m zipfile"))]


def test_a_failed_preflight_stops_the_call_before_any_part(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, STUB_FAIL_PREFLIGHT="1")
    assert result.returncode == 1
    assert len(calls) == 1
    assert calls[0].startswith("-c")
    steps = (tmp_path / "out" / "steps.txt").read_text()
    assert "STOPPED: preflight exit 3" in steps
    # What it found still comes back, packed.
    with tarfile.open(tmp_path / "out" / "results.tgz") as packed:
        device = packed.extractfile("./device.txt")
        assert device is not None
        assert b"llama_models" in device.read()


def test_every_part_runs_by_default(tmp_path: Path) -> None:
    result, calls = _run(tmp_path)
    assert result.returncode == 0, result.stderr
    parts = _parts_run(calls)
    assert len(parts) == 9
    assert parts[0].startswith("-m guardrt.bench.latency")
    assert parts[-3].startswith("-m guardrt.bench.latency --precisions bf16")
    assert parts[-2].startswith("-m pytest -q -rfEs -p no:cacheprovider tests/test_device_steps.py")
    assert parts[-1].startswith("-m guardrt export build --model tiny-random --precision int8")
    assert "--device cuda" in parts[-1]
    assert "not asked for" not in (tmp_path / "out" / "steps.txt").read_text()


def test_only_the_parts_asked_for_run(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, GPU_CHECK_PARTS="profile,norm_rope")
    assert result.returncode == 0, result.stderr
    # In the script's order, whatever the order asked.
    parts = _parts_run(calls)
    assert len(parts) == 2
    assert parts[0].startswith("benchmarks/norm_rope.py")
    assert parts[1].startswith("benchmarks/profile_gpu.py")
    steps = (tmp_path / "out" / "steps.txt").read_text()
    assert "not asked for: latency (latency)" in steps
    assert "not asked for: kernels (kernels)" in steps


def test_an_unknown_part_is_refused_by_name(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, GPU_CHECK_PARTS="latency,profiles")
    assert result.returncode == 2
    assert "unknown part 'profiles'" in result.stderr
    assert calls == []


def test_a_second_call_can_redo_only_the_skipped_bench_phases(tmp_path: Path) -> None:
    """The latency part's budget skips the phases that would overrun it; GPU_CHECK_LATENCY_ARGS
    lets a second call ask for just those, after the script's own options."""
    result, calls = _run(
        tmp_path,
        GPU_CHECK_PARTS="latency",
        GPU_CHECK_LATENCY_ARGS="--precisions int8-wa --no-baseline",
    )
    assert result.returncode == 0, result.stderr
    (latency,) = _parts_run(calls)
    assert latency.startswith("-m guardrt.bench.latency --results ")
    assert latency.rstrip().endswith("--budget-s 270 --precisions int8-wa --no-baseline")


def test_a_second_call_can_profile_other_precisions(tmp_path: Path) -> None:
    """GPU_CHECK_PROFILE_ARGS goes after the profile's own options (`--precisions fp8,int8`:
    where the 8-bit verdicts' time goes)."""
    result, calls = _run(
        tmp_path, GPU_CHECK_PARTS="profile", GPU_CHECK_PROFILE_ARGS="--precisions fp8,int8"
    )
    assert result.returncode == 0, result.stderr
    (profile,) = _parts_run(calls)
    assert profile.startswith("benchmarks/profile_gpu.py --out ")
    assert profile.rstrip().endswith("--precisions fp8,int8")


def test_the_targets_are_judged_from_what_the_bench_wrote(tmp_path: Path) -> None:
    """After the latency part, benchmarks/targets.py reads the bench's JSON (not the eager run's)
    into targets.md, which comes back packed."""
    result, calls = _run(tmp_path, GPU_CHECK_PARTS="latency,eager", STUB_RESULTS="1")
    assert result.returncode == 0, result.stderr
    parts = _parts_run(calls)
    assert len(parts) == 3
    assert parts[0].startswith("-m guardrt.bench.latency --results ")
    assert parts[1] == f"benchmarks/targets.py {tmp_path / 'work'}/latency-stub.json "
    assert parts[2].startswith("-m guardrt.bench.latency --precisions bf16")
    with tarfile.open(tmp_path / "out" / "results.tgz") as packed:
        assert "./targets.md" in packed.getnames()


def test_no_bench_results_no_targets(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, GPU_CHECK_PARTS="latency")
    assert result.returncode == 0, result.stderr
    assert not any("targets.py" in call for call in calls)
