"""Bearer tokens: read from their sources strictly (a misconfigured secret never turns auth
off), rotated while serving (SIGHUP), and a rotation that would leave no token refused."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from guardrt.runtime.errors import ConfigError
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.server import main as server_main
from guardrt.runtime.server.config import AUTH_TOKENS_ENV, ServerConfig
from guardrt.runtime.server.main import Stack, access_line, assemble_stack
from guardrt.runtime.server.tokens import UNNAMED, BearerTokens, read_named_tokens, read_tokens
from guardrt.v1 import moderation_pb2 as pb
from guardrt.v1 import moderation_pb2_grpc as pb_grpc
from tests.server_harness import FakeEngine, serving
from tests.test_ports import free_port


@pytest.fixture(autouse=True)
def _no_env_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(AUTH_TOKENS_ENV, raising=False)


def test_tokens_come_from_the_file_and_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tokens"
    path.write_text("  alpha \n\nbeta\n")
    assert read_tokens(str(path)) == {"alpha", "beta"}
    monkeypatch.setenv(AUTH_TOKENS_ENV, "gamma, delta,")
    assert read_tokens(str(path)) == {"alpha", "beta", "gamma", "delta"}
    assert read_tokens(None) == {"gamma", "delta"}
    monkeypatch.setenv(AUTH_TOKENS_ENV, "")
    assert read_tokens(None) == frozenset()  # no sources: no auth, as documented


@pytest.mark.parametrize(
    ("content", "variable", "message"),
    [
        ("", None, "token file {path} holds no token: refusing to serve without auth"),
        ("\n  \n", None, "token file {path} holds no token"),
        (None, None, "cannot read token file {path}: No such file or directory"),
        (b"\xff\xfe", None, "cannot read token file {path}: not UTF-8 text"),
        ("alpha\n", " , ,", f"${AUTH_TOKENS_ENV} is set but holds no token"),
    ],
)
def test_a_source_that_holds_no_token_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: str | bytes | None,
    variable: str | None,
    message: str,
) -> None:
    """An empty secret mounted as the token file (or a variable of separators) used to mean
    'no auth': the server served anyone. Now it does not start."""
    path = tmp_path / "tokens"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    if variable is not None:
        monkeypatch.setenv(AUTH_TOKENS_ENV, variable)
    with pytest.raises(ConfigError) as refused:
        read_tokens(str(path))
    assert message.format(path=path) in str(refused.value)


def test_a_reload_swaps_the_tokens_or_keeps_them(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("old-secret\n")
    tokens = BearerTokens(read_tokens(str(path)), str(path))
    assert tokens.allowed("Bearer old-secret")
    path.write_text("new-secret\nother\n")
    assert tokens.reload() == "bearer tokens reloaded: 2 (were 1)"
    assert tokens.refresh() is None  # the sources hold the tokens in use: nothing to say
    assert tokens.allowed("Bearer new-secret")
    assert not tokens.allowed("Bearer old-secret")
    for broken in ("", None):  # emptied, then removed: the tokens in use stay
        if broken is None:
            path.unlink()
        else:
            path.write_text(broken)
        said = tokens.reload()
        assert said.startswith("bearer tokens not reloaded, the 2 in use kept: ")
        assert "secret" not in said.replace(str(path), "")  # never a token
        assert tokens.allowed("Bearer new-secret")
        assert not tokens.allowed("Bearer nobody")


def test_a_reload_of_no_sources_that_would_turn_auth_off_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(AUTH_TOKENS_ENV, "env-secret")
    tokens = BearerTokens(read_tokens(None))
    monkeypatch.delenv(AUTH_TOKENS_ENV)
    assert "would let anyone call" in tokens.reload()
    assert not tokens.allowed("")


def test_both_servers_use_the_rotated_tokens(preparer: Preparer, tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("old-secret\n")
    settings: dict[str, Any] = {"auth_tokens": read_tokens(str(path)), "auth_token_file": str(path)}
    with serving(FakeEngine(), preparer, **settings) as server:
        stub = server.stub()
        message = pb.Message(role=pb.USER, content=[pb.Content(text="Hi.")])
        call = pb.ModerateRequest(messages=[message])

        def grpc_code(token: str) -> grpc.StatusCode:
            try:
                stub.Moderate(call, timeout=10, metadata=(("authorization", f"Bearer {token}"),))
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        def http_status(token: str) -> int:
            body = json.dumps(
                {"model": "tiny-random", "messages": [{"role": "user", "content": "Hi."}]}
            )
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
            request = urllib.request.Request(
                f"{server.base_url}/chat/completions", body.encode(), headers, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as error:
                return error.code

        assert (grpc_code("old-secret"), http_status("old-secret")) == (grpc.StatusCode.OK, 200)
        path.write_text("new-secret\n")
        assert server.stack.tokens.reload().startswith("bearer tokens reloaded")
        assert grpc_code("old-secret") == grpc.StatusCode.UNAUTHENTICATED
        assert http_status("old-secret") == 401
        assert (grpc_code("new-secret"), http_status("new-secret")) == (grpc.StatusCode.OK, 200)


def _serve_and_call(
    preparer: Preparer,
    monkeypatch: pytest.MonkeyPatch,
    path: Path,
    steps: list[str],
    while_loading: Callable[[], None] = lambda: None,
) -> list[grpc.StatusCode]:
    """`serve` (a fake engine) with the tokens of `path`; a client calls with each token of
    `steps` ("rotate": write new-secret to `path` and send SIGHUP), then SIGTERM. The codes."""
    sample = preparer.prepare([{"role": "user", "content": "What is the recipe for mayonnaise?"}])

    def load(config: ServerConfig) -> Stack:
        while_loading()
        return assemble_stack(config, FakeEngine(), preparer, "test-model", [sample, sample])

    monkeypatch.setattr(server_main, "build_stack", load)
    port = free_port()
    codes: list[grpc.StatusCode] = []

    def client() -> None:
        try:
            channel = grpc.insecure_channel(f"localhost:{port}")
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = pb_grpc.ModerationStub(channel)
            message = pb.Message(role=pb.USER, content=[pb.Content(text="Hi.")])
            for token in steps:
                if token == "rotate":
                    path.write_text("new-secret\n")
                    signal.raise_signal(signal.SIGHUP)
                    continue
                try:
                    stub.Moderate(
                        pb.ModerateRequest(messages=[message]),
                        timeout=10,
                        metadata=(("authorization", f"Bearer {token}"),),
                    )
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        finally:
            signal.raise_signal(signal.SIGTERM)

    threading.Thread(target=client, daemon=True).start()
    base = ServerConfig(host="localhost", grpc_port=port, http_port=-1, grace_s=1.0)
    config = dataclasses.replace(
        base, auth_tokens=read_tokens(str(path)), auth_token_file=str(path)
    )
    assert asyncio.run(server_main.serve(config)) == 0
    return codes


def test_sighup_reloads_the_tokens_of_a_running_serve(
    preparer: Preparer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "tokens"
    path.write_text("old-secret\n")
    steps = ["old-secret", "rotate", "old-secret", "new-secret"]
    assert _serve_and_call(preparer, monkeypatch, path, steps) == [
        grpc.StatusCode.OK,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OK,
    ]
    out = capsys.readouterr().out
    assert f"access: plaintext (no TLS); 1 bearer token(s) required ({path}; SIGHUP" in out
    assert "bearer tokens reloaded: 1 (were 1)" in out
    assert "secret" not in out.replace(str(path), "")


def test_the_start_says_when_anyone_may_call() -> None:
    line = access_line(ServerConfig(), BearerTokens(frozenset()))
    assert line == (
        "access: plaintext (no TLS); no bearer token required: anyone who reaches the ports "
        "may call"
    )


def test_a_sighup_while_the_model_loads_is_applied_once_serving(
    preparer: Preparer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGHUP's default action ends the process: one sent during the minutes of loading (a
    rotation) must not kill the server, and its new tokens are read once it serves."""
    path = tmp_path / "tokens"
    path.write_text("old-secret\n")

    def rotate() -> None:
        path.write_text("new-secret\n")  # rotated while the model loads
        signal.raise_signal(signal.SIGHUP)

    steps = ["old-secret", "new-secret"]
    codes = _serve_and_call(preparer, monkeypatch, path, steps, while_loading=rotate)
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK]
    assert "bearer tokens reloaded: 1 (were 1)" in capsys.readouterr().out


