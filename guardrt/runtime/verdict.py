"""The verdict grammar: what Llama Guard 3 Vision may answer, as a token-level state machine.

After the template's assistant header the model writes (reference §3.4, §2.3):

    \\n\\n  then  safe  <|eot_id|>
              or  unsafe  \\n  S <k>  ( ,S <k> )*  <|eot_id|>

in tokens 271, then 19193 | 39257 198 50 <k> (21861 <k>)*, then 128009, where `,S` is one
token (21861) and each code number (1..999) is one token. The same machine parses generated
ids into a `Verdict` and tells constrained decoding which tokens may come next (and which are
forced). Anything outside it — empty, truncated, an unknown, excluded or repeated category,
text after `<|eot_id|>` — is an `error` verdict, never `safe`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from guardrt.runtime.policy import DEFAULT_POLICY, Policy
from guardrt.runtime.tokenizer import EOT_ID, Tokenizer


class Label(enum.StrEnum):
    SAFE = "safe"
    UNSAFE = "unsafe"
    ERROR = "error"


@dataclass(frozen=True)
class Verdict:
    """The answer for one conversation (the public result of `Guard.moderate`)."""

    label: Label  # a str enum: compares equal to "safe" / "unsafe" / "error"
    categories: list[str]  # violated codes in the order the model gave them
    raw_output: str  # the generated text as decoded, special tokens by name
    error: str | None = None  # why the output is not a verdict; None unless label is ERROR
    # P(unsafe) over the full vocabulary at the verdict's first word; NaN when not computed
    # (a verdict parsed from ids alone).
    unsafe_probability: float = math.nan
    # P(S_k | unsafe): the category step's distribution renormalized over the listed codes.
    category_probabilities: dict[str, float] = field(default_factory=dict)
    # P(safe) + P(unsafe) at the verdict's first word: near 1 for Llama Guard, whatever the
    # verdict. Low: an input the model does not know how to judge (or not Llama Guard at all).
    label_probability: float = math.nan

    @property
    def content(self) -> str:
        """What the hosted API answers: `safe` or `unsafe\\nS1,S3`.

        An error answers `unsafe` with no category line: it fails closed for every way a client
        reads the hosted answer (`== "safe"`, `startswith("safe")`, `"unsafe" in`). The model's
        own text, which can begin with `safe` (`safe` then more text), stays in `raw_output`.
        """
        if self.label is Label.SAFE:
            return "safe"
        if self.label is Label.UNSAFE:
            return "unsafe\n" + ",".join(self.categories)
        return "unsafe"


class Phase(enum.Enum):
    START = "start"  # expects \n\n
    LABEL = "label"  # expects safe | unsafe
    SAFE = "after safe"  # expects <|eot_id|>
    UNSAFE = "after unsafe"  # expects \n
    CODE_S = "before a code"  # expects S
    CODE = "at a code number"  # expects the number of an unused listed code
    AFTER_CODE = "after a code"  # expects ,S (if a code is left) | <|eot_id|>
    DONE_SAFE = "safe"
    DONE_UNSAFE = "unsafe"


_DONE = (Phase.DONE_SAFE, Phase.DONE_UNSAFE)


@dataclass(frozen=True)
class GrammarState:
    phase: Phase = Phase.START
    codes: tuple[str, ...] = ()  # codes given so far

    @property
    def done(self) -> bool:
        return self.phase in _DONE


@dataclass(frozen=True)
class VerdictTokens:
    """The grammar's token ids, taken from the tokenizer (checked against reference §2.3)."""

    blank: int  # "\n\n"
    safe: int
    unsafe: int
    newline: int  # "\n"
    s: int  # "S"
    comma_s: int  # ",S"
    eot: int  # <|eot_id|>

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> VerdictTokens:
        def one(text: str) -> int:
            ids = tokenizer.encode_text(text)
            if len(ids) != 1:
                raise ValueError(f"{text!r} is not one token in {tokenizer.source}")
            return ids[0]

        return cls(
            blank=one("\n\n"),
            safe=one("safe"),
            unsafe=one("unsafe"),
            newline=one("\n"),
            s=one("S"),
            comma_s=one(",S"),
            eot=EOT_ID,
        )


