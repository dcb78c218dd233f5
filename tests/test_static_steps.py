"""Steps padded to static buckets (`static_steps.py`) answer what unpadded steps answer.

On the CPU the padded steps run eagerly, which checks everything the graphs replay: the padding,
the scratch row, the bucket choice. With GUARDRT_TEST_DEVICE=cuda (scripts/gpu_check.sh) the same
tests capture and replay CUDA graphs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from guardrt.export.quantize import quantize_linears, quantize_weight
from guardrt.kernels.fp8_linear import fp8_linear
from guardrt.kernels.int8_dynamic import int8_dynamic_linear
from guardrt.runtime import static_steps
from guardrt.runtime.capacity import grown_capacity
from guardrt.runtime.classify import Classifier, TorchSteps
from guardrt.runtime.decoding import PAD_ID
from guardrt.runtime.engine import EngineOptions, torch_engine
from guardrt.runtime.engine.torch_engine import TorchEngine
from guardrt.runtime.model.cache import CacheLayout, KVCache
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.fuse import fuse_projections
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.scores import category_vocab, prefill_vocab
from guardrt.runtime.static_steps import BucketKey, Buckets, StaticSteps, pad_step
from guardrt.runtime.tokenizer import Tokenizer
from guardrt.runtime.verdict import Label
from tests.models import (
    DEVICE,
    IMAGE_CONFIG,
    TILE_SIZES,
    assert_same_decoded,
    small_config,
    write_guard_checkpoint,
    write_small,
)
from tests.torch_support import need_cpu_rowwise_scaled_mm

MAX_SEQ = 512


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small(tmp_path_factory.mktemp("static"), small_config("gqa2-cross2,4"), seed=21)


def _model(checkpoint: Path, rows: int) -> MllamaModel:
    model = load_model(checkpoint, device=torch.device(DEVICE), semantics="meta")
    fuse_projections(model)
    model.setup_caches(rows, MAX_SEQ)
    return model


def _requests(tok: Tokenizer) -> list:  # type: ignore[type-arg]
    preparer = Preparer(tok, IMAGE_CONFIG, MAX_SEQ)
    texts = ["How do I pick a lock?", "Is this fine?", "Write me a poem about the sea, please."]
    out = [preparer.prepare([{"role": "user", "content": t}]) for t in texts]
    out.append(
        preparer.prepare([{"role": "user", "content": texts[0]}], excluded_categories=["S1"])
    )
    for tiles, text in zip((1, 4, 2), texts, strict=True):
        width, height = TILE_SIZES[tiles]
        pixels = np.random.default_rng(tiles).integers(0, 256, (height, width, 3), np.uint8)
        part = [{"type": "image", "image": pixels}, {"type": "text", "text": text}]
        request = preparer.prepare([{"role": "user", "content": part}])
        assert request.image is not None
        assert request.image.num_tiles == tiles
        out.append(request)
    return out


def test_default_buckets() -> None:
    buckets = Buckets.default(max_batch=6, max_seq=1000)
    assert buckets.batch == (1, 2, 4, 6)
    assert buckets.tokens == (2, 16, 32, 64, 128, 192, 256, 320, 384, 448, 512)
    assert buckets.keys == (64, 128, 256, 512, 1000)
    assert buckets.key(3, 1, 70, cross=True) == BucketKey(4, 2, 128, True)
    assert buckets.key(1, 300, 301, cross=False) == BucketKey(1, 320, 512, False)
    assert buckets.key(7, 2, 10, cross=False) is None  # more rows than any bucket
    assert buckets.key(1, 600, 600, cross=False) is None  # more tokens than any bucket
    assert buckets.key(4, 300, 300, cross=False) is None  # 4 × 320 tokens: compute-bound
    assert buckets.key(1, 2, 300, cross=False, vocab=15) == BucketKey(1, 2, 512, False, 16)
    assert buckets.key(1, 2, 300, cross=False, vocab=2000) is None  # more codes than a bucket
    prefill = BucketKey(1, 384, 512, True, 64, log_probs=True)
    assert buckets.key(1, 360, 364, cross=True, vocab=17, log_probs=True) == prefill
    assert buckets.key(1, 360, 364, cross=True, vocab=16, log_probs=True) == prefill


def test_category_steps_compute_only_the_tokens_they_read(checkpoint: Path, tok: Tokenizer) -> None:
    """A category step's head computes the listed codes, `,S` and the end only, and returns
    those columns (padded or not): they equal the full head's logits."""
    requests = _requests(tok)
    vocab = category_vocab([r.grammar for r in requests])
    grammar = requests[0].grammar
    expected_ids = {*grammar.token_by_code.values(), grammar.tokens.comma_s, grammar.tokens.eot}
    assert set(vocab.tolist()) == expected_ids  # S1..S13, ",S" and <|eot_id|>
    assert len(vocab) == 15
    model = _model(checkpoint, 3)
    full = TorchSteps(model).step(*_two_rows())
    for steps in (TorchSteps(model), StaticSteps(model)):
        got = steps.step(*_two_rows(), vocab)
        assert got.shape == (*full.shape[:2], len(vocab))
        np.testing.assert_allclose(got, full[..., vocab], rtol=1e-5, atol=1e-5)


