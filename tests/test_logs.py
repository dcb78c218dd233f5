"""Log lines: `--log-format json` gives one object per line with a request's figures as
fields, and neither format ever carries prompt text or image bytes."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from guardrt.runtime.prepare import Preparer
from guardrt.runtime.server.logs import JsonFormatter
from guardrt.v1 import moderation_pb2 as pb
from tests.server_harness import UNSAFE_S1, FakeEngine, serving
from tests.test_server import jpeg

SECRET = "the launch code is 0000"


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
        request = pb.ModerateRequest(request_id="req-7", messages=[message])
        server.stub().Moderate(request, timeout=10)
    records = [r for r in caplog.records if r.name == "guardrt.service"]
    assert len(records) == 1
    entry = json.loads(JsonFormatter().format(records[0]))
    assert entry["request_id"] == "req-7"
    assert entry["label"] == "unsafe"
    assert entry["categories"] == ["S1"]
    assert entry["image_tiles"] >= 1
    assert entry["prompt_tokens"] > 0
    assert entry["text_chars"] == len(SECRET)
    assert entry["batch_size"] == 1
    for shown in (json.dumps(entry), logging.Formatter().format(records[0])):
        assert "launch code" not in shown
