"""`guardrt.client.ModerationClient`: the Python API's messages over gRPC give the verdicts
`Guard` gives in-process; refusals raise with their status; calls refused at once are retried;
a label the client does not know is never read as safe."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from guardrt.client import (
    AsyncModerationClient,
    CallError,
    ModerationClient,
    StreamCheck,
    moderate_request,
    verdict_from_proto,
)
from guardrt.runtime.engine import Engine
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.guard import Guard
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.verdict import Label, Verdict
from guardrt.v1 import moderation_pb2 as pb
from guardrt.v1 import moderation_pb2_grpc as pb_grpc
from tests.server_harness import UNSAFE_S1, FakeEngine, ServerThread, serving
from tests.test_server import jpeg


@pytest.fixture(scope="module")
def server(engine: Engine, preparer: Preparer) -> Iterator[ServerThread]:
    with serving(engine, preparer, auth_tokens=frozenset({"s3cret"})) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[ModerationClient]:
    with ModerationClient(f"localhost:{server.port}", token="s3cret") as connected:
        yield connected


def test_verdicts_equal_the_python_apis(
    client: ModerationClient, engine: Engine, preparer: Preparer, tmp_path: Path
) -> None:
    guard = Guard(preparer, engine)
    picture = jpeg(seed=3, size=(120, 80))
    path = tmp_path / "photo.jpg"
    path.write_bytes(picture)
    pil = Image.fromarray(np.full((64, 48, 3), 200, np.uint8))
    conversations: list[tuple[list[dict[str, Any]], dict[str, Any]]] = [
        ([{"role": "user", "content": "How do I pick a lock?"}], {}),
        (
            [
                {"role": "user", "content": [{"type": "image", "image": picture}]},
                {"role": "assistant", "content": "A bicycle."},
            ],
            {"excluded_categories": ["S1", "S13"]},
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi."}, {"type": "image", "image": path}],
                }
            ],
            {"categories": {"S1": "Spam.", "S2": "Scams."}},
        ),
        ([{"role": "user", "content": [{"type": "image", "image": pil}]}], {}),
    ]
    for messages, policy in conversations:
        remote = client.moderate(messages, **policy)
        local_messages = [
            {**m, "content": [_decoded(p) for p in m["content"]]}
            if isinstance(m["content"], list)
            else m
            for m in messages
        ]
        local = guard.moderate(local_messages, **policy)
        assert (remote.label, remote.categories) == (local.label, local.categories)
        assert remote.unsafe_probability == pytest.approx(local.unsafe_probability, rel=1e-5)
        assert remote.category_probabilities == pytest.approx(
            local.category_probabilities, rel=1e-5
        )
        assert list(remote.category_probabilities) == list(local.category_probabilities)
        assert remote.label_probability == pytest.approx(local.label_probability, rel=1e-5)
        assert remote.raw_output == local.raw_output


def _image(image: object) -> dict[str, Any]:
    return {"type": "image", "image": image}


def _decoded(part: dict[str, Any]) -> dict[str, Any]:
    """The part as Guard reads it: a PIL image sent as PNG is the same pixels."""
    image = part.get("image")
    if isinstance(image, Image.Image):
        return {**part, "image": np.asarray(image)}
    return part


def test_refusals_raise_with_their_status(server: ServerThread, client: ModerationClient) -> None:
    with pytest.raises(CallError) as refused:
        client.moderate([{"role": "assistant", "content": "x"}])
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 0 has role 'assistant'" in str(refused.value)
    anonymous = ModerationClient(f"localhost:{server.port}")  # no token
    with anonymous, pytest.raises(CallError) as denied:
        anonymous.moderate([{"role": "user", "content": "Hi."}])
    assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(ConfigError, match=r"message 0 part 0: cannot read image /nowhere\.png"):
        client.moderate([{"role": "user", "content": [{"type": "image", "image": "/nowhere.png"}]}])
    with pytest.raises(ConfigError, match="message 1: role must be 'user' or 'assistant'"):
        client.moderate([{"role": "user", "content": "Hi."}, {"role": "system", "content": "x"}])
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        ModerationClient("localhost:1", tls_ca=b"", tls_cert=b"")


def test_many_requests_over_one_stream(client: ModerationClient) -> None:
    requests = [
        moderate_request([{"role": "user", "content": f"question {i}"}], request_id=f"q{i}")
        for i in range(6)
    ]
    requests.append(moderate_request([{"role": "assistant", "content": "x"}], request_id="bad"))
    answers = dict(client.moderate_many(requests))
    assert sorted(answers) == sorted([f"q{i}" for i in range(6)] + ["bad"])
    assert answers["bad"].label == Label.ERROR
    assert "message 0 has role 'assistant'" in (answers["bad"].error or "")
    assert math.isnan(answers["bad"].unsafe_probability)  # not computed: not 0
    assert all(answers[f"q{i}"].label != Label.ERROR for i in range(6))
    assert client.info().backend == "torch"


class _Busy(pb_grpc.ModerationServicer):
    """Refuses the first `refusals` calls RESOURCE_EXHAUSTED (a full queue), then answers."""

    def __init__(self, refusals: int) -> None:
        self.refusals, self.calls = refusals, 0

    def Moderate(self, request: pb.ModerateRequest, context: Any) -> pb.ModerateResponse:  # noqa: N802
        self.calls += 1
        if self.calls <= self.refusals:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the request queue is full (1)")
        return pb.ModerateResponse(verdict=pb.Verdict(label=pb.SAFE, unsafe_probability=0.1))


@pytest.mark.parametrize(("retries", "answered"), [(3, True), (0, False)])
def test_calls_refused_at_once_are_retried(retries: int, answered: bool) -> None:
    busy = _Busy(refusals=2)  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_ModerationServicer_to_server(busy, server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        with ModerationClient(f"localhost:{port}", retries=retries, timeout=10) as client:
            messages = [{"role": "user", "content": "Hi."}]
            if answered:
                assert client.moderate(messages).label == Label.SAFE
            else:
                with pytest.raises(CallError) as refused:
                    client.moderate(messages)
                assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(None)
    assert busy.calls == (3 if answered else 1)


def test_a_label_the_client_does_not_know_is_an_error_not_safe() -> None:
    for label in (pb.LABEL_UNSPECIFIED, 7):  # unset, or a newer server's
        verdict = verdict_from_proto(pb.Verdict(label=label, unsafe_probability=0.01))  # type: ignore[arg-type]
        assert verdict.label == Label.ERROR
        assert verdict.content == "unsafe"  # fails closed for a client reading the text
        assert verdict.error is not None


def test_the_client_imports_neither_torch_nor_numpy() -> None:
    """A service calling the server needs grpcio and protobuf, not the model's stack."""
    code = (
        "import sys, guardrt.client; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_async_client_gives_the_same_verdicts(
    server: ServerThread, client: ModerationClient
) -> None:
    """asyncio services await the same calls: concurrent calls on one channel, a stream fed
    by an async generator, refusals raised with their status."""
    conversations = [[{"role": "user", "content": f"question number {i}"}] for i in range(6)]
    expected = [client.moderate(messages) for messages in conversations]

    async def main() -> tuple[list[Verdict], dict[str, Verdict], CallError, str]:
        async with AsyncModerationClient(f"localhost:{server.port}", token="s3cret") as remote:
            together = await asyncio.gather(*(remote.moderate(m) for m in conversations))

            async def requests() -> AsyncIterator[pb.ModerateRequest]:
                for i, messages in enumerate(conversations):
                    yield moderate_request(messages, request_id=f"m{i}")

            many = {request_id: v async for request_id, v in remote.moderate_many(requests())}
            try:
                await remote.moderate([{"role": "assistant", "content": "x"}])
            except CallError as exc:
                refused = exc
            return list(together), many, refused, (await remote.info()).backend

    together, many, refused, backend = asyncio.run(main())
    for i, verdict in enumerate(expected):
        for remote in (together[i], many[f"m{i}"]):
            assert (remote.label, remote.categories) == (verdict.label, verdict.categories)
            assert remote.unsafe_probability == pytest.approx(verdict.unsafe_probability)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert backend == "torch"


