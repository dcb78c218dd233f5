"""Log lines: `--log-format json` gives one object per line with a request's figures as
fields, and neither format ever carries prompt text or image bytes."""

from __future__ import annotations

import json
import logging
import sys
import urllib.error
import urllib.request

import grpc
import pytest

from guardrt.runtime.prepare import Preparer
from guardrt.runtime.server.logs import JsonFormatter
from guardrt.runtime.server.refusals import log_refusal
from guardrt.runtime.server.trace import trace_id
from guardrt.v1 import moderation_pb2 as pb
from tests.server_harness import UNSAFE_S1, FakeEngine, serving
from tests.test_server import jpeg

SECRET = "the launch code is 0000"
_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"  # the spec's example


def test_a_record_is_one_json_object_with_its_fields() -> None:
    record = logging.LogRecord("guardrt.x", logging.ERROR, "f.py", 1, "failed %s", ("r1",), None)
    record.request_id = "r1"
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "guardrt.x"
    assert entry["message"] == "failed r1"
    assert entry["request_id"] == "r1"
    assert entry["time"].endswith("+00:00")
    assert "RuntimeError: boom" in entry["exception"]
    assert "msg" not in entry  # the record's own attributes are not repeated
    assert "args" not in entry


def test_a_requests_line_has_its_figures_and_never_its_text(
    preparer: Preparer, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(FakeEngine(UNSAFE_S1), preparer) as server, caplog.at_level(logging.INFO):
        message = pb.Message(
            role=pb.USER, content=[pb.Content(image=jpeg()), pb.Content(text=SECRET)]
        )
        policy = pb.Policy(unsafe_threshold=0.375)  # what decided the label, for an audit
        request = pb.ModerateRequest(request_id="req-7", messages=[message], policy=policy)
        server.stub().Moderate(request, timeout=10, metadata=(("traceparent", _TRACEPARENT),))
    records = [r for r in caplog.records if r.name == "guardrt.service"]
    assert len(records) == 1
    entry = json.loads(JsonFormatter().format(records[0]))
    assert entry["request_id"] == "req-7"
    assert entry["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"  # the caller's trace
    assert entry["label"] == "unsafe"
    assert entry["categories"] == ["S1"]
    assert entry["unsafe_probability"] == 0.25  # FakeEngine's score
    assert entry["label_probability"] == 0.99
    assert entry["unsafe_threshold"] == 0.375
    assert entry["image_tiles"] >= 1
    assert entry["prompt_tokens"] > 0
    assert entry["text_chars"] == len(SECRET)
    assert entry["batch_size"] == 1
    for shown in (json.dumps(entry), logging.Formatter().format(records[0])):
        assert "launch code" not in shown


def test_a_refused_call_is_logged_with_its_request_id(
    preparer: Preparer, caplog: pytest.LogCaptureFixture
) -> None:
    """The id a caller quotes finds the refusal in the log, on gRPC and HTTP alike; floods
    (a full queue) go to DEBUG, their count is on /metrics."""
    with serving(FakeEngine(), preparer) as server, caplog.at_level(logging.DEBUG):
        bad = pb.ModerateRequest(
            request_id="req-9",
            messages=[pb.Message(role=pb.ASSISTANT, content=[pb.Content(text=SECRET)])],
        )
        with pytest.raises(grpc.RpcError):
            server.stub().Moderate(bad, timeout=10)
        body = json.dumps({"model": "tiny-random", "messages": [{"role": "system"}]}).encode()
        headers = {"Content-Type": "application/json", "X-Request-Id": "http-3"}
        call = urllib.request.Request(f"{server.base_url}/chat/completions", body, headers)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(call, timeout=10)
    refused = {r.request_id: r for r in caplog.records if r.name == "guardrt.refused"}  # type: ignore[attr-defined]
    grpc_line, http_line = refused["req-9"], refused["http-3"]
    assert grpc_line.levelno == http_line.levelno == logging.INFO
    assert grpc_line.getMessage().startswith(
        "refused req-9 on grpc/Moderate: INVALID_ARGUMENT role: message 0 has role "
    )
    assert http_line.getMessage().startswith("refused http-3 on /v1/chat/completions: 400 ")
    for line in (grpc_line, http_line):
        assert "launch code" not in JsonFormatter().format(line)


def test_a_flood_of_refusals_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        log_refusal("grpc/Moderate", "RESOURCE_EXHAUSTED", "queue_full", "the queue is full")
        log_refusal("/v1/moderations", "400", "invalid_request_error", "input[1]: empty")
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.INFO]


@pytest.mark.parametrize(
    ("traceparent", "trace"),
    [
        (_TRACEPARENT, "4bf92f3577b34da6a3ce929d0e0e4736"),
        (
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later",
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ),
        (None, ""),
        ("", ""),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", ""),  # 00 has 4 fields
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", ""),  # version ff is invalid
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", ""),  # all-zero trace id
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", ""),  # all-zero parent id
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", ""),  # not lowercase
        ("00-4bf92f35-00f067aa0ba902b7-01", ""),
    ],
    ids=[
        "spec",
        "later-version",
        "none",
        "empty",
        "extra",
        "ff",
        "zero-trace",
        "zero-parent",
        "upper",
        "short",
    ],
)
def test_trace_ids_come_from_valid_traceparents_only(traceparent: str | None, trace: str) -> None:
    assert trace_id(traceparent) == trace


def test_an_invalid_traceparent_never_fails_a_call(
    preparer: Preparer, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(FakeEngine(), preparer) as server, caplog.at_level(logging.INFO):
        body = json.dumps(
            {"model": "tiny-random", "messages": [{"role": "user", "content": "Hi."}]}
        )
        for traceparent in ("not a traceparent", _TRACEPARENT):
            headers = {"Content-Type": "application/json", "traceparent": traceparent}
            request = urllib.request.Request(
                f"{server.base_url}/chat/completions", body.encode(), headers, method="POST"
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
    records = [r for r in caplog.records if r.name == "guardrt.service"]
    traces = [json.loads(JsonFormatter().format(r))["trace_id"] for r in records]
    assert traces == [None, "4bf92f3577b34da6a3ce929d0e0e4736"]
