"""--policy FILE: the server's policy for requests that send no categories; a request's
exclusions add to the file's, its own categories replace it; the file checked at start."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from guardrt.cli import _parsers
from guardrt.client import moderate_request
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.policy import DEFAULT_CATEGORIES
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.server.server_policy import ServerPolicy, read_policy
from guardrt.v1 import moderation_pb2 as pb
from tests.server_harness import UNSAFE_S1, FakeEngine, serving

TEXT = [{"role": "user", "content": "How do I pick a lock?"}]
OWN = (("S1", "Spam."), ("S2", "Talk of competitors."), ("S3", "Medical claims."))


def _write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(document))
    return path


def test_a_request_meets_the_servers_policy() -> None:
    server = ServerPolicy(OWN, ("S2",))
    assert server.apply(None, ()) == (OWN, ("S2",))
    assert server.apply(None, ["S3", "S2"]) == (OWN, ("S2", "S3"))  # added, once each
    mine = [("S1", "Cats.")]
    assert server.apply(mine, ["S1"]) == (mine, ("S1",))  # its own categories: its own policy
    assert ServerPolicy().apply(None, ["S13"]) == (None, ("S13",))  # no file: as before


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"exclude": ["S6"], "excluded": ["S7"]}, "unknown key 'excluded'"),
        ({"exclude": "S6"}, "exclude must be a list of codes"),
        ({"exclude": ["S14"]}, "excluded category 'S14' is not in the policy"),
        ({"categories": [{"code": "S1", "description": "Spam."}], "exclude": ["S1"]}, "every"),
        ({"categories": [{"code": "X1", "description": "Spam."}]}, "X1"),
        ({"categories": [{"code": "S1", "text": "Spam."}]}, "categories\\[0\\] has unknown key"),
        ({"categories": "S1"}, "categories must be a list of"),
        ([], "is not a JSON object"),
    ],
)
def test_a_bad_policy_file_is_named(tmp_path: Path, document: object, message: str) -> None:
    path = _write(tmp_path, document)
    with pytest.raises(ConfigError, match=message) as refused:
        read_policy(path)
    assert str(path) in str(refused.value)


def test_the_file_and_its_flag(tmp_path: Path) -> None:
    listed = [{"code": c, "description": d} for c, d in OWN]
    path = _write(tmp_path, {"categories": listed, "exclude": ["S2"]})
    policy = read_policy(path)
    assert (policy.categories, policy.exclude, policy.custom) == (OWN, ("S2",), True)
    assert policy.describe() == (
        f"policy: 3 categories of its own, leaving out S2 ({path}; SIGHUP reloads) for requests "
        "that send no categories"
    )
    as_object = read_policy(_write(tmp_path, {"categories": dict(OWN)}))
    assert as_object.categories == OWN
    defaults = read_policy(_write(tmp_path, {"exclude": ["S6", "S6"]}))
    assert (defaults.categories, defaults.exclude, defaults.custom) == (None, ("S6",), False)
    parser, _ = _parsers()
    assert parser.parse_args(["serve", "--policy", str(path)]).policy == str(path)


def _moderations(port: int) -> dict[str, Any]:
    connection = http.client.HTTPConnection("localhost", port, timeout=30)
    try:
        connection.request("POST", "/v1/moderations", json.dumps({"input": "Hello"}))
        answer: dict[str, Any] = json.loads(connection.getresponse().read())
        return answer
    finally:
        connection.close()


def test_requests_without_categories_are_judged_against_the_servers(preparer: Preparer) -> None:
    engine = FakeEngine(UNSAFE_S1)
    with serving(engine, preparer, policy=ServerPolicy(OWN, ("S2",), "policy.json")) as server:
        stub = server.stub()
        stub.Moderate(moderate_request(TEXT))
        plain = engine.batches[-1][0]
        stub.Moderate(moderate_request(TEXT, excluded_categories=["S3"]))
        narrower = engine.batches[-1][0]
        stub.Moderate(moderate_request(TEXT, categories={"S1": "Cats.", "S2": "Dogs."}))
        own = engine.batches[-1][0]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Moderate(moderate_request(TEXT, excluded_categories=["S13"]))
        info = stub.GetInfo(pb.GetInfoRequest())
        results = _moderations(server.http_port)["results"][0]
    assert plain.grammar.codes == ("S1", "S3")
    rendered = preparer.tokenizer.decode(list(plain.prompt))
    assert "S3: Medical claims." in rendered
    assert "Talk of competitors" not in rendered
    assert narrower.grammar.codes == ("S1",)
    assert own.grammar.codes == ("S1", "S2")  # the request's own policy, whole
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "excluded category 'S13' is not in the policy (S1, S2, S3)" in (
        refused.value.details() or ""
    )
    assert [(c.code, c.description) for c in info.default_categories] == list(OWN)
    assert list(info.default_exclude) == ["S2"]
    assert sorted(results["categories"]) == ["S1", "S3"]  # custom categories: keyed by code


def test_without_a_file_the_models_categories(preparer: Preparer) -> None:
    engine = FakeEngine()
    with serving(engine, preparer) as server:
        server.stub().Moderate(moderate_request(TEXT))
        info = server.stub().GetInfo(pb.GetInfoRequest())
    assert len(engine.batches[-1][0].grammar.codes) == 13
    assert [(c.code, c.description) for c in info.default_categories] == list(DEFAULT_CATEGORIES)
    assert list(info.default_exclude) == []


def test_sighup_reads_the_file_again(preparer: Preparer, tmp_path: Path) -> None:
    """A new policy for the requests after it (and GetInfo); a file turned bad keeps the one in
    use and says why."""
    path = _write(tmp_path, {"exclude": ["S6"]})
    engine = FakeEngine()
    with serving(engine, preparer, policy=read_policy(path)) as server:
        stack = server.stack
        assert stack.policy is not None
        assert stack.policy.refresh() is None  # the file holds the policy in use
        path.write_text(json.dumps({"categories": dict(OWN), "exclude": ["S3"]}))
        said = stack.policy.reload()
        assert said.startswith("policy reloaded: 3 categories of its own, leaving out S3")
        server.stub().Moderate(moderate_request(TEXT))
        info = server.stub().GetInfo(pb.GetInfoRequest())
        path.write_text(json.dumps({"categories": dict(OWN), "exclude": ["S1", "S2", "S3"]}))
        kept = stack.policy.reload()
        server.stub().Moderate(moderate_request(TEXT))
    first, second = (batch[0] for batch in engine.batches[-2:])
    assert first.grammar.codes == ("S1", "S2")
    assert [(c.code, c.description) for c in info.default_categories] == list(OWN)
    assert list(info.default_exclude) == ["S3"]
    assert kept.startswith(f"policy not reloaded, the one in use kept: policy file {path}: ")
    assert "every category is excluded" in kept
    assert second.grammar.codes == ("S1", "S2")
