"""--max-rate-per-caller: each caller's token bucket (pure arithmetic, table-tested), and the
servers around it: a call past its caller's rate refused at once saying when to retry (gRPC
retry pushback, HTTP Retry-After), another caller's call still taken, a caller's stream paced
at its rate rather than refused."""

from __future__ import annotations

import http.client
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from guardrt.cli import _parsers
from guardrt.client import ModerationClient
from guardrt.env_flags import env_flags
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.main import access_line
from guardrt.runtime.server.rates import TokenBucket, burst_for
from guardrt.runtime.server.tokens import BearerTokens, read_tokens
from guardrt.v1 import moderation_pb2 as pb
from tests.server_harness import FakeEngine, serving


def test_a_full_bucket_gives_its_burst_then_one_token_per_interval() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=3.0, now=10.0)
    assert [bucket.take(10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(10.0) == pytest.approx(0.5)  # refused: none taken
    assert bucket.take(10.25) == pytest.approx(0.25)
    assert bucket.take(10.5) == 0.0
    assert bucket.take(10.5) == pytest.approx(0.5)
    bucket.take(100.0)  # a long quiet spell fills it to its burst, no more
    assert bucket.tokens == pytest.approx(2.0)


def test_reservations_wait_in_order_and_a_call_in_debt_is_refused() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=1.0, now=0.0)
    assert [bucket.reserve(0.0) for _ in range(3)] == pytest.approx([0.0, 0.5, 1.0])
    assert bucket.take(0.2) == pytest.approx((1 - (-2 + 0.4)) / 2)  # 1.3 s: past the debt
    bucket.give_back()  # a reserved request that will not run returns its turn
    assert bucket.tokens == pytest.approx(-0.6)
    assert bucket.reserve(0.2) == pytest.approx(0.8)


def test_a_clock_that_steps_back_gains_nothing() -> None:
    bucket = TokenBucket.full(rate=1.0, burst=1.0, now=5.0)
    assert bucket.take(5.0) == 0.0
    assert bucket.take(4.0) == pytest.approx(1.0)
    assert bucket.take(5.5) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("rate", "burst", "size"), [(2.5, 0, 3.0), (0.2, 0, 1.0), (10.0, 4, 4.0), (100.0, 0, 100.0)]
)
def test_the_burst_is_given_or_one_seconds_worth(rate: float, burst: int, size: float) -> None:
    assert burst_for(rate, burst) == size


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_rate_per_caller": -1.0}, "max_rate_per_caller must be a finite number ≥ 0"),
        ({"max_rate_per_caller": math.nan}, "max_rate_per_caller must be a finite number ≥ 0"),
        ({"max_rate_per_caller": 1.0, "rate_burst_per_caller": -2}, "rate_burst_per_caller"),
        ({"rate_burst_per_caller": 5}, "rate_burst_per_caller needs max_rate_per_caller"),
    ],
)
def test_bad_rates_are_named(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**settings)


def test_the_flags_and_their_variables() -> None:
    parser, serve = _parsers()
    environ = {"GUARDRT_MAX_RATE_PER_CALLER": "12.5"}
    flags = env_flags(serve, environ)
    args = parser.parse_args(["serve", *flags, "--rate-burst-per-caller", "4"])
    assert (args.max_rate_per_caller, args.rate_burst_per_caller) == (12.5, 4)
    with pytest.raises(ConfigError, match="GUARDRT_MAX_RATE_PER_CALLER"):
        env_flags(serve, {"GUARDRT_MAX_RATE_PER_CALLER": "fast"})
    config = ServerConfig(max_rate_per_caller=12.5, rate_burst_per_caller=4)
    line = access_line(config, BearerTokens(frozenset()))
    assert line.endswith(
        "; per caller: 12.5 requests/s (bursts of 4) (they apply to bearer-token callers: none "
        "here)"
    )


