"""`guardrt bench`'s report: the table printed and written beside the JSON, and the PNG.

Both runs (the torch engine's precisions, `latency.py`; an engine directory, `engine_dir.py`)
write the same document: `precisions` → `latency` (case → p50/p90/p99 and, for the torch run,
the floor), `throughput`, and what each measured besides. Nothing here imports torch.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np


def _load_choices(precision: str, run: dict[str, Any]) -> list[str]:
    """The table's lines for what the engine chose at load (`tune_for_device`)."""
    lines = []
    if "fused_norm_rope" in run:
        lines.append(f"  fused RMSNorm/RoPE/SwiGLU kernels ({precision}): {run['fused_norm_rope']}")
    if "fused_activation_quant" in run:
        lines.append(
            f"  fused activation quantization ({precision}): {run['fused_activation_quant']}"
        )
    image = run.get("fp8_image", {})
    if image.get("measured"):
        timed = "; ".join(
            f"{shape} bf16 {ms['bf16']:.3f} / fp8 {ms.get('fp8', float('nan')):.3f} ms"
            for shape, ms in image["ms"].items()
        )
        lines.append(
            f"  fp8 image products ({precision}): {image['kept_bf16_layers']} layers kept in "
            f"bf16; {timed}"
        )
    rows = run.get("int8_rows", {})
    for shape, limit in rows.get("limits", {}).items():
        blocks = rows.get("blocks", {}).get(shape, {})
        lines.append(
            f"  int8 {shape} ({precision}): the Triton kernel up to {limit} rows, blocks "
            f"{blocks}"
            + (f"; refused: {rows['refused'][shape]}" if shape in rows.get("refused", {}) else "")
        )
    attention = run.get("vision_attention", {})
    if attention.get("ms"):
        timed = ", ".join(f"{name} {ms:.2f}" for name, ms in sorted(attention["ms"].items()))
        lines.append(
            f"  vision attention ({precision}): {attention['plan']} chosen; ms per layer: "
            f"{timed}; refused {len(attention['refused'])}"
        )
    return lines


def _setup_lines(precision: str, run: dict[str, Any]) -> list[str]:
    """A precision's note (fp8 where the card lacks fp8 tensor cores), memory and load times."""
    lines = []
    if "warning" in run:
        lines.append(f"  note ({precision}): {run['warning']}")
    if "peak_memory_gb_batch1" in run:
        peak = run["peak_memory_gb_batch1"]
        lines.append(f"  peak GPU memory at batch 1 ({precision}): {peak:.1f} GB")
    if "load_s" in run:  # an engine directory's run
        lines.append(
            f"  engine load {run['load_s']:.1f} s, warm-up of the cases "
            f"{run.get('warmup_s', float('nan')):.1f} s ({precision})"
        )
    return lines


