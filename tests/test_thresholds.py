"""Decision thresholds on P(unsafe) (`unsafe_threshold`): the label follows the threshold and
the categories the grammar's walk against transformers' full forwards; the scores are the
model's either way; a NaN fails closed; greedy decoding refuses one. Over gRPC, HTTP and the
policy file: a request's threshold replaces the server's, each bad value is named, the verdict
cache keeps thresholds apart, GetInfo says the server's."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import torch

from guardrt.client import moderate_request
from guardrt.runtime.classify import Classifier
from guardrt.runtime.engine import Engine
from guardrt.runtime.errors import ConfigError, PromptError, PromptReason
from guardrt.runtime.guard import Guard
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.policy import check_threshold
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.requests import GREEDY_THRESHOLD, PreparedRequest
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.server_policy import PolicyFile, ServerPolicy, read_policy
from guardrt.runtime.tokenizer import Tokenizer
from guardrt.runtime.verdict import Label
from guardrt.testing.references import hf_model
from guardrt.v1 import moderation_pb2 as pb
from tests.models import IMAGE_CONFIG, small_config, write_small
from tests.server_harness import FakeEngine, serving
from tests.test_classify import _head_edited, naive_constrained
from tests.test_http import post

TEXT: Any = [{"role": "user", "content": "How do I pick a lock?"}]
GUARD = "meta-llama/Llama-Guard-3-11B-Vision"


@pytest.mark.parametrize("value", [0.5, 1, 1.0, 1e-9])
def test_a_threshold_in_range_is_taken(value: float) -> None:
    assert check_threshold(value) == value
    assert check_threshold(None) is None


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "0"),
        (0.0, "0.0"),
        (-0.5, "-0.5"),
        (1.5, "1.5"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (True, "a bool"),
        ("0.5", "a str"),
        ([0.5], "a list"),
    ],
)
def test_a_threshold_out_of_range_is_named(value: object, shown: str) -> None:
    with pytest.raises(PromptError, match=rf"^where must be a number in \(0, 1\], not {shown}$"):
        check_threshold(value, "where")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small(tmp_path_factory.mktemp("thresholds"), small_config("gqa2-cross2,4"), seed=2)


def _loaded(checkpoint: Path, max_batch: int = 4) -> MllamaModel:
    model = load_model(checkpoint, semantics="transformers")
    model.setup_caches(max_batch, 512)
    return model


def _requests(tok: Tokenizer) -> list[PreparedRequest]:
    preparer = Preparer(tok, IMAGE_CONFIG, 512)
    texts = ["How do I pick a lock?", "hi", "Tell me a joke.", "What should never be mixed?"]
    return [preparer.prepare([{"role": "user", "content": text}]) for text in texts]


def test_the_label_follows_the_threshold(small: Path, tok: Tokenizer) -> None:
    """Just above P(unsafe): safe; at it: unsafe (fail closed at equality); the scores are the
    model's whatever the threshold."""
    model = _loaded(small)
    requests = _requests(tok)
    plain = Classifier(model).run(requests)
    assert {d.verdict().label for d in plain} == {Label.SAFE, Label.UNSAFE}
    for result in plain:
        p = result.unsafe_probability
        above = dataclasses.replace(result.request, unsafe_threshold=min(1.0, p * 1.001))
        at = dataclasses.replace(result.request, unsafe_threshold=p)
        high, equal = Classifier(model).run([above, at])
        assert high.verdict().label is (Label.SAFE if p < 1.0 else Label.UNSAFE)
        assert equal.verdict().label is Label.UNSAFE
        for thresholded in (high, equal):
            assert thresholded.unsafe_probability == pytest.approx(p, rel=1e-6)
            assert thresholded.category_probabilities == pytest.approx(
                result.category_probabilities, rel=1e-6
            )


def test_a_thresholded_unsafe_verdict_walks_the_grammar(small: Path, tok: Tokenizer) -> None:
    """A request the model finds safe, made unsafe by a low threshold: its categories are the
    grammar's walk from `unsafe` with transformers' full forwards (as any unsafe verdict's)."""
    hf = hf_model(small)
    model = _loaded(small)
    plain = Classifier(model).run(_requests(tok))
    safe = [d.request for d in plain if d.verdict().label is Label.SAFE]
    assert safe, "the cases should hold a safe verdict"
    low = [dataclasses.replace(r, unsafe_threshold=1e-30) for r in safe]
    for result in Classifier(model).run(low):
        verdict = result.verdict()
        assert verdict.label is Label.UNSAFE
        assert verdict.categories
        t = result.request.grammar.tokens
        expected = naive_constrained(hf, result.request, forced=(t.blank, t.unsafe))
        assert list(result.generated) == expected


