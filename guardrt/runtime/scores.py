"""What a verdict reads off a step's output: the values of a few token ids per row, and the
probabilities made of them.

A step (`decoding.StepModel.step`) returns, per row it was asked for, either every token's
logit or, with `vocab`, the values of those ids only; with `log_probs`, log-softmax values over
the whole vocabulary instead of logits. The constrained prefill asks for log-probabilities of
the ~17 ids it reads: the softmax over 128,256 logits then runs where the logits are (one fused
reduction on a GPU), and a row comes back as ~70 bytes instead of 0.5 MB. On the host, a
float32 softmax of one row cost ~0.4 ms (2-core CPU), ~12 ms a batch of 32 prefills, with the
0.5 MB copies and a -inf fill of every row of a category step on top.

No torch here: the decoding loop and the graph back ends share this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from guardrt.runtime.verdict import VerdictGrammar


@dataclass(frozen=True)
class TokenScores:
    """One row of a step's output: `values` (V,) float32 of the token ids `vocab` (V,), sorted,
    or of every token (V = vocabulary size) when `vocab` is None. Logits or log-probabilities,
    as the step was asked."""

    values: np.ndarray
    vocab: np.ndarray | None = None

    def of(self, ids: Sequence[int]) -> np.ndarray:
        """The values of `ids` (n,), in their order; an id the step did not return is a bug
        in the caller (it asked for the wrong `vocab`), so it raises."""
        wanted = np.asarray(ids, dtype=np.int64)  # (n,)
        at = wanted if self.vocab is None else columns(self.vocab, wanted)  # (n,)
        picked: np.ndarray = self.values[at]
        return picked

    def __getitem__(self, token: int) -> float:
        return float(self.of([token])[0])


def columns(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The columns (n,) of the token ids `ids` (n,) in a step's output over the sorted ids
    `vocab`; an id not among them raises `KeyError` (never the neighbouring column)."""
    found_at = np.searchsorted(vocab, ids)  # (n,)
    found = found_at < len(vocab)
    found[found] = vocab[found_at[found]] == ids[found]
    if not found.all():
        missing = ids[~found].tolist()
        raise KeyError(f"token ids {missing} are not among the step's {len(vocab)}")
    return found_at


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, computed in float64 (vocab-wide sums of tiny terms)."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    result: np.ndarray = weights / weights.sum(axis=-1, keepdims=True)
    return result


def probability(logits: np.ndarray, token: int) -> float:
    """softmax(logits)[token] for one row of logits (vocab,). The normaliser's exponentials are
    float32 (each within ~1e-7 relative; those that underflow are below 1e-38 of the largest,
    which is 1) summed in float64; the token's own term is float64, so a tiny probability stays
    tiny, not 0. 6× cheaper than a float64 softmax."""
    return probabilities(logits, (token,))[0]


def probabilities(logits: np.ndarray, tokens: Sequence[int]) -> list[float]:
    """`probability` of each of `tokens`, over one normaliser."""
    top = float(logits.max())
    weights = np.exp(logits - top, dtype=np.float32)  # (vocab,); exp(-inf) = 0
    total = float(weights.sum(dtype=np.float64))
    return [math.exp(float(logits[token]) - top) / total for token in tokens]


def category_probabilities(grammar: VerdictGrammar, scores: TokenScores) -> dict[str, float]:
    """P(S_k | unsafe): the values (logits or log-probabilities, the same up to a shift) at the
    category step, softmaxed over the listed codes' number tokens only (the only tokens the
    grammar allows there)."""
    tokens = [grammar.token_by_code[code] for code in grammar.codes]
    weights = softmax(scores.of(tokens))
    return {code: float(w) for code, w in zip(grammar.codes, weights, strict=True)}


def category_vocab(grammars: Sequence[VerdictGrammar]) -> np.ndarray:
    """The only tokens a category step reads (sorted ids): after a code, `,S` or the end;
    after `,S`, the listed codes' numbers. The head computes these rows and no others."""
    tokens: set[int] = set()
    for grammar in grammars:
        tokens.update(grammar.token_by_code.values())
        tokens.update((grammar.tokens.comma_s, grammar.tokens.eot))
    return np.asarray(sorted(tokens), dtype=np.int64)


def prefill_vocab(grammars: Sequence[VerdictGrammar]) -> np.ndarray:
    """The only tokens a constrained prefill reads (sorted ids): `safe` and `unsafe` at the
    label row, and at the category row what a category step reads."""
    labels = [id_ for g in grammars for id_ in (g.tokens.safe, g.tokens.unsafe)]
    return np.union1d(category_vocab(grammars), np.asarray(labels, dtype=np.int64))
