"""Which queued requests share a batch (`guardrt/runtime/batching.py`) and the scheduler that
asks: the oldest always; others only where batching saves work, most alike first."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardrt.runtime import scheduler as scheduler_module
from guardrt.runtime.batching import KNEE, POLICIES, Shape, choose, cost, fifo
from guardrt.runtime.errors import ServiceError, ServiceReason
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.requests import Decoded, PreparedRequest
from guardrt.runtime.scheduler import Scheduler, Work
from tests.server_harness import FakeEngine


def text(tokens: int) -> Shape:
    return Shape(tokens, image=False)


def test_cost() -> None:
    assert cost([text(10)]) == 2 * KNEE  # below the knee a step costs a weight pass
    assert cost([text(10)] * 8) == 2 * KNEE  # 80 tokens: batching is free
    assert cost([text(100), text(2000)]) == KNEE + 4000  # padded to the longest


@pytest.mark.parametrize(
    ("shapes", "max_batch", "picked"),
    [
        ([text(300)] * 6, 4, [0, 1, 2, 3]),  # alike: the oldest first, as FIFO
        ([text(100), text(2000)], 4, [0]),  # 4,256 together vs 2,768 apart: apart
        ([text(2000), text(100)], 4, [0]),  # the same when the long one is oldest
        ([text(300), text(350)], 4, [0, 1]),  # 956 together vs 1,162 apart
        ([text(100), text(2000), text(110), text(120)], 2, [0, 2]),  # the nearest, not the older
        ([Shape(400, True), text(400), Shape(420, True)], 2, [0, 2]),  # the same kind first
        ([Shape(400, True), text(400), Shape(420, True)], 4, [0, 1, 2]),  # room: all
        ([text(1500), text(1400), text(30), text(20)], 4, [0, 1]),  # two batches, not padding
    ],
)
def test_choose(shapes: list[Shape], max_batch: int, picked: list[int]) -> None:
    assert choose(shapes, max_batch) == picked


@given(
    st.lists(st.tuples(st.integers(1, 4000), st.booleans()), min_size=1, max_size=40),
    st.integers(1, 8),
)
def test_every_request_runs_within_as_many_batches_as_were_ahead_of_it(
    items: list[tuple[int, bool]], max_batch: int
) -> None:
    queue = list(range(len(items)))
    shapes = [Shape(tokens, has_image) for tokens, has_image in items]
    batches = 0
    served_in: dict[int, int] = {}
    while queue:
        picked = choose([shapes[i] for i in queue], max_batch)
        assert picked[0] == 0
        assert picked == sorted(set(picked))
        assert len(picked) <= max_batch
        batches += 1
        for index in picked:
            served_in[queue[index]] = batches
        queue = [q for i, q in enumerate(queue) if i not in picked]
    assert all(served_in[r] <= r + 1 for r in served_in)


def test_fifo_and_the_policy_setting() -> None:
    from guardrt.runtime.errors import ConfigError  # noqa: PLC0415
    from guardrt.runtime.server.config import ServerConfig  # noqa: PLC0415

    assert fifo([text(100), text(2000), text(100)], 2) == [0, 1]
    assert POLICIES["cost"] is choose
    with pytest.raises(ConfigError, match="batching 'lifo' is not one of cost, fifo"):
        ServerConfig(batching="lifo")
    with pytest.raises(ConfigError, match="warmup_max_batch must be at least 1, not 0"):
        ServerConfig(warmup_max_batch=0)


def _long_and_short(preparer: Preparer) -> tuple[PreparedRequest, PreparedRequest]:
    long = preparer.prepare([{"role": "user", "content": "word " * 700}])
    short = preparer.prepare([{"role": "user", "content": "Hi."}])
    assert Shape.of(long).tokens > 600
    assert Shape.of(short).tokens < 100  # the shared policy head is not counted
    return long, short


def test_the_scheduler_keeps_a_long_prompt_from_padding_short_ones(preparer: Preparer) -> None:
    long, short = _long_and_short(preparer)
    engine = FakeEngine(max_batch=4)
    engine.gate = threading.Event()
    scheduler = Scheduler(engine, max_batch=4, max_wait_s=0.0, max_queue=16)
    scheduler.start()
    answered: list[str] = []
    lock = threading.Lock()

    def work(request: PreparedRequest, name: str) -> Work:
        def done(*_: object) -> None:
            with lock:
                answered.append(name)

        return Work(request, name, done)

    try:
        scheduler.add(work(short, "first"))
        assert engine.entered.wait(10)  # the first batch holds the engine
        for index, (request, name) in enumerate(
            [(long, "long"), (short, "a"), (image_request(preparer), "image"), (short, "b")]
        ):
            scheduler.add(work(request, name))
            assert scheduler.depth() == index + 1
        engine.gate.set()
        deadline = time.monotonic() + 10
        while len(answered) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.drain(10)
    # FIFO would have padded all four to the long prompt. Here the long prompt runs alone, then
    # the rest together: the short texts (~20 tokens past the shared policy head) pad to the
    # image's ~200-token prompt, 844 tokens of work against 1,024 for two batches.
    sizes = [[len(r.prompt) for r in batch] for batch in engine.batches]
    assert [len(batch) for batch in sizes] == [1, 1, 3], sizes
    assert sizes[1] == [len(long.prompt)]
    assert answered[:2] == ["first", "long"]
    assert sorted(answered[2:]) == ["a", "b", "image"]


def image_request(preparer: Preparer) -> PreparedRequest:
    picture = np.zeros((300, 400, 3), np.uint8)
    parts: Sequence[object] = [{"type": "image", "image": picture}, {"type": "text", "text": "Hi."}]
    return preparer.prepare([{"role": "user", "content": parts}])


class _Poisoned(FakeEngine):
    """Fails every batch holding a request of `poison`'s length (an engine error only that
    request causes: say, memory for its long prompt beside the others)."""

    def __init__(self, poison: int) -> None:
        super().__init__(max_batch=4)
        self.poison = poison

    def execute(self, batch: Sequence[PreparedRequest]) -> list[Decoded]:
        if any(len(request.prompt) == self.poison for request in batch):
            self.batches.append(list(batch))
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().execute(batch)


def _run_batched(
    engine: FakeEngine, named: list[tuple[PreparedRequest, str, float | None]]
) -> dict[str, object]:
    """Queue `named` (request, name, deadline) behind a held first batch, so they form one
    batch (first in, first out: whatever their lengths); the outcome each name got."""
    engine.gate = threading.Event()
    scheduler = Scheduler(engine, max_batch=4, max_wait_s=0.0, max_queue=16, policy=fifo)
    outcomes: dict[str, object] = {}
    finished = threading.Event()

    def work(request: PreparedRequest, name: str, deadline: float | None = None) -> Work:
        def done(outcome: object, info: object) -> None:
            outcomes[name] = outcome
            if len(outcomes) == len(named) + 1:
                finished.set()

        return Work(request, name, done, deadline)

    scheduler.start()
    try:
        scheduler.add(work(named[-1][0], "held"))
        assert engine.entered.wait(10)  # the engine holds the first batch
        for request, name, deadline in named:
            scheduler.add(work(request, name, deadline))
        engine.gate.set()
        assert finished.wait(10)
    finally:
        scheduler.drain(10)
    del outcomes["held"]
    return outcomes


def test_a_request_the_engine_fails_on_fails_alone(preparer: Preparer) -> None:
    """One request's engine failure does not fail the requests batched with it: the failed
    batch's requests run again alone, and only the one that fails alone gets the error."""
    long, short = _long_and_short(preparer)
    engine = _Poisoned(len(long.prompt))
    outcomes = _run_batched(engine, [(short, "a", None), (long, "long", None), (short, "b", None)])
    assert isinstance(outcomes["long"], ServiceError)
    assert outcomes["long"].reason is ServiceReason.ENGINE
    assert all(isinstance(outcomes[name], Decoded) for name in ("a", "b"))
    sizes = [len(batch) for batch in engine.batches]
    assert sizes == [1, 3, 1, 1, 1], sizes  # held; the batch; each alone