def test_a_prefill_reads_log_probabilities_of_its_tokens(checkpoint: Path, tok: Tokenizer) -> None:
    """With `log_probs` a step returns the log-softmax over the whole vocabulary (computed on
    the device), at `vocab`'s ids or everywhere, through eager and padded steps alike."""
    requests = _requests(tok)
    vocab = prefill_vocab([r.grammar for r in requests])
    tokens = requests[0].grammar.tokens
    assert {tokens.safe, tokens.unsafe} < set(vocab.tolist())
    assert len(vocab) == 17  # the category step's 15, safe and unsafe
    model = _model(checkpoint, 3)
    logits = torch.from_numpy(TorchSteps(model).step(*_two_rows())).double()  # (B, R, vocab)
    expected = torch.log_softmax(logits, dim=-1).numpy()
    for steps in (TorchSteps(model), StaticSteps(model)):
        everywhere = steps.step(*_two_rows(), None, True)
        np.testing.assert_allclose(everywhere, expected, rtol=1e-5, atol=1e-5)
        got = steps.step(*_two_rows(), vocab, True)
        assert got.shape == (2, 2, len(vocab))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected[..., vocab], rtol=1e-5, atol=1e-5)
    steps = StaticSteps(model)
    steps.step(*_two_rows(), vocab, True)
    assert [(k.vocab, k.log_probs) for k in steps._steps] == [(64, True)]


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _two_rows() -> Arrays:
    """A step's six arrays: two text rows, 3 and 2 tokens, reading 2 rows each."""
    return (
        np.array([[791, 1202, 264], [40, 41, PAD_ID]]), np.array([[0, 1, 2], [0, 1, 2]]),
        np.array([0, 1]), np.array([MAX_SEQ, MAX_SEQ]), np.array([0, 0]),
        np.array([[2, 1], [1, 0]]),
    )  # fmt: skip


def test_pad_step_fills_the_bucket() -> None:
    tokens = np.array([[5, 6, 7], [8, 9, PAD_ID]])
    positions = np.array([[10, 11, 12], [0, 1, 2]])
    arrays = (
        tokens, positions, np.array([3, 1]), np.array([40, 0]), np.array([0, 2]),
        np.array([[2], [1]]),
    )  # fmt: skip
    padded = pad_step(arrays, BucketKey(4, 5, 64, True, 4), 9, 64, np.array([3, 7]))
    assert padded is not None
    assert padded.vocab.tolist() == [3, 7, 7, 7]  # repeats of a wanted id
    assert padded.tokens.tolist() == [
        [5, 6, 7, PAD_ID, PAD_ID], [8, 9, PAD_ID, PAD_ID, PAD_ID],
        [PAD_ID] * 5, [PAD_ID] * 5,
    ]  # fmt: skip
    # real rows continue their positions; pad rows count from 0 (in the scratch row)
    assert padded.positions.tolist() == [
        [10, 11, 12, 13, 14], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4],
    ]  # fmt: skip
    assert padded.slots.tolist() == [3, 1, 9, 9]
    assert padded.image_start.tolist() == [40, 0, 64, 64]  # pad rows: no image
    assert padded.num_tiles.tolist() == [0, 2, 0, 0]
    assert padded.logit_index.tolist() == [[2, 0], [1, 0], [0, 0], [0, 0]]
    # a row ending near the cache's end cannot take 2 more pad positions
    assert pad_step(arrays, BucketKey(4, 5, 64, True), scratch=9, max_seq=14) is None
    assert pad_step(arrays, BucketKey(2, 3, 64, True), 9, 64).vocab.size == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("decode", ["constrained", "greedy"])
