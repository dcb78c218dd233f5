"""The `guardrt` command line (also `python -m guardrt`).

Subcommands register themselves in `_COMMANDS`; each is a small function taking parsed args.
Later issues add `serve`, `export` and `bench` here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Sequence

from guardrt import __version__
from guardrt.runtime.errors import GuardrtError


def _preprocess(args: argparse.Namespace) -> int:
    from guardrt.runtime.preprocess import ImageConfig, preprocess_image  # noqa: PLC0415

    config = ImageConfig.from_preprocessor_config(args.config) if args.config else None
    tiled = preprocess_image(args.image, config=config, max_tiles=args.max_tiles, fast=args.fast)
    report = {
        "source_size_wh": list(tiled.source_size),
        "resized_size_wh": list(tiled.resized_size),
        "tiles_hw": list(tiled.tiles),
        "aspect_ratio_id": tiled.aspect_ratio_id,
        "num_tiles": tiled.num_tiles,
        "pixel_values_shape": list(tiled.pixel_values.shape),
        "pixel_values_sha256": hashlib.sha256(tiled.pixel_values.tobytes()).hexdigest(),
    }
    print(json.dumps(report, indent=2))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardrt", description="Inference runtime for Llama Guard 3 11B Vision."
    )
    parser.add_argument("--version", action="version", version=f"guardrt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    pre = commands.add_parser("preprocess", help="tile one image as the model will see it")
    pre.add_argument("image", help="path of an image file")
    pre.add_argument("--config", help="a checkpoint directory or preprocessor_config.json")
    pre.add_argument("--max-tiles", type=int, default=None, help="override max tiles")
    pre.add_argument("--fast", action="store_true", help="JPEG draft decoding (not bit-exact)")
    pre.set_defaults(handler=_preprocess)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `guardrt` console script; returns the process exit code."""
    args = _parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except GuardrtError as exc:
        print(f"guardrt: error: {exc}", file=sys.stderr)
        return 2