def table(report: dict[str, Any]) -> str:
    base = report.get("transformers", {}).get("latency", {})
    runtime = report.get("runtime") or f"torch {report['torch']}"
    lines = [f"{report['device']}; {runtime}; {report['model']}", ""]
    columns = ("p50 ms", "p90", "p99", "floor", "×floor", "HF ms", "HF/ours", "×bf16")
    bf16 = report["precisions"].get("bf16", {}).get("latency", {})
    # An engine directory's precision names its int8 compute too ("int8 weight-only").
    width = max([6, *(len(p) + 1 for p in report["precisions"])])
    lines.append(f"{'case':<24}{'prec':>{width}}" + "".join(f"{c:>9}" for c in columns))
    for precision, run in report["precisions"].items():
        for case, row in run.get("latency", {}).items():
            hf = base.get(case, {}).get("p50_ms")
            theirs = f"{hf:9.1f}{hf / row['p50_ms']:8.1f}×" if hf else f"{'—':>9}{'—':>9}"
            floor = row.get("floor_ms")  # an engine directory's run has none (no torch)
            floors = f"{floor:8.1f}{row['p50_ms'] / floor:7.1f}×" if floor else f"{'—':>8}{'—':>8}"
            # An 8-bit precision's p50 over bf16's in the same run (issue 8's target: ≤ 0.65).
            ours = bf16.get(case, {}).get("p50_ms") if precision != "bf16" else None
            versus = f"{row['p50_ms'] / ours:8.2f}×" if ours else f"{'—':>9}"
            lines.append(
                f"{case:<24}{precision:>{width}}{row['p50_ms']:9.1f}{row['p90_ms']:8.1f}"
                f"{row['p99_ms']:8.1f}{floors}{theirs}{versus}"
            )
        for case, rate in run.get("throughput", {}).items():
            if "error" in rate:
                lines.append(f"  throughput {case:<20}{precision:>6}: ERROR {rate['error'][:200]}")
                continue
            per_s, batch = rate["requests_per_s"], rate["mean_batch"]
            # Significant digits: a CPU's 0.042 image req/s must not print as 0.0.
            lines.append(
                f"  throughput {case:<20}{precision:>6}: {per_s:.3g} req/s (batch {batch:.1f}; "
                f"warm-up {rate.get('warmup_s', float('nan')):.1f} s)"
            )
        lines += _setup_lines(precision, run)
        if "p_unsafe_served" in run and "p_unsafe" not in run:
            shown = ", ".join(f"{k} {p:.3e}" for k, p in run["p_unsafe_served"].items())
            lines.append(f"  P(unsafe) on the engine's own path ({precision}): {shown}")
        if "p_unsafe_served" in run and "p_unsafe" in run:
            relative = max(
                abs(run["p_unsafe_served"][k] - p) / max(p, 1e-30)
                for k, p in run["p_unsafe"].items()
            )
            lines.append(
                f"  served path vs one eager step ({precision}): max relative |Δ P(unsafe)| "
                f"{relative:.1e}"
            )
        reference = report["precisions"].get("bf16", {}).get("p_unsafe")
        if reference and precision != "bf16" and "p_unsafe" in run:
            delta = max(abs(run["p_unsafe"][k] - reference[k]) for k in reference)
            lines.append(f"  max |Δ P(unsafe)| vs bf16 ({precision}): {delta:.1e}")
        graphs = run.get("cuda_graphs", {})
        if {"batch1_graphs", "graphs_total"} <= graphs.keys():
            first = graphs["batch1_graphs"]
            lines.append(
                f"  warm-up at batch 1 ({precision}): common steps {graphs['batch1_prepare_s']:.1f}"
                f" s, then the cases {graphs['batch1_warmup_s']:.1f} s; "
                f"{first['graphs']} CUDA graphs captured in {first['capture_s']:.1f} s, "
                f"{first['eager_steps']} eager steps; at full batch "
                f"{graphs['graphs_total']['graphs']} graphs in "
                f"{graphs['graphs_total']['capture_s']:.1f} s"
            )
        lines += _load_choices(precision, run)
    for row in report.get("transformers", {}).get("probabilities", []):
        lines.append(f"P(unsafe) {row['input']:<16} ours {row['ours']:.3e}  transformers "
                     f"{row['transformers']:.3e}  |Δ| {row['abs_delta']:.1e}  label-row logit "
                     f"err {row['max_rel_logit_error']:.1e}  labels {row['labels']}")  # fmt: skip
    if "preprocess_ms" in report:
        timed = "; ".join(f"{name} {ms:.1f} ms" for name, ms in report["preprocess_ms"].items())
        lines.append(
            f"host preprocessing p50, before the model ({report.get('host', 'this host')}): {timed}"
        )
    for phase, error in report.get("errors", {}).items():
        lines.append(f"ERROR in {phase}: {error[:500]}")
    for phase in report.get("skipped", []):
        lines.append(f"SKIPPED {phase}: it would have run past --budget-s")
    return "\n".join(lines)


def draw(report: dict[str, Any], path: Path) -> bool:
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return False
    series = {p: r.get("latency", {}) for p, r in report["precisions"].items()}
    if "transformers" in report:
        series["transformers bf16"] = report["transformers"]["latency"]
    labels = list(dict.fromkeys(label for rows in series.values() for label in rows))
    if not labels:
        return False
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(12, 5))
    for index, (name, rows) in enumerate(series.items()):
        values = [rows.get(label, {}).get("p50_ms", np.nan) for label in labels]
        axes.bar(np.arange(len(labels)) + index * width, values, width, label=name)
    axes.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=20)
    axes.set_ylabel("p50 verdict latency (ms)")
    axes.set_title(f"{report['device']}: batch 1")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def save(report: dict[str, Any], stem: Path, plot: bool = False) -> bool:
    """Write the JSON and the table of what is measured so far, and with `plot` the PNG;
    whether a PNG was drawn. Called as each part lands (the PNG as each phase ends): a run
    killed mid-way leaves a consistent set of files."""
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".txt").write_text(table(report) + "\n")
    return plot and draw(report, stem.with_suffix(".png"))
