"""The verdict grammar: reference token ids, parsing generated ids, and constrained decoding."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from guardrt.runtime.policy import DEFAULT_POLICY, Policy, make_policy
from guardrt.runtime.tokenizer import END_OF_TEXT_ID, EOT_ID, load_tokenizer
from guardrt.runtime.verdict import (
    GrammarState,
    Label,
    Phase,
    Verdict,
    VerdictGrammar,
    VerdictTokens,
)

TOK = load_tokenizer()  # cached: the same object as conftest's `tok`

# Reference §2.3: the grammar's tokens and the default policy's code numbers.
BLANK, SAFE, UNSAFE, NEWLINE, S, COMMA_S = 271, 19193, 39257, 198, 50, 21861
CODE_TOKENS = {
    "S1": 16, "S2": 17, "S3": 18, "S4": 19, "S5": 20, "S6": 21, "S7": 22, "S8": 23, "S9": 24,
    "S10": 605, "S11": 806, "S12": 717, "S13": 1032,
}  # fmt: skip
CODES = tuple(CODE_TOKENS)
TWO_CODES = make_policy({"S1": "A.", "S20": "B."})


def ids(text: str, eot: bool = False, extra: Sequence[int] = ()) -> list[int]:
    """The ids of `text` as ordinary text, then `<|eot_id|>` if asked, then `extra` raw ids."""
    return [*TOK.encode_text(text), *([EOT_ID] if eot else []), *extra]


@functools.cache
def grammar(policy: Policy = DEFAULT_POLICY) -> VerdictGrammar:
    return VerdictGrammar(TOK, policy)


def test_verdict_tokens_are_the_reference_ids() -> None:
    assert VerdictTokens.from_tokenizer(TOK) == VerdictTokens(
        blank=271, safe=19193, unsafe=39257, newline=198, s=50, comma_s=21861, eot=128009
    )
    assert EOT_ID == 128009


def test_code_number_tokens_of_the_default_policy() -> None:
    assert grammar().token_by_code == CODE_TOKENS
    assert grammar().code_by_token == {token: code for code, token in CODE_TOKENS.items()}
    assert grammar().codes == CODES


def test_code_number_tokens_follow_the_policy() -> None:
    assert grammar(TWO_CODES).token_by_code == {"S1": 16, "S20": 508}
    excluded = make_policy(excluded_categories=["S1", "S13"])
    assert set(grammar(excluded).token_by_code) == set(CODES[1:12])


@dataclass(frozen=True)
class Case:
    name: str
    ids: list[int]
    label: Label
    categories: tuple[str, ...] = ()
    error: str = ""  # a substring the error must contain
    policy: Policy = DEFAULT_POLICY
    text: str = ""  # for valid cases: the text whose encoding must be `reference`
    reference: tuple[int, ...] = ()


def valid(
    name: str,
    text: str,
    reference: Sequence[int],
    categories: tuple[str, ...] = (),
    policy: Policy = DEFAULT_POLICY,
) -> Case:
    label = Label.UNSAFE if categories else Label.SAFE
    return Case(name, ids(text, eot=True), label, categories, "", policy, text, tuple(reference))


def refused(name: str, token_ids: list[int], error: str, policy: Policy = DEFAULT_POLICY) -> Case:
    return Case(name, token_ids, Label.ERROR, (), error, policy)


CASES = [
    valid("safe", "\n\nsafe", [271, 19193]),
    valid("unsafe-one", "\n\nunsafe\nS1", [271, 39257, 198, 50, 16], ("S1",)),
    valid(
        "unsafe-two",
        "\n\nunsafe\nS1,S3",
        [271, 39257, 198, 50, 16, 21861, 18],
        ("S1", "S3"),
    ),
    valid(
        "unsafe-two-digit-codes",
        "\n\nunsafe\nS10,S11",
        [271, 39257, 198, 50, 605, 21861, 806],
        ("S10", "S11"),
    ),
    valid(
        "unsafe-out-of-order",
        "\n\nunsafe\nS13,S1",
        [271, 39257, 198, 50, 1032, 21861, 16],
        ("S13", "S1"),
    ),
    valid(
        "unsafe-all-13",
        "\n\nunsafe\n" + ",".join(CODES),
        [271, 39257, 198, 50, 16, *(t for c in CODES[1:] for t in (21861, CODE_TOKENS[c]))],
        CODES,
    ),
    valid(
        "custom-policy-s20",
        "\n\nunsafe\nS20",
        [271, 39257, 198, 50, 508],
        ("S20",),
        TWO_CODES,
    ),
    refused("empty", [], "empty output"),
    refused("safe-truncated", ids("\n\nsafe"), "ends after safe"),
    refused("unsafe-no-newline", ids("\n\nunsafe", eot=True), "token 128009 not allowed"),
    refused("unsafe-no-code", ids("\n\nunsafe\n", eot=True), "token 128009 not allowed"),
    refused("unsafe-s-no-number", ids("\n\nunsafe\nS", eot=True), "token 128009 not allowed"),
    refused("unsafe-truncated", ids("\n\nunsafe\nS1"), "ends after a code"),
    refused("s14-not-in-default", ids("\n\nunsafe\nS14", eot=True), "S14 is not in the policy"),
    refused(
        "excluded-code",
        ids("\n\nunsafe\nS1", eot=True),
        "S1 is not in the policy",
        make_policy(excluded_categories=["S1"]),
    ),
    refused("repeated", ids("\n\nunsafe\nS1,S1", eot=True), "S1 repeated"),
    refused("text-after-eot", ids("\n\nsafe", eot=True, extra=[198]), "after the verdict's"),
    refused("eot-after-eot", ids("\n\nsafe", eot=True, extra=[EOT_ID]), "after the verdict's"),
    refused("no-leading-blank", ids("safe", eot=True), "token 19193 not allowed"),
    refused("capital-safe", ids("\n\nSafe", eot=True), "not allowed label"),
    refused("safe-newline", ids("\n\nsafe\n", eot=True), "token 198 not allowed after safe"),
    refused("space-after-comma", ids("\n\nunsafe\nS1, S3", eot=True), "token 11 not allowed"),
    refused("end-of-text", ids("\n\nsafe", extra=[END_OF_TEXT_ID]), "token 128001 not allowed"),
    refused("out-of-vocabulary", ids("\n\nunsafe\nS", extra=[999_999]), "token 999999"),
    refused("negative-id", ids("\n\n", extra=[-1]), "token -1 not allowed"),
    refused(
        "custom-policy-s2", ids("\n\nunsafe\nS2", eot=True), "S2 is not in the policy", TWO_CODES
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_parse(case: Case) -> None:
    verdict = grammar(case.policy).parse(case.ids)
    assert verdict.label is case.label, verdict.error
    assert verdict.categories == list(case.categories)
    assert (verdict.error is None) == (case.label is not Label.ERROR)
    assert case.error in str(verdict.error)
    assert verdict.raw_output == TOK.decode(case.ids)
    if case.label is not Label.ERROR:
        assert TOK.encode_text(case.text) == list(case.reference)
        assert case.ids == [*case.reference, EOT_ID]


def test_reference_encodings_without_the_blank() -> None:
    assert TOK.encode_text("unsafe\nS1,S3") == [39257, 198, 50, 16, 21861, 18]
    assert TOK.encode_text("unsafe\nS10,S11") == [39257, 198, 50, 605, 21861, 806]


def test_invalid_ids_are_shown_by_number() -> None:
    assert (
        "<|invalid_token:999999|>"
        in grammar().parse(ids("\n\nunsafe\nS", extra=[999_999])).raw_output
    )
    assert "<|invalid_token:-1|>" in grammar().parse([BLANK, -1]).raw_output


def test_special_tokens_are_shown_by_name() -> None:
    assert grammar().parse(ids("\n\nsafe", eot=True)).raw_output == "\n\nsafe<|eot_id|>"
    assert grammar().parse(ids("\n\nsafe", extra=[END_OF_TEXT_ID])).raw_output == (
        "\n\nsafe<|end_of_text|>"
    )


# The grammar's tokens, the code numbers, <|end_of_text|>, " " and ",", or any vocabulary id.
GRAMMAR_TOKENS = [BLANK, SAFE, UNSAFE, NEWLINE, S, COMMA_S, EOT_ID, *CODE_TOKENS.values()]
ALPHABET = st.one_of(
    st.sampled_from([*GRAMMAR_TOKENS, END_OF_TEXT_ID, 220, 11]), st.integers(0, 128256)
)


@settings(max_examples=300, deadline=None)
@given(token_ids=st.lists(ALPHABET, max_size=8))
@example(token_ids=[BLANK, SAFE, EOT_ID])
@example(token_ids=[BLANK, UNSAFE, NEWLINE, S, 1032, COMMA_S, 16, EOT_ID])
def test_parse_only_accepts_the_grammar(token_ids: list[int]) -> None:
    verdict = grammar().parse(token_ids)
    assert (verdict.error is None) == (verdict.label is not Label.ERROR)
    if verdict.label is Label.SAFE:
        assert token_ids == [271, 19193, 128009]
        assert verdict.categories == []
    if verdict.label is Label.UNSAFE:
        codes = verdict.categories
        assert [*TOK.encode_text("\n\nunsafe\n" + ",".join(codes)), 128009] == token_ids
        assert len(set(codes)) == len(codes) >= 1
        assert set(codes) <= set(DEFAULT_POLICY.codes)


def walk(g: VerdictGrammar, token_ids: Sequence[int]) -> GrammarState:
    state = g.start()
    for token in token_ids:
        after = g.advance(state, token)
        assert after is not None, (state, token)
        state = after
    return state


def test_constrained_decoding_of_safe() -> None:
    g = grammar()
    state = g.start()
    assert state == GrammarState(Phase.START, ())
    assert g.allowed(state) == (BLANK,)
    assert g.forced(state) == BLANK
    label = walk(g, [BLANK])
    assert label.phase is Phase.LABEL
    assert set(g.allowed(label)) == {SAFE, UNSAFE}
    assert g.forced(label) is None
    after_safe = walk(g, [BLANK, SAFE])
    assert g.forced(after_safe) == EOT_ID
    done = walk(g, [BLANK, SAFE, EOT_ID])
    assert done.phase is Phase.DONE_SAFE
    assert done.done
    assert g.allowed(done) == ()
    assert g.forced(done) is None
    assert g.advance(done, EOT_ID) is None


def test_constrained_decoding_of_unsafe() -> None:
    g = grammar(TWO_CODES)
    state = walk(g, [BLANK, UNSAFE])
    assert state.phase is Phase.UNSAFE
    assert g.forced(state) == NEWLINE
    state = walk(g, [BLANK, UNSAFE, NEWLINE])
    assert state.phase is Phase.CODE_S
    assert g.forced(state) == S
    state = walk(g, [BLANK, UNSAFE, NEWLINE, S])
    assert state.phase is Phase.CODE
    assert g.allowed(state) == (16, 508)  # S1, S20
    assert g.forced(state) is None
    assert g.advance(state, 17) is None  # S2 is not listed
    state = walk(g, [BLANK, UNSAFE, NEWLINE, S, 508])
    assert state == GrammarState(Phase.AFTER_CODE, ("S20",))
    assert g.allowed(state) == (COMMA_S, EOT_ID)
    assert g.forced(state) is None
    state = walk(g, [BLANK, UNSAFE, NEWLINE, S, 508, COMMA_S])
    assert g.allowed(state) == (16,)  # only the unused code is left
    assert g.forced(state) == 16
    assert g.advance(state, 508) is None  # no repeats
    state = walk(g, [BLANK, UNSAFE, NEWLINE, S, 508, COMMA_S, 16])
    assert state == GrammarState(Phase.AFTER_CODE, ("S20", "S1"))
    assert g.allowed(state) == (EOT_ID,)
    assert g.forced(state) == EOT_ID
    assert g.advance(state, COMMA_S) is None
    done = walk(g, [BLANK, UNSAFE, NEWLINE, S, 508, COMMA_S, 16, EOT_ID])
    assert done == GrammarState(Phase.DONE_UNSAFE, ("S20", "S1"))
    assert g.allowed(done) == ()
    assert g.forced(done) is None
    assert g.advance(done, EOT_ID) is None


def test_forced_walk_from_start_stops_at_the_label() -> None:
    g = grammar()
    state = g.start()
    walked = []
    while (token := g.forced(state)) is not None:
        walked.append(token)
        after = g.advance(state, token)
        assert after is not None
        state = after
    assert walked == [BLANK]
    assert state.phase is Phase.LABEL
    # After `unsafe` the forced tokens run to the code number.
    state = walk(g, [BLANK, UNSAFE])
    walked = []
    while (token := g.forced(state)) is not None:
        walked.append(token)
        after = g.advance(state, token)
        assert after is not None
        state = after
    assert walked == [NEWLINE, S]
    assert set(g.allowed(state)) == set(CODE_TOKENS.values())


@settings(max_examples=200, deadline=None)
@given(order=st.permutations(CODES), count=st.integers(1, len(CODES)))
def test_every_code_subset_and_order_decodes(order: list[str], count: int) -> None:
    g = grammar()
    codes = order[:count]
    token_ids = ids("\n\nunsafe\n" + ",".join(codes), eot=True)
    state = g.start()
    for token in token_ids:
        assert token in g.allowed(state)
        if state.phase is Phase.CODE:
            unused = {CODE_TOKENS[c] for c in CODES if c not in state.codes}
            assert set(g.allowed(state)) == unused
        after = g.advance(state, token)
        assert after is not None
        state = after
    assert state.phase is Phase.DONE_UNSAFE
    assert state.codes == tuple(codes)
    assert g.parse(token_ids) == Verdict(Label.UNSAFE, list(codes), TOK.decode(token_ids))


def test_parse_from_the_state_after_the_blank() -> None:
    """Constrained decoding puts 271 in the prompt and parses only what the model wrote."""
    g = grammar()
    state = g.advance(g.start(), BLANK)
    assert state is not None
    safe = g.parse([SAFE, EOT_ID], state=state)
    assert (safe.label, safe.raw_output, safe.error) == (Label.SAFE, "safe<|eot_id|>", None)
    unsafe = g.parse(ids("unsafe\nS1,S3", eot=True), state=state)
    assert (unsafe.label, unsafe.categories) == (Label.UNSAFE, ["S1", "S3"])
    assert unsafe.raw_output == "unsafe\nS1,S3<|eot_id|>"
    twice = g.parse(ids("\n\nsafe", eot=True), state=state)
    assert twice.label is Label.ERROR
    assert "token 271 not allowed" in str(twice.error)
    assert g.parse([], state=state).error == "empty output"  # the model wrote nothing
    # The state is not mutated: the same state parses again from the label.
    assert g.parse([SAFE, EOT_ID], state=state).label is Label.SAFE


@pytest.mark.parametrize(
    ("token_ids", "content"),
    [
        (ids("\n\nsafe", eot=True), "safe"),
        (ids("\n\nunsafe\nS1,S3", eot=True), "unsafe\nS1,S3"),
        (ids("\n\nunsafe\nS13,S10", eot=True), "unsafe\nS13,S10"),
        (ids("\n\nSafe", eot=True), "unsafe"),
        (ids("\n\nsafe", eot=True) + ids("\n\nsafe"), "unsafe"),
        ([], "unsafe"),
    ],
    ids=["safe", "unsafe", "unsafe-order-kept", "error", "error-safe-then-more", "error-empty"],
)
def test_verdict_content(token_ids: list[int], content: str) -> None:
    assert grammar().parse(token_ids).content == content


def test_verdict_content_ignores_raw_output_for_verdicts() -> None:
    assert Verdict(Label.SAFE, [], "\n\nsafe<|eot_id|>").content == "safe"
    assert Verdict(Label.UNSAFE, ["S2"], "anything").content == "unsafe\nS2"
    # An error fails closed, even when the model's text reads `safe` (safe, then more text).
    error = Verdict(Label.ERROR, [], "\n\nsafe<|eot_id|>\n\nsafe", "text after <|eot_id|>")
    assert error.content == "unsafe"
    assert error.raw_output.strip().startswith("safe")
