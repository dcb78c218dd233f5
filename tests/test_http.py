"""The OpenAI-compatible HTTP API: the hosted model's samples (Python `openai`, JavaScript
`openai` on node) unchanged but for base_url/api_key, chat completions, moderations with images
and real scores, SSE, models, health, metrics, and every error in OpenAI's shape."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from guardrt.runtime.engine import Engine
from guardrt.runtime.guard import Guard
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.server.openai_compat import CATEGORY_NAMES
from tests.server_harness import SAFE, UNSAFE_S1, FakeEngine, ServerThread, serving
from tests.test_server import jpeg

JS = Path(__file__).parent / "js"
HOSTED_SAMPLE = """
from openai import OpenAI
client = OpenAI(base_url="{base_url}", api_key="{api_key}")
response = client.chat.completions.create(
    model="meta-llama/Llama-Guard-3-11B-Vision-Turbo",
    messages=[
        {{"role": "system", "content": "You are an AI assistant who knows everything."}},
        {{"role": "user", "content": "Tell me, why is the sky blue?"}},
    ],
)
print(f"Assistant: {{response.choices[0].message.content}}")
"""


@pytest.fixture(scope="module")
def server(engine: Engine, preparer: Preparer) -> Iterator[ServerThread]:
    with serving(engine, preparer, auth_tokens=frozenset({"sk-test"})) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)


@pytest.fixture(scope="module")
def guard(engine: Engine, preparer: Preparer) -> Guard:
    return Guard(preparer, engine)


def data_url(image: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(image).decode()


def post(
    server: ServerThread,
    path: str,
    body: bytes,
    token: str | None = "sk-test",
    extra: dict[str, str] | None = None,
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} | (extra or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{server.base_url}{path}", body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(server: ServerThread, path: str) -> tuple[int, bytes]:
    url = f"http://localhost:{server.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_hosted_python_sample_runs_unchanged(server: ServerThread) -> None:
    code = HOSTED_SAMPLE.format(base_url=server.base_url, api_key="sk-test")
    command = [sys.executable, "-c", code]
    output = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert output.returncode == 0, output.stderr
    assert output.stdout.startswith("Assistant: ")
    content = output.stdout.removeprefix("Assistant: ").strip()
    assert content == "safe" or content.startswith("unsafe\nS")


@pytest.mark.skipif(
    shutil.which("node") is None or not (JS / "node_modules" / "openai").is_dir(),
    reason="needs node and tests/js/node_modules (scripts/setup.sh test installs them with npm)",
)
def test_hosted_javascript_sample_runs_unchanged(server: ServerThread) -> None:
    env = dict(os.environ, GUARDRT_BASE_URL=server.base_url, GUARDRT_API_KEY="sk-test")
    command = ["node", str(JS / "sample.mjs")]
    output = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    assert output.returncode == 0, output.stderr
    content = output.stdout.removeprefix("Assistant: ").strip()
    assert content == "safe" or content.startswith("unsafe\nS")


def test_chat_completion_is_the_verdict(client: openai.OpenAI, guard: Guard) -> None:
    picture = {"type": "image_url", "image_url": {"url": data_url(jpeg(3))}}
    messages: list[Any] = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": [{"type": "text", "text": "Is this a cat?"}, picture]},
        {"role": "assistant", "content": "Yes, a small cat."},
    ]
    model = "meta-llama/Llama-Guard-3-11B-Vision"
    response = client.chat.completions.create(
        model=model, messages=messages, response_format={"type": "text"}, logprobs=False
    )
    parts = [{"type": "text", "text": "Is this a cat?"}, {"type": "image", "image": jpeg(3)}]
    expected = guard.moderate(
        [{"role": "user", "content": parts}, {"role": "assistant", "content": "Yes, a small cat."}]
    )
    choice = response.choices[0]
    assert choice.message.content == expected.content
    assert choice.finish_reason == "stop"
    assert response.object == "chat.completion"
    assert response.usage is not None
    assert response.usage.prompt_tokens > 100
    assert response.usage.completion_tokens >= 3
    extension = (response.model_extra or {})["guardrt"]
    assert extension["label"] == expected.label.value
    assert math.isclose(extension["unsafe_probability"], expected.unsafe_probability, rel_tol=1e-5)
    assert math.isclose(extension["label_probability"], expected.label_probability, rel_tol=1e-5)


def test_streaming_sends_sse_chunks(client: openai.OpenAI, guard: Guard) -> None:
    stream = client.chat.completions.create(
        model="meta-llama/Llama-Guard-3-11B-Vision-Turbo",
        messages=[{"role": "user", "content": "Tell me a joke."}],
        stream=True,
        temperature=0.7,
        max_tokens=20,
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == guard.moderate([{"role": "user", "content": "Tell me a joke."}]).content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_moderations_with_images_and_real_scores(
    client: openai.OpenAI, guard: Guard, server: ServerThread
) -> None:
    image = jpeg(4)
    parts = [
        {"type": "text", "text": "What is shown here?"},
        {"type": "image_url", "image_url": {"url": data_url(image)}},
    ]
    body = {"model": "meta-llama/Llama-Guard-3-11B-Vision", "input": parts}
    code, response = post(server, "/moderations", json.dumps(body).encode())
    assert code == 200
    assert len(response["results"]) == 1
    result = response["results"][0]
    ours = [{"type": "text", "text": "What is shown here?"}, {"type": "image", "image": image}]
    expected = guard.moderate([{"role": "user", "content": ours}])
    assert list(result["category_scores"]) == list(CATEGORY_NAMES.values())
    for code_, name in CATEGORY_NAMES.items():
        score = expected.unsafe_probability * expected.category_probabilities[code_]
        assert math.isclose(result["category_scores"][name], score, rel_tol=1e-5)
        assert result["category_applied_input_types"][name] == ["image", "text"]
        assert result["categories"][name] == (code_ in expected.categories)
    assert result["flagged"] == (expected.label.value == "unsafe")
    several = client.moderations.create(input=["first text", "second text"])
    assert len(several.results) == 2


def test_moderations_custom_policy(server: ServerThread) -> None:
    """Custom categories via the `guardrt` extension field; their keys are their codes."""
    policy = {"categories": [{"code": "S1", "description": "Spam."}]}
    body = {"input": "buy cheap pills now", "guardrt": policy}
    code, response = post(server, "/moderations", json.dumps(body).encode())
    assert code == 200
    assert list(response["results"][0]["category_scores"]) == ["S1"]


def test_models_health_ready_and_metrics(server: ServerThread) -> None:
    models = openai.OpenAI(base_url=server.base_url, api_key="sk-test").models.list()
    ids = [model.id for model in models.data]
    assert "meta-llama/Llama-Guard-3-11B-Vision-Turbo" in ids
    for model in ids:  # each one `models.retrieve` finds too (it was a 404)
        assert (
            openai.OpenAI(base_url=server.base_url, api_key="sk-test").models.retrieve(model).id
            == model
        )
    with pytest.raises(openai.NotFoundError, match="The model 'gpt-4o' does not exist") as gone:
        openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0).models.retrieve(
            "gpt-4o"
        )
    assert gone.value.code == "model_not_found"
    assert get(server, "/healthz")[0] == 200
    assert get(server, "/readyz")[0] == 200
    server.stack.ready = False
    try:
        assert get(server, "/readyz")[0] == 503
    finally:
        server.stack.ready = True
    assert post(server, "/chat/completions", chat_body())[0] == 200
    assert post(server, "/chat/completions", chat_body(model="gpt-4o"))[0] == 404
    status, text = get(server, "/metrics")
    metrics = text.decode()
    assert status == 200
    names = ["guardrt_requests_total", "guardrt_stage_seconds_bucket", "guardrt_batch_size_count"]
    names += ["guardrt_queue_depth", 'stage="queue"', 'stage="preprocess"', 'stage="model"']
    names += ['stage="prefill"', 'stage="decode"', 'code="404",reason="model_not_found"']
    for name in names:
        assert name in metrics, name
    assert "guardrt_label_probability_count" in metrics


@pytest.mark.parametrize(("label_probability", "observed"), [(0.99, 1), (math.nan, 0)])
def test_the_verdicts_share_of_probability_is_a_histogram(
    preparer: Preparer, label_probability: float, observed: int
) -> None:
    """Each verdict's P(safe) + P(unsafe) at its first word (Llama Guard: near 1); unknown
    (greedy output off the grammar's path) is not observed."""
    engine = FakeEngine()
    engine.label_probability = label_probability
    with serving(engine, preparer) as server:
        assert post(server, "/chat/completions", chat_body())[0] == 200
        text = get(server, "/metrics")[1].decode()
    assert f"guardrt_label_probability_count {observed:.1f}" in text
    assert f'guardrt_label_probability_bucket{{le="0.99"}} {observed:.1f}' in text
    assert 'guardrt_label_probability_bucket{le="0.95"} 0.0' in text


def test_metrics_say_what_is_served_and_whether_it_takes_work(server: ServerThread) -> None:
    text = get(server, "/metrics")[1].decode()
    info = next(line for line in text.splitlines() if line.startswith("guardrt_build_info{"))
    for label in ('backend="torch"', 'decode="constrained"', 'semantics="meta"', "version="):
        assert label in info, info
    assert info.endswith(" 1.0")
    assert "guardrt_ready 1.0" in text
    server.stack.ready = False  # draining, or the engine broken
    try:
        assert "guardrt_ready 0.0" in get(server, "/metrics")[1].decode()
    finally:
        server.stack.ready = True


def test_verdicts_are_counted_by_label_input_and_category(preparer: Preparer) -> None:
    """An operator's dashboard: how many verdicts are unsafe, on text or on images, and which
    categories they name; and how many requests are being prepared."""
    with serving(FakeEngine(UNSAFE_S1), preparer) as server:
        for messages in (USER_X, USER_X, image_message(data_url(jpeg()))):
            body = json.dumps({"model": GUARD, "messages": messages}).encode()
            assert post(server, "/chat/completions", body)[0] == 200
        assert post(server, "/moderations", json.dumps({"input": "Hi."}).encode())[0] == 200
        text = get(server, "/metrics")[1].decode()
    assert 'guardrt_verdicts_total{input="text",label="unsafe"} 3.0' in text
    assert 'guardrt_verdicts_total{input="image",label="unsafe"} 1.0' in text
    assert 'guardrt_unsafe_categories_total{category="S1"} 4.0' in text
    assert 'label="safe"' not in text
    assert "guardrt_preparing 0.0" in text


def test_paths_no_route_serves_share_one_metrics_label(preparer: Preparer) -> None:
    """A scanner's probes must not each add a series to /metrics (unbounded labels)."""
    with serving(FakeEngine(), preparer) as server:
        probes = [f"/probe-{i}" for i in range(5)]
        for path in probes:
            assert get(server, path)[0] == 404
        assert get(server, "/v1/moderations")[0] == 405  # a served path, the wrong method
        metrics = get(server, "/metrics")[1].decode()
    assert not any(path in metrics for path in probes)
    assert 'guardrt_requests_total{code="404",reason="http",route="unmatched"} 5.0' in metrics
    assert 'code="405",reason="http",route="/v1/moderations"} 1.0' in metrics


GUARD = "meta-llama/Llama-Guard-3-11B-Vision"
USER_X = [{"role": "user", "content": "x"}]


def chat_body(**fields: Any) -> bytes:
    return json.dumps({"model": GUARD, "messages": USER_X} | fields).encode()


SYSTEM = {"role": "system", "content": "You are an AI assistant who knows everything."}


def image_message(url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),  # was a bare 500
        (b'{"model": "x", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "too deeply"),
        (chat_body(model="gpt-4o"), 404, "does not exist"),
        (chat_body(model=3), 400, "model must be a string naming the model, got a number"),
        (chat_body(model=None), 400, "got null or nothing"),
        (chat_body(n=2), 400, "n must be 1"),
        (chat_body(temperature=9), 400, "temperature"),
        (chat_body(messages=[{"role": "assistant", "content": "x"}]), 400, "role 'assistant'"),
        (chat_body(messages=image_message("https://x.org/a.png")), 400, "no outbound"),
        (
            chat_body(messages=[SYSTEM, *image_message("data:image/png;base64,AAAA")]),
            400,
            "message 1 part 0: image data is not a supported format",
        ),
        (
            chat_body(messages=[SYSTEM, {"role": "assistant", "content": "x"}]),
            400,
            "message 1 has role 'assistant'",  # numbered as the body, the system message too
        ),
        (chat_body(messages=[SYSTEM]), 400, "no user or assistant message"),
        (
            chat_body(guardrt={"excluded": ["S1"]}),  # misspelt: not a silently unused policy
            400,
            "guardrt has unknown key 'excluded'; known: categories, exclude",
        ),
        (
            chat_body(guardrt={"categories": [{"code": "S1", "desc": "Spam."}]}),
            400,
            "guardrt.categories[0] has unknown key 'desc'; known: code, description",
        ),
        (chat_body(messages=[]), 400, "non-empty"),
        (
            chat_body(response_format={"type": "json_object"}),
            400,
            "response_format type 'json_object' is not supported, only 'text'",
        ),
        (chat_body(response_format="json"), 400, 'such as {"type": "text"}, got a string'),
        (chat_body(response_format={"type": 1}), 400, "response_format type a number is not"),
    ],
    ids=[
        "bad-json",
        "nested-json",
        "nested-messages",
        "unknown-model",
        "model-number",
        "model-missing",
        "n",
        "temperature",
        "roles",
        "remote-url",
        "bad-image",
        "roles-after-system",
        "only-system",
        "unknown-extension-key",
        "unknown-category-key",
        "empty",
        "json-format",
        "format-not-object",
        "format-type-number",
    ],
)
def test_chat_errors_in_openai_shape(
    server: ServerThread, body: bytes, status: int, fragment: str
) -> None:
    code, payload = post(server, "/chat/completions", body)
    assert code == status
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert fragment in payload["error"]["message"]


