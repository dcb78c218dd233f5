"""The typed messages between stages: a prepared request in, what the model produced out.

request (messages, policy) → `PreparedRequest` (prompt ids, tiles, grammar) → engine →
`Decoded` (generated ids, scores) → `Verdict`. No torch here: every back end shares them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from guardrt.runtime.errors import PromptError, PromptReason
from guardrt.runtime.preprocess import TiledImage
from guardrt.runtime.scores import TokenLogprob
from guardrt.runtime.tokenizer import IMAGE_ID
from guardrt.runtime.verdict import Label, Verdict, VerdictGrammar


@dataclass(frozen=True)
class PreparedRequest:
    """A request ready for the model (the typed message between prompting and the engine)."""

    prompt: tuple[int, ...]  # token ids, ending at the assistant header
    image: TiledImage | None
    grammar: VerdictGrammar  # the policy's grammar: which codes may be answered
    session: int | None = None  # a cache session whose K/V this request may reuse
    prefix_len: int = 0  # leading ids that depend only on the policy (text-only prompts)
    # Token logprobs wanted: None for none, else the verdict tokens' log-probabilities with
    # this many most likely alternatives at each (0 to scores.MAX_TOP_LOGPROBS).
    top_logprobs: int | None = None
    # `unsafe` when P(unsafe) ≥ this (`policy.check_threshold`); None: when `unsafe` is likelier
    # than `safe`. Constrained decoding only.
    unsafe_threshold: float | None = None

    @property
    def image_position(self) -> int | None:
        return self.prompt.index(IMAGE_ID) if self.image is not None else None


@dataclass(frozen=True)
class Decoded:
    """What the model produced for one request (the engine's output message)."""

    request: PreparedRequest
    generated: tuple[int, ...]  # ids after the prompt, starting with 271 (the blank line)
    unsafe_probability: float  # NaN when the output left the grammar's path before the label
    category_probabilities: dict[str, float]
    reused_tokens: int = 0  # prompt tokens whose K/V were copied (a session's, a shared prefix)
    prefill_s: float = 0.0  # its batch's image encoding and first forward (host-side clock)
    decode_s: float = 0.0  # its batch's later forwards
    # P(safe) + P(unsafe) at the verdict's first word (full-vocabulary softmax): near 1 for
    # Llama Guard, whatever the verdict; far below it for a model not fine-tuned to answer so.
    # NaN where unknown (greedy output off the grammar's path).
    label_probability: float = math.nan
    # With the request's `top_logprobs`: each generated id's log-probability, None where no
    # step predicted it (`decoding._Row.logprobs`); None when not asked.
    logprobs: tuple[TokenLogprob | None, ...] | None = None

    def content_logprobs(self) -> tuple[TokenLogprob, ...] | None:
        """The log-probabilities of the tokens of the verdict's `content` (`safe`, or `unsafe`
        `\\n` `S` 1 `,S` 3: the ids between the blank line and `<|eot_id|>`), each from the
        step that predicted it. None when not asked, and for an error verdict, whose content
        (`unsafe`) is not what the model wrote."""
        if self.logprobs is None or self.verdict().label is Label.ERROR:
            return None
        inner = self.logprobs[1:-1]  # (len(generated) - 2,): a verdict ends with <|eot_id|>
        assert len(self.logprobs) == len(self.generated), "a logprob for every generated id"
        known = tuple(entry for entry in inner if entry is not None)
        assert len(known) == len(inner), "every content token was predicted by a step"
        return known

    def verdict(self) -> Verdict:
        parsed = self.request.grammar.parse(self.generated)
        return dataclasses.replace(
            parsed,
            unsafe_probability=self.unsafe_probability,
            category_probabilities=self.category_probabilities,
            label_probability=self.label_probability,
        )


def max_new_tokens(grammar: VerdictGrammar) -> int:
    """Enough for the longest verdict: \\n\\n unsafe \\n S k (,S k)* <|eot_id|>, plus slack."""
    return 8 + 2 * len(grammar.codes)


# Why greedy decoding refuses a threshold: it writes what the model writes, deciding nothing.
GREEDY_THRESHOLD = (
    "an unsafe threshold needs constrained decoding; this engine decodes greedily "
    "(--decode greedy), writing what the model writes"
)


def check_fits(request: PreparedRequest, max_seq: int, decode: str = "constrained") -> None:
    """Refuse what an engine of `max_seq` positions decoding by `decode` cannot run: a prompt
    that cannot hold its verdict, or a threshold under greedy decoding."""
    if decode == "greedy" and request.unsafe_threshold is not None:
        raise PromptError(PromptReason.THRESHOLD, GREEDY_THRESHOLD)
    needed = len(request.prompt) + max_new_tokens(request.grammar)
    if needed > max_seq:
        raise PromptError(
            PromptReason.TOO_LONG,
            f"the prompt is {len(request.prompt)} tokens; with its verdict it needs "
            f"{needed} of the model's {max_seq}",
        )