def test_an_engine_failing_every_batch_fails_each_request(preparer: Preparer) -> None:
    """A broken engine fails them all, each after one run alone; a request whose deadline
    passed while its batch failed is answered DEADLINE, not run again."""
    long, short = _long_and_short(preparer)
    late = time.monotonic() + 2.0  # still ahead when the batch is scheduled

    class Broken(FakeEngine):
        def execute(self, batch: Sequence[PreparedRequest]) -> list[Decoded]:
            if not self.batches:  # the held first batch passes
                return super().execute(batch)
            self.batches.append(list(batch))
            if len(batch) > 1:  # the batch fails after the deadline has passed
                time.sleep(max(0.0, late - time.monotonic()) + 0.05)
            raise RuntimeError("CUDA error: an illegal memory access")

    engine = Broken(max_batch=4)
    outcomes = _run_batched(engine, [(short, "a", None), (short, "late", late), (long, "b", None)])
    reasons = {name: getattr(outcome, "reason", None) for name, outcome in outcomes.items()}
    assert reasons == {
        "a": ServiceReason.ENGINE,
        "late": ServiceReason.DEADLINE,
        "b": ServiceReason.ENGINE,
    }
    sizes = [[len(r.prompt) for r in batch] for batch in engine.batches]
    assert sizes[1:] == [
        [len(short.prompt), len(short.prompt), len(long.prompt)],
        [len(short.prompt)],  # a, alone
        [len(long.prompt)],  # b, alone; "late" never ran again
    ], sizes


