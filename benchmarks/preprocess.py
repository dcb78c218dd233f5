"""Encoded JPEG bytes → model-ready tiles: guardrt vs PIL decode + transformers' processor.

Usage: python benchmarks/preprocess.py [--repeat N] [--threads N]

The reference is what a transformers user runs: `Image.open(bytes).load()`, then
`MllamaImageProcessorPil` (the backend that is bit-exact with Meta's reference) configured as the
Llama Guard 3 Vision checkpoint. guardrt's exact mode must produce identical arrays (checked on
every image before timing); its fast mode's distance from them is printed. Runs are interleaved
so that machine noise hits every column alike; medians are reported.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import importlib.util
import io

import numpy as np
import PIL
from numpy.typing import NDArray
from PIL import Image

from guardrt.runtime.preprocess import preprocess_image
from guardrt.runtime.preprocess.tiling import default_threads
from guardrt.testing.references import image_processor
from guardrt.testing.timing import machine, medians_ms


def photo_like(width: int, height: int, seed: int = 0) -> NDArray[np.uint8]:
    """A photo-like image: 1/f multi-scale structure, correlated colours, fine sensor grain.

    Its JPEG compresses like a camera photo (~2 bits per pixel at quality 90), which is what
    decides decoding cost.
    """
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.float32)
    for octave in range(9):
        grid_w = max(2, (width >> (8 - octave)) // 2 + 2)
        grid_h = max(2, (height >> (8 - octave)) // 2 + 2)
        amplitude = 70.0 / (1.45**octave)
        luma = rng.normal(0.0, 1.0, (grid_h, grid_w)).astype(np.float32)
        field = np.asarray(
            Image.fromarray(luma, "F").resize((width, height), Image.Resampling.BICUBIC)
        )  # (H, W)
        tint = rng.normal(1.0, 0.25, 3).astype(np.float32)  # (3,)
        image += amplitude * field[..., None] * tint
    image += rng.normal(0.0, 4.0, (height, width, 1)).astype(np.float32)  # luminance grain
    pixels: NDArray[np.uint8] = np.clip(image + 120.0, 0, 255).astype(np.uint8)  # (H, W, 3)
    return pixels


def jpeg(pixels: NDArray[np.uint8], quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def cases() -> list[tuple[str, bytes]]:
    found = [
        ("1920x1080 photo-like", jpeg(photo_like(1920, 1080, seed=1))),
        ("4000x3000 photo-like", jpeg(photo_like(4000, 3000, seed=2))),
    ]
    if importlib.util.find_spec("llama_models") is not None:  # a real photo Meta ships
        pasta = importlib.resources.files("llama_models") / "resources" / "pasta.jpeg"
        found.append(("1280x1280 pasta.jpeg (real)", pasta.read_bytes()))
    return found


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
        "| fast ms | ratio | fast vs exact: max / mean abs diff, values differing |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, data in cases():
        expected = reference(data)
        exact = preprocess_image(data, threads=args.threads).pixel_values
        if not np.array_equal(exact, expected):
            raise SystemExit(f"{name}: exact mode differs from the reference")
        fast = preprocess_image(data, fast=True, threads=args.threads).pixel_values
        diff = np.abs(fast - exact)
        times = medians_ms(
            {
                "reference": functools.partial(reference, data),
                "exact": functools.partial(preprocess_image, data, threads=args.threads),
                "exact1": functools.partial(preprocess_image, data, threads=1),
                "fast": functools.partial(preprocess_image, data, fast=True, threads=args.threads),
            },
            args.repeat,
        )
        print(
            f"| {name} | {len(data) / 1e6:.2f} MB | {times['reference']:.1f} "
            f"| {times['exact']:.1f} | {times['reference'] / times['exact']:.2f}x "
            f"| {times['exact1']:.1f} | {times['fast']:.1f} "
            f"| {times['reference'] / times['fast']:.2f}x "
            f"| {diff.max():.3f} / {diff.mean():.4f}, {(diff > 0).mean():.1%} |"
        )
    print("\nexact mode output identical to the reference (max abs diff 0) on every image.")


if __name__ == "__main__":
    main()
