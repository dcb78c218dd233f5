"""`guardrt serve --listen-while-loading`: the ports answer during the model's load (alive, not
ready, every call refused at once), then the real servers take the same ports."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guardrt.client import ModerationClient
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.server import main as server_main
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.image_urls import parse_origin
from guardrt.runtime.server.loading import LoadingPorts
from guardrt.runtime.server.main import Stack, assemble_stack
from guardrt.runtime.server.ports import check_bindable
from guardrt.v1 import moderation_pb2 as pb
from guardrt.v1 import moderation_pb2_grpc as pb_grpc
from tests.server_harness import FakeEngine
from tests.test_ports import free_port

_MESSAGE = pb.Message(role=pb.USER, content=[pb.Content(text="Hi.")])


def _http(port: int, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    """(status, headers, body as JSON or text) of one call to the HTTP port."""
    request = urllib.request.Request(f"http://localhost:{port}{path}", data=body)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            status, headers, raw = answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        status, headers, raw = exc.code, dict(exc.headers), exc.read()
    text = raw.decode()
    return status, headers, json.loads(text) if text.startswith("{") else text


def _health(channel: grpc.Channel) -> Any:
    request = health_pb2.HealthCheckRequest(service="guardrt.v1.Moderation")
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def _refusal(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _seen_while_loading(grpc_port: int, http_port: int) -> dict[str, Any]:
    """What a loading server answers on each kind of call."""
    seen: dict[str, Any] = {}
    with grpc.insecure_channel(f"localhost:{grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        seen["health"] = _health(channel)
        stub = pb_grpc.ModerationStub(channel)
        moderate = _refusal(
            lambda: stub.Moderate(pb.ModerateRequest(messages=[_MESSAGE]), timeout=5)
        )
        metadata: Any = moderate.trailing_metadata()
        trailers = dict(metadata)
        seen["moderate"] = (moderate.code(), moderate.details(), trailers)
        start = pb.StreamRequest(start=pb.StreamStart(messages=[_MESSAGE]))
        stream = _refusal(lambda: list(stub.ModerateStream(iter([start]), timeout=5)))
        seen["stream"] = stream.code()
        seen["info"] = _refusal(lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=5)).code()
        unknown = channel.unary_unary("/guardrt.v1.Moderation/NoSuchMethod", None, None)
        seen["unknown"] = _refusal(lambda: unknown(b"", timeout=5)).code()
    seen["healthz"] = _http(http_port, "/healthz")[::2]
    seen["readyz"] = _http(http_port, "/readyz")[::2]
    seen["metrics"] = _http(http_port, "/metrics")[2]
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "Hi."}]}).encode()
    seen["chat"] = _http(http_port, "/v1/chat/completions", body)
    return seen


def _blocked_load(preparer: Preparer, release: threading.Event) -> Callable[[ServerConfig], Stack]:
    sample = preparer.prepare([{"role": "user", "content": "What is the recipe for mayonnaise?"}])

    def load(config: ServerConfig) -> Stack:
        if not release.wait(60):
            raise AssertionError("the test never let the load finish")
        return assemble_stack(config, FakeEngine(), preparer, "test-model", [sample, sample])

    return load


def test_the_ports_answer_while_loading_then_serve(
    preparer: Preparer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    release = threading.Event()
    monkeypatch.setattr(server_main, "build_stack", _blocked_load(preparer, release))
    grpc_port, http_port = free_port(), free_port()
    seen: dict[str, Any] = {}
    after: dict[str, Any] = {}

    def client() -> None:
        try:
            seen.update(_seen_while_loading(grpc_port, http_port))
            release.set()
            with grpc.insecure_channel(f"localhost:{grpc_port}") as channel:
                for _ in range(300):  # the same port, now the real server's
                    try:
                        if _health(channel) == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass  # between the two listeners
                    threading.Event().wait(0.1)
                stub = pb_grpc.ModerationStub(channel)
                answer = stub.Moderate(pb.ModerateRequest(messages=[_MESSAGE]), timeout=10)
                after["label"] = answer.verdict.label
            after["readyz"] = _http(http_port, "/readyz")[0]
        finally:
            release.set()
            signal.raise_signal(signal.SIGTERM)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    config = ServerConfig(
        host="localhost",
        grpc_port=grpc_port,
        http_port=http_port,
        grace_s=1.0,
        listen_while_loading=True,
        image_url_origins=(parse_origin("https://images.example.com"),),
    )
    assert asyncio.run(server_main.serve(config)) == 0
    thread.join(10)

    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert seen["health"] == not_serving
    code, details, trailers = seen["moderate"]
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "the model is loading" in details
    assert trailers["grpc-retry-pushback-ms"] == "2000"  # a client's retries wait that long
    assert seen["stream"] == seen["info"] == grpc.StatusCode.UNAVAILABLE
    assert seen["unknown"] == grpc.StatusCode.UNIMPLEMENTED
    assert seen["healthz"] == (200, {"status": "loading"})
    assert seen["readyz"] == (503, {"ready": False, "status": "loading"})
    assert "guardrt_loading 1.0" in seen["metrics"]
    assert "guardrt_ready 0.0" in seen["metrics"]
    status, headers, body = seen["chat"]
    assert (status, body["error"]["code"], headers["Retry-After"]) == (503, "loading", "2")
    assert after == {"label": pb.SAFE, "readyz": 200}
    out = capsys.readouterr().out
    assert f"listening on localhost:{grpc_port} (gRPC) and localhost:{http_port} (HTTP)" in out
    assert out.index("while loading") < out.index("loaded and warmed up")
    assert "images by URL fetched from https://images.example.com only" in out  # said at start


def test_a_call_sent_while_loading_is_answered_once_loaded(
    preparer: Preparer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's retries (UNAVAILABLE, with the server's pushback) carry a call across the
    load: the caller sees a verdict, not the refusal."""
    release = threading.Event()
    monkeypatch.setattr(server_main, "build_stack", _blocked_load(preparer, release))
    port = free_port()
    outcome: list[Any] = []

    def client() -> None:
        try:
            with grpc.insecure_channel(f"localhost:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=30)  # the loading listener
            threading.Timer(0.5, release.set).start()
            with ModerationClient(f"localhost:{port}", timeout=30) as guard:
                outcome.append(guard.moderate([{"role": "user", "content": "Hi."}]))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome.append(exc)
        finally:
            release.set()
            signal.raise_signal(signal.SIGTERM)

    threading.Thread(target=client, daemon=True).start()
    config = ServerConfig(
        host="localhost", grpc_port=port, http_port=-1, grace_s=1.0, listen_while_loading=True
    )
    assert asyncio.run(server_main.serve(config)) == 0
    assert len(outcome) == 1
    assert outcome[0].label.value == "safe", outcome


def test_a_failed_load_lets_the_ports_go(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(config: ServerConfig) -> None:
        raise ConfigError("no such checkpoint: /models/missing")

    monkeypatch.setattr(server_main, "build_stack", load)
    grpc_port, http_port = free_port(), free_port()
    config = ServerConfig(
        host="localhost", grpc_port=grpc_port, http_port=http_port, listen_while_loading=True
    )
    with pytest.raises(ConfigError, match="no such checkpoint"):
        asyncio.run(server_main.serve(config))
    check_bindable("localhost", grpc_port, "gRPC")
    check_bindable("localhost", http_port, "HTTP API")


def test_port_0_is_made_concrete_for_the_real_servers() -> None:
    async def run() -> ServerConfig:
        config = ServerConfig(host="localhost", grpc_port=0, http_port=0)
        ports = await LoadingPorts.open(config, None)
        try:
            return ports.bound(config)
        finally:
            await ports.close()

    bound = asyncio.run(run())
    assert bound.grpc_port > 0
    assert bound.http_port > 0
    assert bound == ServerConfig(
        host="localhost", grpc_port=bound.grpc_port, http_port=bound.http_port
    )
    check_bindable("localhost", bound.grpc_port, "gRPC")  # closed: free again
    check_bindable("localhost", bound.http_port, "HTTP API")


def test_without_the_flag_nothing_listens_while_loading(
    preparer: Preparer, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    monkeypatch.setattr(server_main, "build_stack", _blocked_load(preparer, release))
    port = free_port()
    listening: list[bool] = []

    def client() -> None:
        try:
            threading.Event().wait(0.5)  # serve is loading by now
            with grpc.insecure_channel(f"localhost:{port}") as channel:
                ready = grpc.channel_ready_future(channel)
                try:
                    ready.result(timeout=1)
                    listening.append(True)
                except grpc.FutureTimeoutError:
                    listening.append(False)
            release.set()
            with grpc.insecure_channel(f"localhost:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=30)  # served once loaded
                stub = pb_grpc.ModerationStub(channel)
                stub.Moderate(pb.ModerateRequest(messages=[_MESSAGE]), timeout=10)
        finally:
            release.set()
            signal.raise_signal(signal.SIGTERM)

    threading.Thread(target=client, daemon=True).start()
    config = ServerConfig(host="localhost", grpc_port=port, http_port=-1, grace_s=1.0)
    assert asyncio.run(server_main.serve(config)) == 0
    assert listening == [False]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_while_loading_exits_at_once(checkpoint: Path, signum: signal.Signals) -> None:
    """Before, SIGINT (Ctrl-C) waited for the load's thread to finish (minutes for the 11B),
    then printed a traceback; SIGTERM ended the process without a word."""
    command = [sys.executable, "-m", "guardrt", "serve", "--model", str(checkpoint)]
    command += ["--host", "localhost", "--grpc-port", "0", "--http-port", "-1"]

    def default_signals() -> None:  # a shell's background job starts with SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_signals,  # noqa: PLW1509 - no threads touch the child before exec
    )
    try:
        assert child.stdout is not None
        lines = []
        for line in child.stdout:
            lines.append(line)
            if line.startswith("loading "):
                break
        child.send_signal(signum)
        out = "".join(lines) + child.communicate(timeout=60)[0]
    finally:
        child.kill()
    assert child.returncode == 128 + signum, out
    assert f"{signum.name} while loading the model: stopped" in out
    assert "loaded and warmed up" not in out
    assert "Traceback" not in out
