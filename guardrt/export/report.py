"""The end-of-build report: each step with its parity check, the deviation from fp32, sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _parity_text(parity: dict[str, Any] | None) -> str:
    if not parity:
        return ""
    if "not_run" in parity:
        return f"NOT RUN: {parity['not_run']}"
    return (
        f"max rel logit err {parity['max_relative_logit_error']:.2e}  "
        f"max |ΔP(unsafe)| {parity['max_abs_delta_p_unsafe']:.2e}  "
        f"labels agree {parity['verdicts_agree']}/{parity['probes']}  "
        f"(vs {parity['against']})"
    )


def build_report(document: dict[str, Any], output: Path) -> str:
    lines = [
        f"built {document['engine_format']} {document['precision']} engine in {output}",
        f"  source sha256 {document['source']['sha256']}  ({document['source']['path']})",
        f"  probes: {document['probes']['count']} (sha256 {document['probes']['sha256'][:16]}…)",
        "  steps:",
    ]
    for step in document["steps"]:
        detail = step.get("skipped") or _parity_text(step.get("parity"))
        lines.append(f"    {step['name']:<9} {detail}")
    lines.append(f"  deviation from fp32: {_parity_text(document['deviation'])}")
    for mode, parity in (document.get("alternatives") or {}).items():
        chosen = " (chosen)" if mode == document["quantization"].get("compute") else ""
        lines.append(f"  int8 {mode}{chosen}: {_parity_text(parity)}")
    total = sum(entry["bytes"] for entry in document["files"].values())
    lines.append(f"  {len(document['files'])} files, {total / 2**20:.1f} MiB; manifest.json")
    lines.append(f"serve it: guardrt serve --model {output}")
    return "\n".join(lines)
