"""Encoded JPEG bytes → model-ready tiles: guardrt vs PIL decode + transformers' processor.

Usage: python benchmarks/preprocess.py [--repeat N] [--threads N]

The reference is what a transformers user runs: `Image.open(bytes).load()`, then
`MllamaImageProcessorPil` (the backend that is bit-exact with Meta's reference) configured as the
Llama Guard 3 Vision checkpoint. guardrt's exact mode must produce identical arrays (checked on
every image before timing); its fast mode's distance from them is printed. Runs are interleaved
so that machine noise hits every column alike; medians are reported.

A served request is prepared up to its uint8 canvas, which is what it holds while queued; its
tiles are normalized when its batch runs (on the GPU by the torch back end). The last columns
give that part's time and what a queued image holds, beside the float32 tiles it would be.
"""

from __future__ import annotations

import argparse
import functools
import io

import numpy as np
import PIL
from numpy.typing import NDArray
from PIL import Image

from guardrt.bench.photos import jpeg, photo_like, real_photo
from guardrt.runtime.preprocess import preprocess_image
from guardrt.runtime.preprocess.tiling import default_threads
from guardrt.testing.references import image_processor
from guardrt.testing.timing import machine, medians_ms


def cases() -> list[tuple[str, bytes]]:
    found = [
        ("1920x1080 photo-like", jpeg(photo_like(1920, 1080, seed=1))),
        ("4000x3000 photo-like", jpeg(photo_like(4000, 3000, seed=2))),
    ]
    real = real_photo()
    return found if real is None else [*found, real]


def tiles(data: bytes, *, threads: int, fast: bool = False) -> NDArray[np.float32]:
    """Bytes to the normalized tiles: the reference's output, to compare like with like."""
    return preprocess_image(data, threads=threads, fast=fast).pixel_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args()
    processor = image_processor()

    def reference(data: bytes) -> NDArray[np.float32]:
        image = Image.open(io.BytesIO(data))
        image.load()
        return np.asarray(processor(image, return_tensors="np")["pixel_values"][0, 0])

    print(
        f"machine: {machine(f'Pillow {PIL.__version__}', f'numpy {np.__version__}')}; "
        f"guardrt threads: {args.threads}\n"
    )
    print(
        "| image | JPEG | reference ms | guardrt exact ms | ratio | exact, 1 thread ms "
        "| fast ms | ratio | fast vs exact: max / mean abs diff, values differing "
        "| to the canvas ms | held queued: canvas / float32 tiles MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, data in cases():
        expected = reference(data)
        queued = preprocess_image(data, threads=args.threads)
        exact = queued.pixel_values
        if not np.array_equal(exact, expected):
            raise SystemExit(f"{name}: exact mode differs from the reference")
        fast = preprocess_image(data, fast=True, threads=args.threads).pixel_values
        diff = np.abs(fast - exact)
        times = medians_ms(
            {
                "reference": functools.partial(reference, data),
                "exact": functools.partial(tiles, data, threads=args.threads),
                "exact1": functools.partial(tiles, data, threads=1),
                "fast": functools.partial(tiles, data, fast=True, threads=args.threads),
                "canvas": functools.partial(preprocess_image, data, threads=args.threads),
            },
            args.repeat,
        )
        print(
            f"| {name} | {len(data) / 1e6:.2f} MB | {times['reference']:.1f} "
            f"| {times['exact']:.1f} | {times['reference'] / times['exact']:.2f}x "
            f"| {times['exact1']:.1f} | {times['fast']:.1f} "
            f"| {times['reference'] / times['fast']:.2f}x "
            f"| {diff.max():.3f} / {diff.mean():.4f}, {(diff > 0).mean():.1%} "
            f"| {times['canvas']:.1f} "
            f"| {queued.canvas.nbytes / 1e6:.2f} / {exact.nbytes / 1e6:.2f} |"
        )
    print("\nexact mode output identical to the reference (max abs diff 0) on every image.")


if __name__ == "__main__":
    main()
