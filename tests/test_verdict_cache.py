"""--verdict-cache: an input judged before is answered from memory, exactly as it was judged;
anything that changes what the model reads is another input; errors are never kept."""

from __future__ import annotations

import http.client
import json
import logging

import grpc
import numpy as np
import pytest
from PIL import Image

from guardrt.client import moderate_request
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.requests import Decoded
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.verdict_cache import VerdictCache, request_key
from guardrt.v1 import moderation_pb2 as pb
from tests.images import encode, noise
from tests.server_harness import SAFE, UNSAFE_S1, FakeEngine, serving

PHOTO = noise(300, 200, seed=7)
TEXT = [{"role": "user", "content": "How do I pick a lock?"}]


def _with_image(image: object) -> list[dict[str, object]]:
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image", "image": image}]
    return [{"role": "user", "content": parts}]


def test_the_key_is_what_the_model_reads(preparer: Preparer) -> None:
    key = request_key(preparer.prepare(TEXT))
    assert key == request_key(preparer.prepare(TEXT))  # prepared again: the same input
    assert key != request_key(preparer.prepare([{"role": "user", "content": "How do I pick?"}]))
    assert key != request_key(preparer.prepare(TEXT, excluded_categories=["S2"]))
    png = request_key(preparer.prepare(_with_image(encode(Image.fromarray(PHOTO), "PNG"))))
    assert png == request_key(preparer.prepare(_with_image(PHOTO)))  # the same pixels
    changed = PHOTO.copy()
    changed[100, 150, 1] ^= 1  # one channel of one pixel, by one level
    assert png != request_key(preparer.prepare(_with_image(changed)))
    assert png != request_key(preparer.prepare(_with_image(noise(200, 300, seed=7))))
    assert png != key


def _decoded(preparer: Preparer, generated: tuple[int, ...]) -> Decoded:
    request = preparer.prepare(TEXT)
    return Decoded(request, generated, 0.7, {"S1": 1.0}, label_probability=0.99)


def test_the_cache_keeps_its_last_entries_and_no_errors(preparer: Preparer) -> None:
    cache = VerdictCache(2)
    request = preparer.prepare(TEXT)
    for key in (b"a", b"b", b"c"):
        cache.put(key, _decoded(preparer, UNSAFE_S1))
    assert len(cache) == 2
    assert cache.get(b"a", request) is None  # the oldest went
    answer = cache.get(b"c", request)
    assert answer is not None
    assert answer.verdict().categories == ["S1"]
    assert (answer.unsafe_probability, answer.label_probability) == (0.7, 0.99)
    assert (cache.hits, cache.misses) == (1, 1)
    cache.put(b"d", _decoded(preparer, (271, 9906, 128009)))  # off the grammar: an error
    assert cache.get(b"d", request) is None
    with pytest.raises(ValueError, match="at least 1 entry"):
        VerdictCache(0)
    with pytest.raises(ConfigError, match="verdict_cache must be ≥ 0"):
        ServerConfig(verdict_cache=-1)


def _post_chat(port: int) -> dict[str, object]:
    connection = http.client.HTTPConnection("localhost", port, timeout=30)
    body = {"model": "meta-llama/Llama-Guard-3-11B-Vision", "messages": TEXT}
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body))
        answer: dict[str, object] = json.loads(connection.getresponse().read())
        return answer
    finally:
        connection.close()


def test_a_repeated_input_is_answered_without_the_engine(
    preparer: Preparer, caplog: pytest.LogCaptureFixture
) -> None:
    engine = FakeEngine(UNSAFE_S1)
    with serving(engine, preparer, verdict_cache=16) as server, caplog.at_level(logging.INFO):
        stub = server.stub()
        first = stub.Moderate(moderate_request(TEXT))
        ran = len(engine.batches)
        again = stub.Moderate(moderate_request(TEXT))
        assert len(engine.batches) == ran  # not run again
        assert again.verdict == first.verdict
        assert not first.timing.cached
        assert (again.timing.cached, again.timing.batch_size, again.timing.model_ms) == (True, 0, 0)
        assert again.prompt_tokens == first.prompt_tokens
        other_policy = stub.Moderate(moderate_request(TEXT, excluded_categories=["S13"]))
        assert not other_policy.timing.cached
        assert len(engine.batches) == ran + 1
        extension = _post_chat(server.http_port)["guardrt"]
        assert isinstance(extension, dict)
        assert extension["cached"] is True
        connection = http.client.HTTPConnection("localhost", server.http_port, timeout=30)
        connection.request("GET", "/metrics")
        metrics = connection.getresponse().read().decode()
    assert "guardrt_verdicts_cached_total 2.0" in metrics
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert sum(", unsafe, cached, " in line for line in lines) == 2
    assert sum(", unsafe, batch 1, " in line for line in lines) == 2


def test_errors_and_failures_are_never_answered_again(preparer: Preparer) -> None:
    """An engine failure is an error for its call, and the next call runs the engine again (a
    kept failure would fail every repeat); so does an error verdict."""
    engine = FakeEngine(SAFE)
    with serving(engine, preparer, verdict_cache=16) as server:
        stub = server.stub()
        engine.fail = True
        with pytest.raises(grpc.RpcError) as failed:
            stub.Moderate(moderate_request(TEXT))
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        engine.fail = False
        answered = stub.Moderate(moderate_request(TEXT))
        assert answered.verdict.label == pb.SAFE
        assert not answered.timing.cached
        engine.generated = (271, 9906, 128009)  # off the grammar: an error verdict
        image = _with_image(encode(Image.fromarray(PHOTO), "PNG"))
        errors = [stub.Moderate(moderate_request(image)) for _ in range(2)]
    assert [e.verdict.label for e in errors] == [pb.ERROR, pb.ERROR]
    assert [e.timing.cached for e in errors] == [False, False]


def test_without_the_flag_nothing_is_cached(preparer: Preparer) -> None:
    engine = FakeEngine()
    with serving(engine, preparer) as server:
        stub = server.stub()
        answers = [stub.Moderate(moderate_request(TEXT)) for _ in range(2)]
    assert [a.timing.cached for a in answers] == [False, False]
    assert np.sum([len(b) for b in engine.batches]) >= 2
