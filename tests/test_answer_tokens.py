"""A growing answer's token count (ModerateStream's checkpoints) equals tokenizing the whole
trimmed answer after every append, while re-tokenizing only what follows the last boundary the
pre-tokenizer cannot move."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from guardrt.runtime.server.answer_tokens import AnswerTokens, settled_boundary
from guardrt.runtime.tokenizer import Tokenizer

# Pieces near the pre-tokenizer's rules: letter runs with and without a space in front, digit
# runs, punctuation, contractions, whitespace of every kind and line breaks, letters and
# digits outside ASCII, emoji (several tokens for one character).
_PIECES = [
    "word", " word", "  ", "\n", "\n\n", "\r\n", "\r", "12", "3", " 456", "1,000", ",", ".",
    "!", "'s", "'S", "'t", " don't", "ll", " ll", "é", "Über", "ß", "日本", "ǅ", "Ⅻ", "٣",
    "²", " ", "\t", "\x0b", "\u00a0", "\u2028", "🙂", "-", "_", "(", " (", "…", "'", "x",
    "A", "  \n", " \n ",
]  # fmt: skip
_appends = st.lists(
    st.lists(st.sampled_from(_PIECES), min_size=1, max_size=3).map("".join),
    min_size=1,
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(_appends)
def test_the_count_after_each_append_is_the_whole_answers(
    tok: Tokenizer, appends: list[str]
) -> None:
    counter = AnswerTokens(tok)
    answer = ""
    for text in appends:
        answer += text
        assert counter.append(text) == len(tok.encode_text(answer.strip())), repr(answer)


def test_boundaries_are_before_a_spaced_word_or_after_a_line_break() -> None:
    assert settled_boundary("one two three", 0) == 7  # before " three"
    assert settled_boundary("12 and\n3x", 0) == 7  # after the line break, before "3"
    assert settled_boundary("12 34 56", 0) == 0  # digits take no space: none is settled
    assert settled_boundary("one two", 0, since=4) == 3  # "t" was appended: " t" is new
    assert settled_boundary("one two", 0, since=5) == 0  # only "wo" was: looked at before
    assert settled_boundary("one two", 4) == 4  # none after `start`


def test_a_long_answer_sent_a_word_at_a_time_costs_little(tok: Tokenizer) -> None:
    """8,000 tokens a word at a time (the model's whole context): counted in pieces, not the
    whole answer each time (1.6 s on this repository's CPU machine before; ~0.01 s after).
    The figure is printed, not asserted; the count is."""
    counter = AnswerTokens(tok)
    started = time.perf_counter()
    for index in range(4000):
        count = counter.append(f" word{index % 97}")
    print(f"4,000 appends: {time.perf_counter() - started:.3f} s")
    assert count == len(tok.encode_text(counter.text.strip())) == 8000