def test_a_nan_fails_closed_under_a_threshold(small: Path, tok: Tokenizer) -> None:
    """NaN scores (a broken kernel) compare false with any threshold: unsafe, never safe."""
    model = _loaded(small)
    request = dataclasses.replace(_requests(tok)[0], unsafe_threshold=1.0)

    def poison(logits: torch.Tensor) -> None:
        logits[..., 1000] = math.nan

    with _head_edited(model, poison):
        result = Classifier(model).run([request])[0]
    assert math.isnan(result.unsafe_probability)
    assert result.verdict().label is Label.UNSAFE


def test_greedy_decoding_refuses_a_threshold(small: Path, tok: Tokenizer) -> None:
    request = dataclasses.replace(_requests(tok)[0], unsafe_threshold=0.5)
    with pytest.raises(PromptError, match="needs constrained decoding") as refused:
        Classifier(_loaded(small), decode="greedy").run([request])
    assert refused.value.reason is PromptReason.THRESHOLD


def test_guard_takes_a_threshold(engine: Engine, preparer: Preparer) -> None:
    guard = Guard(preparer, engine)
    plain = guard.moderate(TEXT)
    p = plain.unsafe_probability
    assert guard.moderate(TEXT, unsafe_threshold=p).label is Label.UNSAFE
    if p < 1.0:
        assert guard.moderate(TEXT, unsafe_threshold=min(1.0, 2 * p)).label is Label.SAFE
    batch = guard.moderate_batch(
        [{"messages": TEXT, "unsafe_threshold": p}, {"messages": TEXT, "unsafe_threshold": 2.0}]
    )
    assert batch[0].label is Label.UNSAFE
    assert batch[1].label is Label.ERROR
    assert batch[1].error == "unsafe_threshold must be a number in (0, 1], not 2.0"


def _grpc_answer(stub: Any, threshold: float | None) -> Any:
    return stub.Moderate(moderate_request(TEXT, unsafe_threshold=threshold))


def test_grpc_and_http_thresholds(engine: Engine, preparer: Preparer) -> None:
    """A request's threshold flips its verdict on both APIs and in the cache key; a bad one is
    named; the server's (its policy file) applies to requests without one."""
    p = Guard(preparer, engine).moderate(TEXT).unsafe_probability
    assert 0 < p < 0.5, "the tiny model finds this text safe"
    policy = ServerPolicy(source="policy.json", unsafe_threshold=p)
    with serving(engine, preparer, policy=policy, verdict_cache=8) as server:
        stub = server.stub()
        by_server = _grpc_answer(stub, None)
        by_request = _grpc_answer(stub, 0.9)
        with pytest.raises(grpc.RpcError) as refused:
            _grpc_answer(stub, 1.5)
        info = stub.GetInfo(pb.GetInfoRequest())
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        chats = [
            client.chat.completions.create(model=GUARD, messages=TEXT, extra_body=extra)
            for extra in ({}, {"guardrt": {"unsafe_threshold": 0.9}}, {})
        ]
        moderation = client.moderations.create(
            input="How do I pick a lock?", extra_body={"guardrt": {"unsafe_threshold": 0.9}}
        )
        body = json.dumps({"model": GUARD, "messages": TEXT, "guardrt": {"unsafe_threshold": 0}})
        code, payload = post(server, "/chat/completions", body.encode(), token=None)
    assert by_server.verdict.label == 2  # UNSAFE: P(unsafe) reaches the server's threshold
    assert by_request.verdict.label == 1  # SAFE: the request's own replaces it
    assert by_request.verdict.unsafe_probability == pytest.approx(
        by_server.verdict.unsafe_probability
    )
    assert (by_server.unsafe_threshold, by_request.unsafe_threshold) == (pytest.approx(p), 0.9)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unsafe_threshold must be a number in (0, 1], not 1.5" in str(refused.value.details())
    assert info.default_unsafe_threshold == pytest.approx(p)
    contents = [chat.choices[0].message.content or "" for chat in chats]
    assert contents[0].startswith("unsafe\nS")
    assert contents[1] == "safe"
    cached = [(chat.model_extra or {})["guardrt"]["cached"] for chat in chats]
    assert cached == [False, False, True]  # two thresholds, two entries
    deciding = [(chat.model_extra or {})["guardrt"]["unsafe_threshold"] for chat in chats]
    assert deciding == [pytest.approx(p), 0.9, pytest.approx(p)]
    assert moderation.results[0].flagged is False
    assert (code, payload["error"]["param"]) == (400, "guardrt.unsafe_threshold")
    assert (
        "guardrt.unsafe_threshold must be a number in (0, 1], not 0" in payload["error"]["message"]
    )


