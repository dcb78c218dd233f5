"""`guardrt moderate`: a small gRPC client for trying a server from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from guardrt.runtime.errors import ConfigError
from guardrt.v1 import moderation_pb2 as pb
from guardrt.v1 import moderation_pb2_grpc as pb_grpc


def build_request(args: argparse.Namespace) -> pb.ModerateRequest:
    if not args.text and not args.image and args.response is None:
        raise ConfigError("nothing to judge: give --text, --image or --response")
    user = pb.Message(role=pb.USER)
    if args.image:
        try:
            user.content.append(pb.Content(image=Path(args.image).read_bytes()))
        except OSError as exc:
            raise ConfigError(f"cannot read image {args.image}: {exc.strerror}") from exc
    user.content.append(pb.Content(text=args.text))
    messages = [user]
    if args.response is not None:
        messages.append(pb.Message(role=pb.ASSISTANT, content=[pb.Content(text=args.response)]))
    exclude = [code.strip() for code in args.exclude.split(",") if code.strip()]
    return pb.ModerateRequest(messages=messages, policy=pb.Policy(exclude=exclude))


def _read(flag: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {flag} {path}: {exc.strerror}") from exc


def moderate_once(args: argparse.Namespace) -> int:
    request = build_request(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        raise ConfigError("--tls-cert needs --tls-ca (the CA that verifies the server)")
    if args.tls_ca:
        ca, key, cert = (
            _read(flag, path)
            for flag, path in (
                ("--tls-ca", args.tls_ca),
                ("--tls-key", args.tls_key),
                ("--tls-cert", args.tls_cert),
            )
        )
        credentials = grpc.ssl_channel_credentials(ca, key, cert)
        channel = grpc.secure_channel(args.server, credentials)
    else:
        channel = grpc.insecure_channel(args.server)
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    with channel:
        stub = pb_grpc.ModerationStub(channel)
        try:
            response = stub.Moderate(request, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            print(f"guardrt: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(response), indent=2))
        return 0
    verdict = response.verdict
    label = pb.Label.Name(verdict.label)
    categories = f" {','.join(verdict.categories)}" if verdict.categories else ""
    print(f"{label}{categories}  P(unsafe)={verdict.unsafe_probability:.4g}")
    return 0 if verdict.label != pb.ERROR else 1
