"""Issue 8's targets against one `guardrt bench` run: the README's performance table and a
verdict on every target, from the run's JSON, so a short GPU session quotes what was measured
without copying figures by hand.

    python benchmarks/targets.py benchmarks/results/latency-<card>.json

Targets (batch 1, bf16 unless noted; issue 8): text `safe` ≤ 14 ms, `unsafe` + 1 category ≤
30 ms; image + text `safe` ≤ 45 ms, `unsafe` + 1 ≤ 60 ms; each 8-bit precision ≤ 0.65 × bf16
on each of those cases; throughput ≥ 300 text and ≥ 25 image requests/s (the best concurrency);
peak memory at batch 1 ≤ 24 GB in bf16 and ≤ 13 GB in int8. A target whose figure the run
lacks (a skipped phase, an error) is "not measured", never met.

The targets were set for an H100. A run on another card (the device tool lends an H200 now) is
judged against them all the same, under a line that sets the run's own measured ceilings
beside the H100's: memory-bound work (text verdicts, decode steps) scales with the copy rate,
compute-bound work (the image prefill) with the matrix rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardrt.bench.options import PRECISIONS  # torch-free

LATENCY_MS = {"text safe": 14.0, "text unsafe": 30.0, "image+text safe": 45.0,
              "image+text unsafe": 60.0}  # fmt: skip
CASES = ("text safe", "text unsafe", "image+text safe", "image+text unsafe",
         "response+image safe", "response+image unsafe")  # fmt: skip
EIGHT_BIT = tuple(p for p in PRECISIONS if p != "bf16")  # each judged against bf16
EIGHT_BIT_RATIO = 0.65
THROUGHPUT = {"text": 300.0, "image+text": 25.0}  # requests/s, bf16
MEMORY_GB = {"bf16": 24.0, "int8": 13.0}  # peak at batch 1
# The card the targets name, and its ceilings measured there (../shared/measurements/README.md,
# 2026-11-27: device-to-device copy in TB/s, a bf16 8192³ product in TFLOP/s).
TARGET_CARD, TARGET_COPY_TBS, TARGET_BF16_TFLOPS = "H100", 2.94, 771.0


@dataclass(frozen=True)
class Check:
    target: str
    measured: float | None  # None: the run lacks it
    limit: float
    at_least: bool = False  # a floor (throughput), not a ceiling
    unit: str = "ms"

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "not measured"
        met = self.measured >= self.limit if self.at_least else self.measured <= self.limit
        return "met" if met else "missed"

    def line(self) -> str:
        sign = "≥" if self.at_least else "≤"
        shown = "—" if self.measured is None else f"{self.measured:.3g} {self.unit}"
        return f"| {self.target} | {shown} | {sign} {self.limit:g} {self.unit} | {self.verdict} |"


def _row(report: dict[str, Any], precision: str, case: str) -> dict[str, Any]:
    """A case's latency figures in one precision's run ({} where the run lacks it)."""
    row: dict[str, Any] = report["precisions"].get(precision, {}).get("latency", {}).get(case, {})
    return row


def _p50(report: dict[str, Any], precision: str, case: str) -> float | None:
    return _row(report, precision, case).get("p50_ms")


def _best_rate(report: dict[str, Any], precision: str, name: str) -> float | None:
    rates = report["precisions"].get(precision, {}).get("throughput", {})
    measured = [
        r["requests_per_s"]
        for case, r in rates.items()
        if case.rsplit(" c=", 1)[0] == name and "requests_per_s" in r
    ]
    return max(measured) if measured else None


def checks(report: dict[str, Any]) -> list[Check]:
    """Every target of issue 8, with the run's figure (or None)."""
    out = [Check(f"{case}, bf16 p50", _p50(report, "bf16", case), limit)
           for case, limit in LATENCY_MS.items()]  # fmt: skip
    asked = set(report["precisions"]) | set(report.get("skipped", []))  # skipped: past the budget
    for precision in EIGHT_BIT:
        if precision not in asked:
            continue
        for case in LATENCY_MS:
            ours, bf16 = _p50(report, precision, case), _p50(report, "bf16", case)
            ratio = ours / bf16 if ours is not None and bf16 else None
            out.append(Check(f"{case}, {precision} / bf16", ratio, EIGHT_BIT_RATIO, unit="×"))
    for name, limit in THROUGHPUT.items():
        rate = _best_rate(report, "bf16", name)
        out.append(Check(f"{name} throughput, bf16", rate, limit, at_least=True, unit="req/s"))
    for precision, limit in MEMORY_GB.items():
        peak = report["precisions"].get(precision, {}).get("peak_memory_gb_batch1")
        out.append(Check(f"peak memory at batch 1, {precision}", peak, limit, unit="GB"))
    return out


