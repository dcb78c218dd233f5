"""Images by URL on the HTTP API and gRPC (`--image-url-origins`): fetched from the allowed
origins only, within the limits, and every failure an error for its request, never a verdict
without the image."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from guardrt.client import messages_to_proto, moderate_request
from guardrt.runtime.errors import ConfigError, ImageUrlError
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.server.image_urls import (
    Origin,
    parse_origin,
    parse_origins,
    remote_image,
)
from guardrt.runtime.server.tokens import read_tokens
from guardrt.v1 import moderation_pb2 as pb
from tests.images import encode, synthetic
from tests.server_harness import FakeEngine, ServerThread, serving

JPEG = encode(Image.fromarray(synthetic(200, 120)), "JPEG", quality=90)


@pytest.mark.parametrize(
    ("entry", "origin"),
    [
        ("http://[::1]:8080", Origin("http", "::1", 8080)),
        ("https://images.example.com", Origin("https", "images.example.com", 443)),
        ("https://Images.Example.com/", Origin("https", "images.example.com", 443)),
        ("http://minio.internal:9000", Origin("http", "minio.internal", 9000)),
        ("https://*.cdn.example.com", Origin("https", "*.cdn.example.com", 443)),
        ("http://127.0.0.1:8080", Origin("http", "127.0.0.1", 8080)),
    ],
    ids=["ipv6", "https", "case-and-slash", "http-port", "subdomains", "address"],
)
def test_origins_parse(entry: str, origin: Origin) -> None:
    assert parse_origin(entry) == origin


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("images.example.com", "its scheme must be http or https"),
        ("ftp://files.example.com", "its scheme must be http or https"),
        ("https://", "it needs a host"),
        ("https://*", "it needs a host"),
        ("https://a.*.example.com", "it needs a host"),
        ("https://user:secret@images.example.com", "it must not hold credentials"),
        ("https://images.example.com/uploads", "an origin has no path, query or fragment"),
        ("https://images.example.com:99999", "is malformed"),
    ],
    ids=["no-scheme", "ftp", "no-host", "star", "inner-star", "credentials", "path", "port"],
)
def test_bad_origins_are_named(entry: str, message: str) -> None:
    with pytest.raises(
        ConfigError, match=re.escape(f"image URL origin '{entry}'") + ".*" + message
    ):
        parse_origin(entry)


_ORIGINS = parse_origins(
    ["https://images.example.com", "https://*.cdn.example.com", "http://minio.internal:9000", ""]
)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://images.example.com/a.jpg?sig=1", True),
        ("HTTPS://IMAGES.EXAMPLE.COM:443/a.jpg", True),
        ("http://images.example.com/a.jpg", False),  # another scheme
        ("https://images.example.com:8443/a.jpg", False),  # another port
        ("https://images.example.com.evil.net/a.jpg", False),
        ("https://a.cdn.example.com/x.png", True),
        ("https://a.b.cdn.example.com/x.png", True),
        ("https://cdn.example.com/x.png", False),  # the domain itself is not its subdomain
        ("https://evilcdn.example.com/x.png", False),
        ("http://minio.internal:9000/bucket/k", True),
        ("http://minio.internal/bucket/k", False),
    ],
)
def test_only_the_origins_are_allowed(url: str, allowed: bool) -> None:
    if allowed:
        assert remote_image(url, _ORIGINS, "messages[0].content[1]").url == url
    else:
        with pytest.raises(ImageUrlError, match="not among the server's --image-url-origins"):
            remote_image(url, _ORIGINS, "messages[0].content[1]")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://user:pw@images.example.com/a.jpg", "must not hold credentials"),
        ("file:///etc/passwd", "must be data:, http: or https: with a host"),
        ("https:///a.jpg", "must be data:, http: or https: with a host"),
        ("https://images.example.com:70000/a.jpg", "is malformed"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ImageUrlError, match=message) as refused:
        remote_image(url, _ORIGINS, "messages[0].content[1]")
    assert refused.value.code == "invalid_image_url"


def test_messages_name_the_origin_never_the_path_or_query() -> None:
    """A signed URL's query is a credential, and messages reach the logs."""
    url = "https://evil.example.net/private/k.jpg?X-Amz-Signature=secret"
    with pytest.raises(ImageUrlError) as refused:
        remote_image(url, _ORIGINS, "input")
    assert "https://evil.example.net" in str(refused.value)
    assert "private" not in str(refused.value)
    assert "secret" not in str(refused.value)