class VerdictGrammar:
    """The grammar for one policy: only the listed codes may be answered, each at most once."""

    def __init__(self, tokenizer: Tokenizer, policy: Policy = DEFAULT_POLICY) -> None:
        self.tokenizer = tokenizer
        self.tokens = VerdictTokens.from_tokenizer(tokenizer)
        self.codes = policy.codes
        # The token of each code's number: "S13" is S (50) then 13 (1032).
        self.code_by_token: dict[int, str] = {}
        for code in self.codes:
            number = tokenizer.encode_text(code[1:])
            if len(number) != 1:
                raise ValueError(f"category {code}'s number is not one token")
            self.code_by_token[number[0]] = code
        self.token_by_code = {code: token for token, code in self.code_by_token.items()}
        t = self.tokens
        self._fixed: dict[Phase, dict[int, Phase]] = {
            Phase.START: {t.blank: Phase.LABEL},
            Phase.LABEL: {t.safe: Phase.SAFE, t.unsafe: Phase.UNSAFE},
            Phase.SAFE: {t.eot: Phase.DONE_SAFE},
            Phase.UNSAFE: {t.newline: Phase.CODE_S},
            Phase.CODE_S: {t.s: Phase.CODE},
        }

    def start(self) -> GrammarState:
        return GrammarState()

    def allowed(self, state: GrammarState) -> tuple[int, ...]:
        """Token ids that may come next (empty once the verdict is complete)."""
        if state.phase in self._fixed:
            return tuple(self._fixed[state.phase])
        left = tuple(self.token_by_code[c] for c in self.codes if c not in state.codes)
        if state.phase is Phase.CODE:
            return left
        if state.phase is Phase.AFTER_CODE:
            return (self.tokens.comma_s, self.tokens.eot) if left else (self.tokens.eot,)
        return ()

    def forced(self, state: GrammarState) -> int | None:
        """The only token allowed next, if exactly one is (decoding can skip the model)."""
        allowed = self.allowed(state)
        return allowed[0] if len(allowed) == 1 else None

    def advance(self, state: GrammarState, token: int) -> GrammarState | None:
        """The state after `token`, or None if the grammar does not allow it there."""
        if token not in self.allowed(state):
            return None
        if state.phase in self._fixed:
            return GrammarState(self._fixed[state.phase][token], state.codes)
        if state.phase is Phase.CODE:
            return GrammarState(Phase.AFTER_CODE, (*state.codes, self.code_by_token[token]))
        if token == self.tokens.comma_s:
            return GrammarState(Phase.CODE, state.codes)
        return GrammarState(Phase.DONE_UNSAFE, state.codes)

    def _why(self, state: GrammarState, token: int) -> str:
        code = self._number_code(token)
        if state.phase is Phase.CODE and code is not None and code in state.codes:
            return f"category {code} repeated"
        if state.phase is Phase.CODE and code is not None:
            return f"category {code} is not in the policy"
        if state.done:
            return f"token {token} after the verdict's <|eot_id|>"
        return f"token {token} not allowed {state.phase.value}"

    def _number_code(self, token: int) -> str | None:
        if token in self.code_by_token:
            return self.code_by_token[token]
        digits = self.tokenizer.token_bytes(token)
        # Only a listed code's number or another plain number counts as a category.
        return f"S{digits.decode()}" if digits.isdigit() and not digits.startswith(b"0") else None

    def parse(self, ids: Sequence[int], state: GrammarState | None = None) -> Verdict:
        """The verdict of generated ids (from `state`, default the grammar's start)."""
        state = state or self.start()
        raw = self.tokenizer.decode(ids)
        for token in ids:
            after = self.advance(state, token)
            if after is None:
                return Verdict(Label.ERROR, [], raw, self._why(state, token))
            state = after
        if state.phase is Phase.DONE_SAFE:
            return Verdict(Label.SAFE, [], raw)
        if state.phase is Phase.DONE_UNSAFE:
            return Verdict(Label.UNSAFE, list(state.codes), raw)
        reason = "empty output" if not ids else f"output ends {state.phase.value}"
        return Verdict(Label.ERROR, [], raw, reason)