def test_static_steps_answer_what_eager_steps_answer(
    checkpoint: Path, tok: Tokenizer, decode: str
) -> None:
    requests = _requests(tok)
    eager = Classifier(_model(checkpoint, 4 + 1), decode, prefixes=1)  # type: ignore[arg-type]
    expected = eager.run(requests) + [eager.run([r])[0] for r in requests[:3]]
    model = _model(checkpoint, 4 + 1 + 1)  # + the scratch row
    # As the engine lays the cache out: image K/V only for the 4 batch rows, none for the
    # prefix row or the scratch row (whose pad rows read the last batch row's instead).
    model.setup_caches(4 + 1 + 1, MAX_SEQ, image_rows=4)
    assert model.cache.cross_kv.shape[2] == 4
    steps = StaticSteps(model)  # captures CUDA graphs on a GPU
    assert steps.max_batch == 5
    assert steps.scratch == 5
    static = Classifier(model, decode, prefixes=1, steps=steps)  # type: ignore[arg-type]
    got = static.run(requests) + [static.run([r])[0] for r in requests[:3]]
    assert_same_decoded(got, expected)
    labels = {d.verdict().label for d in expected}
    assert decode == "greedy" or labels == {Label.SAFE, Label.UNSAFE}, "both paths exercised"
    assert any(k.tokens == 2 for k in steps._steps)  # decode steps were bucketed
    assert any(k.cross for k in steps._steps)
    assert any(not k.cross for k in steps._steps)
    assert any(k.batch == 4 for k in steps._steps)  # 3 rows padded to 4
    assert steps.graphs == (len(steps._steps) if DEVICE == "cuda" else 0)


def test_steps_without_a_bucket_run_eagerly(checkpoint: Path, tok: Tokenizer) -> None:
    requests = _requests(tok)[:4]
    expected = Classifier(_model(checkpoint, 4)).run(requests)
    model = _model(checkpoint, 4 + 1)
    tight = Buckets(batch=(1, 2), tokens=(2,), keys=(MAX_SEQ,), max_tokens=4)
    steps = StaticSteps(model, tight, capture=False)
    got = Classifier(model, steps=steps).run(requests)
    assert_same_decoded(got, expected)
    assert steps.eager_steps >= 1  # the 4-row prefill had no bucket
    assert set(steps._steps) <= {BucketKey(b, 2, MAX_SEQ, False) for b in (1, 2)}