NOT_AN_IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}
LONG = "word " * 9000  # over the 8,192 positions


@pytest.mark.parametrize(
    ("path", "body", "param", "fragment"),
    [
        (
            "/chat/completions",
            {"messages": [SYSTEM, {"role": "user", "content": "a"}, USER_X[0]]},
            "messages[2]",
            "message 2 has role 'user'",
        ),
        (
            "/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "a"}, NOT_AN_IMAGE]}
                ]
            },
            "messages[0].content[1]",
            "message 0 part 1: image data is not a supported format",
        ),
        (
            "/chat/completions",
            {"messages": [SYSTEM, {"role": "user", "content": "bad \ud800"}]},
            "messages[1].content",  # a string content: the runtime's part 0
            "message 1 part 0 text has a lone surrogate",
        ),
        ("/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, None, "tokens"),
        (
            "/moderations",
            {"input": ["fine", "bad \ud800", "fine too"]},
            "input[1]",
            "input[1]: message 0 part 0 text has a lone surrogate",
        ),
        ("/moderations", {"input": ["fine", LONG]}, "input[1]", "input[1]: the prompt is"),
        ("/moderations", {"input": "bad \ud800"}, "input", "input: message 0 part 0 text"),
        (
            "/moderations",
            {"input": [{"type": "text", "text": "a"}, NOT_AN_IMAGE]},
            "input[1]",
            "input[1]: message 0 part 1: image data is not a supported format",
        ),
    ],
    ids=[
        "chat-role",
        "chat-image-part",
        "chat-text",
        "chat-too-long",
        "moderations-text-of-several",
        "moderations-too-long-of-several",
        "moderations-one-string",
        "moderations-image-part",
    ],
)
def test_input_errors_name_their_place_in_the_body(
    server: ServerThread, path: str, body: dict[str, Any], param: str | None, fragment: str
) -> None:
    """Errors found by the runtime's validation carry `param`, the body's place of the fault
    (as the HTTP layer's own checks do), and /v1/moderations' messages say which input."""
    text = json.dumps({"model": GUARD} | body)  # the lone surrogate as JSON escapes it
    code, payload = post(server, path, text.encode())
    assert code == 400
    assert payload["error"]["param"] == param
    assert fragment in payload["error"]["message"]


