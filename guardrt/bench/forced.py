"""Force a verdict's path without skipping any of its work: every forward runs in full, then
the logits the decoding loop reads are edited so the grammar takes the chosen path.

With random weights the path would be whatever the weights say; a benchmark needs both the
`safe` path (one prefill) and the `unsafe` + one category path (one more small forward), the
two costs a deployment sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from guardrt.runtime.decoding import StepModel
from guardrt.runtime.preprocess import TiledImage
from guardrt.runtime.scores import columns
from guardrt.runtime.verdict import VerdictGrammar

Path = Literal["safe", "unsafe"]
_TOP = 1e6  # a forced logit: softmax gives its token probability 1 (a max over the batch's
# logits, the old way, cost milliseconds of host time per batch of 32 rows)


class ForcedSteps:
    """A `StepModel` that runs `inner` and forces, per batch (`reset` before each run): at the
    prefill, the label row to `path` and the category row to `code`; after a code, the end."""

    def __init__(self, inner: StepModel, grammar: VerdictGrammar, path: Path, code: str) -> None:
        self.inner, self.path = inner, path
        self.max_batch, self.max_seq = inner.max_batch, inner.max_seq
        tokens = grammar.tokens
        self._label = tokens.safe if path == "safe" else tokens.unsafe
        self._other = tokens.unsafe if path == "safe" else tokens.safe
        self._code = grammar.token_by_code[code]
        self._end = tokens.eot
        self._steps = 0

    def reset(self) -> None:
        self._steps = 0

    def write_images(self, slots: Sequence[int], images: Sequence[TiledImage]) -> None:
        self.inner.write_images(slots, images)

    def clear_images(self, slots: Sequence[int]) -> None:
        self.inner.clear_images(slots)

    def copy_kv(self, source: int, target: int, length: int) -> None:
        self.inner.copy_kv(source, target, length)

    def step(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        image_start: np.ndarray,
        num_tiles: np.ndarray,
        logit_index: np.ndarray,
        vocab: np.ndarray | None = None,
        log_probs: bool = False,
    ) -> np.ndarray:
        scores = self.inner.step(
            tokens, positions, slots, image_start, num_tiles, logit_index, vocab, log_probs
        )  # (B, R, V)
        if logit_index.shape[1] == 1:  # filling a shared prefix row: no decision read
            return scores

        def column(token: int) -> int:
            return token if vocab is None else int(columns(vocab, np.asarray([token]))[0])

        if self._steps == 0:  # the prefill: rows (label, category)
            if log_probs:  # probability 1 for the label, 0 for the other one
                scores[:, 0, column(self._other)] = -np.inf
                scores[:, 0, column(self._label)] = 0.0
            else:  # above any real logit
                scores[:, 0, column(self._label)] = _TOP
            scores[:, 1, column(self._code)] = _TOP  # read as a softmax over the codes only
        else:  # a category step: rows (after the code, after ",S")
            scores[:, 0, column(self._end)] = _TOP
        self._steps += 1
        return scores