class _Images(BaseHTTPRequestHandler):
    """The image server: each path a behaviour."""

    hits: list[str] = []  # noqa: RUF012 - the test's record of what was fetched
    big = 40 * 1024 * 1024

    def do_GET(self) -> None:
        _Images.hits.append(self.path)
        if self.path.startswith("/photo.jpg"):
            self._send(200, JPEG)
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/photo.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/big-announced":
            self.send_response(200)
            self.send_header("Content-Length", str(self.big))
            self.end_headers()
        elif self.path == "/big-unannounced":  # no length: read until the connection closes
            self.send_response(200)
            self.end_headers()
            chunk = b"\xff" * (1 << 20)
            try:
                for _ in range(self.big >> 20):
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the fetcher stopped reading at its limit
        elif self.path == "/slow":
            time.sleep(3)
            self._send(200, JPEG)
        elif self.path == "/gzipped":  # whatever was asked for
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b\x08")
        elif self.path == "/broken":
            self._send(500, b"oops")
        else:
            self._send(404, b"no such image")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the fetcher gave up
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def image_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Images.hits.clear()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _post(server: ServerThread, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("localhost", server.http_port, timeout=30)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _chat(url: str, second: str | None = None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "What is in this picture?"}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in (url, second) if u]
    messages = [{"role": "user", "content": parts}]
    return {"model": "meta-llama/Llama-Guard-3-11B-Vision", "messages": messages}


@pytest.fixture
def fetching(preparer: Preparer) -> Iterator[tuple[ServerThread, FakeEngine, int]]:
    """A server allowed to fetch from the image server (1 s per fetch), its engine, and the
    image server's port."""
    engine = FakeEngine()
    with image_server() as port:
        origins = (parse_origin(f"http://127.0.0.1:{port}"),)
        with serving(
            engine, preparer, image_url_origins=origins, image_url_timeout_s=1.0
        ) as server:
            yield server, engine, port


def _without_ids(answer: dict[str, Any]) -> dict[str, Any]:
    extension = {k: v for k, v in answer["guardrt"].items() if k != "request_id"}
    return {k: v for k, v in answer.items() if k not in ("id", "created")} | {"guardrt": extension}


def test_an_image_url_answers_as_its_bytes_inline(
    fetching: tuple[ServerThread, FakeEngine, int],
) -> None:
    server, engine, port = fetching
    inline = "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()
    status, by_value = _post(server, "/v1/chat/completions", _chat(inline))
    assert status == 200
    signed = "/photo.jpg?X-Amz-Signature=a%2Fb%3D&k=%7E"  # re-quoted, a signature breaks
    status, by_url = _post(
        server, "/v1/chat/completions", _chat(f"http://127.0.0.1:{port}{signed}")
    )
    assert status == 200, by_url
    assert _without_ids(by_url) == _without_ids(by_value)
    first, second = (batch[0] for batch in engine.batches[-2:])
    assert first.image is not None
    assert second.image is not None
    np.testing.assert_array_equal(first.image.pixel_values, second.image.pixel_values)
    assert _Images.hits == [signed]  # the URL went out byte for byte
    status, moderated = _post(
        server,
        "/v1/moderations",
        {
            "input": [
                {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{port}/photo.jpg"}}
            ]
        },
    )
    assert status == 200, moderated
    assert moderated["results"][0]["category_applied_input_types"]["hate"] == ["image"]


@pytest.mark.parametrize(
    ("path", "status", "code", "message"),
    [
        ("/missing.jpg", 400, "image_url_fetch_failed", "answered 404"),
        ("/moved", 400, "image_url_fetch_failed", "answered 302 (redirects are not followed)"),
        ("/big-announced", 400, "image_url_too_large", "over the 33554432-byte limit"),
        ("/big-unannounced", 400, "image_url_too_large", "over the 33554432-byte limit"),
        ("/slow", 502, "image_url_unavailable", "did not send the image within 1 s"),
        ("/broken", 502, "image_url_unavailable", "answered 500"),
        ("/gzipped", 400, "image_url_fetch_failed", "sent the image 'gzip'-encoded"),
    ],
    ids=["404", "redirect", "announced-too-large", "too-large", "timeout", "server-error", "gzip"],
)
def test_a_url_that_cannot_be_fetched_is_an_error_for_its_request(
    fetching: tuple[ServerThread, FakeEngine, int],
    path: str,
    status: int,
    code: str,
    message: str,
) -> None:
    server, engine, port = fetching
    batches = len(engine.batches)
    answered, body = _post(server, "/v1/chat/completions", _chat(f"http://127.0.0.1:{port}{path}"))
    assert (answered, body["error"]["code"]) == (status, code), body
    assert body["error"]["param"] == "messages[0].content[1]"
    assert message in body["error"]["message"]
    assert f"http://127.0.0.1:{port}" in body["error"]["message"]
    assert path not in body["error"]["message"]
    assert len(engine.batches) == batches  # nothing ran: no verdict without the image


def test_a_refused_url_is_never_fetched(fetching: tuple[ServerThread, FakeEngine, int]) -> None:
    server, _, port = fetching
    status, body = _post(server, "/v1/chat/completions", _chat(f"http://localhost:{port}/a.jpg"))
    assert (status, body["error"]["code"]) == (400, "image_url_not_allowed")
    assert "--image-url-origins); send the image inline as data:image/" in body["error"]["message"]
    photo = f"http://127.0.0.1:{port}/photo.jpg"
    status, body = _post(server, "/v1/chat/completions", _chat(photo, photo))
    assert status == 400
    assert "second image" in body["error"]["message"]
    assert _Images.hits == []  # a conversation Llama Guard cannot judge fetches nothing


def test_without_origins_urls_are_refused(preparer: Preparer) -> None:
    with serving(FakeEngine(), preparer) as server:
        status, body = _post(
            server, "/v1/chat/completions", _chat("https://images.example.com/a.jpg")
        )
    assert (status, body["error"]["code"]) == (400, "remote_image_url")
    assert "--image-url-origins" in body["error"]["message"]


# gRPC: `Content.image_url`.


def _grpc_request(url: str, request_id: str = "") -> pb.ModerateRequest:
    parts = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": url},
    ]
    return moderate_request([{"role": "user", "content": parts}], request_id=request_id)


