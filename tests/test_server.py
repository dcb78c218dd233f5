"""The gRPC service with a real client against an in-process server: every RPC, every error
code, batching, streaming equivalence, cancellation and the drain."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from guardrt.runtime.engine import Engine
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.requests import Decoded, PreparedRequest
from guardrt.runtime.server.config import ServerConfig, TlsConfig
from guardrt.runtime.server.grpc_server import stream_window
from guardrt.runtime.server.main import assemble_stack, self_check
from guardrt.runtime.server.service import checked_request_id
from guardrt.runtime.server.tokens import ANYONE, bearer_caller
from guardrt.v1 import moderation_pb2 as pb
from guardrt.v1 import moderation_pb2_grpc as pb_grpc
from tests.images import encode
from tests.server_harness import UNSAFE_S1, FakeEngine, ServerThread, serving


def jpeg(seed: int = 0, size: tuple[int, int] = (90, 60)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def user(text: str, image: bytes | None = None) -> pb.Message:
    message = pb.Message(role=pb.USER)
    if image is not None:
        message.content.append(pb.Content(image=image))
    message.content.append(pb.Content(text=text))
    return message


def answer(text: str) -> pb.Message:
    return pb.Message(role=pb.ASSISTANT, content=[pb.Content(text=text)])


def request(
    *messages: pb.Message, request_id: str = "", exclude: tuple[str, ...] = ()
) -> pb.ModerateRequest:
    return pb.ModerateRequest(
        request_id=request_id, messages=messages, policy=pb.Policy(exclude=exclude)
    )


def assert_same_verdict(a: pb.Verdict, b: pb.Verdict, rel: float = 1e-4) -> None:
    assert (a.label, list(a.categories), a.raw_output) == (
        b.label,
        list(b.categories),
        b.raw_output,
    )
    assert math.isclose(a.unsafe_probability, b.unsafe_probability, rel_tol=rel)
    assert a.category_probabilities.keys() == b.category_probabilities.keys()
    for code, value in a.category_probabilities.items():
        assert math.isclose(value, b.category_probabilities[code], rel_tol=rel, abs_tol=1e-7)


# --- answers -------------------------------------------------------------------------------


def test_moderate_equals_guard(engine: Engine, preparer: Preparer, checkpoint: Path) -> None:
    from guardrt.runtime.guard import Guard  # noqa: PLC0415

    guard = Guard(preparer, engine)
    image = jpeg(1)
    cases: list[tuple[list[pb.Message], list[dict[str, Any]]]] = [
        ([user("How do I pick a lock?")], [{"role": "user", "content": "How do I pick a lock?"}]),
        (
            [user("Is this fine?", image), answer("Yes, it is a picture.")],
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": image},
                        {"type": "text", "text": "Is this fine?"},
                    ],
                },
                {"role": "assistant", "content": "Yes, it is a picture."},
            ],
        ),
    ]
    with serving(engine, preparer) as server:
        stub = server.stub()
        for messages, python in cases:
            response = stub.Moderate(request(*messages, request_id="r-1"), timeout=30)
            expected = guard.moderate(python)
            assert response.request_id == "r-1"
            assert response.verdict.label == {"safe": pb.SAFE, "unsafe": pb.UNSAFE}[expected.label]
            assert list(response.verdict.categories) == expected.categories
            assert math.isclose(
                response.verdict.unsafe_probability, expected.unsafe_probability, rel_tol=1e-5
            )
            assert 0 < expected.label_probability < 1  # tiny random weights: far from 1
            assert math.isclose(
                response.verdict.label_probability, expected.label_probability, rel_tol=1e-5
            )
            assert response.prompt_tokens == len(guard.prepare(python).prompt)
            assert response.timing.total_ms >= response.timing.model_ms > 0
            assert response.timing.batch_size == 1
        assert len(stub.Moderate(request(user("hi")), timeout=30).request_id) == 32  # made up


def test_moderate_many_holds_a_backlog_back_instead_of_refusing_it(preparer: Preparer) -> None:
    """A client streaming a backlog far larger than the queue gets every verdict: the server
    reads the next request only when one is answered (gRPC's flow control holds the client),
    so none is refused RESOURCE_EXHAUSTED. (Before, 3,000 requests over ModerateMany to a
    256-request queue got 2,656 refusals.)"""
    engine = FakeEngine(max_batch=1)
    engine.gate = threading.Event()
    with serving(engine, preparer, max_batch_size=1, max_queue=8, max_wait_ms=0) as server:
        window = stream_window(server.stack.service)
        assert window == 4  # half the queue: room is left for other callers
        requests = [request(user(f"question {i}"), request_id=f"m{i}") for i in range(60)]
        with ThreadPoolExecutor(1) as pool:
            answers = pool.submit(lambda: list(server.stub().ModerateMany(iter(requests))))
            assert engine.entered.wait(10)
            time.sleep(0.3)  # the stream would have read everything by now
            service = server.stack.service
            assert service.scheduler.depth() + service.preparing() <= window - 1
            other = server.stub().Moderate.future(request(user("Hi.")), timeout=30)
            time.sleep(0.1)
            engine.gate.set()
            responses = answers.result(timeout=60)
            assert other.result().verdict.label == pb.SAFE  # another caller got in
    assert sorted(r.request_id for r in responses) == sorted(f"m{i}" for i in range(60))
    assert {r.verdict.label for r in responses} == {pb.SAFE}


def test_get_info_health_and_reflection(engine: Engine, preparer: Preparer) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (  # noqa: PLC0415
        ProtoReflectionDescriptorDatabase,
    )

    with serving(engine, preparer) as server:
        info = server.stub().GetInfo(pb.GetInfoRequest(), timeout=10)
        assert (info.backend, info.semantics, info.decode, info.max_batch_size) == (
            "torch",
            "meta",
            "constrained",
            4,
        )
        assert [c.code for c in info.default_categories] == [f"S{i}" for i in range(1, 14)]
        assert not info.meaningless_verdicts
        health = health_pb2_grpc.HealthStub(server.channel())
        for service in ("", "guardrt.v1.Moderation"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(server.channel()).get_services()
        assert "guardrt.v1.Moderation" in services
        assert "grpc.health.v1.Health" in services


def test_moderate_many_answers_each_and_isolates_errors(engine: Engine, preparer: Preparer) -> None:
    requests = [request(user(f"question number {i}"), request_id=f"m{i}") for i in range(5)] + [
        request(pb.Message(role=pb.ASSISTANT, content=[pb.Content(text="x")]), request_id="bad")
    ]
    with serving(engine, preparer, max_wait_ms=20) as server:
        stub = server.stub()
        responses = {r.request_id: r for r in stub.ModerateMany(iter(requests), timeout=60)}
        assert sorted(responses) == sorted(r.request_id for r in requests)
        bad = responses.pop("bad").verdict
        assert bad.label == pb.ERROR
        assert bad.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "message 0 has role 'assistant'" in bad.error
        for request_id, response in responses.items():
            alone = stub.Moderate(requests[int(request_id[1:])], timeout=30)
            assert_same_verdict(response.verdict, alone.verdict)


def test_concurrent_requests_form_batches_with_the_same_answers(
    engine: Engine, preparer: Preparer
) -> None:
    texts = [f"Tell me about topic {i}, please." for i in range(8)]
    with serving(engine, preparer, max_wait_ms=200) as server:
        stub = server.stub()
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda t: stub.Moderate(request(user(t)), timeout=60), texts))
        assert max(r.timing.batch_size for r in together) > 1
        for text, response in zip(texts, together, strict=True):
            assert_same_verdict(
                response.verdict, stub.Moderate(request(user(text)), timeout=60).verdict
            )


def test_stream_checkpoints_equal_fresh_moderate(engine: Engine, preparer: Preparer) -> None:
    question = user("Can you explain how bridges carry heavy loads?")
    pieces = [
        "Bridges car",
        "ry loads by sp",
        "reading forces: ",
        "a beam bends, an arch ",
        "compresses,",
        " a suspension bridge hangs its deck from cables  ",
        "anchored at both ends; ",
        "ümlaut ok.  ",
    ]
    start = pb.StreamStart(request_id="s1", messages=[question], check_every_tokens=4)
    messages = [pb.StreamRequest(start=start)]
    messages += [pb.StreamRequest(append=p) for p in pieces] + [
        pb.StreamRequest(end=pb.StreamEnd())
    ]
    with serving(engine, preparer) as server:
        stub = server.stub()
        responses = list(stub.ModerateStream(iter(messages), timeout=120))
        assert len(responses) >= 3
        assert [r.final for r in responses] == [False] * (len(responses) - 1) + [True]
        full = "".join(pieces)
        assert responses[-1].covered_chars == len(full)
        covered = [r.covered_chars for r in responses]
        assert covered == sorted(covered)
        for response in responses:
            assert response.request_id == "s1"
            fresh = stub.Moderate(
                request(question, answer(full[: response.covered_chars])), timeout=30
            )
            assert_same_verdict(response.verdict, fresh.verdict)
            assert response.prompt_tokens == fresh.prompt_tokens
        # After the first check the conversation's K/V come from the stream's cache slot: only
        # the changed answer tokens and the template's suffix (the line's end and
        # "<END CONVERSATION>…<|end_header_id|>": 56 tokens) are recomputed.
        assert responses[0].reused_tokens == 0
        for previous, response in itertools.pairwise(responses):
            assert response.reused_tokens >= previous.prompt_tokens - 56 - 3


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("r-1\nINFO forged log line", "character 3 is U+000A"),
        ("with space", "character 4 is U+0020"),
        ("caf\u00e9", "character 3 is U+00E9"),
        ("x" * 129, "it has 129 characters"),
    ],
    ids=["newline", "space", "non-ascii", "too-long"],
)
def test_request_ids_that_could_forge_a_log_line_are_refused(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)) as raised:
        checked_request_id(value)
    assert value not in str(raised.value)  # named by position and code point, not echoed


def test_request_ids() -> None:
    assert checked_request_id("req-42_a.b:c/d") == "req-42_a.b:c/d"
    assert checked_request_id("x" * 128) == "x" * 128
    made = checked_request_id("")
    assert len(made) == 32
    assert made != checked_request_id("")


def test_every_rpc_refuses_a_bad_request_id(engine: Engine, preparer: Preparer) -> None:
    bad = "r\nforged"
    with serving(engine, preparer) as server:
        stub = server.stub()
        with pytest.raises(grpc.RpcError) as moderate:
            stub.Moderate(request(user("hi"), request_id=bad), timeout=30)
        assert moderate.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "U+000A" in str(moderate.value.details())
        many = list(
            stub.ModerateMany(
                iter([request(user("hi"), request_id=bad), request(user("hi"), request_id="ok")]),
                timeout=30,
            )
        )
        by_id = {r.request_id: r.verdict for r in many}
        assert by_id[bad].label == pb.ERROR  # echoed as sent, so the caller can match it
        assert by_id[bad].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert by_id["ok"].label != pb.ERROR
        start = pb.StreamStart(request_id=bad, messages=[user("hello")], check_every_tokens=8)
        with pytest.raises(grpc.RpcError) as stream:
            list(stub.ModerateStream(iter([pb.StreamRequest(start=start)]), timeout=30))
        assert stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cancelled_stream_gives_its_cache_slot_back(engine: Engine, preparer: Preparer) -> None:
    sessions = engine.classifier.sessions  # type: ignore[attr-defined]
    free = sessions.available()
    start = pb.StreamStart(messages=[user("hello")], check_every_tokens=1000)
    gate = threading.Event()

    def messages() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(start=start)
        yield pb.StreamRequest(append="some answer text")
        gate.wait(10)  # the client stops here, mid-stream

    with serving(engine, preparer) as server:
        call: Any = server.stub().ModerateStream(messages(), timeout=30)
        deadline = time.monotonic() + 10
        while sessions.available() == free and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sessions.available() == free - 1  # the stream holds a slot
        call.cancel()
        gate.set()
        while sessions.available() != free and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sessions.available() == free


def test_stream_stops_at_first_unsafe_and_validates(preparer: Preparer) -> None:
    question = user("hello")
    start = pb.StreamStart(messages=[question], check_every_tokens=2, stop_on_unsafe=True)
    messages = [pb.StreamRequest(start=start)] + [
        pb.StreamRequest(append="word ") for _ in range(20)
    ]
    with serving(FakeEngine(UNSAFE_S1), preparer) as server:
        stub = server.stub()
        responses = list(stub.ModerateStream(iter(messages), timeout=30))
        assert len(responses) == 1
        assert responses[0].final
        assert responses[0].verdict.label == pb.UNSAFE
        for bad, message in [
            ([pb.StreamRequest(append="x")], "must be a start"),
            (
                [pb.StreamRequest(start=pb.StreamStart(messages=[question, answer("a")]))],
                "end with a user message",
            ),
            ([pb.StreamRequest(start=start), pb.StreamRequest(start=start)], "second start"),
            ([pb.StreamRequest(start=start)], "without an end"),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.ModerateStream(iter(bad), timeout=30))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in str(caught.value.details())


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "exclude", "names"),
    [
        ([], (), "no messages"),
        (
            [pb.Message(role=pb.ROLE_UNSPECIFIED, content=[pb.Content(text="hi")])],
            (),
            "message 0 has role 'unspecified'",
        ),
        (
            [pb.Message(role=pb.Role.ValueType(77), content=[pb.Content(text="hi")])],
            (),
            "message 0 has role 'enum value 77'",
        ),
        ([user("a"), user("b")], (), "message 1 has role 'user'"),
        ([user("a", jpeg(1)), answer("b"), user("c", jpeg(2))], (), "second image"),
        ([user("a", b"not an image at all")], (), "message 0 part 0: image data is not"),
        ([user("a")], ("S99",), "'S99' is not in the policy"),
        ([pb.Message(role=pb.USER, content=[pb.Content()])], (), "type is missing"),
    ],
    ids=[
        "empty",
        "unspecified-role",
        "unknown-role-number",
        "two-users",
        "two-images",
        "bad-image",
        "unknown-category",
        "empty-part",
    ],
)
def test_invalid_requests(
    preparer: Preparer, messages: list[pb.Message], exclude: tuple[str, ...], names: str
) -> None:
    with serving(FakeEngine(), preparer) as server:
        with pytest.raises(grpc.RpcError) as caught:
            server.stub().Moderate(request(*messages, exclude=exclude), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert names in str(caught.value.details())


def test_size_and_text_limits(preparer: Preparer) -> None:
    short = Preparer(preparer.tokenizer, preparer.image_config, max_seq=256)
    with serving(FakeEngine(), short, max_message_bytes=200_000, max_text_chars=1000) as server:
        stub = server.stub()
        with pytest.raises(grpc.RpcError) as oversized:
            stub.Moderate(request(user("x", b"\xff" * 300_000)), timeout=10)
        assert oversized.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as long_text:
            stub.Moderate(request(user("y" * 1001)), timeout=10)
        assert long_text.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "1001 characters" in str(long_text.value.details())
        with pytest.raises(grpc.RpcError) as too_many_tokens:
            stub.Moderate(request(user("word " * 150)), timeout=10)  # 750 chars, ~350 tokens
        assert too_many_tokens.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "of the model's 256" in str(too_many_tokens.value.details())


def test_queue_full_deadline_and_cancellation(preparer: Preparer) -> None:
    engine = FakeEngine(max_batch=1)
    engine.gate = threading.Event()
    with serving(engine, preparer, max_batch_size=1, max_queue=2, max_wait_ms=0) as server:
        stub = server.stub()
        first = stub.Moderate.future(request(user("first"), request_id="first"), timeout=30)
        assert engine.entered.wait(10)  # running, held at the gate
        expiring = stub.Moderate.future(request(user("expiring"), request_id="late"), timeout=0.5)
        cancelled: Any = stub.Moderate.future(
            request(user("cancel me"), request_id="gone"), timeout=30
        )
        time.sleep(0.3)  # both are queued now: the queue (2) is full
        with pytest.raises(grpc.RpcError) as full:
            stub.Moderate(request(user("one too many")), timeout=10)
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        cancelled.cancel()
        time.sleep(1.0)  # the deadline of "late" passes while it waits
        engine.gate.set()
        assert first.result().verdict.label == pb.SAFE
        with pytest.raises(grpc.RpcError) as late:
            expiring.result()
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        executed = [len(r.prompt) for batch in engine.batches for r in batch]
        assert len(executed) == 1, "only the first request may have run"
        assert server.stack.scheduler.depth() == 0


class _HeldPreparer:
    """The preparer, holding every request at a gate while it is being prepared (an image
    being decoded and tiled); counts the requests it was given."""

    def __init__(self, preparer: Preparer) -> None:
        self.inner, self.gate, self.calls = preparer, threading.Event(), 0
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prepare(self, *args: Any, **kwargs: Any) -> PreparedRequest:
        with self.lock:
            self.calls += 1
        self.gate.wait(30)
        return self.inner.prepare(*args, **kwargs)


def test_a_burst_is_refused_at_the_door_not_after_its_images_are_prepared(
    preparer: Preparer,
) -> None:
    """Requests being prepared count against --max-queue with the queued ones: a call beyond
    it is refused RESOURCE_EXHAUSTED at once, before its image is decoded and tiled. (Before,
    a burst of image calls all went to the preparation pool, unbounded: 600 calls of a 1.9 MB
    JPEG took the server from 0.6 to 9.2 GB, 15 MB of pixels each, and the first refusal came
    after 16 s.)"""
    held = _HeldPreparer(preparer)
    with serving(FakeEngine(), held, max_queue=2, workers=4) as server:  # type: ignore[arg-type]
        stub = server.stub()
        calls = [
            stub.Moderate.future(request(user("Hi.", jpeg(seed))), timeout=30) for seed in range(2)
        ]
        deadline = time.monotonic() + 10
        while held.calls < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert held.calls == 2
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as full:
            stub.Moderate(request(user("Hi.", jpeg(7))), timeout=5)
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full (2, counting the requests being prepared)" in str(
            full.value.details()
        )
        assert time.monotonic() - started < 4  # at once, not at the call's deadline
        assert held.calls == 2  # never prepared
        held.gate.set()
        assert [call.result().verdict.label for call in calls] == [pb.SAFE, pb.SAFE]
        # the room is given back: the next calls are prepared and answered
        assert stub.Moderate(request(user("Hi.", jpeg(3))), timeout=10).verdict.label == pb.SAFE
        assert stub.Moderate(request(user("Hi.")), timeout=10).verdict.label == pb.SAFE


def test_engine_failure_fails_only_its_requests(preparer: Preparer) -> None:
    engine = FakeEngine()
    with serving(engine, preparer) as server:
        stub = server.stub()
        engine.fail = True
        with pytest.raises(grpc.RpcError) as failed:
            stub.Moderate(request(user("boom"), request_id="req-42"), timeout=10)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert "req-42" in str(failed.value.details())
        assert "CUDA" not in str(failed.value.details())
        engine.fail = False
        assert stub.Moderate(request(user("fine")), timeout=10).verdict.label == pb.SAFE


class _Poisoned(FakeEngine):
    """Fails any batch holding a request whose prompt is `poison`'s; runs the rest."""

    def __init__(self, poison: PreparedRequest) -> None:
        super().__init__()
        self.poison = poison.prompt

    def execute(self, batch: Sequence[PreparedRequest]) -> list[Decoded]:
        if any(r.prompt == self.poison for r in batch):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().execute(batch)


def _health(server: ServerThread) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel())
    status: int = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    return status


