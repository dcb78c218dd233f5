"""`guardrt serve`'s ports and settings: a port in use, or a setting out of range, is an error
that names it, before the model loads where it can be; never a traceback or a shared port."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guardrt.runtime import guard as guard_module
from guardrt.runtime.errors import ConfigError, GuardrtError
from guardrt.runtime.guard import Guard
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.requests import Decoded, PreparedRequest
from guardrt.runtime.server import main as server_main
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.grpc_server import build_server
from guardrt.runtime.server.main import Stack, assemble_stack
from guardrt.runtime.server.ports import check_bindable
from guardrt.v1 import moderation_pb2 as pb
from guardrt.v1 import moderation_pb2_grpc as pb_grpc
from tests.server_harness import FakeEngine


@contextmanager
def held_port() -> Iterator[int]:
    """A localhost port another listener holds (as a second server would meet it)."""
    with socket.socket() as holder:
        holder.bind(("localhost", 0))
        holder.listen()
        yield holder.getsockname()[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port: int = probe.getsockname()[1]
    return port


def test_a_held_port_is_named() -> None:
    with (
        held_port() as port,
        pytest.raises(ConfigError, match=f"HTTP API: cannot listen on localhost:{port}: "),
    ):
        check_bindable("localhost", port, "HTTP API")
    check_bindable("localhost", port, "HTTP API")  # released: bindable again
    check_bindable("localhost", 0, "gRPC")  # any free port


def test_an_unknown_host_is_named() -> None:
    with pytest.raises(ConfigError, match=r"gRPC: cannot resolve host 'no-such-host\.invalid'"):
        check_bindable("no-such-host.invalid", 50051, "gRPC")


def test_grpc_does_not_share_a_port_with_another_server() -> None:
    """gRPC's default SO_REUSEPORT would let this bind succeed and split the first server's
    calls between two processes."""

    async def main() -> None:
        first = grpc.aio.server(options=[("grpc.so_reuseport", 1)])  # as a default server binds
        port = first.add_insecure_port("localhost:0")
        config = ServerConfig(grpc_port=port, host="localhost", http_port=-1)
        info = pb.ModelInfo(model="test")
        with pytest.raises(ConfigError, match=f"gRPC: cannot listen on localhost:{port}"):
            build_server(config, None, info)  # type: ignore[arg-type]
        await first.stop(None)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"grpc_port": 50051, "http_port": 50051}, "http port 50051 is the grpc port too"),
        ({"max_wait_ms": math.nan}, "max_wait_ms must be a finite number ≥ 0, not nan"),
        ({"max_wait_ms": -1.0}, "max_wait_ms must be a finite number ≥ 0, not -1.0"),
        ({"grace_s": math.inf}, "grace_s must be a finite number ≥ 0, not inf"),
        ({"workers": 0}, "workers must be at least 1, not 0"),
        ({"max_streams": -1}, "max_streams must be ≥ 0"),
        ({"engine_timeout_s": math.nan}, "engine_timeout_s must be a finite number ≥ 0, not nan"),
        ({"max_message_bytes": 10}, "max_message_bytes must be at least 1024 (a call's framing"),
        ({"max_in_flight_per_caller": -1}, "max_in_flight_per_caller must be ≥ 0 (0: no limit)"),
        ({"image_url_timeout_s": 0.0}, "image_url_timeout_s must be a finite number > 0, not 0.0"),
    ],
    ids=[
        "same-ports",
        "nan-wait",
        "negative-wait",
        "infinite-grace",
        "workers",
        "streams",
        "nan-engine-timeout",
        "tiny-messages",
        "per-caller",
        "image-url-timeout",
    ],
)
def test_settings_out_of_range_are_named(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        ServerConfig(**settings)  # type: ignore[arg-type]


def test_a_held_port_stops_serve_before_the_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(config: ServerConfig) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(server_main, "build_stack", load)
    with held_port() as port:
        config = ServerConfig(host="localhost", grpc_port=0, http_port=port)
        with pytest.raises(ConfigError, match=f"HTTP API: cannot listen on localhost:{port}"):
            asyncio.run(server_main.serve(config))


def test_a_bad_tokenizer_stops_the_start_before_the_model_loads(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tokenizer and image settings are read first: a truncated tokenizer.json (a copy
    cut short) is named in a second, not after the model's minutes of loading."""
    broken = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, broken)
    text = (broken / "tokenizer.json").read_text()
    (broken / "tokenizer.json").write_text(text[: len(text) // 2])

    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(server_main, "load_engine", load)
    config = ServerConfig(model=str(broken), host="localhost", max_seq=1024)
    with pytest.raises(GuardrtError, match=r"tokenizer\.json"):
        server_main.build_stack(config)
    monkeypatch.setattr(guard_module, "load_engine", load)  # the Python API's load too
    with pytest.raises(GuardrtError, match=r"tokenizer\.json"):
        Guard.load(broken, max_seq=1024)


def test_an_http_port_taken_after_the_check_stops_grpc_too(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check cannot see a port taken while the model loads: the HTTP bind fails later, and
    serve stops the gRPC server it had started and says why (no traceback, no port left held)."""
    monkeypatch.setattr(server_main, "check_bindable", lambda host, port, what: None)
    grpc_port = free_port()
    base = ServerConfig(model=str(checkpoint), host="localhost", max_seq=1024, grace_s=1.0)
    with held_port() as http_port:
        config = dataclasses.replace(base, grpc_port=grpc_port, http_port=http_port)
        with pytest.raises(ConfigError, match=f"HTTP API: cannot listen on localhost:{http_port}"):
            asyncio.run(server_main.serve(config))
    check_bindable("localhost", grpc_port, "gRPC")  # the gRPC server let its port go


def _serve_one_failing_call(
    preparer: Preparer,
    monkeypatch: pytest.MonkeyPatch,
    engine: FakeEngine,
    before_call: Callable[[], None],
    **settings: Any,
) -> tuple[int, list[grpc.StatusCode]]:
    """`serve` on `engine` (gRPC only, on a free port); once it serves, `before_call()`, then
    one Moderate. serve's exit status and the codes the call got. However it goes, serve is
    not left running (SIGTERM stops it, with status 0)."""
    sample = preparer.prepare([{"role": "user", "content": "What is the recipe for mayonnaise?"}])

    def load(config: ServerConfig) -> Stack:
        return assemble_stack(config, engine, preparer, "test-model", [sample, sample])

    monkeypatch.setattr(server_main, "build_stack", load)
    port = free_port()
    codes: list[grpc.StatusCode] = []
    stopped = threading.Event()

    def client() -> None:
        try:
            channel = grpc.insecure_channel(f"localhost:{port}")
            grpc.channel_ready_future(channel).result(timeout=30)
            before_call()
            stub = pb_grpc.ModerationStub(channel)
            message = pb.Message(role=pb.USER, content=[pb.Content(text="boom")])
            stub.Moderate(pb.ModerateRequest(messages=[message]), timeout=20)
        except grpc.RpcError as exc:
            codes.append(exc.code())
        finally:
            if not stopped.wait(30):
                signal.raise_signal(signal.SIGTERM)

    threading.Thread(target=client, daemon=True).start()
    config = ServerConfig(host="localhost", grpc_port=port, http_port=-1, **settings)
    try:
        status = asyncio.run(server_main.serve(config))
    finally:  # no SIGTERM from the client once serve has returned: nothing would handle it
        stopped.set()
    return status, codes


def test_serve_exits_with_status_1_once_its_engine_is_broken(
    preparer: Preparer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken engine (a failed request, then its self-check failing too) stops `serve`: it
    drains and returns 1, so a supervisor restarts it instead of it answering UNAVAILABLE on."""
    engine = FakeEngine()

    def fail() -> None:
        engine.fail = True

    status, codes = _serve_one_failing_call(preparer, monkeypatch, engine, fail, grace_s=1.0)
    assert codes == [grpc.StatusCode.INTERNAL]
    assert status == 1
    assert "the engine is broken (it failed its self-check): stopping" in capsys.readouterr().out


def test_serve_exits_with_status_1_when_its_engine_is_stuck(
    preparer: Preparer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch that never returns (a hung GPU): past --engine-timeout-s the call is answered
    UNAVAILABLE and serve exits 1 for a restart, leaving the stuck engine unclosed."""
    hang, release = threading.Event(), threading.Event()

    class Stuck(FakeEngine):
        closed = False

        def execute(self, batch: Sequence[PreparedRequest]) -> list[Decoded]:
            if hang.is_set():
                release.wait(30)
            return super().execute(batch)

        def close(self) -> None:
            Stuck.closed = True

    settings = {"grace_s": 0.5, "engine_timeout_s": 0.5}
    try:
        status, codes = _serve_one_failing_call(
            preparer, monkeypatch, Stuck(), hang.set, **settings
        )
    finally:
        release.set()
    assert codes == [grpc.StatusCode.UNAVAILABLE]
    assert status == 1
    out = capsys.readouterr().out
    assert "the engine is broken (it ran one batch for over 0.5 s): stopping" in out
    assert "stopped with work left after the grace period" in out
    assert not Stuck.closed


def test_sigterm_with_a_drain_delay_keeps_taking_calls_while_not_serving(
    preparer: Preparer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--drain-delay-s: after SIGTERM, health says NOT_SERVING at once, and calls still sent
    here (a load balancer has not noticed yet) are answered until the delay is over."""
    sample = preparer.prepare([{"role": "user", "content": "What is the recipe for mayonnaise?"}])

    def load(config: ServerConfig) -> Stack:
        return assemble_stack(config, FakeEngine(), preparer, "test-model", [sample, sample])

    monkeypatch.setattr(server_main, "build_stack", load)
    port = free_port()
    seen: list[object] = []

    def client() -> None:
        channel = grpc.insecure_channel(f"localhost:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.ModerationStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        message = pb.Message(role=pb.USER, content=[pb.Content(text="Hi.")])
        signal.raise_signal(signal.SIGTERM)
        time.sleep(0.3)
        seen.append(health.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
        seen.append(stub.Moderate(pb.ModerateRequest(messages=[message]), timeout=5).verdict.label)

    threading.Thread(target=client, daemon=True).start()
    config = ServerConfig(
        host="localhost", grpc_port=port, http_port=-1, grace_s=1.0, drain_delay_s=3.0
    )
    started = time.monotonic()
    assert asyncio.run(server_main.serve(config)) == 0
    assert time.monotonic() - started > 3.0
    assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING, pb.SAFE]
    out = capsys.readouterr().out
    assert "draining (NOT_SERVING; up to 3 + 1 s)" in out
    assert "loading tiny-random (device auto) …" in out
    assert "loaded and warmed up in " in out