def test_grpc_an_image_url_answers_as_its_bytes(
    fetching: tuple[ServerThread, FakeEngine, int],
) -> None:
    server, engine, port = fetching
    parts = [{"type": "text", "text": "What is in this picture?"}, {"type": "image", "image": JPEG}]
    by_value = server.stub().Moderate(moderate_request([{"role": "user", "content": parts}]))
    signed = "/photo.jpg?X-Amz-Signature=a%2Fb%3D&k=%7E"
    by_url = server.stub().Moderate(_grpc_request(f"http://127.0.0.1:{port}{signed}"))
    assert by_url.verdict == by_value.verdict
    assert by_url.prompt_tokens == by_value.prompt_tokens
    first, second = (batch[0] for batch in engine.batches[-2:])
    assert first.image is not None
    assert second.image is not None
    np.testing.assert_array_equal(first.image.canvas, second.image.canvas)
    assert _Images.hits == [signed]  # the URL went out byte for byte
    info = server.stub().GetInfo(pb.GetInfoRequest())
    assert list(info.image_url_origins) == [f"http://127.0.0.1:{port}"]


@pytest.mark.parametrize(
    ("path", "code", "message"),
    [
        ("/missing.jpg", grpc.StatusCode.INVALID_ARGUMENT, "answered 404"),
        ("/moved", grpc.StatusCode.INVALID_ARGUMENT, "(redirects are not followed)"),
        ("/big-announced", grpc.StatusCode.INVALID_ARGUMENT, "over the 33554432-byte limit"),
        ("/slow", grpc.StatusCode.UNAVAILABLE, "did not send the image within 1 s"),
        ("/broken", grpc.StatusCode.UNAVAILABLE, "answered 500"),
    ],
    ids=["404", "redirect", "too-large", "timeout", "server-error"],
)
def test_grpc_a_url_that_cannot_be_fetched_is_an_error_for_its_request(
    fetching: tuple[ServerThread, FakeEngine, int],
    path: str,
    code: grpc.StatusCode,
    message: str,
) -> None:
    server, engine, port = fetching
    batches = len(engine.batches)
    with pytest.raises(grpc.RpcError) as refused:
        server.stub().Moderate(_grpc_request(f"http://127.0.0.1:{port}{path}"))
    assert refused.value.code() == code
    details = refused.value.details() or ""
    assert message in details
    assert details.startswith("message 0 part 1: ")
    assert f"http://127.0.0.1:{port}" in details
    assert path not in details
    assert len(engine.batches) == batches  # nothing ran: no verdict without the image
    metrics = urllib.request.urlopen(f"http://localhost:{server.http_port}/metrics").read()
    reason = "image_url_unavailable" if code == grpc.StatusCode.UNAVAILABLE else "image_url_"
    counted = f'guardrt_requests_total{{code="{code.name}",reason="{reason}'
    assert counted.encode() in metrics