def test_a_failed_capture_leaves_the_steps_eager(
    checkpoint: Path,
    tok: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A capture that raises anything (torch raises RuntimeError, Triton its own error types)
    logs a warning, and this step and every later one run eagerly with the same answers."""
    requests = _requests(tok)[:3]
    expected = Classifier(_model(checkpoint, 4)).run(requests)
    model = _model(checkpoint, 4 + 1)
    steps = StaticSteps(model, capture=False)
    steps.capture, steps._pool = True, object()  # type: ignore[assignment]  # as on a GPU

    class CompileError(Exception):  # not a RuntimeError, as triton's errors are not
        pass

    def fails(self: object, pool: object) -> None:
        raise CompileError("out of resources: shared memory\nsecond line")

    monkeypatch.setattr(static_steps._Static, "capture", fails)
    with caplog.at_level(logging.WARNING, logger="guardrt.runtime.static_steps"):
        got = Classifier(model, steps=steps).run(requests)
    assert_same_decoded(got, expected)
    assert steps.capture is False
    assert steps.graphs == 0
    assert steps.eager_steps >= 1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "CompileError: out of resources: shared memory" in warning
    assert "second line" not in warning


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU's refusal")
def test_capture_needs_cuda(checkpoint: Path) -> None:
    model = _model(checkpoint, 3)
    with pytest.raises(ValueError, match="CUDA"):
        StaticSteps(model, capture=True)
    small = _model(checkpoint, 1)
    with pytest.raises(ValueError, match="scratch"):
        StaticSteps(small)
    assert isinstance(StaticSteps(model), TorchSteps)  # CPU: padded, eager


# Ops a CUDA graph cannot capture: a read back to the host (`.item()`, `int(t)`, `bool(t)`;
# inference mode dispatches them undecomposed) or an output whose shape depends on the data
# (nonzero, boolean-mask indexing: recorded as "index(bool)").
UNCAPTURABLE = {
    "item", "is_nonzero", "_local_scalar_dense", "nonzero", "masked_select", "unique",
    "_unique2", "index(bool)", "index_put(bool)", "index_put_(bool)",
}  # fmt: skip


class _OpRecorder(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._overloadpacket.__name__
        indices = args[1] if name.startswith("index") and len(args) > 1 else ()
        masks = [i for i in indices if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
        self.ops.add(f"{name}(bool)" if masks else name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", [None, "int8", "fp8"])
def test_a_static_step_never_reads_the_device_back(
    checkpoint: Path, tok: Tokenizer, kind: str | None
) -> None:
    """What a CUDA graph captures (`_Static.forward`) has no host read-back and no data-shaped
    output, for text, image and category steps (checked op by op on the CPU); the eager step
    that reads its length off the tensors does (so the check can fail)."""
    model = load_model(checkpoint, device=torch.device(DEVICE), semantics="meta")
    if kind is not None:
        quantize_linears(model, kind=kind, keep=lambda name: name.endswith("lm_head"))  # type: ignore[arg-type]
    fuse_projections(model)
    model.setup_caches(4 + 1 + 1, MAX_SEQ)
    steps = StaticSteps(model, capture=False)
    Classifier(model, prefixes=1, steps=steps).run(_requests(tok))
    assert {k.cross for k in steps._steps} == {True, False}
    assert any(k.vocab and not k.log_probs for k in steps._steps)  # category steps
    assert any(k.log_probs for k in steps._steps)  # prefills, their log-softmax included
    for static in steps._steps.values():
        with torch.inference_mode(), _OpRecorder() as recorder:
            static.forward()
        assert not recorder.ops & UNCAPTURABLE, (static.key, recorder.ops & UNCAPTURABLE)
        assert "index_put_" in recorder.ops or "index_put" in recorder.ops  # the K/V writes ran
    tokens, positions, slots, starts, tiles, index, _ = next(iter(steps._steps.values())).inputs
    with torch.inference_mode(), _OpRecorder() as recorder:
        model(tokens, positions, slots, starts, tiles, index)  # kv_len read off the tensors
    assert recorder.ops & UNCAPTURABLE == {"item", "is_nonzero"}


def test_the_cache_grows_on_demand_and_keeps_every_row(checkpoint: Path, tok: Tokenizer) -> None:
    """Caches that start with 64 positions grow (powers of two) as prompts need and answer what
    fully allocated ones answer; a growth drops the steps captured on the old tensor."""
    requests = _requests(tok)
    expected = Classifier(_model(checkpoint, 4 + 1), prefixes=1).run(requests)
    model = load_model(checkpoint, device=torch.device(DEVICE), semantics="meta")
    fuse_projections(model)
    model.setup_caches(4 + 1 + 1, MAX_SEQ, capacity=64)
    assert model.cache.capacity == 64
    assert model.cache.self_kv.shape[4] == 64
    steps = StaticSteps(model)
    got = Classifier(model, prefixes=1, steps=steps).run(requests)
    assert_same_decoded(got, expected)
    assert model.cache.capacity == 512  # the ~260-token prompts needed 512 (a power of two)
    assert model.cache.version >= 1
    assert steps.dropped >= 1  # steps set up on a smaller cache were dropped
    eager = _model(checkpoint, 4 + 1)
    eager.setup_caches(4 + 1, MAX_SEQ, capacity=100)
    assert_same_decoded(Classifier(eager, prefixes=1).run(requests), expected)


@pytest.mark.parametrize(
    ("capacity", "length", "max_seq", "grown"),
    [
        (0, 1, 8192, 256),  # never below MIN_CAPACITY
        (256, 256, 8192, 256),  # fits: unchanged
        (256, 257, 8192, 512),  # the next power of two
        (512, 1500, 8192, 2048),
        (1024, 5000, 6000, 6000),  # capped at max_seq
        (100, 120, 8192, 256),  # a capacity not a power of two grows to one
        (6000, 6000, 6000, 6000),
    ],
)
def test_grown_capacity(capacity: int, length: int, max_seq: int, grown: int) -> None:
    assert grown_capacity(capacity, length, max_seq) == grown


def test_grown_capacity_refuses_past_max_seq() -> None:
    with pytest.raises(IndexError, match="position 8192 is past the cache's 8192"):
        grown_capacity(4096, 8193, 8192)


def test_cache_reserve() -> None:
    layout = CacheLayout(
        self_layers=2, cross_layers=1, rows=3, kv_heads=1, max_seq=300, image_keys=4, head_dim=2
    )
    cache = KVCache(layout, device=torch.device("cpu"), dtype=torch.float32, capacity=10)
    cache.self_kv[:] = torch.arange(cache.self_kv.numel(), dtype=torch.float32).view_as(
        cache.self_kv
    )
    before = cache.self_kv.clone()
    assert not cache.reserve(10)
    assert cache.reserve(11)
    assert cache.capacity == 256  # MIN_CAPACITY
    assert cache.version == 1
    torch.testing.assert_close(cache.self_kv[:, :, :, :, :10], before)
    assert cache.self_kv[:, :, :, :, 10:].abs().sum() == 0
    assert cache.reserve(290)
    assert cache.capacity == 300  # capped at max_seq
    torch.testing.assert_close(cache.self_kv[:, :, :, :, :10], before)
    with pytest.raises(IndexError, match="300"):
        cache.reserve(301)
    cache.copy_kv(0, 2, 300)  # copies reserve too (already enough here)
    torch.testing.assert_close(cache.self_kv[:, :, 2], cache.self_kv[:, :, 0])


def test_rows_without_image_kv_refuse_an_image(checkpoint: Path, tok: Tokenizer) -> None:
    model = _model(checkpoint, 3)
    model.setup_caches(3, MAX_SEQ, image_rows=2)
    steps = TorchSteps(model)
    image = _requests(tok)[4].image
    assert image is not None
    steps.write_images([1], [image])
    with pytest.raises(ValueError, match=r"cache rows \[2\] hold no image K/V \(rows 0..1 do\)"):
        steps.write_images([2], [image])
    with pytest.raises(ValueError, match=r"cache rows \[2\]"):
        steps.clear_images([0, 2])


def test_steps_on_an_older_cache_tensor_are_dropped(checkpoint: Path) -> None:
    """Whoever grows the cache (an eager step, a prefix copy), the next step drops what was set
    up on the old tensor and still answers what an unpadded step answers."""
    model = _model(checkpoint, 3)
    model.setup_caches(3, MAX_SEQ, capacity=64)
    steps = StaticSteps(model)
    arrays = (
        np.array([[791, 1202, 264]]), np.array([[0, 1, 2]]), np.array([0]),
        np.array([MAX_SEQ]), np.array([0]), np.array([[2]]),
    )  # fmt: skip
    first = steps.step(*arrays)
    assert len(steps._steps) == 1
    assert steps.dropped == 0
    model.cache.copy_kv(0, 1, 200)  # grows the cache behind the static steps' back
    assert model.cache.capacity == 256
    again = steps.step(*arrays)
    assert steps.dropped == 1
    assert len(steps._steps) == 1  # set up anew on the grown tensor
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "kernel", "op"),
    [("fp8", fp8_linear, "_scaled_mm"), ("int8", int8_dynamic_linear, "_int_mm")],
)
def test_the_activation_quantizing_kernels_never_read_the_device_back(
    kind: str, kernel: Any, op: str
) -> None:
    """`fp8_linear` and `int8_dynamic_linear` (activation quantization, then `_scaled_mm` /
    `_int_mm`, both runnable on the CPU) run inside captured steps on the GPU: the same
    op-by-op check as the model's step."""
    if kind == "fp8":
        need_cpu_rowwise_scaled_mm()
    weight = quantize_weight(torch.randn(32, 64), kind=kind)  # type: ignore[arg-type]
    x = torch.randn(24, 64, dtype=torch.bfloat16)
    with torch.inference_mode(), _OpRecorder() as recorder:
        kernel(x, weight.qweight, weight.scales, torch.zeros(32, dtype=torch.bfloat16))
    assert op in recorder.ops
    assert not recorder.ops & UNCAPTURABLE


def test_common_steps_set_up_before_traffic_serve_it(checkpoint: Path, tok: Tokenizer) -> None:
    """After `prepare(common_keys())` a batch-1 request (text or image, either path) meets only
    steps already set up, and answers what it answers without them (dummies wrote only the
    scratch row)."""
    requests = _requests(tok)
    expected = Classifier(_model(checkpoint, 2 + 1), prefixes=1).run(requests[:1])
    expected += [Classifier(_model(checkpoint, 2 + 1), prefixes=1).run([r])[0] for r in requests]
    model = _model(checkpoint, 2 + 1 + 1)
    steps = StaticSteps(model)
    keys = steps.common_keys(len(prefill_vocab([r.grammar for r in requests])))
    assert all(k.batch == 1 for k in keys)
    assert {k.tokens for k in keys} == set(steps.buckets.tokens)
    assert steps.prepare(keys) == len(keys)
    assert steps.prepare(keys) == 0  # already there
    classifier = Classifier(model, prefixes=1, steps=steps)
    got = classifier.run(requests[:1]) + [classifier.run([r])[0] for r in requests]
    assert_same_decoded(got, expected)
    assert set(steps._steps) == set(keys)  # nothing new was needed
    assert steps.eager_steps == 0


def test_steps_on_a_replaced_cache_are_dropped(checkpoint: Path) -> None:
    """`setup_caches` again (same sizes) makes new tensors: what was set up on the old ones goes."""
    model = _model(checkpoint, 3)
    steps = StaticSteps(model)
    arrays = (
        np.array([[791, 1202]]), np.array([[0, 1]]), np.array([0]),
        np.array([MAX_SEQ]), np.array([0]), np.array([[1]]),
    )  # fmt: skip
    first = steps.step(*arrays)
    model.setup_caches(3, MAX_SEQ)
    again = steps.step(*arrays)
    assert steps.dropped == 1
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_sessions_through_static_steps(checkpoint: Path, tok: Tokenizer, with_image: bool) -> None:
    """A streaming session's row (its prefix cached across requests) through padded steps
    answers what a fresh request through eager steps answers."""
    requests = _requests(tok)
    base = requests[4] if with_image else requests[2]  # image: 1 tile; text: the longest
    model = _model(checkpoint, 2 + 1 + 1)
    classifier = Classifier(model, sessions=1, steps=StaticSteps(model))
    session = classifier.sessions.open()
    assert session is not None
    eager = Classifier(_model(checkpoint, 2))
    grown = base
    for extra in ([], [791, 1202], [791, 1202, 264, 11]):  # the conversation grows
        grown = dataclasses.replace(base, prompt=base.prompt[:-5] + tuple(extra) + base.prompt[-5:])
        in_session = dataclasses.replace(grown, session=session)
        (got,) = classifier.run([in_session])
        assert_same_decoded([got], eager.run([grown]))
    assert got.reused_tokens > 100  # the last request re-read only what changed


def test_the_engine_warms_up_and_serves_through_static_steps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tok: Tokenizer
) -> None:
    """The torch engine as it runs on a GPU (static steps, the common steps set up at warm-up,
    one batch per bucket; with GUARDRT_TEST_DEVICE=cuda, on the GPU, its load-time measurements
    and CUDA graphs included), on the CPU with the padded steps run eagerly: it answers what the
    plain engine answers, and serving the warm-up's shapes sets nothing new up."""
    directory = write_guard_checkpoint(tmp_path / "ckpt", "gqa2-cross2,4", seed=21)
    options = EngineOptions(directory, device=DEVICE, max_batch=3, max_seq=MAX_SEQ)
    plain = TorchEngine(dataclasses.replace(options, cuda_graphs=False))
    monkeypatch.setattr(torch_engine, "static_steps_for", lambda options, device: True)
    engine = TorchEngine(options)
    steps = engine.steps
    assert isinstance(steps, StaticSteps)
    requests = _requests(tok)
    engine.warmup(requests[:2])
    # The common steps of every batch up to min(warmup_max_batch 4, max_batch 3): 1 and 2.
    label = len(prefill_vocab([r.grammar for r in requests[:2]]))
    assert set(steps.common_keys(label, max_batch=3)) <= set(steps._steps)
    assert any(k.batch == 2 for k in steps.common_keys(label, max_batch=3))
    assert {k.batch for k in steps._steps} >= {1, 2, 4}  # 3 rows land in the 4-row bucket
    warmed = set(steps._steps)
    assert_same_decoded(engine.execute(requests[:3]), plain.execute(requests[:3]))
    assert_same_decoded(engine.execute(requests[:1]), plain.execute(requests[:1]))
    # Image K/V for the batch and session rows only: not the prefix row nor the scratch row.
    cache = engine.model.cache
    rows = options.max_batch + options.max_sessions
    assert cache.cross_kv.shape[2] == rows
    assert cache.self_kv.shape[2] == rows + options.max_prefixes + 1
    mixed = [requests[0], requests[5], requests[4]]  # text, 4 tiles, 1 tile
    assert_same_decoded(engine.execute(mixed), plain.execute(mixed))
    assert set(steps._steps) - warmed <= {k for k in steps._steps if k.batch > 1}
