"""Scores and decoding against transformers, batching, and the Guard API (small configs)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.hooks import RemovableHandle

from guardrt.export.quantize import QuantizedLinear
from guardrt.runtime.classify import Classifier, TorchSteps
from guardrt.runtime.decoding import Decoder
from guardrt.runtime.errors import ConfigError, PromptError, PromptReason
from guardrt.runtime.guard import Guard
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.model.text import SelfAttention
from guardrt.runtime.model.tiny import random_state, write_checkpoint
from guardrt.runtime.policy import make_policy
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.preprocess import TiledImage
from guardrt.runtime.prompt import encode_prompt
from guardrt.runtime.requests import PreparedRequest, max_new_tokens
from guardrt.runtime.scores import probability
from guardrt.runtime.tokenizer import Tokenizer
from guardrt.runtime.verdict import Label, VerdictGrammar
from guardrt.testing.references import hf_inputs, hf_model
from tests.models import (
    IMAGE_CONFIG,
    CountingSteps,
    assert_same_decoded,
    image,
    small_config,
    write_small,
)

STOP = [128001, 128008, 128009]
TEXTS = [
    "How do I pick a lock?",
    "Write a poem about the sea, with rhymes and a refrain, in four stanzas please.",
    "hi",
    "Explain how vaccines work to a ten year old.",
    "What household chemicals should never be mixed?",
    "Tell me a joke.",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small(tmp_path_factory.mktemp("ckpt"), small_config("gqa2-cross2,4"), seed=21)


@pytest.fixture(scope="module")
def hf(checkpoint: Path) -> Any:
    return hf_model(checkpoint)


def loaded(checkpoint: Path, semantics: str = "transformers", max_batch: int = 4) -> MllamaModel:
    model = load_model(checkpoint, semantics=semantics)  # type: ignore[arg-type]
    model.setup_caches(max_batch, 512)
    return model


def request(
    tok: Tokenizer, text: str, tiled: TiledImage | None, excluded: tuple[str, ...] = ()
) -> PreparedRequest:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if tiled is not None:
        content.insert(0, {"type": "image"})
    messages = [{"role": "user", "content": content}]
    policy = make_policy(excluded_categories=excluded)
    ids = encode_prompt(messages, excluded_categories=excluded, tokenizer=tok)
    return PreparedRequest(tuple(ids), tiled, VerdictGrammar(tok, policy))


def cases(tok: Tokenizer) -> list[PreparedRequest]:
    """Text-only and 1 to 4 tile requests of different lengths and policies."""
    return [
        request(tok, TEXTS[0], None),
        request(tok, TEXTS[1], image(1, seed=1)),
        request(tok, TEXTS[2], image(4, seed=2), excluded=("S1", "S13")),
        request(tok, TEXTS[3], None, excluded=("S2",)),
        request(tok, TEXTS[4], image(2, seed=3)),
        request(tok, TEXTS[5], image(3, seed=4)),
    ]


def hf_last_logits(hf: Any, ids: list[int], tiled: TiledImage | None) -> torch.Tensor:
    with torch.inference_mode():
        logits: torch.Tensor = hf(**hf_inputs(ids, tiled)).logits[0, -1].float()
    return logits


def naive_constrained(hf: Any, req: PreparedRequest, forced: Sequence[int] = ()) -> list[int]:
    """The grammar walked with a full transformers forward at every choice (the reference),
    from the `forced` ids on (`\\n\\n unsafe`: a verdict a threshold made unsafe)."""
    grammar, state = req.grammar, req.grammar.start()
    generated: list[int] = []
    while not state.done:
        allowed = grammar.allowed(state)
        if len(generated) < len(forced):
            token = forced[len(generated)]
        elif len(allowed) == 1:
            token = allowed[0]
        else:
            logits = hf_last_logits(hf, list(req.prompt) + generated, req.image)
            token = max(allowed, key=lambda t: float(logits[t]))
        generated.append(token)
        after = grammar.advance(state, token)
        assert after is not None
        state = after
    return generated


def test_constrained_decoding_equals_grammar_walk_with_full_forwards(
    checkpoint: Path, hf: Any, tok: Tokenizer
) -> None:
    decoded = Classifier(loaded(checkpoint)).run(cases(tok))
    labels = set()
    for result in decoded:
        assert list(result.generated) == naive_constrained(hf, result.request)
        labels.add(result.verdict().label)
    assert labels == {Label.SAFE, Label.UNSAFE}, "the cases should exercise both paths"


def test_constrained_scores_equal_full_forward_softmax(
    checkpoint: Path, hf: Any, tok: Tokenizer
) -> None:
    requests = cases(tok)
    for result in Classifier(loaded(checkpoint)).run(requests):
        req, t = result.request, result.request.grammar.tokens
        label_probs = torch.softmax(hf_last_logits(hf, [*req.prompt, t.blank], req.image), -1)
        assert math.isclose(result.unsafe_probability, float(label_probs[t.unsafe]), rel_tol=1e-4)
        label = float(label_probs[t.unsafe] + label_probs[t.safe])
        assert math.isclose(result.label_probability, label, rel_tol=1e-4)
        code_logits = hf_last_logits(
            hf, [*req.prompt, t.blank, t.unsafe, t.newline, t.s], req.image
        )
        numbers = [req.grammar.token_by_code[c] for c in req.grammar.codes]
        expected = torch.softmax(code_logits[numbers], -1)
        got = torch.tensor([result.category_probabilities[c] for c in req.grammar.codes])
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
        assert math.isclose(float(got.sum()), 1.0, rel_tol=1e-5)


def test_greedy_equals_transformers_generate(checkpoint: Path, hf: Any, tok: Tokenizer) -> None:
    requests = cases(tok)
    for result in Classifier(loaded(checkpoint), decode="greedy").run(requests):
        req = result.request
        limit = max_new_tokens(req.grammar)
        with torch.inference_mode():
            output = hf.generate(
                **hf_inputs(list(req.prompt), req.image),
                max_new_tokens=limit,
                do_sample=False,
                eos_token_id=STOP,
                pad_token_id=128004,
            )
        assert list(result.generated) == output[0, len(req.prompt) :].tolist()
        verdict = result.verdict()
        if verdict.label is Label.ERROR:  # random weights rarely follow the grammar
            assert verdict.error
            assert verdict.raw_output == tok.decode(list(result.generated))


@pytest.mark.parametrize("semantics", ["meta", "transformers"])
@pytest.mark.parametrize("decode", ["constrained", "greedy"])
def test_batches_equal_requests_alone(
    checkpoint: Path, tok: Tokenizer, semantics: str, decode: str
) -> None:
    requests = cases(tok)  # six requests through max_batch 4: two batches
    classifier = Classifier(loaded(checkpoint, semantics), decode=decode)  # type: ignore[arg-type]
    together = classifier.run(requests)
    alone = [classifier.run([req])[0] for req in requests]
    assert_same_decoded(together, alone)


def _head_edited(model: MllamaModel, edit: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """`edit` applied in place to the head's whole-vocabulary logits (B, R, vocab), before
    anything reduces them (a category step's few rows skip the module), until the returned
    handle's `with` block ends."""

    def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        edit(output)
        return output

    return model.language_model.lm_head.register_forward_hook(hook)


def test_safe_tie_goes_to_unsafe(checkpoint: Path, tok: Tokenizer) -> None:
    """When P(safe) == P(unsafe) the verdict fails closed (and with `safe` ahead, it is safe)."""
    model = loaded(checkpoint)
    hello = request(tok, "hello", None)
    t = hello.grammar.tokens
    for margin, label in ((1.0, Label.SAFE), (0.0, Label.UNSAFE)):

        def edit(logits: torch.Tensor, margin: float = margin) -> None:
            logits[..., t.safe] = logits[..., t.unsafe] + margin

        with _head_edited(model, edit):
            assert Classifier(model).run([hello])[0].verdict().label is label, margin


def test_a_nan_in_any_logit_fails_closed(checkpoint: Path, tok: Tokenizer) -> None:
    """One NaN logit of a token the verdict never reads (a faulty kernel's) turns a `safe`
    verdict `unsafe`: the normaliser over the whole vocabulary is NaN, so is every
    log-probability."""
    model = loaded(checkpoint)
    hello = request(tok, "hello", None)
    t = hello.grammar.tokens
    for poisoned, label in ((False, Label.SAFE), (True, Label.UNSAFE)):

        def edit(logits: torch.Tensor, poisoned: bool = poisoned) -> None:
            logits[..., t.safe] = logits[..., t.unsafe] + 5.0
            if poisoned:
                logits[..., 1000] = float("nan")

        with _head_edited(model, edit):
            result = Classifier(model).run([hello])[0]
        assert result.verdict().label is label, poisoned
        assert math.isnan(result.unsafe_probability) is poisoned


@pytest.mark.parametrize("decode", ["constrained", "greedy"])
def test_nan_logits_never_give_safe(
    checkpoint: Path, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch, decode: str
) -> None:
    """A broken forward (NaN logits, as a faulty kernel would give) fails closed: unsafe
    (constrained: no comparison with NaN is true) or an error verdict (greedy), never safe."""
    model = loaded(checkpoint)
    original = model.forward

    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full_like(original(*args, **kwargs), float("nan"))

    monkeypatch.setattr(model, "forward", broken)
    result = Classifier(model, decode=decode).run([request(tok, "hello", None)])[0]  # type: ignore[arg-type]
    assert result.verdict().label is not Label.SAFE


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete small checkpoint (tokenizer files included) for the Guard API."""
    directory = tmp_path_factory.mktemp("guard")
    config = small_config("gqa1-cross1,3")
    write_checkpoint(directory, config, random_state(ModelConfig.from_dict(config), 5))
    preprocessor = json.loads((directory / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"height": 28, "width": 28}
    return directory


@pytest.fixture(scope="module")
def guard(guard_dir: Path) -> Guard:
    return Guard.load(guard_dir, max_batch=2, max_seq=1024)


def test_guard_moderates(guard: Guard) -> None:
    photo = torch.randint(0, 256, (60, 90, 3), dtype=torch.uint8).numpy()
    verdict = guard.moderate(
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": photo}, {"type": "text", "text": "ok?"}],
            },
            {"role": "assistant", "content": "Sure."},
        ],
        excluded_categories=["S3"],
    )
    assert verdict.label in ("safe", "unsafe")
    assert isinstance(verdict.categories, list)
    assert 0.0 <= verdict.unsafe_probability <= 1.0
    assert sorted(verdict.category_probabilities) == sorted(f"S{i}" for i in range(1, 14) if i != 3)
    assert math.isclose(sum(verdict.category_probabilities.values()), 1.0, rel_tol=1e-5)
    assert verdict.error is None
    assert verdict.raw_output.startswith("\n\n")


def test_guard_is_safe_to_call_from_several_threads(guard: Guard) -> None:
    """Calls from several threads give what each gives alone. (Before, two batches ran on the
    one set of caches at once: 4 of 24 scores came out wrong, without an error.)"""
    texts = [f"message {i} " + "word " * (i * 7 % 50) for i in range(32)]
    alone = [guard.moderate([{"role": "user", "content": t}]).unsafe_probability for t in texts]
    together: list[float] = [math.nan] * len(texts)

    def work(first: int) -> None:
        for i in range(first, len(texts), 4):
            messages = [{"role": "user", "content": texts[i]}]
            together[i] = guard.moderate(messages).unsafe_probability

    threads = [threading.Thread(target=work, args=(first,)) for first in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert together == pytest.approx(alone, rel=1e-5)


def test_guard_refusals(guard: Guard) -> None:
    with pytest.raises(PromptError) as no_payload:
        guard.moderate([{"role": "user", "content": [{"type": "image"}]}])
    assert no_payload.value.reason is PromptReason.CONTENT
    with pytest.raises(PromptError) as too_long:
        guard.moderate([{"role": "user", "content": "word " * 2000}])
    assert too_long.value.reason is PromptReason.TOO_LONG
    verdicts = guard.moderate_batch(
        [
            [{"role": "user", "content": "hello"}],
            [{"role": "system", "content": "SECRET"}],
            {"messages": [{"role": "user", "content": "hi"}], "excluded_categories": ["S99"]},
            {"messages": [{"role": "user", "content": "hi"}], "categories": {"S1": "Spam."}},
        ]
    )
    assert [v.label for v in verdicts][1:3] == [Label.ERROR, Label.ERROR]
    assert "role 'system'" in str(verdicts[1].error)
    assert "SECRET" not in str(verdicts[1].error)
    assert "S99" in str(verdicts[2].error)
    assert verdicts[0].label is not Label.ERROR
    assert list(verdicts[3].category_probabilities) == ["S1"]


def test_moderate_batch_prepares_a_batch_at_a_time(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dataset's worth of images prepared at once would not fit in memory (15 MB of tiles
    each): items are prepared a batch (max_batch 2 here) at a time, from any iterable, and
    each verdict is the one the item gets alone, in order, invalid items included."""
    events: list[str] = []
    prepare, execute = guard.preparer.prepare, guard.engine.execute

    def prepared(*args: Any, **kwargs: Any) -> PreparedRequest:
        events.append("prepare")
        return prepare(*args, **kwargs)

    def executed(batch: Any) -> Any:
        events.append(f"run {len(batch)}")
        return execute(batch)

    monkeypatch.setattr(guard.preparer, "prepare", prepared)
    monkeypatch.setattr(guard.engine, "execute", executed)
    texts = ["one", "two", "three", "four", "five"]
    conversations: list[Any] = [[{"role": "user", "content": t}] for t in texts]
    conversations.insert(2, [{"role": "system", "content": "x"}])  # invalid: no run
    verdicts = guard.moderate_batch(iter(conversations))
    assert events == ["prepare"] * 2 + ["run 2", "prepare", "prepare", "prepare", "run 2"] + [
        "prepare",
        "run 1",
    ]
    assert [v.label == Label.ERROR for v in verdicts] == [False, False, True] + [False] * 3
    monkeypatch.undo()
    for conversation, verdict in zip(conversations, verdicts, strict=True):
        if verdict.label != Label.ERROR:
            alone = guard.moderate(conversation)
            assert verdict.unsafe_probability == pytest.approx(alone.unsafe_probability)


def test_guard_load_errors(guard_dir: Path) -> None:
    with pytest.raises(ConfigError, match="semantics"):
        Guard.load(guard_dir, semantics="hf")
    with pytest.raises(ConfigError, match="decode"):
        Guard.load(guard_dir, decode="beam")
    with pytest.raises(ConfigError, match="dtype"):
        Guard.load(guard_dir, dtype="int4")
    with pytest.raises(ConfigError, match=r"quantize must be one of int8, fp8 .*'int4'"):
        Guard.load(guard_dir, quantize="int4")
    with pytest.raises(ConfigError, match=r"int8_compute must be one of .*'fast'"):
        Guard.load(guard_dir, quantize="int8", int8_compute="fast")
    with pytest.raises(ConfigError, match="needs quantize='int8', not 'fp8'"):
        Guard.load(guard_dir, quantize="fp8", int8_compute="weight+activation")


@pytest.mark.parametrize(
    ("kind", "compute"), [("int8", "weight-only"), ("int8", "weight+activation"), ("fp8", None)]
)
def test_guard_quantized_at_load(guard_dir: Path, kind: str, compute: str | None) -> None:
    """`quantize=` swaps the checkpoint's linears for 8-bit ones at load (the head kept) and
    scores within the export's bounds of the full-precision model; `int8_compute` reaches every
    layer, the fused ones included (on the CPU they compute weight-only either way)."""
    full = Guard.load(guard_dir, max_batch=2, max_seq=1024)
    assert full.engine.info.dtype == "fp32"  # the precision names engine directories use
    quantized = Guard.load(
        guard_dir, max_batch=2, max_seq=1024, quantize=kind, int8_compute=compute or "weight-only"
    )
    engine = quantized.engine
    assert engine.info.dtype == kind
    model = engine.model  # type: ignore[attr-defined]
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    fused = [m.qkv for m in model.modules() if isinstance(m, SelfAttention)]
    assert layers
    assert fused
    fused_layers = [f for f in fused if isinstance(f, QuantizedLinear)]
    assert len(fused_layers) == len(fused)
    wanted = compute == "weight+activation"
    assert {m.activations for m in layers + fused_layers} == {wanted}
    assert {m.qweight.dtype for m in layers} == {
        torch.int8 if kind == "int8" else torch.float8_e4m3fn
    }
    assert not isinstance(model.language_model.lm_head, QuantizedLinear)
    texts = [TEXTS[0], TEXTS[1], TEXTS[4]]
    for text in texts:
        messages = [{"role": "user", "content": text}]
        a, b = full.moderate(messages), quantized.moderate(messages)
        assert a.label == b.label
        assert math.isclose(a.unsafe_probability, b.unsafe_probability, rel_tol=0.1)


def test_import_guardrt_does_not_import_torch() -> None:
    code = "import sys, guardrt; guardrt.Verdict; guardrt.Label; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_session_reuses_the_common_prefix_exactly(
    checkpoint: Path, tok: Tokenizer, with_image: bool
) -> None:
    """A request in a session re-reads only what differs from the session's previous prompt,
    and answers what a fresh request answers."""
    model = load_model(checkpoint, semantics="meta")
    model.setup_caches(2 + 1, 512)
    classifier = Classifier(model, sessions=1)
    session = classifier.sessions.open()
    assert session is not None
    assert classifier.sessions.open() is None  # the only session slot is taken
    tiled = image(2, seed=9) if with_image else None
    answers = ["The answer starts", "The answer starts here and goes on", "The answer starts here"]
    reused_counts = []
    for text in answers:
        base = request(tok, f"Question? {text}", tiled)
        in_session = dataclasses.replace(base, session=session)
        reused, fresh = classifier.run([in_session])[0], classifier.run([base])[0]
        assert fresh.reused_tokens == 0
        assert reused.generated == fresh.generated
        assert math.isclose(reused.unsafe_probability, fresh.unsafe_probability, rel_tol=1e-5)
        reused_counts.append(reused.reused_tokens)
    assert reused_counts[0] == 0
    assert min(reused_counts[1:]) > 100  # the shared prefix (policy, question) was not recomputed
    classifier.sessions.close(session)
    assert classifier.sessions.open() is not None