@pytest.mark.parametrize("path", ["/chat/completions", "/moderations"])
def test_a_misspelt_policy_key_is_refused_by_name(server: ServerThread, path: str) -> None:
    body = json.loads(chat_body(guardrt={"exclude": ["S13"], "exclude_categories": ["S1"]}))
    body["input"] = "x"
    code, payload = post(server, path, json.dumps(body).encode())
    assert code == 400
    assert payload["error"]["param"] == "guardrt.exclude_categories"
    assert payload["error"]["code"] == "unknown_key"


def test_auth_and_body_limit(engine: Engine, preparer: Preparer, server: ServerThread) -> None:
    body = chat_body()
    for token in (None, "wrong"):
        code, payload = post(server, "/chat/completions", body, token=token)
        assert code == 401
        assert payload["error"]["code"] == "invalid_api_key"
    with serving(FakeEngine(), preparer, max_message_bytes=10_000) as small:
        big = chat_body(messages=[{"role": "user", "content": "x" * 2_000_000}])
        code, payload = post(small, "/chat/completions", big, token=None)
        assert code == 413
        assert "limit" in payload["error"]["message"]


def test_engine_failure_is_a_500_without_internals(preparer: Preparer) -> None:
    engine = FakeEngine()
    engine.fail = True
    with serving(engine, preparer) as failing:
        code, payload = post(failing, "/chat/completions", chat_body(), token=None)
        assert code == 500
        assert "CUDA" not in payload["error"]["message"]
        assert payload["error"]["type"] == "server_error"