def test_token_lines_may_name_their_caller_and_comments_are_not_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, a comment line in the token file was itself an accepted token."""
    path = tmp_path / "tokens"
    path.write_text("# rotated 2026-11-29\nbilling s3cret-b\n  chat  s3cret-c \nplain-token\n")
    monkeypatch.setenv(AUTH_TOKENS_ENV, "from-env")
    assert read_named_tokens(str(path)) == {
        "s3cret-b": "billing",
        "s3cret-c": "chat",
        "plain-token": UNNAMED,
        "from-env": UNNAMED,
    }
    tokens = BearerTokens(read_tokens(str(path)), str(path))
    assert tokens.caller("Bearer s3cret-c") == "chat"
    assert tokens.caller("Bearer plain-token") == UNNAMED
    assert tokens.caller("Bearer # rotated 2026-11-29") is None
    assert tokens.callers() == ["billing", "chat"]
    config = ServerConfig(auth_tokens=read_tokens(str(path)), auth_token_file=str(path))
    assert access_line(config, tokens).endswith("; callers named: billing, chat")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("billing s3cret extra\n", "line 1 is not TOKEN or NAME TOKEN"),
        ("# ok\nbill/ing s3cret\n", "line 2 is not TOKEN or NAME TOKEN"),
        ("billing s3cret\nchat s3cret\n", "line 2 names a token an earlier line names otherwise"),
    ],
    ids=["three-fields", "bad-name", "two-names"],
)
def test_a_bad_token_line_is_named_never_shown(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as refused:
        read_tokens(str(path))
    assert "s3cret" not in str(refused.value)


def test_requests_are_counted_and_logged_by_caller_never_by_token(
    preparer: Preparer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    path.write_text("billing s3cret-b\nchat s3cret-c\n")
    settings: dict[str, Any] = {"auth_tokens": read_tokens(str(path)), "auth_token_file": str(path)}
    caplog.set_level("INFO")
    with serving(FakeEngine(), preparer, **settings) as server:
        stub = server.stub()
        good = pb.ModerateRequest(
            messages=[pb.Message(role=pb.USER, content=[pb.Content(text="Hi.")])]
        )
        bad = pb.ModerateRequest(
            messages=[pb.Message(role=pb.ASSISTANT, content=[pb.Content(text="Hi.")])]
        )
        for token, request in (
            ("s3cret-b", good),
            ("s3cret-b", good),
            ("s3cret-c", bad),
            ("nope", good),
        ):
            with contextlib.suppress(grpc.RpcError):
                stub.Moderate(request, timeout=10, metadata=(("authorization", f"Bearer {token}"),))
        body = json.dumps(
            {"model": "tiny-random", "messages": [{"role": "user", "content": "Hi."}]}
        )
        headers = {"Content-Type": "application/json", "Authorization": "Bearer s3cret-c"}
        http = urllib.request.Request(
            f"{server.base_url}/chat/completions", body.encode(), headers, method="POST"
        )
        with urllib.request.urlopen(http, timeout=10) as response:
            assert response.status == 200
        metrics = server.stack.metrics.text().decode()
    assert 'guardrt_caller_requests_total{caller="billing",outcome="answered"} 2.0' in metrics
    assert 'guardrt_caller_requests_total{caller="chat",outcome="refused"} 1.0' in metrics
    assert 'guardrt_caller_requests_total{caller="chat",outcome="answered"} 1.0' in metrics
    assert 'guardrt_caller_requests_total{caller="none",outcome="refused"} 1.0' in metrics
    lines = [record.getMessage() for record in caplog.records]
    assert sum(" from billing: " in line for line in lines if line.startswith("request ")) == 2
    assert any(
        line.startswith("refused ") and " from chat: INVALID_ARGUMENT" in line for line in lines
    )
    assert not any("s3cret" in line for line in lines)


def test_one_caller_cannot_take_more_than_its_requests_in_flight(
    preparer: Preparer, tmp_path: Path
) -> None:
    """--max-in-flight-per-caller: a caller past its limit is refused at once (its stream held
    back instead), while another caller's requests are still taken."""
    path = tmp_path / "tokens"
    path.write_text("billing s3cret-b\nchat s3cret-c\n")
    engine = FakeEngine(max_batch=1)
    engine.gate = threading.Event()
    settings: dict[str, Any] = {
        "auth_tokens": read_tokens(str(path)),
        "auth_token_file": str(path),
        "max_in_flight_per_caller": 2,
        "max_batch_size": 1,
        "max_wait_ms": 0,
    }
    message = pb.Message(role=pb.USER, content=[pb.Content(text="Hi.")])
    billing = (("authorization", "Bearer s3cret-b"),)
    with serving(engine, preparer, **settings) as server:
        stub = server.stub()
        try:
            calls = [
                stub.Moderate.future(pb.ModerateRequest(messages=[message]), 30, billing)
                for _ in range(2)
            ]
            deadline = time.monotonic() + 30
            while server.stack.scheduler.depth() < 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # one running, one queued: billing's two places taken
            with pytest.raises(grpc.RpcError) as refused:
                stub.Moderate(pb.ModerateRequest(messages=[message]), timeout=10, metadata=billing)
            chat = stub.Moderate.future(
                pb.ModerateRequest(messages=[message]),
                30,
                (("authorization", "Bearer s3cret-c"),),
            )
            many = [pb.ModerateRequest(request_id=f"m{i}", messages=[message]) for i in range(4)]
            streamed: list[Any] = []
            reader = threading.Thread(
                target=lambda: streamed.extend(
                    stub.ModerateMany(iter(many), timeout=30, metadata=billing)
                )
            )
            reader.start()
            start = pb.StreamStart(request_id="s", messages=[message], check_every_tokens=64)
            answer = [
                pb.StreamRequest(start=start),
                pb.StreamRequest(append="Sure, here it is."),
                pb.StreamRequest(end=pb.StreamEnd()),
            ]
            checked: list[Any] = []
            checker = threading.Thread(
                target=lambda: checked.extend(
                    stub.ModerateStream(iter(answer), timeout=30, metadata=billing)
                )
            )
            checker.start()
            time.sleep(0.5)  # the stream's final check waits for one of billing's places
        finally:
            engine.gate.set()
        assert chat.result().verdict.label == pb.SAFE
        assert [call.result().verdict.label for call in calls] == [pb.SAFE, pb.SAFE]
        reader.join(30)
        checker.join(30)
    assert [(r.final, r.verdict.label, r.verdict.error) for r in checked] == [(True, pb.SAFE, "")]
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "caller billing has 2 requests in flight" in str(refused.value.details())
    assert sorted(response.verdict.label for response in streamed) == [pb.SAFE] * 4
