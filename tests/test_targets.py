"""`benchmarks/targets.py`: issue 8's targets judged from a bench run's JSON, on a made-up run
(every verdict) and on a real one (the H100's run 3, bf16 only)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

targets = importlib.import_module("benchmarks.targets")
ROOT = Path(__file__).resolve().parents[1]


def _row(p50: float, floor: float = 5.0) -> dict[str, float]:
    return {"p50_ms": p50, "p90_ms": p50, "p99_ms": p50, "floor_ms": floor}


def _report() -> dict[str, Any]:
    bf16 = {case: _row(10.0 * (i + 1)) for i, case in enumerate(targets.CASES)}
    return {
        "device": "NVIDIA H200",
        "torch": "2.11.0+cu130",
        "model": "full architecture, random bf16 weights",
        # KINDS.md's H200 figures, rounded: 1.46× the H100's copy rate, 1.02× its matrix rate
        "ceilings": {"copy_bytes_per_s": 4.3e12, "bf16_flops_per_s": 790e12},
        "precisions": {
            "bf16": {
                "latency": bf16,  # text safe 10 (≤ 14), text unsafe 20, image safe 30, unsafe 40
                "throughput": {
                    "text c=8": {"requests_per_s": 250.0},
                    "text c=32": {"requests_per_s": 310.0},
                    "image+text c=8": {"error": "RuntimeError: out of memory"},
                    "image+text c=32": {"requests_per_s": 20.0},
                },
                "peak_memory_gb_batch1": 23.5,
            },
            "int8": {  # text safe at 0.5× bf16, text unsafe at 0.7×; no image cases
                "latency": {"text safe": _row(5.0), "text unsafe": _row(14.0)},
            },
        },
        "transformers": {"latency": {"text safe": {"p50_ms": 80.0}}},
    }


def _verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {c.target: c.verdict for c in targets.checks(report)}


def test_every_target_is_judged_and_a_missing_figure_is_never_met() -> None:
    verdicts = _verdicts(_report())
    assert verdicts["text safe, bf16 p50"] == "met"  # 10 ≤ 14
    assert verdicts["text unsafe, bf16 p50"] == "met"  # 20 ≤ 30
    assert verdicts["image+text safe, bf16 p50"] == "met"  # 30 ≤ 45
    assert verdicts["image+text unsafe, bf16 p50"] == "met"  # 40 ≤ 60
    assert verdicts["text safe, int8 / bf16"] == "met"  # 0.5
    assert verdicts["text unsafe, int8 / bf16"] == "missed"  # 0.7
    assert verdicts["image+text safe, int8 / bf16"] == "not measured"
    assert "text safe, fp8 / bf16" not in verdicts  # a precision the run did not ask for
    assert verdicts["text throughput, bf16"] == "met"  # the best concurrency: 310
    assert verdicts["image+text throughput, bf16"] == "missed"  # 20; the failed c=8 not counted
    assert verdicts["peak memory at batch 1, bf16"] == "met"
    assert verdicts["peak memory at batch 1, int8"] == "not measured"


def test_a_precision_skipped_past_the_budget_is_not_measured() -> None:
    report = _report() | {"skipped": ["fp8"]}
    verdicts = _verdicts(report)
    assert verdicts["text safe, fp8 / bf16"] == "not measured"
    assert "not measured in this run: " in targets.markdown(report)


def test_limits_are_inclusive_and_throughput_is_a_floor() -> None:
    report = _report()
    report["precisions"]["bf16"]["latency"]["text safe"] = _row(14.0)
    report["precisions"]["bf16"]["throughput"]["image+text c=32"] = {"requests_per_s": 24.9}
    verdicts = _verdicts(report)
    assert verdicts["text safe, bf16 p50"] == "met"
    assert verdicts["image+text throughput, bf16"] == "missed"


def test_the_table_gives_each_case_its_figures() -> None:
    lines = targets.latency_table(_report()).splitlines()
    assert lines[0] == (
        "| case (batch 1) | guardrt bf16 | guardrt int8 | floor (bf16) | "
        "transformers eager bf16 | target |"
    )
    assert lines[2] == "| text safe | 10.0 | 5.0 (0.50×) | 5.0 | 80.0 | ≤ 14 |"
    assert lines[4] == "| image+text safe | 30.0 | — | 5.0 | — | ≤ 45 |"
    assert lines[6] == "| response+image safe | 50.0 | — | 5.0 | — |  |"


def test_a_run_on_another_card_sets_its_ceilings_beside_the_h100s() -> None:
    """The targets are the H100's: a run on the H200 says so, with both cards' ceilings, since
    its faster memory flatters the memory-bound (text) verdicts."""
    lines = targets.markdown(_report()).splitlines()
    assert lines[2] == "Ceilings measured in this run: copy 4.30 TB/s, bf16 matrix 790 TFLOP/s."
    assert lines[3] == (
        "The targets are the H100's (measured there: copy 2.94 TB/s, bf16 771 TFLOP/s). Against "
        "those, this card's memory-bound work (text verdicts, decode steps) may run 1.46× as "
        "fast, its compute-bound work (the image prefill) 1.02×."
    )
    no_ceilings = {k: v for k, v in _report().items() if k != "ceilings"}
    assert targets.markdown(no_ceilings).splitlines()[2].startswith("| case (batch 1) |")


def test_a_real_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The H100's run 3 (bf16, eager decoding steps, before the CUDA graphs): every latency
    target missed, as the README says, and the 8-bit ones not measured."""
    path = ROOT / "benchmarks/results/latency-NVIDIA-H100-80GB-HBM3-run3-bf16.json"
    assert targets.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("NVIDIA H100 80GB HBM3; torch 2.11.0+cu130")
    # The targets' own card: its ceilings, no comparison.
    assert "\nCeilings measured in this run: copy 2.90 TB/s, bf16 matrix 732 TFLOP/s.\n" in out
    assert "The targets are the H100's" not in out
    assert "| text safe | 38.5 | 8.5 | 86.9 | ≤ 14 |" in out
    verdicts = _verdicts(json.loads(path.read_text()))
    assert verdicts["text safe, bf16 p50"] == "missed"
    assert verdicts["text throughput, bf16"] == "missed"  # 76.6 req/s
    assert verdicts["peak memory at batch 1, bf16"] == "missed"  # 32.9 GB
    assert verdicts["peak memory at batch 1, int8"] == "not measured"
    assert "not measured in this run: peak memory at batch 1, int8" in out


def test_a_file_that_is_not_a_bench_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"device": "x"}))
    assert targets.main([str(other)]) == 2
    assert "not a guardrt bench result" in capsys.readouterr().err
    assert targets.main([str(tmp_path / "absent.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
