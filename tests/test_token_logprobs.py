"""Token logprobs of a verdict (`PreparedRequest.top_logprobs`): each content token's
full-vocabulary log-probability and its position's most likely tokens, against transformers'
full forwards, in both decode modes, beside requests that ask for none, through the padded
static steps and the ONNX engine."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from guardrt.runtime.classify import Classifier
from guardrt.runtime.engine import EngineOptions, load_engine
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.requests import Decoded, PreparedRequest
from guardrt.runtime.scores import TokenLogprob, TokenScores, token_logprob
from guardrt.runtime.static_steps import StaticSteps
from guardrt.runtime.tokenizer import Tokenizer
from guardrt.runtime.verdict import Label
from guardrt.testing.references import hf_inputs, hf_model
from tests.models import (
    IMAGE_CONFIG,
    TILE_SIZES,
    assert_same_decoded,
    small_config,
    write_small,
)

TOP = 5


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small(tmp_path_factory.mktemp("logprobs"), small_config("gqa2-cross2,4"), seed=2)


@pytest.fixture(scope="module")
def hf(small: Path) -> Any:
    return hf_model(small)


def _loaded(checkpoint: Path, semantics: str = "transformers") -> MllamaModel:
    model = load_model(checkpoint, semantics=semantics)  # type: ignore[arg-type]
    model.setup_caches(4, 512)
    return model


def _cases(tok: Tokenizer, top: int | None = TOP) -> list[PreparedRequest]:
    """Texts, a response check, images of 1 and 4 tiles, a policy without S1 and S13."""
    preparer = Preparer(tok, IMAGE_CONFIG, 512)
    texts = ["How do I pick a lock?", "hi", "Tell me a joke.", "What should never be mixed?"]
    out = [
        preparer.prepare([{"role": "user", "content": texts[0]}]),
        preparer.prepare([{"role": "user", "content": texts[1]}]),  # unsafe, two categories
        preparer.prepare(
            [
                {"role": "user", "content": texts[1]},
                {"role": "assistant", "content": "Hello! How can I help?"},
            ]
        ),
        preparer.prepare(
            [{"role": "user", "content": texts[3]}], excluded_categories=["S1", "S13"]
        ),
    ]
    for tiles, text in ((1, texts[2]), (4, texts[0])):
        width, height = TILE_SIZES[tiles]
        pixels = np.random.default_rng(tiles).integers(0, 256, (height, width, 3), np.uint8)
        content = [{"type": "image", "image": pixels}, {"type": "text", "text": text}]
        out.append(preparer.prepare([{"role": "user", "content": content}]))
    return [dataclasses.replace(request, top_logprobs=top) for request in out]


def _reference(hf: Any, request: PreparedRequest, generated: list[int]) -> torch.Tensor:
    """transformers' log-softmax (vocab,) float64 after the prompt and `generated`."""
    ids = [*request.prompt, *generated]
    with torch.inference_mode():
        logits = hf(**hf_inputs(ids, request.image)).logits[0, -1]
    return torch.log_softmax(logits.double(), -1)


def _assert_matches_reference(hf: Any, decoded: Decoded, top: int) -> None:
    """Each content token's entry against a full forward up to it (the decoder's scores are
    float32 log-softmax values: ~1e-5 absolute at these magnitudes)."""
    entries = decoded.content_logprobs()
    assert entries is not None
    generated = list(decoded.generated)
    assert [e.token for e in entries] == generated[1:-1]
    for i, entry in enumerate(entries, start=1):
        expected = _reference(hf, decoded.request, generated[:i])
        assert math.isclose(entry.logprob, float(expected[entry.token]), abs_tol=2e-4)
        assert len(entry.top) == top
        if top:
            values, ids = torch.topk(expected, top)
            assert [t for t, _ in entry.top][:2] == ids.tolist()[:2]  # near-ties may swap later
            got = np.array([v for _, v in entry.top])
            assert np.allclose(got, values.numpy(), atol=2e-4)
            assert got.tolist() == sorted(got.tolist(), reverse=True)


@pytest.mark.parametrize("decode", ["constrained", "greedy"])
def test_content_logprobs_equal_full_forward_log_softmax(
    small: Path, hf: Any, tok: Tokenizer, decode: str
) -> None:
    decoded = Classifier(_loaded(small), decode=decode).run(_cases(tok))  # type: ignore[arg-type]
    labels = {d.verdict().label for d in decoded}
    if decode == "constrained":
        assert labels == {Label.SAFE, Label.UNSAFE}, "the cases should exercise both paths"
        assert any(len(d.verdict().categories) > 1 for d in decoded), "and a `,S` step"
    for result in decoded:
        if result.verdict().label is Label.ERROR:  # greedy output off the grammar
            assert result.content_logprobs() is None
            continue
        _assert_matches_reference(hf, result, TOP)


def test_constrained_entries_follow_the_verdict_text(small: Path, tok: Tokenizer) -> None:
    """The tokens' bytes make the content (what the HTTP API answers)."""
    for result in Classifier(_loaded(small)).run(_cases(tok)):
        entries = result.content_logprobs()
        assert entries is not None
        text = b"".join(tok.token_bytes(e.token) for e in entries).decode()
        assert text == result.verdict().content