def test_a_broken_engine_answers_the_queue_and_refuses_new_work(preparer: Preparer) -> None:
    """A request that fails alone, then the probe failing too: the engine is broken. What is
    queued is answered BROKEN without running, new work is refused, the listeners are told."""
    long, short = _long_and_short(preparer)
    engine = FakeEngine(max_batch=1)
    engine.gate, engine.fail = threading.Event(), True
    scheduler = Scheduler(engine, max_batch=1, max_wait_s=0.0, max_queue=16, probe=short)
    told: list[str] = []
    scheduler.on_broken(lambda: told.append("broken"))
    outcomes: dict[str, object] = {}

    def work(name: str) -> Work:
        return Work(long, name, lambda outcome, info: outcomes.__setitem__(name, outcome))

    scheduler.start()
    try:
        scheduler.add(work("first"))
        assert engine.entered.wait(10)
        scheduler.add(work("queued"))
        engine.gate.set()
        assert scheduler.broken.wait(10)
        with pytest.raises(ServiceError) as refused:
            scheduler.add(work("late"))
    finally:
        scheduler.drain(10)
    assert refused.value.reason is ServiceReason.BROKEN
    reasons = {name: getattr(outcome, "reason", None) for name, outcome in outcomes.items()}
    assert reasons == {"first": ServiceReason.ENGINE, "queued": ServiceReason.BROKEN}
    assert [[r.prompt for r in batch] for batch in engine.batches] == [
        [long.prompt],
        [short.prompt],  # the probe; "queued" never ran
    ]
    assert told == ["broken"]


def test_an_engine_giving_the_wrong_number_of_outputs_answers_no_one_wrongly(
    preparer: Preparer,
) -> None:
    """Outputs that do not match the batch one for one cannot be matched to their requests:
    none is answered from them. Each request runs again alone; an engine that is wrong then
    too (the probe as well) is broken."""
    long, short = _long_and_short(preparer)

    class Short(FakeEngine):
        def execute(self, batch: Sequence[PreparedRequest]) -> list[Decoded]:
            outputs = super().execute(batch)
            return outputs if len(self.batches) == 1 else outputs[:-1]  # the held one is right

    engine = Short(max_batch=4)
    outcomes = _run_batched(engine, [(short, "a", None), (long, "b", None)])
    reasons = {name: getattr(outcome, "reason", None) for name, outcome in outcomes.items()}
    assert reasons == {"a": ServiceReason.ENGINE, "b": ServiceReason.ENGINE}


