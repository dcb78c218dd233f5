"""Where a verdict's time goes on the GPU: torch.profiler over one text and one image verdict.

Usage: python benchmarks/profile_gpu.py [--size full|tiny] [--device cuda] [--out DIR]
                                        [--precisions bf16,fp8,...]

Builds the full-size architecture with random bf16 weights (as `guardrt bench`), fused and with
CUDA graphs as the torch engine serves (`--no-cuda-graphs`: eager), warms up, then
profiles one `safe` text verdict and one `safe` 4-tile image verdict at batch 1, then a batch of
`--batch` (32) text verdicts (the throughput case), and prints, per
case, the wall time, the GPU busy time (sum of kernel times), the kernel count, and the top
kernels and operators by GPU time. Launch-bound phases show as wall ≫ GPU busy; kernel-bound
ones as a few kernels owning the GPU time. Writes the tables under --out: profile.txt for bf16,
profile-PRECISION.txt for each other precision (quantized as `guardrt bench` quantizes it, one
model at a time), to show where an 8-bit verdict's time goes.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from guardrt.bench import cases
from guardrt.bench.forced import ForcedSteps
from guardrt.bench.fullsize import SIZES, random_model
from guardrt.bench.options import PRECISIONS, quantization
from guardrt.export.quantize import QuantKind
from guardrt.runtime.classify import TorchSteps
from guardrt.runtime.decoding import Decoder
from guardrt.runtime.model.checkpoint import quantize_for_serving
from guardrt.runtime.model.fuse import fuse_projections
from guardrt.runtime.model.tune import tune_for_device
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.preprocess import ImageConfig
from guardrt.runtime.requests import PreparedRequest
from guardrt.runtime.static_steps import setup_steps, uses_graphs
from guardrt.runtime.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("/tmp"))
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--batch", type=int, default=32, help="the batched text case's rows")
    parser.add_argument(
        "--precisions", default="bf16", help=f"comma-separated, of {', '.join(PRECISIONS)}"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    wanted = [p for p in args.precisions.split(",") if p]
    quantized = {p: quantization(p) for p in wanted}  # an unknown one stops the run first
    args.out.mkdir(parents=True, exist_ok=True)
    for precision, (kind, activations) in quantized.items():
        text = _precision(args, device, precision, kind, activations)
        print(text)
        name = "profile.txt" if precision == "bf16" else f"profile-{precision}.txt"
        (args.out / name).write_text(text)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _precision(
    args: argparse.Namespace,
    device: torch.device,
    precision: str,
    kind: QuantKind | None,
    activations: bool,
) -> str:
    """The profile tables of one precision's model."""
    model = random_model(SIZES[args.size], device)
    if kind is not None:
        quantize_for_serving(model, kind, activations)
    fuse_projections(model)
    tuning = tune_for_device(model)  # as the engine does at load
    requests = cases.requests(Preparer(load_tokenizer(), ImageConfig(), 1024))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"{card}, {precision}"]
    lines += tuning.lines()
    # Batch 1 (latency), then a full text batch (throughput: where its time goes).
    for rows, names in ((1, ("text", "image+text")), (args.batch, ("text",))):
        static = uses_graphs(device, not args.no_cuda_graphs)
        steps = setup_steps(model, rows + cases.PREFIXES, 1024, static, image_rows=rows)
        for name in names:
            lines += _profile(steps, [requests[name]] * rows, f"{name} safe, batch {rows}")
        del steps
    return "\n".join(lines)


def _profile(steps: TorchSteps, batch: list[PreparedRequest], title: str) -> list[str]:
    """Warm up on `batch`, then profile one run of it: wall and GPU-busy time, kernel count,
    and the operators by GPU time."""
    device = steps.device
    forced = ForcedSteps(steps, batch[0].grammar, "safe", "S1")
    decoder = Decoder(forced, "constrained", prefixes=cases.PREFIXES)
    for _ in range(3):
        forced.reset()
        decoder.run(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    forced.reset()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        decoder.run(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_ms = sum(e.device_time for e in kernels) / 1e3 if kernels else 0.0
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return [
        f"\n== {title}: wall {wall_ms:.1f} ms, GPU busy {busy_ms:.1f} ms, {len(kernels)} kernels",
        prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70),
    ]


if __name__ == "__main__":
    main()