def test_an_answer_checked_while_it_is_generated(
    server: ServerThread, client: ModerationClient
) -> None:
    """Checkpoints as the answer grows, and a final verdict equal to moderating the whole
    conversation at once."""
    question = [{"role": "user", "content": "How do I bake bread?"}]
    answer = "Mix flour, water, salt and yeast; knead, let it rise, shape it and bake it hot."

    async def main() -> tuple[list[StreamCheck], StreamCheck]:
        async with (
            AsyncModerationClient(f"localhost:{server.port}", token="s3cret") as remote,
            remote.stream(question, check_every_tokens=4) as stream,
        ):
            for start in range(0, len(answer), 7):  # split mid-word
                await stream.append(answer[start : start + 7])
            final = await stream.end()
            return list(stream.checks), final

    checks, final = asyncio.run(main())
    whole = client.moderate([*question, {"role": "assistant", "content": answer}])
    assert final.final
    assert final.covered_chars == len(answer)
    assert (final.verdict.label, final.verdict.categories) == (whole.label, whole.categories)
    assert final.verdict.unsafe_probability == pytest.approx(whole.unsafe_probability, rel=1e-4)
    assert len(checks) >= 3  # checkpoints on the way, then the final
    assert [c.final for c in checks] == [False] * (len(checks) - 1) + [True]
    assert [c.covered_chars for c in checks] == sorted(c.covered_chars for c in checks)


def test_a_stream_stopped_at_unsafe_sends_nothing_more(preparer: Preparer) -> None:
    with serving(FakeEngine(UNSAFE_S1), preparer) as server:

        async def main() -> tuple[StreamCheck, int, bool]:
            async with (
                AsyncModerationClient(f"localhost:{server.port}") as remote,
                remote.stream(
                    [{"role": "user", "content": "Hi."}], check_every_tokens=2, stop_on_unsafe=True
                ) as stream,
            ):
                await stream.append("one two three four")
                while stream.final is None:
                    await asyncio.sleep(0.01)
                await stream.append("five six seven eight")  # after the stop: not sent
                return await stream.end(), len(stream.checks), stream.unsafe

        final, checks, unsafe = asyncio.run(main())
    assert final.final
    assert final.verdict.label == Label.UNSAFE
    assert final.verdict.categories == ["S1"]
    assert (checks, unsafe) == (1, True)


def test_a_refused_stream_raises_with_its_status(server: ServerThread) -> None:
    async def main() -> None:
        async with (
            AsyncModerationClient(f"localhost:{server.port}", token="s3cret") as remote,
            remote.stream([{"role": "assistant", "content": "x"}]) as stream,
        ):
            await stream.append("more")
            await stream.end()

    with pytest.raises(CallError) as refused:
        asyncio.run(main())
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_the_client_knows_the_servers_stream_started_header() -> None:
    from guardrt.client import _STREAM_STARTED  # noqa: PLC0415
    from guardrt.runtime.server.grpc_server import STREAM_STARTED  # noqa: PLC0415

    assert _STREAM_STARTED == STREAM_STARTED
