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
from pathlib import Path
from typing import Any

from guardrt import __version__
from guardrt.runtime.errors import ConfigError, GuardrtError


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


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc}") from exc


def _prompt(args: argparse.Namespace) -> int:
    from guardrt.runtime.prompt import encode_prompt, render_prompt  # noqa: PLC0415
    from guardrt.runtime.tokenizer import load_tokenizer  # noqa: PLC0415

    document = _read_json(args.messages, "messages file")
    # A list of messages, or {"messages": [...]}; parse_messages refuses anything else by name.
    messages: Any = document.get("messages") if isinstance(document, dict) else document
    categories = _read_json(args.categories, "categories file") if args.categories else None
    excluded = [code.strip() for code in args.exclude.split(",") if code.strip()]
    if not args.ids:
        text = render_prompt(messages, categories=categories, excluded_categories=excluded)
        sys.stdout.write(text + "\n")
        return 0
    tokenizer = load_tokenizer(args.tokenizer)
    ids = encode_prompt(
        messages, categories=categories, excluded_categories=excluded, tokenizer=tokenizer
    )
    print(f"# {len(ids)} tokens; tokenizer {tokenizer.source}")
    for index, token in enumerate(ids):
        if tokenizer.is_special(token):
            shown = f"{tokenizer.decode([token])}  (special)"
        else:
            shown = json.dumps(tokenizer.token_bytes(token).decode("utf-8", "backslashreplace"))
        print(f"{index:5d} {token:7d}  {shown}")
    return 0


def _export_tiny_random(args: argparse.Namespace) -> int:
    from guardrt.runtime.model.tiny import write_tiny_random  # noqa: PLC0415

    directory = Path(args.output)
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"output directory {directory} is not empty")
    write_tiny_random(directory, seed=args.seed)
    print(f"wrote a tiny random mllama checkpoint to {directory} (its verdicts are meaningless)")
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

    prompt = commands.add_parser(
        "prompt",
        help="print exactly what the model reads for a conversation (text, or token ids)",
        description="Render a conversation with the Llama Guard 3 Vision template. The messages "
        'file holds a list of {role, content} messages (or {"messages": [...]}); image parts '
        "mark where an image is, they are not read.",
    )
    prompt.add_argument("--messages", required=True, help="JSON file of messages")
    prompt.add_argument("--ids", action="store_true", help="print token ids, specials named")
    prompt.add_argument("--exclude", default="", help="category codes to leave out, e.g. S1,S13")
    prompt.add_argument("--categories", help="JSON file of custom categories {code: description}")
    prompt.add_argument(
        "--tokenizer", help="checkpoint directory, tokenizer.json or tokenizer.model (for --ids)"
    )
    prompt.set_defaults(handler=_prompt)

    export = commands.add_parser("export", help="write checkpoints and engines")
    exports = export.add_subparsers(dest="export_command", required=True)
    tiny = exports.add_parser(
        "tiny-random",
        help="write a tiny random mllama as a complete HF checkpoint (meaningless verdicts)",
    )
    tiny.add_argument("-o", "--output", required=True, help="directory to create")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(handler=_export_tiny_random)
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
    except BrokenPipeError:
        # The reader went away (`guardrt prompt --ids | head`): not an error of ours.
        sys.stderr.close()
        return 0
