"""From prepared requests to verdicts with scores, driven by the verdict grammar.

Constrained decoding (default): the prefill reads the prompt followed by `\\n\\n unsafe \\n S`
(4 forced or hypothetical tokens). Causal attention makes the logits at `\\n\\n` the label
distribution (P(unsafe) and P(safe) over the full vocabulary) and those at `S` the category
distribution given `unsafe`, so one prefill gives every score. A `safe` verdict ends there; an
`unsafe` one costs one small forward per category given ([code, ",S"] at once: the logits at the
code decide between `,S` and `<|eot_id|>`, those at `,S` pick the next code).

Greedy decoding: plain argmax generation over the full vocabulary until a stop token, identical
to transformers' `generate(do_sample=False)`; the output is then parsed by the grammar, so text
outside it is an error verdict.

Ties between `safe` and `unsafe` go to `unsafe`: a safety classifier fails closed.

No torch here: every back end implements `StepModel` (image K/V into cache rows, one forward
step → numpy logits or log-probabilities of the ids asked for) and shares this loop, so the
torch and ONNX engines decide alike. The prefill asks for the log-probabilities of the ~17 ids
it reads, so the softmax over the vocabulary runs on the device (`scores.py`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from guardrt.runtime.errors import ConfigError
from guardrt.runtime.prefixes import PrefixTable
from guardrt.runtime.preprocess import TiledImage
from guardrt.runtime.requests import Decoded, PreparedRequest, check_fits, max_new_tokens
from guardrt.runtime.scores import (
    TokenLogprob,
    TokenScores,
    category_probabilities,
    category_vocab,
    prefill_vocab,
    probabilities,
    token_logprob,
)
from guardrt.runtime.sessions import SessionState, SessionTable, common_prefix
from guardrt.runtime.tokenizer import END_OF_TEXT_ID, EOM_ID, EOT_ID
from guardrt.runtime.verdict import GrammarState, Verdict, VerdictGrammar

Decode = Literal["constrained", "greedy"]
DECODES: tuple[Decode, ...] = ("constrained", "greedy")
STOP_IDS = frozenset({END_OF_TEXT_ID, EOM_ID, EOT_ID})
PAD_ID = 128_004  # <|finetune_right_pad_id|>; padded rows are never read
_MIN_PREFIX = 16  # shorter policy heads are not worth a copy


class StepModel(Protocol):
    """A model with per-row K/V caches, as the decoding loop drives it (torch or ONNX)."""

    max_batch: int  # cache rows (batch rows then session rows)
    max_seq: int  # positions per row

    def write_images(self, slots: Sequence[int], images: Sequence[TiledImage]) -> None:
        """Encode each image and write its cross-attention K/V into its row."""
        ...

    def clear_images(self, slots: Sequence[int]) -> None:
        """Zero the image K/V of rows without an image."""
        ...

    def copy_kv(self, source: int, target: int, length: int) -> None:
        """Copy row `source`'s self-attention K/V at positions 0..length-1 into row `target`."""
        ...

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
        """One forward: int64 tokens, positions (B, S), slots, image_start, num_tiles (B,),
        logit_index (B, R) → float32 (B, R, V) at those rows. K/V of the step are stored at
        (slot, position); rows are right-padded and only their real positions are read later.
        V is the vocabulary size, or with `vocab` (sorted int64 ids, the only tokens the
        caller reads) len(vocab), column j holding token vocab[j]: the head need not compute
        the others. The values are logits, or with `log_probs` log-softmax values over the
        whole vocabulary (the normaliser is reduced where the logits are; see `scores.py`)."""
        ...


@dataclass
class _Row:
    """Decoding state of one request in a batch."""

    request: PreparedRequest
    slot: int
    next_position: int = 0
    generated: list[int] = field(default_factory=list)
    state: GrammarState = field(default_factory=GrammarState)
    unsafe_probability: float = math.nan
    label_probability: float = math.nan  # P(safe) + P(unsafe) at the label (`Decoded`)
    category_probabilities: dict[str, float] = field(default_factory=dict)
    code_scores: TokenScores | None = None
    done: bool = False
    skip: int = 0  # prompt tokens already in the slot's cache (a session's common prefix)
    session: SessionState | None = None
    # With the request's `top_logprobs`: each generated token's log-probability (None where no
    # step predicted it: the blank line and tokens after the label that the grammar forces
    # outside the prefill's rows), aligned with `generated`.
    logprobs: list[TokenLogprob | None] = field(default_factory=list)


