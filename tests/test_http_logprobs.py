"""Token logprobs over the OpenAI-compatible API (`logprobs`, `top_logprobs`), through the
`openai` client: the engine's own log-probabilities of the content's tokens, streamed too,
cached apart from answers without them, none behind an error verdict, and bad values named."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from guardrt.runtime.engine import Engine
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.scores import TokenLogprob
from guardrt.runtime.server.chat_logprobs import NO_PROBABILITY, choice_logprobs
from tests.server_harness import SAFE, FakeEngine, ServerThread, serving
from tests.test_http import post

GUARD = "meta-llama/Llama-Guard-3-11B-Vision"
JOKE: Any = [{"role": "user", "content": "Tell me a joke."}]
LOCK: Any = [{"role": "user", "content": "How do I pick a lock?"}]


@pytest.fixture(scope="module")
def server(engine: Engine, preparer: Preparer) -> Iterator[ServerThread]:
    with serving(engine, preparer, verdict_cache=16) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)


def _engine_entries(
    engine: Engine, preparer: Preparer, messages: list[Any], top: int
) -> tuple[TokenLogprob, ...]:
    request = dataclasses.replace(preparer.prepare(messages), top_logprobs=top)
    entries = engine.execute([request])[0].content_logprobs()
    assert entries is not None
    return entries


@pytest.mark.parametrize("messages", [JOKE, LOCK], ids=["joke", "lock"])
def test_content_tokens_with_their_alternatives(
    client: openai.OpenAI, engine: Engine, preparer: Preparer, messages: list[Any]
) -> None:
    response = client.chat.completions.create(
        model=GUARD, messages=messages, logprobs=True, top_logprobs=3
    )
    choice = response.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.content is not None
    content = choice.logprobs.content
    assert "".join(entry.token for entry in content) == choice.message.content
    assert b"".join(bytes(entry.bytes or []) for entry in content).decode() == (
        choice.message.content
    )
    expected = _engine_entries(engine, preparer, messages, 3)
    tok = preparer.tokenizer
    assert [entry.token for entry in content] == [tok.decode([e.token]) for e in expected]
    for got, want in zip(content, expected, strict=True):
        assert math.isclose(got.logprob, want.logprob, rel_tol=1e-5, abs_tol=1e-6)
        assert [t.token for t in got.top_logprobs] == [tok.decode([t]) for t, _ in want.top]
        assert len(got.top_logprobs) == 3
    label = content[0]  # `safe` or `unsafe`: its probability is the extension's score
    extension = (response.model_extra or {})["guardrt"]
    word = "unsafe" if label.token == "unsafe" else "safe"
    assert label.token == word == extension["label"]
    if word == "unsafe":
        assert math.isclose(math.exp(label.logprob), extension["unsafe_probability"], rel_tol=1e-4)


def test_logprobs_without_alternatives(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=GUARD, messages=LOCK, logprobs=True)
    logprobs = response.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content
    assert all(entry.top_logprobs == [] for entry in logprobs.content)
    plain = client.chat.completions.create(model=GUARD, messages=LOCK, logprobs=False)
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_ride_with_the_content(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=GUARD, messages=JOKE, logprobs=True, top_logprobs=2, stream=True
    )
    chunks = list(stream)
    with_content = [c for c in chunks if c.choices[0].delta.content]
    assert len(with_content) == 1
    logprobs = with_content[0].choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert "".join(e.token for e in logprobs.content) == with_content[0].choices[0].delta.content
    others = [c for c in chunks if c is not with_content[0]]
    assert all(c.choices[0].logprobs is None for c in others)


def test_the_verdict_cache_keeps_answers_with_and_without_logprobs_apart(
    client: openai.OpenAI,
) -> None:
    messages: Any = [{"role": "user", "content": "Is the cache keyed on logprobs?"}]
    plain = client.chat.completions.create(model=GUARD, messages=messages)
    asked = client.chat.completions.create(
        model=GUARD, messages=messages, logprobs=True, top_logprobs=1
    )
    again = client.chat.completions.create(
        model=GUARD, messages=messages, logprobs=True, top_logprobs=1
    )
    extensions = [(r.model_extra or {})["guardrt"]["cached"] for r in (plain, asked, again)]
    assert extensions == [False, False, True]
    assert plain.choices[0].logprobs is None
    assert asked.choices[0].logprobs == again.choices[0].logprobs
    assert asked.choices[0].logprobs is not None
    assert asked.choices[0].logprobs.content


def test_an_error_verdict_has_no_token_logprobs(preparer: Preparer) -> None:
    """Its content (`unsafe`) is not what the model wrote: no tokens stand behind it."""
    with serving(FakeEngine(generated=(*SAFE, 271, 19193)), preparer) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        chat = client.chat.completions.create(model=GUARD, messages=JOKE, logprobs=True)
        assert chat.choices[0].message.content == "unsafe"
        assert chat.choices[0].logprobs is not None
        assert chat.choices[0].logprobs.content is None


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"logprobs": "yes"}, "logprobs must be true or false, not a string"),
        ({"logprobs": True, "top_logprobs": 21}, "from 0 to 20, not 21"),
        ({"logprobs": True, "top_logprobs": -1}, "from 0 to 20, not -1"),
        ({"logprobs": True, "top_logprobs": 2.5}, "from 0 to 20, not 2.5"),
        ({"logprobs": True, "top_logprobs": True}, "from 0 to 20, not a boolean"),
        ({"top_logprobs": 2}, "top_logprobs (2) needs logprobs: true"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs (2) needs logprobs: true"),
    ],
)
def test_bad_logprobs_fields_are_named(
    server: ServerThread, fields: dict[str, Any], fragment: str
) -> None:
    body = json.dumps({"model": GUARD, "messages": JOKE} | fields).encode()
    code, payload = post(server, "/chat/completions", body, token=None)
    assert code == 400
    assert fragment in payload["error"]["message"]
    assert payload["error"]["param"] in fields


def test_entries_in_openais_shape() -> None:
    """A special token by name, bytes that are not UTF-8 alone, a log-probability JSON cannot
    hold."""
    names = {1: b"<|eot_id|>", 2: b"\xe2\x82", 3: b"ok"}
    entries = (TokenLogprob(3, -0.5, ((3, -0.5), (1, -math.inf), (2, -3.0))),)
    shaped = choice_logprobs(entries, names.__getitem__)
    assert shaped["refusal"] is None
    (entry,) = shaped["content"]
    assert (entry["token"], entry["logprob"], entry["bytes"]) == ("ok", -0.5, [111, 107])
    tops = [(t["token"], t["logprob"], t["bytes"]) for t in entry["top_logprobs"]]
    assert tops == [
        ("ok", -0.5, [111, 107]),
        ("<|eot_id|>", NO_PROBABILITY, list(b"<|eot_id|>")),
        ("\ufffd", -3.0, [0xE2, 0x82]),
    ]
    json.dumps(shaped, allow_nan=False)