def _scheduler_thread_dies(
    preparer: Preparer, policy_fails_at: int
) -> tuple[dict[str, object], list[str], Scheduler]:
    """Queue three requests behind a held one, with a batching policy that raises (a fault in
    the engine thread itself) on its `policy_fails_at`-th call."""
    long, short = _long_and_short(preparer)
    engine = FakeEngine(max_batch=1)
    engine.gate = threading.Event()
    calls = [0]

    def policy(shapes: Sequence[Shape], max_batch: int) -> list[int]:
        calls[0] += 1
        if calls[0] == policy_fails_at:
            raise IndexError("a fault in the batching policy")
        return fifo(shapes, max_batch)

    scheduler = Scheduler(engine, max_batch=1, max_wait_s=0.0, max_queue=16, policy=policy)
    told: list[str] = []
    scheduler.on_broken(lambda: told.append("broken"))
    outcomes: dict[str, object] = {}
    answers: list[str] = []

    def work(name: str) -> Work:
        def done(outcome: object, info: object) -> None:
            answers.append(name)
            outcomes[name] = outcome

        return Work(short if name != "long" else long, name, done)

    scheduler.start()
    try:
        scheduler.add(work("held"))
        assert engine.entered.wait(10)
        for name in ("a", "long", "b"):
            scheduler.add(work(name))
        engine.gate.set()
        assert scheduler.broken.wait(10)
        with pytest.raises(ServiceError) as refused:
            scheduler.add(work("late"))
        assert refused.value.reason is ServiceReason.BROKEN
    finally:
        assert scheduler.drain(10)
    assert sorted(answers) == sorted(set(answers)), answers  # each answered once
    return outcomes, told, scheduler


@pytest.mark.parametrize("policy_fails_at", [2, 3])
def test_a_fault_in_the_engine_thread_answers_every_waiting_request(
    preparer: Preparer, policy_fails_at: int
) -> None:
    """A fault in the engine thread (here the batching policy raising) would leave every
    queued call waiting forever: instead they are answered BROKEN, new work is refused and the
    listeners told (`guardrt serve` then exits for a restart)."""
    outcomes, told, _ = _scheduler_thread_dies(preparer, policy_fails_at)
    reasons = {name: getattr(outcome, "reason", None) for name, outcome in outcomes.items()}
    ran = ["a", "long", "b"][: policy_fails_at - 2]
    assert reasons == {
        "held": None,
        **dict.fromkeys(ran),
        **{name: ServiceReason.BROKEN for name in ["a", "long", "b"] if name not in ran},
    }
    assert all(isinstance(outcomes[name], Decoded) for name in ["held", *ran])
    assert told == ["broken"]


def _collect(into: list[object]) -> Callable[[object, object], None]:
    return lambda outcome, info: into.append(outcome)


