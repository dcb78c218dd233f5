"""`guardrt bench --model ENGINE_DIR` on the CPU (a tiny int8 ONNX engine): every case on both
forced paths, throughput through the scheduler, P(unsafe) on the engine's own path equal to
serving it; options that belong to the torch run are refused; no torch is imported. No timing
is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from guardrt.bench import cases, options
from guardrt.cli import main
from guardrt.runtime.engine import EngineOptions, load_engine
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.prepare import load_preparer

CASES = {f"{c} {p}" for c in ("text", "image+text", "response+image") for p in ("safe", "unsafe")}


def test_an_engine_directory_is_measured_as_it_serves(
    onnx_int8: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--model", str(onnx_int8), "--repeat", "2", "--requests", "4",
            "--concurrency", "1,2", "--results", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    (written,) = tmp_path.glob("latency-onnx-int8-*.json")
    report = json.loads(written.read_text())
    assert "errors" not in report
    assert report["runtime"].startswith("onnx engine on onnxruntime ")
    assert report["device"].startswith("CPUExecutionProvider")  # the engine's own words
    (precision,) = report["precisions"]
    assert precision == "int8 weight-only"
    run = report["precisions"][precision]
    assert set(run["latency"]) == CASES
    for case, row in run["latency"].items():
        path = case.split()[-1]
        assert row["path"].startswith(path)  # the forced path was taken
        assert row["runs"] == 2
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert "floor_ms" not in row  # no torch, no roofline
    assert set(run["throughput"]) == {f"{n} c={c}" for n in ("text", "image+text") for c in (1, 2)}
    assert all(rate["requests_per_s"] > 0 for rate in run["throughput"].values())
    assert run["throughput"]["text c=2"]["mean_batch"] <= 2
    assert run["load_s"] > 0
    assert run["warmup_s"] > 0
    # The engine's unforced P(unsafe) is what serving the directory gives.
    requests = cases.requests(load_preparer(onnx_int8, 1024))
    served = load_engine("onnx", EngineOptions(onnx_int8, device="cpu", max_seq=1024))
    try:
        for name, request in requests.items():
            expected = served.execute([request])[0].unsafe_probability
            assert run["p_unsafe_served"][name] == pytest.approx(expected, rel=1e-5)
    finally:
        served.close()
    table = written.with_suffix(".txt").read_text()
    assert "response+image unsafe" in table
    assert "throughput text c=2" in table
    assert table in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--precisions", "bf16"], "--precisions: not for an engine directory"),
        (["--no-baseline", "--size", "tiny"], "--size, --no-baseline: not for an engine"),
        (["--no-cuda-graphs"], "--no-cuda-graphs: not for an engine directory"),
    ],
)
def test_torch_run_options_are_refused_for_an_engine_directory(
    onnx_int8: Path, extra: list[str], words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        options.parse(["--model", str(onnx_int8), *extra])


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--model", "/no/such/dir"], "--model /no/such/dir is not a directory"),
        (["--concurrency", "8,x"], "--concurrency '8,x' is not a list of client counts"),
        (["--concurrency=0"], "--concurrency '0' is not a list"),
        (["--repeat", "0"], "--repeat 0 must be ≥ 1"),
        (["--requests", "-1"], "--requests -1 must be ≥ 1"),
        (["--budget-s", "nan"], "--budget-s nan must be a number of seconds ≥ 0"),
        (["--budget-s", "-1"], "--budget-s -1.0 must be"),
        (["--results", "/dev/null/x"], "--results /dev/null/x: cannot make it: Not a directory"),
    ],
)
def test_bad_bench_options_are_clear_errors(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *argv]) == 2
    assert f"guardrt: error: {words}" in capsys.readouterr().err


def test_the_engine_directory_run_imports_no_torch(onnx_int8: Path, tmp_path: Path) -> None:
    """An engine serves without torch, and so is measured without it."""
    code = (
        "import sys\n"
        "from guardrt.bench import command, engine_dir\n"
        "args = command.options.parse(sys.argv[1:])\n"
        "assert command.options.engine_dir(args)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "--model", str(onnx_int8), "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_each_precision_names_what_quantizes_it() -> None:
    """The bench and the profile quantize a precision the same way (`options.quantization`)."""
    assert options.quantization("bf16") == (None, False)
    assert options.quantization("int8") == ("int8", False)
    assert options.quantization("int8-wa") == ("int8", True)
    assert options.quantization("fp8") == ("fp8", False)
    with pytest.raises(ConfigError, match="'int4'"):
        options.quantization("int4")