def answer_of(server: ServerThread, path: str, body: bytes, request_id: str) -> tuple[int, Any]:
    """(status, the echoed X-Request-Id, the error message) of a call that fails."""
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    request = urllib.request.Request(f"{server.base_url}{path}", body, headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(request, timeout=30)
    error = failed.value
    return error.code, (error.headers.get("X-Request-Id"), json.loads(error.read())["error"])


def test_an_error_answer_carries_the_request_id(preparer: Preparer) -> None:
    """The id a caller reports finds the server's log lines, failures included."""
    engine = FakeEngine()
    with serving(engine, preparer) as server:
        code, (echoed, error) = answer_of(server, "/chat/completions", chat_body(n=2), "r-400")
        assert (code, echoed) == (400, "r-400")
        engine.fail = True
        for path, body in (("/chat/completions", chat_body()), ("/moderations", b'{"input":"x"}')):
            code, (echoed, error) = answer_of(server, path, body, "r-500")
            assert (code, echoed) == (500, "r-500")
            assert error["message"] == "internal error on request r-500; the server log has details"


@dataclass
class Busy:
    """A server whose one engine slot is held by a call in flight (`running`) until `gate` is
    set; `ran`: the engine's batches before that call."""

    server: ServerThread
    engine: FakeEngine
    gate: threading.Event
    pool: ThreadPoolExecutor
    running: Future[tuple[int, Any]]
    ran: int


@contextmanager
def one_call_in_flight(preparer: Preparer, threads: int, **settings: Any) -> Iterator[Busy]:
    engine = FakeEngine(max_batch=1)
    engine.gate = gate = threading.Event()
    settings = {"max_batch_size": 1, "max_wait_ms": 0} | settings
    with serving(engine, preparer, **settings) as server, ThreadPoolExecutor(threads) as pool:
        engine.entered.clear()
        ran = len(engine.batches)
        running = pool.submit(post, server, "/chat/completions", chat_body(), "sk-test")
        assert engine.entered.wait(10)
        yield Busy(server, engine, gate, pool, running, ran)


def test_queue_full_is_a_429(preparer: Preparer) -> None:
    with one_call_in_flight(preparer, 2, max_queue=1) as busy:
        queued = busy.pool.submit(post, busy.server, "/chat/completions", chat_body(), None)
        time.sleep(0.3)
        code, payload = post(busy.server, "/chat/completions", chat_body(), token=None)
        assert code == 429
        assert payload["error"]["code"] == "server_overloaded"
        busy.gate.set()
        assert busy.running.result()[0] == 200
        assert queued.result()[0] == 200


def test_a_full_queue_refuses_before_the_body_is_read(preparer: Preparer) -> None:
    """With the queue full, a call is answered 429 from its headers: a client still sending a
    large image gets its answer without the server reading (or holding) the body."""
    with one_call_in_flight(preparer, 2, max_queue=1) as busy:
        queued = busy.pool.submit(post, busy.server, "/chat/completions", chat_body(), None)
        wait_until(lambda: busy.server.stack.scheduler.depth() == 1)
        with socket.create_connection(("localhost", busy.server.http_port), timeout=10) as raw:
            head = (
                "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                "Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n"
            )
            raw.sendall(head.encode() + b'{"model": "tiny-random", "messages": [')  # and no more
            answer = raw.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 429"), answer[:200]
        assert "server_overloaded" in answer
        busy.gate.set()
        assert busy.running.result()[0] == 200
        assert queued.result()[0] == 200


def test_a_refused_moderations_call_leaves_no_work_behind(preparer: Preparer) -> None:
    """Three inputs, two free places in the queue: the call is a 429 and the two inputs queued
    before the third was refused are dropped unrun, not judged for an answer nobody gets."""
    with one_call_in_flight(preparer, 2, max_queue=3) as busy:
        server = busy.server
        queued = busy.pool.submit(post, server, "/chat/completions", chat_body())
        wait_until(lambda: server.stack.scheduler.depth() == 1)
        code, payload = post(server, "/moderations", b'{"input": ["a", "b", "c"]}')
        assert code == 429
        assert payload["error"]["code"] == "server_overloaded"
        assert server.stack.scheduler.depth() == 1  # the other call's, still queued
        busy.gate.set()
        assert busy.running.result()[0] == 200
        assert queued.result()[0] == 200
        assert len(busy.engine.batches) == busy.ran + 2  # the two calls, none of the three


def test_more_moderation_inputs_than_the_queue_holds_is_a_400(preparer: Preparer) -> None:
    with serving(FakeEngine(), preparer, max_queue=2) as server:
        code, payload = post(server, "/moderations", b'{"input": ["a", "b", "c"]}')
        assert code == 400  # never a 429: no retry could succeed
        assert "the call has 3 inputs; this server queues at most 2" in payload["error"]["message"]
        assert post(server, "/moderations", b'{"input": ["a", "b"]}')[0] == 200


def post_with(
    server: ServerThread, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, Any]:
    """`post` with extra headers (and the test token)."""
    return post(server, path, body, "sk-test", headers)


def wait_until(condition: Any, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def test_an_error_verdict_fails_closed_over_http(preparer: Preparer) -> None:
    """The model writes `safe`, then more text: outside the grammar, so an error. No reading
    of the chat answer may take it for `safe`; moderations flag it; the text is kept."""
    with serving(FakeEngine(generated=(*SAFE, 271, 19193)), preparer) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test")
        messages: Any = USER_X
        chat = client.chat.completions.create(model=GUARD, messages=messages)
        content = chat.choices[0].message.content
        assert content == "unsafe"
        extension = chat.model_extra["guardrt"]  # type: ignore[index]
        assert extension["label"] == "error"
        assert extension["error"]
        assert extension["raw_output"].startswith("\n\nsafe<|eot_id|>")
        chunks = client.chat.completions.create(model=GUARD, messages=messages, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "unsafe"
        result = client.moderations.create(input="x").results[0]
        assert result.flagged is True
        assert result.model_extra["guardrt"]["label"] == "error"  # type: ignore[index]


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf", "1e9"])
def test_a_bad_timeout_header_is_a_400(server: ServerThread, value: str) -> None:
    for name in ("X-Request-Timeout", "X-Stainless-Read-Timeout"):
        for path, body in (("/chat/completions", chat_body()), ("/moderations", b'{"input":"x"}')):
            code, payload = post_with(server, path, body, {name: value})
            assert code == 400, (name, value, path)
            assert payload["error"]["param"] == name
            assert repr(value) in payload["error"]["message"]


@pytest.mark.parametrize("header", ["X-Request-Timeout", "X-Stainless-Read-Timeout"])
def test_a_call_whose_timeout_passes_in_the_queue_is_a_504_and_never_runs(
    preparer: Preparer, header: str
) -> None:
    with one_call_in_flight(preparer, 3) as busy:
        server = busy.server
        late = busy.pool.submit(
            post_with, server, "/chat/completions", chat_body(), {header: "0.2"}
        )
        patient = busy.pool.submit(
            post_with, server, "/moderations", b'{"input":"x"}', {header: "60"}
        )
        wait_until(lambda: server.stack.scheduler.depth() == 2)
        time.sleep(0.4)  # the first call's timeout passes while it waits
        busy.gate.set()
        assert busy.running.result()[0] == 200
        code, payload = late.result()
        assert code == 504
        assert payload["error"]["code"] == "timeout"
        assert patient.result()[0] == 200
        assert len(busy.engine.batches) == busy.ran + 2  # the late call never reached the engine


def test_draining_takes_calls_in_the_delay_and_answers_those_in_flight(
    preparer: Preparer,
) -> None:
    """After SIGTERM /readyz says 503 at once; a call sent in the drain delay (a load balancer
    that has not noticed yet) is still taken, as gRPC takes it; calls in flight are answered
    after the sites close."""
    with one_call_in_flight(preparer, 2, grace_s=10) as busy:
        server = busy.server
        server.stop(delay=3.0)  # the drain begins; the sites close 3 s later (a loaded CI)
        wait_until(lambda: not server.stack.ready)
        assert get(server, "/readyz")[0] == 503
        during = busy.pool.submit(post, server, "/chat/completions", chat_body())
        wait_until(lambda: server.stack.service.scheduler.depth() == 1)  # taken: queued
        wait_until(lambda: not server.stack.accepting)
        time.sleep(0.3)  # the sites have closed: the calls in flight are still answered
        busy.gate.set()
        for call in (busy.running, during):
            code, payload = call.result()
            assert code == 200
            assert payload["choices"][0]["message"]["content"] == "safe"


def test_once_the_delay_is_over_new_calls_are_refused_with_503(preparer: Preparer) -> None:
    """A call that still reaches the HTTP API after the drain delay (on a connection kept
    open) is refused 503 `shutting_down`, as gRPC refuses it UNAVAILABLE."""
    with serving(FakeEngine(), preparer) as server:
        server.stack.accepting = False  # where the drain delay leaves it
        try:
            for path, body in (
                ("/chat/completions", chat_body()),
                ("/moderations", b'{"input":1}'),
            ):
                code, payload = post(server, path, body)
                assert code == 503, path
                assert payload["error"]["code"] == "shutting_down"
            assert get(server, "/readyz")[0] == 200  # what /readyz says is `ready`'s
        finally:
            server.stack.accepting = True


def test_a_caller_that_disconnects_takes_its_queued_call_with_it(preparer: Preparer) -> None:
    with one_call_in_flight(preparer, 1) as busy:
        server = busy.server
        body = chat_body()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer sk-test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection(("localhost", server.http_port)) as caller:
            caller.sendall(head.encode() + body)
            wait_until(lambda: server.stack.scheduler.depth() == 1)
        wait_until(lambda: server.stack.scheduler.depth() == 0)  # dropped, not run
        busy.gate.set()
        assert busy.running.result()[0] == 200
        assert post(server, "/chat/completions", chat_body())[0] == 200
        assert len(busy.engine.batches) == busy.ran + 2  # the first and the last, not the abandoned


def test_the_request_id_header_is_taken_and_echoed(server: ServerThread) -> None:
    def call(path: str, body: bytes, headers: dict[str, str]) -> tuple[str, Any]:
        every = {"Content-Type": "application/json", "Authorization": "Bearer sk-test"} | headers
        request = urllib.request.Request(f"{server.base_url}{path}", body, every, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.headers["X-Request-Id"], json.loads(response.read())

    echoed, chat = call("/chat/completions", chat_body(), {"X-Request-Id": "trace-7/a"})
    assert echoed == "trace-7/a"
    assert chat["id"] == "chatcmpl-trace-7/a"
    assert chat["guardrt"]["request_id"] == "trace-7/a"
    echoed, moderation = call("/moderations", b'{"input": ["a", "b"]}', {"X-Request-Id": "m-1"})
    assert echoed == "m-1"
    assert [r["guardrt"]["request_id"] for r in moderation["results"]] == ["m-1-0", "m-1-1"]
    made, chat = call("/chat/completions", chat_body(), {})
    assert len(made) == 32
    assert chat["id"] == f"chatcmpl-{made}"
    code, payload = post_with(server, "/chat/completions", chat_body(), {"X-Request-Id": "a b"})
    assert code == 400
    assert "character 1 is U+0020" in payload["error"]["message"]


@pytest.mark.parametrize("path", ["/chat/completions", "/moderations"])
def test_a_large_body_is_decoded_off_the_event_loop(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """An image in base64 (tens of ms of JSON and base64 decoding for a photo) is decoded on a
    preparation thread, not on the event loop every other call's answer waits on; a small
    body stays on the loop (a thread hop would cost more than its parsing)."""
    from guardrt.runtime.server import openai_compat  # noqa: PLC0415

    threads: list[str] = []
    for name in ("parse_chat", "parse_moderations"):
        original = getattr(openai_compat, name)

        def recorded(*args: Any, _original: Any = original) -> Any:
            threads.append(threading.current_thread().name)
            return _original(*args)

        monkeypatch.setattr(openai_compat, name, recorded)
    picture = jpeg(size=(400, 300)) + b"\0" * 100_000  # trailing bytes: over 64 KiB in base64
    image = {"type": "image_url", "image_url": {"url": data_url(picture)}}
    parts: list[object] = [{"type": "text", "text": "Hi."}, image]
    bodies: list[dict[str, object]]
    if path == "/chat/completions":
        bodies = [
            {"model": "tiny-random", "messages": [{"role": "user", "content": "Hi."}]},
            {"model": "tiny-random", "messages": [{"role": "user", "content": parts}]},
        ]
    else:
        bodies = [{"input": "Hi."}, {"input": parts}]
    for body in bodies:
        status, answer = post(server, path, json.dumps(body).encode())
        assert status == 200, answer
    loop_thread = server._thread.name
    assert threads[0] == loop_thread
    assert threads[1].startswith("guardrt-prepare"), threads


def test_the_request_storage_keys_do_not_warn() -> None:
    """aiohttp ≥ 3.14 warns (NotAppKeyWarning, in the user's logs) on plain string keys of a
    request's storage: the server's keys are typed where aiohttp has them."""
    from aiohttp.test_utils import make_mocked_request  # noqa: PLC0415

    from guardrt.runtime.server import http_server  # noqa: PLC0415

    request = make_mocked_request("POST", "/v1/chat/completions")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        request[http_server._REQUEST_ID_KEY] = "id"
        request[http_server._BODY_KEY] = None
    assert request.get(http_server._REQUEST_ID_KEY) == "id"
