"""--verdict-cache: an input judged before is answered from memory, exactly as it was judged;
anything that changes what the model reads is another input; errors are never kept."""

from __future__ import annotations

import http.client
import json
import logging
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from guardrt.client import moderate_request
from guardrt.runtime import prepare as prepare_module
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.preprocess import preprocess_image
from guardrt.runtime.requests import Decoded
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.verdict_cache import (
    CachedVerdict,
    VerdictCache,
    image_bytes,
    input_key,
)
from guardrt.v1 import moderation_pb2 as pb
from tests.images import encode, noise
from tests.server_harness import SAFE, UNSAFE_S1, FakeEngine, serving

PHOTO = noise(300, 200, seed=7)
TEXT = [{"role": "user", "content": "How do I pick a lock?"}]


def _with_image(image: object) -> list[dict[str, object]]:
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image", "image": image}]
    return [{"role": "user", "content": parts}]


def _key(messages: list[dict[str, Any]], **policy: Any) -> bytes | None:
    return input_key(
        messages, policy.get("categories"), policy.get("excluded", ()), policy.get("ignored", ())
    )


def test_the_key_is_the_request() -> None:
    key = _key(TEXT)
    assert key is not None
    assert key == _key([{"role": "user", "content": "How do I pick a lock?"}])
    assert key != _key([{"role": "user", "content": "How do I pick a lock? "}])
    assert key != _key([{"role": "assistant", "content": "How do I pick a lock?"}])
    assert key != _key(TEXT, excluded=["S2"])
    assert key != _key(TEXT, categories=[("S1", "Spam.")])
    assert key != _key(TEXT, ignored=("system",))
    png = encode(Image.fromarray(PHOTO), "PNG")
    image_key = _key(_with_image(png))
    assert image_key == _key(_with_image(bytes(png)))
    changed = bytearray(png)
    changed[-20] ^= 1  # one bit of the file
    assert image_key != _key(_with_image(bytes(changed)))
    assert _key(_with_image(PHOTO)) is None  # an array: not keyed, not cached
    # Types are part of the key: a tuple is not a list, 1 is not True.
    as_tuple = [{"role": "user", "content": ({"type": "text", "text": "Hi."},)}]
    as_list = [{"role": "user", "content": [{"type": "text", "text": "Hi."}]}]
    assert _key(as_tuple) != _key(as_list)
    assert _key([{"role": "user", "content": 1}]) != _key([{"role": "user", "content": True}])
    assert image_bytes(_with_image(png)) == len(png)


def _entry(preparer: Preparer, generated: tuple[int, ...]) -> CachedVerdict:
    request = preparer.prepare(TEXT)
    decoded = Decoded(request, generated, 0.7, {"S1": 1.0}, label_probability=0.99)
    return CachedVerdict(decoded.verdict(), len(request.prompt), len(generated), 0)


def test_the_cache_keeps_its_last_entries_and_no_errors(preparer: Preparer) -> None:
    cache = VerdictCache(2)
    for key in (b"a", b"b", b"c"):
        cache.put(key, _entry(preparer, UNSAFE_S1))
    assert len(cache) == 2
    assert cache.get(b"a") is None  # the oldest went
    answer = cache.get(b"c")
    assert answer is not None
    assert answer.verdict.categories == ["S1"]
    assert (answer.verdict.unsafe_probability, answer.verdict.label_probability) == (0.7, 0.99)
    assert (cache.hits, cache.misses) == (1, 1)
    cache.put(b"d", _entry(preparer, (271, 9906, 128009)))  # off the grammar: an error
    assert cache.get(b"d") is None
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
    preparer: Preparer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiled: list[object] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        tiled.append(args)
        return preprocess_image(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "preprocess_image", counted)
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
        picture = _with_image(encode(Image.fromarray(PHOTO), "JPEG"))
        before = len(tiled)
        image_answers = [stub.Moderate(moderate_request(picture)) for _ in range(2)]
        assert [a.timing.cached for a in image_answers] == [False, True]
        assert image_answers[1].verdict == image_answers[0].verdict
        assert len(tiled) == before + 1  # the repeat's image was not decoded again
        other_policy = stub.Moderate(moderate_request(TEXT, excluded_categories=["S13"]))
        assert not other_policy.timing.cached
        assert len(engine.batches) == ran + 2  # the image's first time, the other policy
        answers = [_post_chat(server.http_port)["guardrt"] for _ in range(2)]
        assert [answer["cached"] for answer in answers] == [False, True]  # type: ignore[index]
        connection = http.client.HTTPConnection("localhost", server.http_port, timeout=30)
        connection.request("GET", "/metrics")
        metrics = connection.getresponse().read().decode()
    assert "guardrt_verdicts_cached_total 3.0" in metrics
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert sum(", unsafe, cached, " in line for line in lines) == 3
    assert sum(", unsafe, batch 1, " in line for line in lines) == 4


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
