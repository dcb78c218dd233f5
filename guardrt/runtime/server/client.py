"""`guardrt moderate`: a small gRPC client for trying a server from the shell (on
`guardrt.client.ModerationClient`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from google.protobuf import json_format

from guardrt.client import CallError, ModerationClient, moderate_request, verdict_from_proto
from guardrt.runtime.errors import ConfigError
from guardrt.v1 import moderation_pb2 as pb


def build_request(args: argparse.Namespace) -> pb.ModerateRequest:
    if not args.text and not args.image and not args.image_url and args.response is None:
        raise ConfigError("nothing to judge: give --text, --image, --image-url or --response")
    if args.image and args.image_url:
        raise ConfigError("--image and --image-url both give the image: give one")
    parts: list[dict[str, Any]] = []
    if args.image:
        parts.append({"type": "image", "image": args.image})
    if args.image_url:
        parts.append({"type": "image_url", "image_url": args.image_url})
    parts.append({"type": "text", "text": args.text or ""})
    messages = [{"role": "user", "content": parts}]
    if args.response is not None:
        messages.append({"role": "assistant", "content": args.response})
    exclude = [code.strip() for code in args.exclude.split(",") if code.strip()]
    return moderate_request(
        messages, excluded_categories=exclude, unsafe_threshold=args.unsafe_threshold
    )


def moderate_once(args: argparse.Namespace) -> int:
    request = build_request(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        raise ConfigError("--tls-cert needs --tls-ca (the CA that verifies the server)")
    client = ModerationClient(
        args.server,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        timeout=args.timeout,
        retries=0,  # a person at the shell sees the refusal at once
    )
    with client:
        try:
            response = client.call(request)
        except CallError as error:
            print(f"guardrt: {error}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(response), indent=2))
        return 0
    verdict = verdict_from_proto(response.verdict)
    label = verdict.label.value.upper()
    categories = f" {','.join(verdict.categories)}" if verdict.categories else ""
    print(f"{label}{categories}  P(unsafe)={verdict.unsafe_probability:.4g}")
    return 0 if verdict.label != "error" else 1
