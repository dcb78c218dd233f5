"""Chat fields OpenAI clients send beside the conversation, through the `openai` client:
`stream_options.include_usage` (the usage chunk), `tools` offered and `tool_choice` demanded,
`stop`; each bad value a 400 naming its field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from guardrt.runtime.engine import Engine
from guardrt.runtime.prepare import Preparer
from tests.server_harness import ServerThread, serving
from tests.test_http import post

GUARD = "meta-llama/Llama-Guard-3-11B-Vision"
JOKE: Any = [{"role": "user", "content": "Tell me a joke."}]
TOOL: Any = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture(scope="module")
def server(engine: Engine, preparer: Preparer) -> Iterator[ServerThread]:
    with serving(engine, preparer) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)


def test_include_usage_ends_the_stream_with_a_usage_chunk(client: openai.OpenAI) -> None:
    """OpenAI's shape: the last chunk has no choices and the usage; the others `usage: null`."""
    whole = client.chat.completions.create(model=GUARD, messages=JOKE)
    chunks = list(
        client.chat.completions.create(
            model=GUARD, messages=JOKE, stream=True, stream_options={"include_usage": True}
        )
    )
    *answer, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert whole.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None and len(c.choices) == 1 for c in answer)
    assert "".join(c.choices[0].delta.content or "" for c in answer) == (
        whole.choices[0].message.content
    )
    assert answer[-1].choices[0].finish_reason == "stop"
    assert (answer[-1].model_extra or {})["guardrt"]["label"] in ("safe", "unsafe")


def test_without_include_usage_the_finish_chunk_carries_it(client: openai.OpenAI) -> None:
    for options in (None, {"include_usage": False}, {}):
        extra: Any = {} if options is None else {"stream_options": options}
        chunks = list(
            client.chat.completions.create(model=GUARD, messages=JOKE, stream=True, **extra)
        )
        assert all(len(c.choices) == 1 for c in chunks)
        assert chunks[-1].usage is not None
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_offered_tools_are_never_called(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=GUARD, messages=JOKE)
    for choice in ("auto", "none", None):
        extra: Any = {} if choice is None else {"tool_choice": choice}
        offered = client.chat.completions.create(
            model=GUARD, messages=JOKE, tools=[TOOL], stop=["\n"], logit_bias={}, **extra
        )
        message = offered.choices[0].message
        assert message.content == plain.choices[0].message.content  # `stop` cuts nothing
        assert message.tool_calls is None
        assert offered.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when"),
        (
            {"stream": True, "stream_options": "usage"},
            "stream_options",
            "stream_options must be an object, not a string",
        ),
        (
            {"stream": True, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
            "must be true or false, not a number",
        ),
        ({"tool_choice": "required"}, "tool_choice", "tool_choice 'required' cannot be met"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
            "tool_choice an object cannot be met",
        ),
        ({"tools": TOOL}, "tools", "tools must be an array, not an object"),
        ({"stop": 3}, "stop", "stop must be a string or a list of up to 4 strings, not a number"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4 strings, not an array"),
        ({"logit_bias": {"19193": -100}}, "logit_bias", "logit_bias is not applied to a verdict"),
        ({"logit_bias": [1]}, "logit_bias", "logit_bias must be an object, not an array"),
    ],
    ids=[
        "options-without-stream",
        "options-string",
        "usage-number",
        "tool-required",
        "tool-named",
        "tools-object",
        "stop-number",
        "stop-five",
        "logit-bias",
        "logit-bias-array",
    ],
)
def test_bad_fields_are_named(
    server: ServerThread, fields: dict[str, Any], param: str, fragment: str
) -> None:
    body = json.dumps({"model": GUARD, "messages": JOKE} | fields).encode()
    code, payload = post(server, "/chat/completions", body, token=None)
    assert code == 400
    assert payload["error"]["param"] == param
    assert fragment in payload["error"]["message"]