def latency_table(report: dict[str, Any]) -> str:
    """p50 ms per case and precision (8-bit ones with their ratio to bf16), bf16's floor,
    transformers eager bf16, and the target."""
    precisions = [p for p in PRECISIONS if p in report["precisions"]]
    base = report.get("transformers", {}).get("latency", {})
    head = ["case (batch 1)", *(f"guardrt {p}" for p in precisions), "floor (bf16)",
            "transformers eager bf16", "target"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in CASES:
        cells = [case]
        for precision in precisions:
            ours, bf16 = _p50(report, precision, case), _p50(report, "bf16", case)
            if ours is None:
                cells.append("—")
            elif precision != "bf16" and bf16:
                cells.append(f"{ours:.1f} ({ours / bf16:.2f}×)")
            else:
                cells.append(f"{ours:.1f}")
        row = _row(report, "bf16", case)
        cells.append(f"{row['floor_ms']:.1f}" if "floor_ms" in row else "—")
        theirs = base.get(case, {}).get("p50_ms")
        cells.append(f"{theirs:.1f}" if theirs else "—")
        limit = LATENCY_MS.get(case)
        cells.append(f"≤ {limit:g}" if limit else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def card_lines(report: dict[str, Any]) -> list[str]:
    """The run's measured ceilings and, on a card other than the targets' H100, how they compare
    with the H100's (none where the run recorded no ceilings)."""
    ceilings = report.get("ceilings") or {}
    copy_tbs = (ceilings.get("copy_bytes_per_s") or 0.0) / 1e12
    bf16_tflops = (ceilings.get("bf16_flops_per_s") or 0.0) / 1e12
    if not copy_tbs or not bf16_tflops:
        return []
    lines = [f"Ceilings measured in this run: copy {copy_tbs:.2f} TB/s, bf16 matrix "
             f"{bf16_tflops:.0f} TFLOP/s."]  # fmt: skip
    if TARGET_CARD not in report["device"]:
        lines.append(
            f"The targets are the {TARGET_CARD}'s (measured there: copy {TARGET_COPY_TBS:.2f} "
            f"TB/s, bf16 {TARGET_BF16_TFLOPS:.0f} TFLOP/s). Against those, this card's "
            f"memory-bound work (text verdicts, decode steps) may run "
            f"{copy_tbs / TARGET_COPY_TBS:.2f}× as fast, its compute-bound work (the image "
            f"prefill) {bf16_tflops / TARGET_BF16_TFLOPS:.2f}×."
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    found = checks(report)
    missing = [c.target for c in found if c.measured is None]
    card = card_lines(report)
    parts = [
        f"{report['device']}; torch {report.get('torch', '?')}; {report.get('model', '')}",
        *(["", *card] if card else []),
        "",
        latency_table(report),
        "",
        "| target | measured | limit | verdict |",
        "|---|---|---|---|",
        *(c.line() for c in found),
    ]
    if missing:
        parts += ["", f"not measured in this run: {', '.join(missing)}"]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("results", type=Path, help="a guardrt bench JSON (benchmarks/results/)")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.results.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.results}: {exc}", file=sys.stderr)
        return 2
    if "precisions" not in report or "device" not in report:
        print(f"{args.results} is not a guardrt bench result (no precisions)", file=sys.stderr)
        return 2
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
