"""How many tokens a growing answer has, counted without re-tokenizing all of it each time.

A ModerateStream client appends an answer a token or a word at a time; whether a checkpoint is
due depends on the answer's token count (trimmed, as the model reads it). Tokenizing the whole
answer on every append costs O(n²) on the event loop: 1.6 s for an 8,000-token answer sent a
word at a time. Llama 3's pre-tokenizer splits text into chunks that BPE never merges across,
and some boundaries cannot move whatever is appended: before a space that follows a letter and
precedes one (" word" is a chunk of its own: a letter run ends at the space), and between a
line break and a letter or digit after it. The count up to the last such boundary is kept;
each append re-tokenizes only what follows it.
"""

from __future__ import annotations

from guardrt.runtime.tokenizer import Tokenizer


def settled_boundary(text: str, start: int, since: int = 0) -> int:
    """The last position after `start` where the pre-tokenizer starts a chunk whatever
    follows; `start` when there is none. Positions from `since - 1` on are looked at: the text
    up to `since` was looked at before, and only a position whose next character is new can
    have become one. Such a position is a space before a letter (a letter chunk takes one space
    or symbol in front of it, and nothing before a space runs into it), or a letter or digit
    after a line break."""
    for index in range(len(text) - 2, max(start, since - 2), -1):
        after = text[index + 1]
        if text[index] == " " and after.isalpha():
            return index
        if text[index] == "\n" and (after.isalpha() or after.isdigit()):
            return index + 1
    return start


class AnswerTokens:
    """The token count of `answer.strip()` as text is appended."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""  # the answer, its leading whitespace left out
        self._settled, self._settled_tokens = 0, 0

    def append(self, text: str) -> int:
        """Add `text`; the count of the whole answer, trimmed."""
        since = len(self.text)
        self.text = (self.text + text) if self.text else text.lstrip()
        boundary = settled_boundary(self.text, self._settled, since)
        if boundary > self._settled:
            piece = self.text[self._settled : boundary]
            self._settled_tokens += len(self.tokenizer.encode_text(piece))
            self._settled = boundary
        tail = self.text[self._settled :].rstrip()
        return self._settled_tokens + len(self.tokenizer.encode_text(tail))