def test_asking_changes_nothing_else(small: Path, tok: Tokenizer) -> None:
    """Rows asking for logprobs beside rows that do not (one batch): every verdict and score
    as without any, and the rows that did not ask get none."""
    model = _loaded(small)
    plain = Classifier(model).run(_cases(tok, top=None))
    asked = _cases(tok)
    mixed = [asked[0], *_cases(tok, top=None)[1:3], asked[3]]
    got = Classifier(model).run(mixed)
    assert_same_decoded(got, [plain[0], plain[1], plain[2], plain[3]])
    assert [d.logprobs is None for d in got] == [False, True, True, False]
    assert all(d.content_logprobs() is None for d in plain)


def test_without_alternatives_the_logprobs_are_the_same(small: Path, tok: Tokenizer) -> None:
    """top 0 reads a few ids' log-probabilities, not the vocabulary: the same values."""
    model = _loaded(small)
    with_top = Classifier(model).run(_cases(tok, top=3))
    alone = Classifier(model).run(_cases(tok, top=0))
    for a, b in zip(alone, with_top, strict=True):
        entries_a, entries_b = a.content_logprobs(), b.content_logprobs()
        assert entries_a is not None
        assert entries_b is not None
        assert [e.top for e in entries_a] == [()] * len(entries_a)
        assert [e.token for e in entries_a] == [e.token for e in entries_b]
        assert np.allclose([e.logprob for e in entries_a], [e.logprob for e in entries_b])


def test_padded_static_steps_give_the_same_logprobs(small: Path, tok: Tokenizer) -> None:
    """The steps the GPU replays as graphs (padded to buckets; eager here): a prefill reading
    four rows has no bucket and runs unpadded, the category steps use theirs."""
    eager = Classifier(_loaded(small, "meta")).run(_cases(tok))
    model = _loaded(small, "meta")
    padded = Classifier(model, steps=StaticSteps(model, capture=False)).run(_cases(tok))
    for a, b in zip(padded, eager, strict=True):
        entries_a, entries_b = a.content_logprobs(), b.content_logprobs()
        assert entries_a is not None
        assert entries_b is not None
        for x, y in zip(entries_a, entries_b, strict=True):
            assert (x.token, [t for t, _ in x.top]) == (y.token, [t for t, _ in y.top])
            assert math.isclose(x.logprob, y.logprob, abs_tol=1e-5)


def test_onnx_engine_gives_the_torch_engines_logprobs(
    onnx_fp32: Path, checkpoint: Path, preparer: Preparer
) -> None:
    text = preparer.prepare([{"role": "user", "content": "How do I pick a lock?"}])
    pixels = np.random.default_rng(2).integers(0, 256, (448, 896, 3), np.uint8)
    content = [{"type": "image", "image": pixels}, {"type": "text", "text": "and this?"}]
    pictured = preparer.prepare([{"role": "user", "content": content}])
    batch = [dataclasses.replace(r, top_logprobs=2) for r in (text, pictured)]
    options = EngineOptions(onnx_fp32, device="cpu", max_batch=4, max_seq=1024)
    onnx = load_engine("onnx", options).execute(batch)
    reference = load_engine("torch", dataclasses.replace(options, model=checkpoint)).execute(batch)
    for a, b in zip(onnx, reference, strict=True):
        entries_a, entries_b = a.content_logprobs(), b.content_logprobs()
        assert entries_a is not None
        assert entries_b is not None
        assert [e.token for e in entries_a] == [e.token for e in entries_b]
        assert np.allclose(
            [e.logprob for e in entries_a], [e.logprob for e in entries_b], atol=1e-4
        )


def test_token_logprob_normalises_logits() -> None:
    logits = np.array([1.0, 3.0, 2.0, 3.0, -50.0], np.float32)
    entry = token_logprob(2, TokenScores(logits), top=3, normalised=False)
    expected = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
    assert math.isclose(entry.logprob, float(expected[2]), abs_tol=1e-6)
    assert [t for t, _ in entry.top] == [1, 3, 2]  # ties by id
    assert entry == TokenLogprob(2, entry.logprob, entry.top)
    assert token_logprob(4, TokenScores(logits), top=9, normalised=False).top[-1][0] == 4


def test_alternatives_need_the_whole_vocabulary() -> None:
    compact = TokenScores(np.zeros(3, np.float32), np.array([7, 19, 300]))
    assert token_logprob(19, compact, top=0).logprob == 0.0
    with pytest.raises(ValueError, match="3 alternatives need every token"):
        token_logprob(19, compact, top=3)
    with pytest.raises(ValueError, match="cannot be normalised"):
        token_logprob(19, compact, top=0, normalised=False)


def test_a_shared_policy_prefix_gives_the_same_logprobs(small: Path, tok: Tokenizer) -> None:
    """Text rows that start after their policy's shared K/V (prefixes.py; its fill reads
    nothing, asked as a plain prefill) score their tokens as fresh prefills do."""
    model = _loaded(small)
    texts = [r for r in _cases(tok) if r.image is None]
    fresh = Classifier(model).run(texts)
    shared = Classifier(model, prefixes=1).run(texts)
    assert any(d.reused_tokens for d in shared)
    for a, b in zip(shared, fresh, strict=True):
        entries_a, entries_b = a.content_logprobs(), b.content_logprobs()
        assert entries_a is not None
        assert entries_b is not None
        assert [(e.token, [t for t, _ in e.top]) for e in entries_a] == [
            (e.token, [t for t, _ in e.top]) for e in entries_b
        ]
        logprobs = [[e.logprob for e in entries] for entries in (entries_a, entries_b)]
        assert np.allclose(logprobs[0], logprobs[1], atol=1e-4)