def test_under_random_load_every_request_is_answered_once_and_never_wrongly(
    preparer: Preparer,
) -> None:
    """Four threads queue 240 requests; some make the engine fail (only when they are in the
    batch), some have deadlines that pass, some are cancelled. Every request not cancelled is
    answered exactly once; a request the engine failed on is never answered with a verdict, a
    good one never with the engine's error; the engine is never judged broken."""
    rng = random.Random(8)
    _, short = _long_and_short(preparer)
    requests = [dataclasses.replace(short) for _ in range(240)]
    poison = {id(request) for request in rng.sample(requests, 24)}

    class Flaky(FakeEngine):
        def execute(self, batch: Sequence[PreparedRequest]) -> list[Decoded]:
            time.sleep(rng.uniform(0.0, 0.002))
            if any(id(request) in poison for request in batch):
                raise RuntimeError("CUDA out of memory")
            return super().execute(batch)

    scheduler = Scheduler(
        Flaky(max_batch=4), max_batch=4, max_wait_s=0.001, max_queue=1000, probe=short
    )
    answers: dict[int, list[object]] = {id(request): [] for request in requests}
    works: list[Work] = []
    lock = threading.Lock()

    def add(chunk: list[PreparedRequest], seed: int) -> None:
        local = random.Random(seed)
        for request in chunk:
            deadline = time.monotonic() + 0.005 if local.random() < 0.1 else None
            work = Work(request, str(id(request)), _collect(answers[id(request)]), deadline)
            with lock:
                works.append(work)
            scheduler.add(work)
            if local.random() < 0.1:
                scheduler.cancel(work)
            time.sleep(local.uniform(0.0, 0.0005))

    scheduler.start()
    try:
        threads = [threading.Thread(target=add, args=(requests[i::4], i)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        assert scheduler.drain(30)
    assert not scheduler.broken.is_set()
    assert len(works) == len(requests)
    for work in works:
        got = answers[id(work.request)]
        assert len(got) <= 1, got
        if work.cancelled:
            continue
        assert len(got) == 1, work.request_id
        outcome = got[0]
        if isinstance(outcome, ServiceError) and outcome.reason is ServiceReason.DEADLINE:
            assert work.deadline is not None
        elif id(work.request) in poison:
            assert isinstance(outcome, ServiceError), outcome
            assert outcome.reason is ServiceReason.ENGINE
        else:
            assert isinstance(outcome, Decoded), outcome


def test_requests_failing_alone_probe_the_engine_at_most_once_a_second(
    preparer: Preparer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of requests that each fail alone costs one self-check per PROBE_INTERVAL_S, not
    one each; after the interval the next failure probes again."""
    monkeypatch.setattr(scheduler_module, "PROBE_INTERVAL_S", 2.0)  # room for a loaded CI
    long, short = _long_and_short(preparer)
    engine = _Poisoned(len(long.prompt))
    scheduler = Scheduler(engine, max_batch=1, max_wait_s=0.0, max_queue=16, probe=short)
    answered = threading.Semaphore(0)

    def fail_one() -> None:
        scheduler.add(Work(long, "long", lambda outcome, info: answered.release()))
        assert answered.acquire(timeout=10)

    scheduler.start()
    try:
        fail_one()
        fail_one()
        fail_one()
        time.sleep(2.2)
        fail_one()
    finally:
        scheduler.drain(10)
    assert not scheduler.broken.is_set()
    ran = [
        "long" if len(batch[0].prompt) == len(long.prompt) else "probe" for batch in engine.batches
    ]
    assert ran == ["long", "probe", "long", "long", "long", "probe"], ran


def test_a_stuck_batch_is_answered_broken_and_the_queue_with_it(preparer: Preparer) -> None:
    """A batch that never returns (a hung GPU) would hold its callers forever and keep the
    server in service: past `stall_s` its requests and the queue are answered BROKEN, new work
    is refused, the listeners told; when the batch comes back at last, no one is answered
    twice."""
    _, short = _long_and_short(preparer)
    engine = FakeEngine(max_batch=1)
    engine.gate = threading.Event()  # the first batch hangs until the test lets it go
    scheduler = Scheduler(engine, max_batch=1, max_wait_s=0.0, max_queue=16, stall_s=0.3)
    told: list[str] = []
    scheduler.on_broken(lambda: told.append(scheduler.broken_why))
    answers: dict[str, list[object]] = {"stuck": [], "queued": []}

    def work(name: str) -> Work:
        return Work(short, name, _collect(answers[name]))

    scheduler.start()
    try:
        scheduler.add(work("stuck"))
        assert engine.entered.wait(10)
        scheduler.add(work("queued"))
        assert scheduler.broken.wait(10)
        assert 0.3 < (scheduler.running_for() or 0.0) < 5
        with pytest.raises(ServiceError):
            scheduler.add(work("queued"))
        engine.gate.set()  # the hung batch returns after all
    finally:
        scheduler.drain(10)
    reasons = {name: [getattr(o, "reason", None) for o in got] for name, got in answers.items()}
    assert reasons == {"stuck": [ServiceReason.BROKEN], "queued": [ServiceReason.BROKEN]}
    assert told == ["it ran one batch for over 0.3 s"]