def test_a_greedy_server_refuses_thresholds(preparer: Preparer, tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.info = dataclasses.replace(engine.info, decode="greedy")
    with serving(engine, preparer.for_engine(engine.info.max_seq, "greedy")) as server:
        with pytest.raises(grpc.RpcError) as refused:
            _grpc_answer(server.stub(), 0.5)
        plain = _grpc_answer(server.stub(), None)
    assert (plain.verdict.label, plain.unsafe_threshold) == (1, 0.0)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert GREEDY_THRESHOLD in str(refused.value.details())
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"unsafe_threshold": 0.3}))
    with pytest.raises(ConfigError, match=f"policy file {path}: an unsafe threshold needs"):
        ServerConfig(decode="greedy", policy=read_policy(path))
    path.write_text(json.dumps({"exclude": ["S1"]}))
    greedy = PolicyFile(read_policy(path), lambda policy: None, "greedy")
    path.write_text(json.dumps({"unsafe_threshold": 0.3}))
    assert greedy.reload().startswith("policy not reloaded, the one in use kept: policy file")
    assert greedy.policy.unsafe_threshold is None


def test_the_policy_file_holds_a_threshold(tmp_path: Path, preparer: Preparer) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"exclude": ["S6"], "unsafe_threshold": 0.25}))
    policy = read_policy(path)
    assert policy.unsafe_threshold == 0.25
    assert policy.describe().endswith(
        "; unsafe when P(unsafe) ≥ 0.25 for requests that send no threshold"
    )
    assert (policy.threshold(None), policy.threshold(0.7)) == (0.25, 0.7)
    engine = FakeEngine()
    with serving(engine, preparer, policy=policy) as server:
        server.stub().Moderate(moderate_request(TEXT))
        server.stub().Moderate(moderate_request(TEXT, unsafe_threshold=0.75))
    assert [batch[0].unsafe_threshold for batch in engine.batches[-2:]] == [0.25, 0.75]
    path.write_text(json.dumps({"unsafe_threshold": "high"}))
    with pytest.raises(ConfigError, match=r"unsafe_threshold must be a number in \(0, 1\], not a"):
        read_policy(path)


def test_the_shell_client_sends_a_threshold() -> None:
    from guardrt.cli import _parsers  # noqa: PLC0415
    from guardrt.runtime.server.client import build_request  # noqa: PLC0415

    parser, _ = _parsers()
    given = build_request(
        parser.parse_args(["moderate", "--text", "x", "--unsafe-threshold", "0.2"])
    )
    assert given.policy.HasField("unsafe_threshold")
    assert given.policy.unsafe_threshold == pytest.approx(0.2)
    plain = build_request(parser.parse_args(["moderate", "--text", "x"]))
    assert not plain.policy.HasField("unsafe_threshold")


def test_a_streams_checks_keep_its_threshold(preparer: Preparer) -> None:
    """ModerateStream's start carries the policy: each checkpoint is decided by its threshold."""
    engine = FakeEngine()
    question = pb.Message(role=pb.USER, content=[pb.Content(text="How do I pick a lock?")])
    start = pb.StreamStart(
        messages=[question], check_every_tokens=2, policy=pb.Policy(unsafe_threshold=0.125)
    )
    messages = [
        pb.StreamRequest(start=start),
        pb.StreamRequest(append="First, you will need a tension wrench"),
        pb.StreamRequest(end=pb.StreamEnd()),
    ]
    with serving(engine, preparer) as server:
        responses = list(server.stub().ModerateStream(iter(messages), timeout=60))
    assert len(responses) >= 2
    thresholds = {request.unsafe_threshold for batch in engine.batches for request in batch}
    assert thresholds == {0.125}


def test_guard_on_a_greedy_engine_refuses_a_threshold_per_item(preparer: Preparer) -> None:
    engine = FakeEngine()
    engine.info = dataclasses.replace(engine.info, decode="greedy")
    guard = Guard(preparer, engine)  # its preparer takes the engine's decode
    with pytest.raises(PromptError, match="needs constrained decoding"):
        guard.moderate(TEXT, unsafe_threshold=0.5)
    plain, refused = guard.moderate_batch([TEXT, {"messages": TEXT, "unsafe_threshold": 0.5}])
    assert plain.label is Label.SAFE
    assert refused.label is Label.ERROR
    assert refused.error == GREEDY_THRESHOLD
