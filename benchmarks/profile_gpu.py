"""Where a verdict's time goes on the GPU: torch.profiler over one text and one image verdict.

Usage: python benchmarks/profile_gpu.py [--size full|tiny] [--device cuda] [--out DIR]

Builds the full-size architecture with random bf16 weights (as `guardrt bench`), fused and with
CUDA graphs as the torch engine serves (`--no-cuda-graphs`: eager), warms up, then
profiles one `safe` text verdict and one `safe` 4-tile image verdict at batch 1 and prints, per
case, the wall time, the GPU busy time (sum of kernel times), the kernel count, and the top
kernels and operators by GPU time. Launch-bound phases show as wall ≫ GPU busy; kernel-bound
ones as a few kernels owning the GPU time. Writes the tables under --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from guardrt.bench import cases
from guardrt.bench.forced import ForcedSteps
from guardrt.bench.fullsize import SIZES, random_model
from guardrt.runtime.classify import TorchSteps
from guardrt.runtime.decoding import Decoder
from guardrt.runtime.model.fuse import fuse_projections
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.preprocess import ImageConfig
from guardrt.runtime.static_steps import StaticSteps
from guardrt.runtime.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("/tmp"))
    parser.add_argument("--no-cuda-graphs", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = random_model(SIZES[args.size], device)
    fuse_projections(model)
    static = device.type == "cuda" and not args.no_cuda_graphs
    model.setup_caches(1 + cases.PREFIXES + int(static), 1024)
    steps = StaticSteps(model) if static else TorchSteps(model)
    requests = cases.requests(Preparer(load_tokenizer(), ImageConfig(), 1024))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    lines = [f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"]
    for name in ("text", "image+text"):
        request = requests[name]
        forced = ForcedSteps(steps, request.grammar, "safe", "S1")
        decoder = Decoder(forced, "constrained", prefixes=cases.PREFIXES)
        for _ in range(3):
            forced.reset()
            decoder.run([request])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        forced.reset()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            decoder.run([request])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall_ms = (time.perf_counter() - start) * 1e3
        events = prof.key_averages()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy_ms = sum(e.device_time for e in kernels) / 1e3 if kernels else 0.0
        lines.append(
            f"\n== {name} safe: wall {wall_ms:.1f} ms, GPU busy {busy_ms:.1f} ms, "
            f"{len(kernels)} kernels"
        )
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        lines.append(events.table(sort_by=sort, row_limit=30, max_name_column_width=70))
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.txt").write_text(text)


if __name__ == "__main__":
    main()