def test_a_request_the_engine_cannot_run_leaves_the_server_in_service(
    preparer: Preparer,
) -> None:
    """The engine still runs its self-check (the warm-up's text request) after failing one
    request: that request gets INTERNAL, the server stays SERVING and answers the next."""
    sample = preparer.prepare([{"role": "user", "content": "What is the recipe for mayonnaise?"}])
    engine = _Poisoned(preparer.prepare([{"role": "user", "content": "boom"}]))
    with serving(engine, preparer, warmup=[sample]) as server:
        stub = server.stub()
        with pytest.raises(grpc.RpcError) as failed:
            stub.Moderate(request(user("boom")), timeout=10)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert [r.prompt for r in engine.batches[-1]] == [sample.prompt]  # the self-check ran
        assert stub.Moderate(request(user("fine")), timeout=10).verdict.label == pb.SAFE
        assert _health(server) == health_pb2.HealthCheckResponse.SERVING
        assert not server.stack.scheduler.broken.is_set()


def test_a_broken_engine_takes_the_server_out_of_service(preparer: Preparer) -> None:
    """An engine that fails its self-check too is broken (a CUDA error poisons the process):
    health NOT_SERVING, /readyz 503, and every new call UNAVAILABLE (a load balancer sends it
    elsewhere) instead of INTERNAL after a wasted wait, even once the engine would answer."""
    sample = preparer.prepare([{"role": "user", "content": "What is the recipe for mayonnaise?"}])
    engine = FakeEngine()
    with serving(engine, preparer, warmup=[sample]) as server:
        stub = server.stub()
        engine.fail = True
        with pytest.raises(grpc.RpcError) as failed:
            stub.Moderate(request(user("boom"), request_id="req-1"), timeout=10)
        assert failed.value.code() == grpc.StatusCode.INTERNAL  # its own failure
        assert server.stack.scheduler.broken.wait(10)
        deadline = time.monotonic() + 10
        while _health(server) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health still SERVING"
            time.sleep(0.02)
        engine.fail = False
        ran = len(engine.batches)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Moderate(request(user("fine")), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed its self-check" in str(refused.value.details())
        assert len(engine.batches) == ran  # refused without running
        with pytest.raises(urllib.error.HTTPError) as unready:
            urllib.request.urlopen(f"http://localhost:{server.http_port}/readyz", timeout=10)
        assert unready.value.code == 503
        call = urllib.request.Request(
            f"http://localhost:{server.http_port}/v1/moderations",
            data=json.dumps({"input": "fine"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as unavailable:
            urllib.request.urlopen(call, timeout=10)
        assert unavailable.value.code == 503
        error = json.loads(unavailable.value.read())["error"]
        assert error["code"] == "engine_unavailable"  # not "shutting_down": it says why
        assert "failed its self-check" in error["message"]
        assert len(engine.batches) == ran


@pytest.mark.parametrize(
    ("authorization", "allowed"),
    [
        ("Bearer s3cret", True),
        ("bearer s3cret", True),  # the scheme is case-insensitive
        ("BEARER  s3cret ", True),
        ("Bearer S3CRET", False),  # the token is not
        ("Basic s3cret", False),
        ("s3cret", False),
        ("Bearer", False),
        ("", False),
    ],
)
def test_bearer_header_forms(authorization: str, allowed: bool) -> None:
    assert bearer_caller(authorization, {"s3cret": "billing"}) == ("billing" if allowed else None)
    assert bearer_caller(authorization, {}) == ANYONE  # no tokens: no auth


def test_bearer_tokens(preparer: Preparer) -> None:
    with serving(FakeEngine(), preparer, auth_tokens=frozenset({"s3cret"})) as server:
        stub = server.stub()
        for metadata in (
            None,
            (("authorization", "Bearer wrong"),),
            (("authorization", "s3cret"),),
        ):
            with pytest.raises(grpc.RpcError) as denied:
                stub.Moderate(request(user("hi")), timeout=10, metadata=metadata)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Moderate(
            request(user("hi")), timeout=10, metadata=(("authorization", "Bearer s3cret"),)
        )
        assert ok.verdict.label == pb.SAFE
        health = health_pb2_grpc.HealthStub(server.channel())  # health stays open
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            == health_pb2.HealthCheckResponse.SERVING
        )


def test_every_grpc_route_is_counted(preparer: Preparer) -> None:
    """guardrt_requests_total has each RPC's verdicts (code OK) and refusals by status name:
    Moderate and ModerateStream's checkpoints as ModerateMany's, and calls without a token."""
    token = (("authorization", "Bearer s3cret"),)
    with serving(FakeEngine(), preparer, auth_tokens=frozenset({"s3cret"})) as server:
        stub = server.stub()
        stub.Moderate(request(user("hi")), timeout=10, metadata=token)
        with pytest.raises(grpc.RpcError):
            stub.Moderate(request(user("a"), user("b")), timeout=10, metadata=token)
        with pytest.raises(grpc.RpcError):
            stub.Moderate(request(user("hi")), timeout=10)  # no token
        start = pb.StreamStart(messages=[user("question")], check_every_tokens=1)
        messages = [
            pb.StreamRequest(start=start),
            pb.StreamRequest(append="one two"),
            pb.StreamRequest(end=pb.StreamEnd()),
        ]
        assert len(list(stub.ModerateStream(iter(messages), timeout=30, metadata=token))) == 2
        with pytest.raises(grpc.RpcError):
            list(stub.ModerateStream(iter(messages[1:]), timeout=30, metadata=token))
        list(stub.ModerateMany(iter([request(user("x"))]), timeout=30, metadata=token))
        text = server.stack.metrics.text().decode()

    def count(route: str, code: str, reason: str) -> float:
        line = f'guardrt_requests_total{{code="{code}",reason="{reason}",route="grpc/{route}"}} '
        found = [row for row in text.splitlines() if row.startswith(line)]
        return float(found[0].removeprefix(line)) if found else 0.0

    assert count("Moderate", "OK", "ok") == 1
    assert count("Moderate", "INVALID_ARGUMENT", "role") == 1
    assert count("Moderate", "UNAUTHENTICATED", "unauthenticated") == 1
    assert count("ModerateStream", "OK", "ok") == 2  # a checkpoint and the final verdict
    assert count("ModerateStream", "INVALID_ARGUMENT", "stream_protocol") == 1
    assert count("ModerateMany", "OK", "ok") == 1


def test_drain_answers_in_flight_work_and_refuses_new_calls(preparer: Preparer) -> None:
    engine = FakeEngine(max_batch=1)
    engine.gate = threading.Event()
    with serving(engine, preparer, max_batch_size=1, max_wait_ms=0, grace_s=10) as server:
        stub = server.stub()
        in_flight = stub.Moderate.future(request(user("running")), timeout=30)
        queued = stub.Moderate.future(request(user("queued")), timeout=30)
        assert engine.entered.wait(10)
        health = health_pb2_grpc.HealthStub(server.channel())
        server.stop(delay=1.0)  # NOT_SERVING first, then the server stops taking calls
        time.sleep(0.3)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        time.sleep(1.2)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Moderate(request(user("new")), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        engine.gate.set()
        assert in_flight.result().verdict.label == pb.SAFE
        assert queued.result().verdict.label == pb.SAFE


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate"
)
def test_tls(preparer: Preparer, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]
    subprocess.run(
        [*command, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True
    )
    with serving(FakeEngine(), preparer, tls=TlsConfig(cert, key)) as server:
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        secure = pb_grpc.ModerationStub(
            grpc.secure_channel(f"localhost:{server.port}", credentials)
        )
        assert secure.Moderate(request(user("hi")), timeout=10).verdict.label == pb.SAFE
        with pytest.raises(grpc.RpcError) as plain:
            server.stub().Moderate(request(user("hi")), timeout=5)
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("model", "label_probability", "warned"),
    [
        ("/models/Llama-Guard-3-11B-Vision", 0.99, False),
        ("/models/Llama-3.2-11B-Vision-Instruct", 0.02, True),  # the same architecture
        ("/models/other", math.nan, True),  # greedy output off the grammar's path
        ("tiny-random", 0.0, False),  # said to be meaningless already
    ],
)
def test_the_self_check_warns_of_a_model_that_is_not_llama_guard(
    preparer: Preparer, model: str, label_probability: float, warned: bool
) -> None:
    """A model that puts little probability on 'safe'/'unsafe' at the verdict's first word
    still gets verdicts from the grammar, meaningless ones: the start says so."""
    engine = FakeEngine()
    engine.label_probability = label_probability
    sample = preparer.prepare([{"role": "user", "content": "What is the recipe for mayonnaise?"}])
    config = ServerConfig(grpc_port=0)
    lines = self_check(assemble_stack(config, engine, preparer, model, [sample, sample]))
    assert lines[0].startswith("self-check verdicts: text: 'safe' (P(unsafe)=0.25, P(safe or")
    warning = f"is {model} Llama Guard 3 11B Vision? Its verdicts may mean nothing"
    assert (len(lines) == 2 and warning in lines[1]) is warned


def test_serve_command_drains_on_sigterm(checkpoint: Path) -> None:
    """`guardrt serve` end to end: self-check, serving, SIGTERM, exit 0."""
    import signal  # noqa: PLC0415
    import sys  # noqa: PLC0415

    command = [sys.executable, "-m", "guardrt", "serve", "--model", str(checkpoint)]
    command += ["--grpc-port", "0", "--host", "localhost", "--max-seq", "1024", "--grace-s", "5"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "serving" in line:
            break
    assert "self-check verdicts: text:" in "".join(lines)
    # Random weights are not Llama Guard: almost none of their probability is on the verdict.
    assert "WARNING: the model puts only " in "".join(lines)
    port = int(lines[-1].split("(gRPC)")[0].rsplit(":", 1)[1])
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        stub = pb_grpc.ModerationStub(channel)
        stub.Moderate(request(user("connect first")), timeout=30)
        pending = [stub.Moderate.future(request(user(f"hello {i}")), timeout=30) for i in range(6)]
        time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert all(p.result().verdict.label in (pb.SAFE, pb.UNSAFE) for p in pending)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "stopped" in output


def test_create_server_from_config_alone(checkpoint: Path) -> None:
    """`create_server(config) -> (server, port)` loads and warms the model itself."""
    import asyncio  # noqa: PLC0415

    from guardrt.runtime.server.main import create_server  # noqa: PLC0415

    async def main() -> tuple[str, int]:
        config = ServerConfig(model=str(checkpoint), grpc_port=0, host="localhost", max_seq=1024)
        server, port = create_server(config)
        await server.start()
        async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(
                health_pb2.HealthCheckRequest(service="guardrt.v1.Moderation")
            )
            info = await pb_grpc.ModerationStub(channel).GetInfo(pb.GetInfoRequest())
        await server.stop(1)
        return info.model, status.status

    model, status = asyncio.run(main())
    assert model == str(checkpoint)
    assert status == health_pb2.HealthCheckResponse.SERVING
