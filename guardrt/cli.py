"""The `guardrt` command line (also `python -m guardrt`).

Subcommands register themselves in `_COMMANDS`; each is a small function taking parsed args.
Later issues add `serve`, `export` and `bench` here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from guardrt import __version__
from guardrt.env_flags import env_flags
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


def _prompt(args: argparse.Namespace) -> int:
    from guardrt.runtime.jsonfile import read_json  # noqa: PLC0415
    from guardrt.runtime.prompt import encode_prompt, render_prompt  # noqa: PLC0415
    from guardrt.runtime.tokenizer import load_tokenizer  # noqa: PLC0415

    document = read_json(Path(args.messages), "messages file")
    # A list of messages, or {"messages": [...]}; parse_messages refuses anything else by name.
    messages: Any = document.get("messages") if isinstance(document, dict) else document
    categories = read_json(Path(args.categories), "categories file") if args.categories else None
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


def _export_build(args: argparse.Namespace) -> int:
    from guardrt.export.build import BuildOptions, build  # noqa: PLC0415 (needs torch)
    from guardrt.export.report import build_report  # noqa: PLC0415
    from guardrt.runtime.model.resolve import resolve_model  # noqa: PLC0415

    options = BuildOptions(
        model=resolve_model(args.model),
        output=Path(args.output),
        precision=args.precision,
        engine_format=args.format,
        max_batch=args.max_batch_size,
        max_seq=args.max_seq_len,
        semantics=args.semantics,
        int8_compute=args.int8_compute,
        device=args.device,
        force=args.force,
    )
    document = build(options)
    print(build_report(document, options.output))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from guardrt.bench.command import main as bench  # noqa: PLC0415

    return bench(args.bench_args)


def _add_export(commands: Any) -> None:
    export = commands.add_parser("export", help="write checkpoints and engines")
    exports = export.add_subparsers(dest="export_command", required=True)
    tiny = exports.add_parser(
        "tiny-random",
        help="write a tiny random mllama as a complete HF checkpoint (meaningless verdicts)",
    )
    tiny.add_argument("-o", "--output", required=True, help="directory to create")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(handler=_export_tiny_random)
    built = exports.add_parser(
        "build",
        help="build an engine directory (ONNX or TensorRT) from a checkpoint",
        description="convert → quantize → build, each step checked against the one before on "
        "fixed probes; ENGINE_DIR/manifest.json records every step, file and tool version. "
        "Serve the result with `guardrt serve --model ENGINE_DIR`.",
    )
    built.add_argument("--model", required=True, help="checkpoint directory (or tiny-random)")
    built.add_argument("-o", "--output", required=True, help="engine directory to create")
    built.add_argument(
        "--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8", "fp8"]
    )
    built.add_argument("--format", default="onnx", choices=["onnx", "tensorrt"])
    built.add_argument("--max-batch-size", type=int, default=4, help="rows per batch (4)")
    built.add_argument("--max-seq-len", type=int, default=8192, help="positions per row (8192)")
    built.add_argument("--semantics", default="meta", choices=["meta", "transformers"])
    built.add_argument(
        "--int8-compute",
        default="weight-only",
        choices=["weight-only", "weight+activation"],
        help="int8: fp32 math on int8 weights (default), or int8 activations too (faster on "
        "CPUs, less exact; the manifest records both deviations)",
    )
    built.add_argument(
        "--device", default="cpu", help="torch device for converting and parity (cpu, cuda)"
    )
    built.add_argument("--force", action="store_true", help="replace a non-empty -o directory")
    built.set_defaults(handler=_export_build)


def _serve(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from guardrt.runtime.server import logs  # noqa: PLC0415
    from guardrt.runtime.server.config import ServerConfig, TlsConfig  # noqa: PLC0415
    from guardrt.runtime.server.image_urls import parse_origins  # noqa: PLC0415
    from guardrt.runtime.server.main import serve  # noqa: PLC0415
    from guardrt.runtime.server.server_policy import read_policy  # noqa: PLC0415
    from guardrt.runtime.server.tokens import read_tokens  # noqa: PLC0415

    logs.configure(args.log_level, args.log_format)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    tls = (
        TlsConfig(
            Path(args.tls_cert), Path(args.tls_key), args.tls_client_ca and Path(args.tls_client_ca)
        )
        if args.tls_cert
        else None
    )
    config = ServerConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        semantics=args.semantics,
        decode=args.decode,
        max_seq=args.max_seq,
        max_streams=args.max_streams,
        cuda_graphs=not args.no_cuda_graphs,
        warmup_max_batch=args.warmup_max_batch,
        quantize=args.quantize,
        int8_compute=args.int8_compute,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        batching=args.batching,
        max_queue=args.max_queue,
        max_message_bytes=args.max_message_bytes,
        max_text_chars=args.max_text_chars,
        max_in_flight_per_caller=args.max_in_flight_per_caller,
        max_rate_per_caller=args.max_rate_per_caller,
        rate_burst_per_caller=args.rate_burst_per_caller,
        verdict_cache=args.verdict_cache,
        policy=read_policy(args.policy) if args.policy else None,
        grace_s=args.grace_s,
        drain_delay_s=args.drain_delay_s,
        engine_timeout_s=args.engine_timeout_s,
        workers=args.workers,
        listen_while_loading=args.listen_while_loading,
        image_url_origins=parse_origins(args.image_url_origins.split(",")),
        image_url_timeout_s=args.image_url_timeout_s,
        tls=tls,
        auth_tokens=read_tokens(args.auth_token_file),
        auth_token_file=args.auth_token_file,
    )
    return asyncio.run(serve(config))


def _moderate(args: argparse.Namespace) -> int:
    from guardrt.runtime.server.client import moderate_once  # noqa: PLC0415

    return moderate_once(args)


def _add_serve(commands: Any) -> argparse.ArgumentParser:
    serve: argparse.ArgumentParser = commands.add_parser(
        "serve",
        help="serve moderation over gRPC (tiny-random by default: meaningless verdicts)",
        epilog="Each flag can also be set in the environment as GUARDRT_<FLAG> (--max-queue: "
        "GUARDRT_MAX_QUEUE=512; a switch: GUARDRT_LISTEN_WHILE_LOADING=true); a flag given "
        "here wins.",
    )
    serve.add_argument(
        "--model",
        default="tiny-random",
        help="tiny-random (default; a generated random model, meaningless verdicts) or a "
        "checkpoint directory",
    )
    serve.add_argument(
        "--device",
        default="auto",
        help="auto (default: the GPU when the back end has one, else the CPU), cpu, cuda, cuda:N",
    )
    serve.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    serve.add_argument(
        "--semantics",
        default=None,
        choices=["meta", "transformers"],
        help="meta (default for a checkpoint) or transformers; an engine directory has its own",
    )
    serve.add_argument("--decode", default="constrained", choices=["constrained", "greedy"])
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--grpc-port", type=int, default=50051)
    serve.add_argument(
        "--http-port", type=int, default=8000, help="OpenAI-compatible HTTP API (-1: off)"
    )
    serve.add_argument("--max-batch-size", type=int, default=4)
    serve.add_argument("--max-wait-ms", type=float, default=5.0)
    serve.add_argument(
        "--batching",
        choices=["cost", "fifo"],
        default="cost",
        help="which queued requests share a batch: the oldest plus those whose padding costs "
        "less than a batch of their own (cost), or the oldest --max-batch-size (fifo)",
    )
    serve.add_argument("--max-queue", type=int, default=256)
    serve.add_argument("--max-seq", type=int, default=8192, help="prompt + verdict tokens")
    serve.add_argument(
        "--max-streams", type=int, default=4, help="cache slots kept for ModerateStream"
    )
    serve.add_argument(
        "--quantize",
        choices=["int8", "fp8"],
        help="a checkpoint's linear weights as int8 (weight-only) or fp8 (e4m3, fp8 matmuls on "
        "sm ≥ 8.9), made at load; an engine directory has its own precision",
    )
    serve.add_argument(
        "--int8-compute",
        default="weight-only",
        choices=["weight-only", "weight+activation"],
        help="with --quantize int8 on a GPU: weight+activation also quantizes the activations "
        "of large steps per token (int8 tensor cores; moves scores more)",
    )
    serve.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="torch on a GPU: run every step eagerly (default: small steps replay CUDA graphs "
        "captured at warm-up or on first use)",
    )
    serve.add_argument(
        "--warmup-max-batch",
        type=int,
        default=4,
        help="torch on a GPU: warm-up captures the common steps of batches up to this many "
        "requests (a slower start for fewer captures on first use; 1: batch 1 only)",
    )
    serve.add_argument("--max-message-bytes", type=int, default=40 * 1024 * 1024)
    serve.add_argument("--max-text-chars", type=int, default=200_000)
    serve.add_argument(
        "--max-in-flight-per-caller",
        type=int,
        default=0,
        help="requests one caller (a bearer token's name, see --auth-token-file) may have in "
        "flight; past it RESOURCE_EXHAUSTED / 429, ModerateMany held back (0: no limit)",
    )
    serve.add_argument(
        "--max-rate-per-caller",
        type=float,
        default=0.0,
        metavar="REQUESTS_PER_S",
        help="requests a second one caller (a bearer token's name) may start; past it "
        "RESOURCE_EXHAUSTED / 429 with when to retry, ModerateMany paced (0: no limit)",
    )
    serve.add_argument(
        "--rate-burst-per-caller",
        type=int,
        default=0,
        help="requests a quiet caller may start at once (default: one second's worth)",
    )
    serve.add_argument(
        "--policy",
        metavar="FILE",
        help='the policy of requests that send no categories: JSON {"categories": [{"code", '
        '"description"}, ...], "exclude": ["S6"], "unsafe_threshold": 0.3}, each optional '
        "(default: the model's S1-S13, unsafe when likelier than safe; a request's exclusions "
        "add to the file's, its threshold replaces the file's)",
    )
    serve.add_argument(
        "--verdict-cache",
        type=int,
        default=0,
        metavar="ENTRIES",
        help="answer an input judged before from memory: the verdicts of the last ENTRIES "
        "distinct requests (their messages, image bytes and policy, hashed) are kept (0: off)",
    )
    serve.add_argument("--grace-s", type=float, default=30.0, help="drain time on SIGTERM")
    serve.add_argument(
        "--drain-delay-s",
        type=float,
        default=0.0,
        help="on SIGTERM, keep taking calls this long while health says NOT_SERVING, for load "
        "balancers to stop sending here (then --grace-s to finish)",
    )
    serve.add_argument(
        "--engine-timeout-s",
        type=float,
        default=300.0,
        help="a batch running longer means a stuck engine (a hung GPU): answer what waits "
        "UNAVAILABLE and exit 1 for a restart (0: never)",
    )
    serve.add_argument("--workers", type=int, default=4, help="preparation threads")
    serve.add_argument(
        "--listen-while-loading",
        action="store_true",
        help="bind the ports before the model loads (minutes): health NOT_SERVING, /healthz "
        "alive, /readyz 503, every call refused UNAVAILABLE / 503 until loaded (for liveness "
        "probes; not behind a load balancer that checks a port by connecting to it)",
    )
    serve.add_argument(
        "--image-url-origins",
        default="",
        metavar="ORIGIN[,ORIGIN...]",
        help="image URLs (HTTP image_url parts, gRPC Content.image_url) are fetched from "
        "these origins only, e.g. "
        "https://images.example.com,https://*.cdn.example.com,http://minio.internal:9000 "
        "(default none: data: URLs only; no redirects, proxies or environment credentials)",
    )
    serve.add_argument(
        "--image-url-timeout-s",
        type=float,
        default=10.0,
        help="the longest one image fetch may take (waiting for a turn included)",
    )
    serve.add_argument("--tls-cert", help="PEM certificate chain (enables TLS)")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument("--tls-client-ca", help="PEM CA bundle: require client certs (mTLS)")
    serve.add_argument(
        "--auth-token-file",
        help="file of static bearer tokens, a line each: TOKEN, or NAME TOKEN to name the caller "
        "in logs and metrics ('#' starts a comment; also $GUARDRT_AUTH_TOKENS); read again on "
        "SIGHUP",
    )
    serve.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text (default) or json: one object per line, a request's figures as fields",
    )
    serve.set_defaults(handler=_serve)
    return serve


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return seconds


def _add_moderate(commands: Any) -> None:
    client = commands.add_parser("moderate", help="ask a running server for a verdict")
    client.add_argument("--server", default="localhost:50051", help="HOST:PORT")
    client.add_argument("--text", default="", help="the user's message")
    client.add_argument("--image", help="path of an image sent with the user's message")
    client.add_argument(
        "--image-url", help="the image by URL instead, fetched by the server (its origins only)"
    )
    client.add_argument("--response", help="an assistant answer to judge (response classification)")
    client.add_argument("--exclude", default="", help="category codes to leave out, e.g. S1,S13")
    client.add_argument(
        "--unsafe-threshold",
        type=float,
        default=None,
        help="unsafe when P(unsafe) ≥ this, in (0, 1] (default: the server's)",
    )
    client.add_argument("--token", help="bearer token")
    client.add_argument("--tls-ca", help="PEM CA bundle to verify the server (enables TLS)")
    client.add_argument("--tls-cert", help="PEM client certificate (mutual TLS; with --tls-key)")
    client.add_argument("--tls-key", help="PEM private key of --tls-cert")
    client.add_argument(
        "--timeout", type=_positive_seconds, default=30.0, help="deadline in seconds"
    )
    client.add_argument("--json", action="store_true", help="print the whole response as JSON")
    client.set_defaults(handler=_moderate)


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command's parser, and its `serve` subcommand's (whose flags the environment may
    also give: `env_flags.py`)."""
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

    _add_export(commands)
    commands.add_parser(  # parsed by guardrt/bench/options.py (main() hands it over)
        "bench",
        help="verdict latency and throughput: the torch engine against transformers (needs "
        "torch and the test extra), or an engine directory (--model ENGINE_DIR)",
    )
    serve = _add_serve(commands)
    _add_moderate(commands)
    return parser, serve


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `guardrt` console script; returns the process exit code."""
    given = list(sys.argv[1:] if argv is None else argv)
    handler: Callable[[argparse.Namespace], int]
    if given[:1] == ["bench"]:  # its own parser (guardrt/bench/options.py), --help included
        handler, args = _bench, argparse.Namespace(bench_args=given[1:])
    else:
        parser, serve = _parsers()
        try:
            helping = {"-h", "--help"} & set(given)  # help is shown whatever the variables
            if given[:1] == ["serve"] and not helping:  # $GUARDRT_<FLAG>: the command line wins
                given = ["serve", *env_flags(serve, os.environ), *given[1:]]
        except GuardrtError as exc:
            print(f"guardrt: error: {exc}", file=sys.stderr)
            return 2
        args = parser.parse_args(given)
        handler = args.handler
    try:
        return handler(args)
    except GuardrtError as exc:
        print(f"guardrt: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`guardrt prompt --ids | head`): not an error of ours.
        sys.stderr.close()
        return 0
