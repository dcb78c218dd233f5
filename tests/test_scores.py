"""What a verdict reads off a step (`guardrt/runtime/scores.py`): token lookups in compact
step outputs and the ids a prefill asks for (the graph back ends' normaliser is reduced in
the decoder graph: tests/test_decoder_graph.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from guardrt.runtime.policy import make_policy
from guardrt.runtime.scores import (
    TokenScores,
    category_probabilities,
    category_vocab,
    prefill_vocab,
    probabilities,
    probability,
)
from guardrt.runtime.tokenizer import Tokenizer
from guardrt.runtime.verdict import VerdictGrammar


def test_token_scores_look_ids_up_in_their_columns() -> None:
    values = np.array([0.5, -1.0, 2.0, 3.0], np.float32)
    compact = TokenScores(values, np.array([7, 19, 300, 128_000]))
    assert compact.of([300, 7, 300]).tolist() == [2.0, 0.5, 2.0]  # in the order asked
    assert compact[128_000] == 3.0
    everywhere = TokenScores(np.arange(10, dtype=np.float32))
    assert everywhere.of([9, 2]).tolist() == [9.0, 2.0]


@pytest.mark.parametrize("missing", [8, 0, 200_000])
def test_an_id_the_step_did_not_return_is_refused(missing: int) -> None:
    """Below, between and past the columns: never the neighbouring column's value."""
    compact = TokenScores(np.zeros(3, np.float32), np.array([7, 19, 300]))
    with pytest.raises(KeyError, match=str(missing)):
        compact.of([19, missing])


def test_prefill_vocab_holds_what_a_prefill_reads(tok: Tokenizer) -> None:
    full = VerdictGrammar(tok, make_policy())
    fewer = VerdictGrammar(tok, make_policy(excluded_categories=["S1", "S2"]))
    ids = prefill_vocab([full])
    assert ids.tolist() == sorted(ids.tolist())
    assert {full.tokens.safe, full.tokens.unsafe} < set(ids.tolist())
    assert set(category_vocab([full]).tolist()) < set(ids.tolist())
    assert len(ids) == 17  # 13 codes, ",S", the end, safe and unsafe
    assert len(prefill_vocab([fewer])) == 15
    assert np.array_equal(prefill_vocab([fewer, full]), ids)  # a batch's union


def test_category_probabilities_from_log_probabilities_or_logits(tok: Tokenizer) -> None:
    """A softmax over the codes only: the same from logits as from log-probabilities (they
    differ by a row's constant), read through compact columns."""
    grammar = VerdictGrammar(tok, make_policy(excluded_categories=["S3"]))
    vocab = category_vocab([grammar])
    logits = np.random.default_rng(1).standard_normal(len(vocab)).astype(np.float32)
    from_logits = category_probabilities(grammar, TokenScores(logits, vocab))
    shifted = category_probabilities(grammar, TokenScores(logits - np.float32(7.25), vocab))
    assert tuple(from_logits) == tuple(grammar.codes)
    assert "S3" not in from_logits
    assert math.isclose(sum(from_logits.values()), 1.0, rel_tol=1e-12)
    for code, value in from_logits.items():
        assert math.isclose(shifted[code], value, rel_tol=1e-6)


def test_probabilities_share_one_normaliser_and_equal_a_float64_softmax() -> None:
    logits = np.random.default_rng(2).standard_normal(128_256).astype(np.float32) * 4
    logits[7] = -40.0  # a tiny probability stays tiny, not 0
    exact = np.exp(logits.astype(np.float64) - logits.max())
    exact /= exact.sum()
    got = probabilities(logits, (3, 7, 100_000))
    for token, value in zip((3, 7, 100_000), got, strict=True):
        assert math.isclose(value, float(exact[token]), rel_tol=1e-6)
        assert value == probability(logits, token)
    assert got[1] > 0
