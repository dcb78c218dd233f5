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


MAX_TOP_LOGPROBS = 20  # the most alternatives a position reports (the OpenAI API's bound)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model: the full-vocabulary log-softmax
    at the position that predicted it (whatever constrained decoding allowed there), and the
    `top` most likely tokens at that position as (id, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(
    token: int, scores: TokenScores, top: int, normalised: bool = True
) -> TokenLogprob:
    """`token`'s entry from the scores of the position that predicted it: log-probabilities
    (`normalised`, as a step asked with `log_probs` returns them) or logits of every token
    (normalised here, in float64). `top` alternatives need every token's score."""
    if top and scores.vocab is not None:
        raise ValueError(f"{top} alternatives need every token's score, not {len(scores.vocab)}")
    values = scores.values
    if not normalised:
        if scores.vocab is not None:
            raise ValueError("logits of some tokens cannot be normalised")
        peak = float(values.max())
        total = float(np.exp(values - peak, dtype=np.float32).sum(dtype=np.float64))
        values = (values.astype(np.float64) - (peak + math.log(total))).astype(np.float32)
        scores = TokenScores(values)
    best: tuple[tuple[int, float], ...] = ()
    if top:
        count = min(top, len(values))
        picked = np.argpartition(-values, count - 1)[:count]  # (count,) unordered
        ranked = sorted(picked.tolist(), key=lambda i: (-float(values[i]), i))
        best = tuple((i, float(values[i])) for i in ranked)
    return TokenLogprob(token, scores[token], best)
