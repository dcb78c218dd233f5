"""Bulk requests (`Priority.BULK`, the HTTP API's `service_tier: "flex"`): they run after the
interactive ones, fill free rows only, and hold at most half the queue, so that a backlog never
delays or crowds out live traffic."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from guardrt.client import CallError, ModerationClient, moderate_request
from guardrt.runtime.batching import Shape, choose
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.requests import PreparedRequest
from guardrt.runtime.scheduler import Scheduler, Work
from guardrt.v1 import moderation_pb2 as pb
from tests.server_harness import FakeEngine, ServerThread, serving


def _text(tokens: int, bulk: bool = False) -> Shape:
    return Shape(tokens, image=False, bulk=bulk)


def test_a_batch_takes_interactive_candidates_before_bulk_ones() -> None:
    # The bulk request is the most alike, and would be taken were it interactive.
    assert choose([_text(300), _text(300), _text(350)], 2) == [0, 1]
    assert choose([_text(300), _text(300, bulk=True), _text(350)], 2) == [0, 2]
    # A free row still takes it: batching saves work whoever it is for.
    assert choose([_text(300), _text(300, bulk=True), _text(350)], 3) == [0, 1, 2]


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _requests(preparer: Preparer, count: int) -> list[PreparedRequest]:
    """Requests told apart by their prompt lengths."""
    return [preparer.prepare(_user("word " * (index + 1))) for index in range(count)]


def test_interactive_work_runs_before_older_bulk_work(preparer: Preparer) -> None:
    held, bulk_a, bulk_b, live = _requests(preparer, 4)
    engine = FakeEngine(max_batch=1)
    engine.gate = threading.Event()
    scheduler = Scheduler(engine, max_batch=1, max_wait_s=0.0, max_queue=16)
    answered = threading.Semaphore(0)
    scheduler.start()
    try:
        scheduler.add(Work(held, "held", lambda *_: answered.release()))
        assert engine.entered.wait(10)  # the engine holds the first batch
        for request, bulk in ((bulk_a, True), (bulk_b, True), (live, False)):
            scheduler.add(Work(request, "w", lambda *_: answered.release(), bulk=bulk))
        engine.gate.set()
        for _ in range(4):
            assert answered.acquire(timeout=10)
    finally:
        scheduler.drain(10)
    ran = [batch[0] for batch in engine.batches]
    assert ran == [held, live, bulk_a, bulk_b]


def _until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    """Wait for `condition` (the server's threads run at their own pace under load)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _moderate(text: str, bulk: bool = False, request_id: str = "") -> pb.ModerateRequest:
    return moderate_request(_user(text), request_id=request_id, bulk=bulk)


@pytest.fixture
def held_server(preparer: Preparer) -> Iterator[tuple[ServerThread, FakeEngine]]:
    """A server whose engine holds its batches until `engine.gate` is set: batches of 1, a
    queue of 4 (2 for bulk requests)."""
    engine = FakeEngine(max_batch=1)
    engine.gate = threading.Event()
    with serving(engine, preparer, max_batch_size=1, max_queue=4, max_wait_ms=0) as server:
        try:
            yield server, engine
        finally:
            engine.gate.set()


def test_bulk_requests_hold_half_the_queue_and_never_crowd_out_live_ones(
    held_server: tuple[ServerThread, FakeEngine],
) -> None:
    server, engine = held_server
    stub = server.stub()
    running = stub.Moderate.future(_moderate("held"), timeout=30)
    assert engine.entered.wait(10)
    backlog = [stub.Moderate.future(_moderate("bulk " * n, bulk=True), timeout=30) for n in (1, 2)]
    _until(lambda: server.stack.scheduler.depth() == 2)  # both queued: the bulk share is full
    with ModerationClient(f"localhost:{server.port}", retries=0) as client:
        with pytest.raises(CallError, match="bulk requests fill their share of the queue") as full:
            client.moderate(_user("one more bulk"), bulk=True)
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        live = stub.Moderate.future(_moderate("live " * 9), timeout=30)  # room is kept for it
        _until(lambda: server.stack.scheduler.depth() == 3)
        assert engine.gate is not None
        engine.gate.set()
        assert live.result().verdict.label == pb.SAFE
    assert all(call.result().verdict.label == pb.SAFE for call in [running, *backlog])
    lengths = [len(batch[0].prompt) for batch in engine.batches]
    assert lengths[1] == max(lengths), "the live request ran first after the held one"


def test_a_bulk_backlog_over_moderatemany_is_held_back_not_refused(preparer: Preparer) -> None:
    """Two streams of bulk requests, together past the bulk share: every request is answered,
    none refused (each stream waits for room)."""
    engine = FakeEngine(max_batch=1)
    with serving(engine, preparer, max_batch_size=1, max_queue=4, max_wait_ms=0) as server:
        verdicts: list[Any] = []

        def stream(name: str) -> None:
            requests = [_moderate("text", True, f"{name}-{i}") for i in range(12)]
            for response in server.stub().ModerateMany(iter(requests), timeout=60):
                verdicts.append(response.verdict)

        threads = [threading.Thread(target=stream, args=(name,)) for name in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len(verdicts) == 24
    assert [v.error for v in verdicts if v.label != pb.SAFE] == []


def test_an_unknown_priority_is_named(preparer: Preparer) -> None:
    with serving(FakeEngine(), preparer) as server:
        request = _moderate("Hi.")
        request.priority = pb.Priority.ValueType(7)  # a value newer than this server's proto
        with pytest.raises(grpc.RpcError) as refused:
            server.stub().Moderate(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority enum value 7 is not INTERACTIVE or BULK" in str(refused.value.details())


def _chat(server: ServerThread, **fields: Any) -> tuple[int, Any]:
    body = {"model": "meta-llama/Llama-Guard-3-11B-Vision", "messages": _user("Hi.")} | fields
    connection = http.client.HTTPConnection("localhost", server.http_port, timeout=30)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body))
        response = connection.getresponse()
        raw = response.read().decode()
    finally:
        connection.close()
    if fields.get("stream"):
        events = [json.loads(line[6:]) for line in raw.splitlines() if line[6:].startswith("{")]
        return response.status, events
    return response.status, json.loads(raw)


def test_the_http_api_takes_openai_service_tiers(preparer: Preparer) -> None:
    with serving(FakeEngine(), preparer) as server:
        assert _chat(server)[1]["service_tier"] == "default"
        assert _chat(server, service_tier="auto")[1]["service_tier"] == "default"
        assert _chat(server, service_tier="flex")[1]["service_tier"] == "flex"
        status, events = _chat(server, service_tier="flex", stream=True)
        assert status == 200
        assert {event["service_tier"] for event in events} == {"flex"}
        status, body = _chat(server, service_tier="cheap")
        assert (status, body["error"]["code"]) == (400, "invalid_service_tier")
        assert body["error"]["param"] == "service_tier"


def test_flex_past_the_bulk_share_is_429(held_server: tuple[ServerThread, FakeEngine]) -> None:
    server, engine = held_server
    stub = server.stub()
    running = stub.Moderate.future(_moderate("held"), timeout=30)
    assert engine.entered.wait(10)
    backlog = [stub.Moderate.future(_moderate("bulk", bulk=True), timeout=30) for _ in (1, 2)]
    _until(lambda: server.stack.service.bulk_held() == 2)
    status, body = _chat(server, service_tier="flex")
    assert status == 429
    assert "bulk requests fill their share" in body["error"]["message"]
    assert "guardrt_bulk_in_flight 2.0" in server.stack.metrics.text().decode()
    assert engine.gate is not None
    engine.gate.set()
    assert all(call.result().verdict.label == pb.SAFE for call in [running, *backlog])