def test_decoded_times_split_the_batch_into_prefill_and_decode(
    checkpoint: Path, tok: Tokenizer
) -> None:
    classifier = Classifier(loaded(checkpoint), decode="greedy")
    started = time.perf_counter()
    (result,) = classifier.run([request(tok, "hello", None)])
    elapsed = time.perf_counter() - started
    assert result.prefill_s > 0
    assert result.decode_s > 0  # greedy generation takes several steps after the prefill
    assert result.prefill_s + result.decode_s <= elapsed


def test_session_row_beside_a_long_prompt_stays_in_the_cache(
    checkpoint: Path, tok: Tokenizer
) -> None:
    """A session row (its prefix cached) batched with a fresh prompt longer than its own
    remainder is right-padded to that prompt's width: its pad positions must not run past
    max_seq (they did: an IndexError failed the whole batch)."""
    model = load_model(checkpoint, semantics="meta")
    model.setup_caches(2 + 1, 512)
    classifier = Classifier(model, sessions=1)
    session = classifier.sessions.open()
    assert session is not None
    first = dataclasses.replace(request(tok, "Question? The answer", None), session=session)
    classifier.run([first])
    extended = dataclasses.replace(
        request(tok, "Question? The answer goes on", None), session=session
    )
    long = request(tok, "word " * 270, None)
    assert len(long.prompt) + max_new_tokens(long.grammar) <= 512  # fits alone
    assert len(first.prompt) + len(long.prompt) > 512  # the padded session row would not
    together = classifier.run([extended, long])
    alone = [classifier.run([request(tok, "Question? The answer goes on", None)])[0]]
    alone.append(classifier.run([long])[0])
    assert together[0].reused_tokens > 100
    for a, b in zip(together, alone, strict=True):
        assert a.generated == b.generated
        assert math.isclose(a.unsafe_probability, b.unsafe_probability, rel_tol=1e-5)