def test_grpc_refused_urls_are_never_fetched(
    fetching: tuple[ServerThread, FakeEngine, int],
) -> None:
    server, _, port = fetching
    for url, words in (
        (f"http://localhost:{port}/a.jpg", "--image-url-origins); send the image's bytes in"),
        ("data:image/jpeg;base64,/9j/", "not as a data: URL"),
        ("ftp://127.0.0.1/a.jpg", "must be http: or https: with a host"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            server.stub().Moderate(_grpc_request(url))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in (refused.value.details() or "")
    photo = f"http://127.0.0.1:{port}/photo.jpg"
    parts = [{"type": "image_url", "image_url": photo}, {"type": "image_url", "image_url": photo}]
    with pytest.raises(grpc.RpcError) as refused:
        server.stub().Moderate(moderate_request([{"role": "user", "content": parts}]))
    assert "second image" in (refused.value.details() or "")
    assert _Images.hits == []


def test_grpc_without_origins_urls_are_refused(preparer: Preparer) -> None:
    with serving(FakeEngine(), preparer) as server, pytest.raises(grpc.RpcError) as refused:
        server.stub().Moderate(_grpc_request("https://images.example.com/a.jpg"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "started without --image-url-origins" in (refused.value.details() or "")


def test_grpc_moderate_many_answers_each_url_request_on_its_own(
    fetching: tuple[ServerThread, FakeEngine, int],
) -> None:
    server, _, port = fetching
    requests = [
        _grpc_request(f"http://127.0.0.1:{port}/photo.jpg", "good"),
        _grpc_request(f"http://127.0.0.1:{port}/broken", "broken"),
        _grpc_request(f"http://127.0.0.1:{port}/missing.jpg", "missing"),
    ]
    answers = {r.request_id: r.verdict for r in server.stub().ModerateMany(iter(requests))}
    assert answers["good"].label == pb.SAFE
    assert answers["broken"].label == pb.ERROR
    assert answers["broken"].error_code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert answers["missing"].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_grpc_a_streams_image_url_is_fetched_once(
    fetching: tuple[ServerThread, FakeEngine, int],
) -> None:
    server, engine, port = fetching
    photo = f"http://127.0.0.1:{port}/photo.jpg"
    start = pb.StreamStart(
        messages=_grpc_request(photo).messages, check_every_tokens=1, request_id="s"
    )
    answer = [
        pb.StreamRequest(start=start),
        pb.StreamRequest(append="Sure, "),
        pb.StreamRequest(append="it is a photo."),
        pb.StreamRequest(end=pb.StreamEnd()),
    ]
    checks = list(server.stub().ModerateStream(iter(answer), timeout=30))
    assert checks[-1].final
    assert all(check.verdict.label == pb.SAFE for check in checks)
    assert _Images.hits == ["/photo.jpg"]  # once for the stream, not once a check
    assert all(batch[0].image is not None for batch in engine.batches[-len(checks) :])
    broken = pb.StreamStart(messages=_grpc_request(f"http://127.0.0.1:{port}/broken").messages)
    with pytest.raises(grpc.RpcError) as refused:
        list(server.stub().ModerateStream(iter([pb.StreamRequest(start=broken)]), timeout=30))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_client_sends_image_url_parts() -> None:
    for part in (
        {"type": "image_url", "image_url": "https://images.example.com/a.jpg"},
        {"type": "image_url", "image_url": {"url": "https://images.example.com/a.jpg"}},
    ):
        (message,) = messages_to_proto([{"role": "user", "content": [part]}])
        assert message.content[0].image_url == "https://images.example.com/a.jpg"
    with pytest.raises(ConfigError, match="message 0 part 0: an image_url part needs its URL"):
        messages_to_proto([{"role": "user", "content": [{"type": "image_url"}]}])


def test_a_refused_call_fetches_nothing(preparer: Preparer, tmp_path: Path) -> None:
    """The image is fetched once the call is admitted: past its caller's rate, no connection."""
    tokens = tmp_path / "tokens"
    tokens.write_text("billing s3cret-b\n")
    with image_server() as port:
        settings: dict[str, Any] = {
            "image_url_origins": (parse_origin(f"http://127.0.0.1:{port}"),),
            "auth_tokens": read_tokens(str(tokens)),
            "auth_token_file": str(tokens),
            "max_rate_per_caller": 0.01,
            "rate_burst_per_caller": 1,
        }
        with serving(FakeEngine(), preparer, **settings) as server:
            billing = (("authorization", "Bearer s3cret-b"),)
            photo = f"http://127.0.0.1:{port}/photo.jpg"
            server.stub().Moderate(_grpc_request(photo), metadata=billing)
            with pytest.raises(grpc.RpcError) as refused:
                server.stub().Moderate(_grpc_request(photo), metadata=billing)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _Images.hits == ["/photo.jpg"]  # the first call's fetch only
