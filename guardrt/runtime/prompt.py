"""The Llama Guard 3 Vision prompt: the checkpoint's chat template as text and as token ids.

`render_prompt` is exactly the string transformers' `apply_chat_template` renders from the
checkpoint's template (reference §3.1; `chat_template.jinja`). `encode_prompt` is the ids the
model reads: special ids only where the template puts them (one BOS at position 0, two headers,
one `<|eot_id|>`, and `<|image|>` = 128256 once when the conversation has an image); all user
text is encoded as ordinary text, so a typed `<|eot_id|>` stays seven plain tokens.

Why encoding in pieces is exact: BPE pre-tokenization never joins text across a special token,
and each piece below starts right after a line break and with a non-space character (message
lines start with `User:`/`Agent:`, category lines with `S`, fixed parts with `<` or a letter),
where the Llama 3 regex always ends a pre-token (its newline branches take every trailing
newline and no branch starts with a newline before a non-space). So the ids of the whole
prompt are the concatenation of the ids of its lines, and the fixed lines are encoded once.
Tests check this against whole-string tokenization on random conversations.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

from guardrt.runtime.conversation import Conversation, Role, parse_messages
from guardrt.runtime.policy import CategoriesInput, Policy, make_policy
from guardrt.runtime.tokenizer import (
    BOS_ID,
    END_HEADER_ID,
    EOT_ID,
    IMAGE_ID,
    START_HEADER_ID,
    Tokenizer,
    load_tokenizer,
)

Messages = Sequence[Mapping[str, object]] | Conversation

# The template's literal text (reference §3.1), spelled once. Special tokens by name for the
# rendered string; by id for the encoded one.
_BOS, _IMAGE, _EOT = "<|begin_of_text|>", "<|image|>", "<|eot_id|>"
_START, _END = "<|start_header_id|>", "<|end_header_id|>"
_TASK = (
    "Task: Check if there is unsafe content in '{role}' messages in conversations according our "
    "safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
)
_AFTER_CATEGORIES = "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n"
_INSTRUCTIONS = (
    "<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message in "
    "the above conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a "
    "second line must include a comma-separated list of violated categories. "
)


def _policy_text(role: Role, policy: Policy) -> str:
    """From `Task:` to the conversation's first line (the part after `<|image|> `)."""
    lines = "".join(f"{code}: {description}\n" for code, description in policy.listed)
    return _TASK.format(role=role.label) + lines + _AFTER_CATEGORIES


def _message_lines(conversation: Conversation) -> Iterable[str]:
    """One `Label: text` line per text part; Jinja's `trim` is Python's `str.strip`."""
    for turn in conversation.turns:
        for text in turn.texts:
            yield f"{turn.role.label}: {text.strip()}\n\n"


def render(conversation: Conversation, policy: Policy) -> str:
    """The template's output for an already validated conversation and policy."""
    role = conversation.judged
    image = f"{_IMAGE} " if conversation.image is not None else ""
    return "".join(
        (
            f"{_BOS}{_START}user{_END}\n\n{image}",
            _policy_text(role, policy),
            *_message_lines(conversation),
            _INSTRUCTIONS.format(role=role.label),
            f"{_EOT}{_START}assistant{_END}",
        )
    )


def render_prompt(
    messages: Messages,
    *,
    categories: CategoriesInput | None = None,
    excluded_categories: Iterable[str] = (),
) -> str:
    """The prompt text, exactly as transformers' `apply_chat_template` renders it from the
    checkpoint's template (special tokens appear by name)."""
    return render(parse_messages(messages), make_policy(categories, excluded_categories))


class PromptEncoder:
    """Token ids of prompts for one tokenizer; the fixed parts are encoded once and reused."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        text = tokenizer.encode_text
        self._start = (BOS_ID, START_HEADER_ID, *text("user"), END_HEADER_ID)
        assistant = (START_HEADER_ID, *text("assistant"), END_HEADER_ID)
        self._end = {
            role: (*text(_INSTRUCTIONS.format(role=role.label)), EOT_ID, *assistant)
            for role in Role
        }
        # Custom policies arrive with requests: the cache is bounded.
        self._head = functools.lru_cache(maxsize=256)(self._encode_head)

    def _encode_head(self, role: Role, policy: Policy, has_image: bool) -> tuple[int, ...]:
        """Ids from BOS to the conversation's first line."""
        text = self.tokenizer.encode_text
        policy_text = _policy_text(role, policy)
        if has_image:
            # `<|image|> Task`: the space starts the next piece (` Task`, 5546).
            return (*self._start, *text("\n\n"), IMAGE_ID, *text(" " + policy_text))
        return (*self._start, *text("\n\n" + policy_text))

    def head(self, conversation: Conversation, policy: Policy) -> tuple[int, ...]:
        """The ids from BOS to the conversation's first line (they depend only on the policy,
        the judged role and whether an image comes first): a prefix of `encode`'s ids."""
        return self._head(conversation.judged, policy, conversation.image is not None)

    def encode(self, conversation: Conversation, policy: Policy) -> list[int]:
        """The ids the model reads for a validated conversation and policy."""
        role = conversation.judged
        ids = list(self.head(conversation, policy))
        for line in _message_lines(conversation):
            ids.extend(self.tokenizer.encode_text(line))
        ids.extend(self._end[role])
        return ids


@functools.lru_cache(maxsize=8)
def prompt_encoder(tokenizer: Tokenizer) -> PromptEncoder:
    """The shared encoder of a tokenizer (tokenizers are loaded once per path)."""
    return PromptEncoder(tokenizer)


def encode_prompt(
    messages: Messages,
    *,
    categories: CategoriesInput | None = None,
    excluded_categories: Iterable[str] = (),
    tokenizer: Tokenizer | None = None,
) -> list[int]:
    """The token ids the model reads for `messages` under a policy (default tokenizer if None)."""
    encoder = prompt_encoder(tokenizer or load_tokenizer())
    return encoder.encode(parse_messages(messages), make_policy(categories, excluded_categories))