def parse_decode(value: str) -> Decode:
    for decode in DECODES:
        if value == decode:
            return decode
    raise ConfigError(f"decode must be one of {DECODES}, not {value!r}")


def _ids(values: Sequence[int] | Sequence[Sequence[int]]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


class Decoder:
    """Runs prepared requests through a `StepModel`, a batch at a time."""

    def __init__(
        self,
        model: StepModel,
        decode: Decode = "constrained",
        sessions: int = 0,
        prefixes: int = 0,
    ) -> None:
        """`model`'s cache rows hold the batch rows, then `sessions` session rows, then
        `prefixes` rows of shared policy prefixes (`prefixes.py`)."""
        if decode not in DECODES:
            raise ConfigError(f"decode must be one of {DECODES}, not {decode!r}")
        if model.max_batch <= sessions + prefixes:
            raise ValueError("the model's caches are not set up for a batch (setup_caches)")
        self.model, self.decode = model, decode
        self.batch_size = model.max_batch - sessions - prefixes
        self.sessions = SessionTable(self.batch_size, sessions)
        self.prefixes = PrefixTable(self.batch_size + sessions, prefixes)
        self._prefilled = 0.0

    def check_fits(self, request: PreparedRequest) -> None:
        check_fits(request, self.model.max_seq, self.decode)

    def classify(self, requests: Sequence[PreparedRequest]) -> list[Verdict]:
        """The verdict of each request, in order (batched up to the model's max_batch)."""
        return [decoded.verdict() for decoded in self.run(requests)]

    def run(self, requests: Sequence[PreparedRequest]) -> list[Decoded]:
        """The generated ids and scores of each request, in order."""
        for request in requests:
            self.check_fits(request)
        results: list[Decoded] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            rows = [self._row(request, slot) for slot, request in enumerate(chunk)]
            started, self._prefilled = time.perf_counter(), 0.0
            self._share_prefixes(rows)
            self._write_images(rows)
            if self.decode == "constrained":
                self._constrained(rows)
            else:
                self._greedy(rows)
            results.extend(
                Decoded(
                    row.request,
                    tuple(row.generated),
                    row.unsafe_probability,
                    row.category_probabilities,
                    row.skip,
                    prefill_s=self._prefilled - started,
                    decode_s=time.perf_counter() - self._prefilled,
                    label_probability=row.label_probability,
                    logprobs=None if row.request.top_logprobs is None else tuple(row.logprobs),
                )
                for row in rows
            )
            for row in rows:
                if row.session is not None:
                    row.session.cached = row.request.prompt
        return results

    def _row(self, request: PreparedRequest, slot: int) -> _Row:
        """A batch row; a session's row uses its own slot and skips the cached prefix (all
        but the last prompt token at most, whose logits a greedy step needs)."""
        session = self.sessions.get(request.session)
        if session is None:
            return _Row(request, slot)
        reuse = common_prefix(session.cached, request.prompt) if session.image_ready else 0
        reuse = min(reuse, len(request.prompt) - 1)
        return _Row(request, session.slot, next_position=reuse, skip=reuse, session=session)

    def _share_prefixes(self, rows: list[_Row]) -> None:
        """Text-only rows outside sessions start after their policy's prefix: its K/V, filled
        once into a prefix row (one forward), are copied into theirs."""
        if self.prefixes.count == 0:
            return
        for row in rows:
            length = row.request.prefix_len
            if row.session is not None or row.request.image is not None or length < _MIN_PREFIX:
                continue
            prefix = row.request.prompt[:length]
            slot, ready = self.prefixes.lookup(prefix)
            if not ready:
                try:  # nothing is read: asked as a prefill is, it replays a prefill's graph
                    self.model.step(
                        _ids([prefix]),
                        _ids([list(range(length))]),
                        _ids([slot]),
                        _ids([self.model.max_seq]),  # no image
                        _ids([0]),
                        _ids([[length - 1]]),
                        *self._prefill_asks([row.request.grammar]),
                    )
                except BaseException:
                    self.prefixes.forget(prefix)
                    raise
            self.model.copy_kv(slot, row.slot, length)
            row.next_position = row.skip = length

    def _write_images(self, rows: list[_Row]) -> None:
        """Image K/V into each row's slot (once per session); zeros for rows without one."""
        fresh = [row for row in rows if row.session is None or not row.session.image_ready]
        with_image = [row for row in fresh if row.request.image is not None]
        without = [row.slot for row in fresh if row.request.image is None]
        if with_image:
            images = [row.request.image for row in with_image if row.request.image is not None]
            self.model.write_images([row.slot for row in with_image], images)
        if without and (with_image or any(row.session is not None for row in fresh)):
            self.model.clear_images(without)
        for row in fresh:
            if row.session is not None:
                row.session.image_ready = True

    def _step(
        self,
        rows: list[_Row],
        tokens: list[list[int]],
        offsets: list[list[int]],
        vocab: np.ndarray | None = None,
        log_probs: bool = False,
    ) -> list[list[TokenScores]]:
        """Feed each row its tokens (right-padded) and return its scores at `offsets` (indices
        into each row's tokens): [row][offset], of `vocab`'s ids only when given, logits or
        with `log_probs` log-probabilities (`StepModel.step`)."""
        width = max(len(t) for t in tokens)
        padded = [t + [PAD_ID] * (width - len(t)) for t in tokens]
        # A row's pads continue its positions (after its real tokens, so its real queries never
        # see them) but stop at the last cache position: a session row with a long cached
        # prefix, padded to a fresh row's width, would run past max_seq. Real positions never
        # reach it before the last verdict token (check_fits), which overwrites what pads left.
        last = self.model.max_seq - 1
        positions = [[min(row.next_position + j, last) for j in range(width)] for row in rows]
        starts = [
            row.request.image_position
            if row.request.image_position is not None
            else self.model.max_seq
            for row in rows
        ]
        tiles = [row.request.image.num_tiles if row.request.image else 0 for row in rows]
        values = self.model.step(
            _ids(padded),
            _ids(positions),
            _ids([row.slot for row in rows]),
            _ids(starts),
            _ids(tiles),
            _ids(offsets),
            vocab,
            log_probs,
        )  # (B, R, V)
        for row, fed in zip(rows, tokens, strict=True):
            row.next_position += len(fed)
        if not self._prefilled:  # the batch's first forward: its prefill ends here
            self._prefilled = time.perf_counter()
        return [[TokenScores(at, vocab) for at in row_values] for row_values in values]

    def _prefill_asks(
        self, grammars: Sequence[VerdictGrammar], top: int | None = None
    ) -> tuple[np.ndarray | None, bool]:
        """(vocab, log_probs) of a prefill: constrained decoding reads the log-probabilities of
        `prefill_vocab`'s ids (with token logprobs asked, `top` not None, also of `\\n` and
        `S`, or every id for their alternatives), greedy decoding every logit."""
        if self.decode == "greedy":
            return None, False
        if top is None:
            return prefill_vocab(grammars), True
        if top:
            return None, True
        fed = [id_ for g in grammars for id_ in (g.tokens.newline, g.tokens.s)]
        return np.union1d(prefill_vocab(grammars), _ids(fed)), True

    def _category_asks(self, rows: Sequence[_Row]) -> tuple[np.ndarray | None, bool]:
        """(vocab, log_probs) of a category step: the grammar's few head rows as logits (their
        order is all it reads), or log-probabilities where token logprobs are asked."""
        top = _top_asked([row.request for row in rows])
        if top:
            return None, True
        return category_vocab([row.request.grammar for row in rows]), top is not None

    def _label_scores(self, row: _Row, label: TokenScores, code: TokenScores) -> None:
        """From the prefill's log-probabilities: P(unsafe) within ~|log P| · 6e-8 relative
        (a float32 log-probability), and the category distribution."""
        grammar = row.request.grammar
        row.unsafe_probability = math.exp(label[grammar.tokens.unsafe])
        row.label_probability = row.unsafe_probability + math.exp(label[grammar.tokens.safe])
        row.category_probabilities = category_probabilities(grammar, code)

    def _advance(self, row: _Row, token: int, scores: TokenScores | None = None) -> None:
        """Append `token`; `scores`: those of the position that predicted it (log-probabilities),
        when a step read it."""
        state = row.request.grammar.advance(row.state, token)
        assert state is not None, "constrained decoding chose a token outside the grammar"
        row.state, row.done = state, state.done
        row.generated.append(token)
        top = row.request.top_logprobs
        if top is not None:
            row.logprobs.append(None if scores is None else token_logprob(token, scores, top))

    def _pick(self, row: _Row, scores: TokenScores) -> int:
        """The allowed token with the highest score (the first allowed wins ties)."""
        allowed = row.request.grammar.allowed(row.state)
        return allowed[int(np.argmax(scores.of(allowed)))]

    def _constrained(self, rows: list[_Row]) -> None:
        first = rows[0].request.grammar.tokens
        suffix = [first.blank, first.unsafe, first.newline, first.s]
        # The prefill reads the rows at `\n\n` (the label) and `S` (the first code); with token
        # logprobs asked, also those at `unsafe` and `\n`, which predict the forced `\n`, `S`.
        top = _top_asked([row.request for row in rows])
        read = (0, 3) if top is None else (0, 1, 2, 3)
        scores = self._step(
            rows,
            [list(row.request.prompt[row.skip :]) + suffix for row in rows],
            [[len(row.request.prompt) - row.skip + i for i in read] for row in rows],
            *self._prefill_asks([row.request.grammar for row in rows], top),
        )
        for row, at in zip(rows, scores, strict=True):
            label, code = at[0], at[-1]
            self._label_scores(row, label, code)
            self._advance(row, first.blank)
            # `safe` only when strictly more likely: a tie, or scores a broken kernel made NaN
            # (every comparison false; a NaN anywhere in the row makes its normaliser and so
            # every log-probability NaN), fail closed. Rounding log-probabilities to float32
            # keeps the logits' order or makes a tie, never flips it.
            tokens = row.request.grammar.tokens
            threshold = row.request.unsafe_threshold
            if threshold is None:
                safer = label[tokens.safe] > label[tokens.unsafe]
            else:  # the caller's trade-off; a NaN compares false: unsafe
                safer = row.unsafe_probability < threshold
            self._advance(row, tokens.safe if safer else tokens.unsafe, label)
            while not row.done and (forced := row.request.grammar.forced(row.state)) is not None:
                # safe → eot; unsafe → \n, S: predicted by the prefill's rows while the
                # generated ids are the suffix it read (generated id i by row i - 1)
                i = len(row.generated)
                fed = len(at) == len(suffix) and row.generated == suffix[:i]
                self._advance(row, forced, at[i - 1] if fed else None)
            row.code_scores = code
        active = [row for row in rows if not row.done]
        while active:
            for row in active:
                assert row.code_scores is not None
                self._advance(row, self._pick(row, row.code_scores), row.code_scores)
                if (forced := row.request.grammar.forced(row.state)) is not None:
                    self._advance(row, forced)  # every listed code given: <|eot_id|>
            active = [row for row in active if not row.done]
            if not active:
                break
            comma = active[0].request.grammar.tokens.comma_s
            scores = self._step(
                active,
                [[row.generated[-1], comma] for row in active],
                [[0, 1]] * len(active),
                *self._category_asks(active),
            )
            for row, (after_code, after_comma) in zip(active, scores, strict=True):
                choice = self._pick(row, after_code)
                self._advance(row, choice, after_code)
                row.code_scores = after_comma
            active = [row for row in active if not row.done]

    def _greedy(self, rows: list[_Row]) -> None:
        scores = self._step(
            rows,
            [list(row.request.prompt[row.skip :]) for row in rows],
            [[len(row.request.prompt) - 1 - row.skip] for row in rows],
        )
        active = rows
        while active:
            for row, (logits,) in zip(active, scores, strict=True):  # the whole vocabulary
                self._record_greedy_scores(row, logits)
                token = int(np.argmax(logits.values))
                row.generated.append(token)
                if row.request.top_logprobs is not None:
                    top = row.request.top_logprobs
                    row.logprobs.append(token_logprob(token, logits, top, normalised=False))
                limit = max_new_tokens(row.request.grammar)
                row.done = token in STOP_IDS or len(row.generated) >= limit
            active = [row for row in active if not row.done]
            if active:
                scores = self._step(
                    active, [[row.generated[-1]] for row in active], [[0]] * len(active)
                )

    def _record_greedy_scores(self, row: _Row, logits: TokenScores) -> None:
        """Scores from the steps where the greedy output follows the grammar's path."""
        tokens = row.request.grammar.tokens
        if row.generated == [tokens.blank]:
            unsafe, safe = probabilities(logits.values, (tokens.unsafe, tokens.safe))
            row.unsafe_probability, row.label_probability = unsafe, unsafe + safe
        if row.generated == [tokens.blank, tokens.unsafe, tokens.newline, tokens.s]:
            row.category_probabilities = category_probabilities(row.request.grammar, logits)


def _top_asked(requests: Sequence[PreparedRequest]) -> int | None:
    """The most alternatives any of `requests` asks for with its token logprobs (0: the
    chosen tokens' only); None when none asks for token logprobs."""
    asked = [r.top_logprobs for r in requests if r.top_logprobs is not None]
    return max(asked) if asked else None