def _tokens(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "tokens"
    path.write_text("billing s3cret-b\nchat s3cret-c\n")
    return {"auth_tokens": read_tokens(str(path)), "auth_token_file": str(path)}


BILLING = (("authorization", "Bearer s3cret-b"),)
CHAT = (("authorization", "Bearer s3cret-c"),)
MESSAGE = pb.Message(role=pb.USER, content=[pb.Content(text="Hi.")])


def _chat_completion(port: int, token: str) -> tuple[int, dict[str, str], Any]:
    connection = http.client.HTTPConnection("localhost", port, timeout=30)
    body = {
        "model": "meta-llama/Llama-Guard-3-11B-Vision",
        "messages": [{"role": "user", "content": "Hi."}],
    }
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def test_a_caller_past_its_rate_is_refused_with_when_to_retry(
    preparer: Preparer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _tokens(tmp_path) | {"max_rate_per_caller": 0.5, "rate_burst_per_caller": 2}
    with (
        serving(FakeEngine(), preparer, **settings) as server,
        caplog.at_level(logging.DEBUG, logger="guardrt.refused"),
    ):
        stub = server.stub()
        for _ in range(2):  # its burst
            assert stub.Moderate(pb.ModerateRequest(messages=[MESSAGE]), metadata=BILLING)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Moderate(pb.ModerateRequest(messages=[MESSAGE]), metadata=BILLING)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = refused.value.details() or ""
        assert "caller billing is past its rate of 0.5 requests a second" in details
        assert "(--max-rate-per-caller): retry in " in details
        trailers: Any = refused.value.trailing_metadata() or ()
        pushback = dict(trailers)["grpc-retry-pushback-ms"]
        assert 0 < int(pushback) <= 2000
        status, headers, body = _chat_completion(server.http_port, "s3cret-b")
        assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")
        assert 1 <= int(headers["Retry-After"]) <= 2
        answered = stub.Moderate(pb.ModerateRequest(messages=[MESSAGE]), metadata=CHAT)
        assert answered.verdict.label == pb.SAFE  # another caller's bucket
        info = stub.GetInfo(pb.GetInfoRequest(), metadata=CHAT)
        assert (info.max_rate_per_caller, info.max_in_flight_per_caller) == (0.5, 0)
        assert list(info.image_url_origins) == []
        connection = http.client.HTTPConnection("localhost", server.http_port, timeout=30)
        connection.request("GET", "/metrics")
        metrics = connection.getresponse().read().decode()
    assert 'code="RESOURCE_EXHAUSTED",reason="rate_limited",route="grpc/Moderate"' in metrics
    assert 'code="429",reason="rate_limit_exceeded",route="/v1/chat/completions"' in metrics
    # A caller past its rate can send thousands a second: DEBUG, as a full queue's refusals.
    refused_lines = [r for r in caplog.records if "past its rate" in r.getMessage()]
    assert [r.levelno for r in refused_lines] == [logging.DEBUG, logging.DEBUG]


def test_a_callers_stream_is_paced_not_refused(preparer: Preparer, tmp_path: Path) -> None:
    """At 4 requests a second with a burst of 1, ModerateMany's 5 requests are all answered,
    the last no sooner than a second after the first (its turn)."""
    settings = _tokens(tmp_path) | {"max_rate_per_caller": 4.0, "rate_burst_per_caller": 1}
    many = [pb.ModerateRequest(request_id=f"m{i}", messages=[MESSAGE]) for i in range(5)]
    with serving(FakeEngine(), preparer, **settings) as server:
        started = time.monotonic()
        answers = list(server.stub().ModerateMany(iter(many), timeout=30, metadata=BILLING))
        elapsed = time.monotonic() - started
    assert sorted(a.request_id for a in answers) == [f"m{i}" for i in range(5)]
    assert all(a.verdict.label == pb.SAFE for a in answers)
    assert elapsed >= 0.9  # 4 turns of 0.25 s after the first (less a little clock slack)


def test_the_python_clients_retries_carry_a_call_past_the_rate(
    preparer: Preparer, tmp_path: Path
) -> None:
    settings = _tokens(tmp_path) | {"max_rate_per_caller": 5.0, "rate_burst_per_caller": 1}
    with serving(FakeEngine(), preparer, **settings) as server:
        client = ModerationClient(f"localhost:{server.port}", token="s3cret-b", retries=4)
        with client:
            labels = [client.moderate([{"role": "user", "content": "Hi."}]).label for _ in range(3)]
    assert [label.value for label in labels] == ["safe", "safe", "safe"]