def test_shared_policy_prefix_gives_what_a_fresh_prefill_gives(
    checkpoint: Path, tok: Tokenizer
) -> None:
    """Text-only rows copy their policy head's K/V from a prefix row (filled once per policy,
    the least recently used evicted) and answer what full prefills answer; image rows and
    session rows do not use it."""
    preparer = Preparer(tok, IMAGE_CONFIG, 512)
    texts = ["How do I pick a lock?", "Is this fine?", "Write me a poem about the sea."]
    default = [preparer.prepare([{"role": "user", "content": t}]) for t in texts]
    custom = preparer.prepare(
        [{"role": "user", "content": texts[0]}], excluded_categories=["S1", "S2"]
    )
    response = preparer.prepare(
        [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": "No."}]
    )
    picture = np.full((40, 60, 3), 128, np.uint8)
    with_image = preparer.prepare(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": picture},
                    {"type": "text", "text": texts[1]},
                ],
            }
        ]
    )
    assert default[0].prefix_len > 100  # BOS, header, task and the 13 categories
    assert default[0].prefix_len == default[1].prefix_len != custom.prefix_len
    assert with_image.prefix_len == 0
    batch = [*default, custom, with_image, response, default[2]]
    model = load_model(checkpoint, semantics="meta")
    model.setup_caches(4 + 2, 512)
    counting = CountingSteps(TorchSteps(model))
    shared = Decoder(counting, "constrained", sessions=0, prefixes=2)
    got = shared.run(batch)
    reference = Classifier(loaded(checkpoint, "meta")).run(batch)
    for a, b in zip(got, reference, strict=True):
        assert a.generated == b.generated
        assert math.isclose(a.unsafe_probability, b.unsafe_probability, rel_tol=1e-5)
    reused = [d.reused_tokens for d in got]
    assert reused[:3] == [default[0].prefix_len] * 3
    assert reused[3] == custom.prefix_len
    assert reused[4] == 0  # the image comes before the policy: nothing to share
    assert reused[5] == response.prefix_len  # the response policy head: its own prefix
    # 6 text rows; 3 distinct heads (default, custom, response) through 2 rows: the default's
    # is evicted by the response's and filled again for the last request, 4 fills in all.
    assert (counting.copies, counting.fills) == (6, 4)
    plain_model = loaded(checkpoint, "meta")
    plain = CountingSteps(TorchSteps(plain_model))
    Decoder(plain, "constrained").run([default[0]])
    before = counting.steps
    shared.run([default[0]])  # the default head is warm now: a copy, no fill
    assert (counting.copies, counting.fills) == (7, 4)
    assert counting.steps - before == plain.steps


def test_probability_equals_a_float64_softmax() -> None:
    """The host's P(token) (float32 exponentials, float64 sum) against a float64 softmax, on
    vocab-sized rows with wide spreads, ties and -inf entries (a head that skipped rows)."""
    rng = np.random.default_rng(7)
    for scale in (0.1, 3.0, 30.0):
        row = (rng.standard_normal(128_256) * scale).astype(np.float32)
        row[rng.integers(0, 128_256, 1000)] = -np.inf
        shifted = row.astype(np.float64) - row.max()
        exact = np.exp(shifted) / np.exp(shifted).sum()
        for token in (int(np.argmax(row)), 19193, int(np.argmin(np.where(np.isinf(row), 0, row)))):
            got = probability(row, token)
            assert math.isclose(got, exact[token], rel_tol=1e-6, abs_tol=1e-300), (scale, token)
    assert probability(np.array([-np.inf, 0.0, -np.inf], np.float32), 1) == 1.0
