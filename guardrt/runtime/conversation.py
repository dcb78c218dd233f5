"""Messages in, a validated `Conversation` out: the shape the Llama Guard template accepts.

Accepted messages (reference §3.1, §3.2):

    {"role": "user" | "assistant",
     "content": str | [{"type": "text", "text": str}, {"type": "image", "image": ...}]}

Roles alternate starting with `user` (no system message: the template raises on one). A string
content is one text part. At most one image in the whole conversation; its payload (bytes, a
path, a PIL image, an array) is carried, not read, and may be left out when only rendering.
Every refusal is a `PromptError` naming the message index, part index or key, never the text.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from guardrt.runtime.errors import PromptError, PromptReason

_MESSAGE_KEYS = frozenset({"role", "content"})
_PART_KEYS = {"text": frozenset({"type", "text"}), "image": frozenset({"type", "image"})}


class Role(enum.Enum):
    USER = "user"
    ASSISTANT = "assistant"

    @property
    def label(self) -> str:
        """The speaker label the template writes: `User` or `Agent`."""
        return "User" if self is Role.USER else "Agent"


@dataclass(frozen=True)
class Turn:
    role: Role
    texts: tuple[str, ...]  # the message's text parts in order, as given (the template trims)


@dataclass(frozen=True)
class ImagePart:
    message_index: int
    part_index: int
    source: object | None  # bytes, path, PIL image or array; None when only rendering


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    image: ImagePart | None

    @property
    def judged(self) -> Role:
        """Whose last message is judged: an odd count judges the user, an even one the agent."""
        return Role.USER if len(self.turns) % 2 == 1 else Role.ASSISTANT


def _shown(key: object, limit: int = 40) -> str:
    """A key or value for an error message, cut short (keys come from the caller)."""
    text = repr(key)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(text: object, index: int, part: int) -> str:
    where = f"message {index} part {part}"
    if not isinstance(text, str):
        raise PromptError(
            PromptReason.TEXT, f"{where} text is {type(text).__name__}, not a string"
        ).located(message=index, part=part)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(
            PromptReason.TEXT, f"{where} text has a lone surrogate at offset {exc.start}"
        ).located(message=index, part=part) from exc
    return text


def _parts(content: object, index: int) -> Sequence[object]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, Sequence) and not isinstance(content, bytes | bytearray):
        return content
    raise PromptError(
        PromptReason.CONTENT,
        f"message {index} content is {type(content).__name__}; expected a string or a list of "
        "text/image parts",
    ).located(message=index)


def _message(message: object, index: int) -> Mapping[object, object]:
    if not isinstance(message, Mapping):
        raise PromptError(
            PromptReason.CONTENT, f"message {index} is {type(message).__name__}, not an object"
        ).located(message=index)
    return message


def _check_turn(message: Mapping[object, object], index: int, turn: int, rule: str) -> Role:
    """The role of the conversation's `turn`-th kept message (`index` in the caller's list)."""
    unknown = sorted(set(message) - _MESSAGE_KEYS, key=str)
    if unknown:
        raise PromptError(
            PromptReason.CONTENT, f"message {index} has unknown key {_shown(unknown[0])}"
        ).located(message=index)
    if "content" not in message:
        raise PromptError(PromptReason.CONTENT, f"message {index} has no content").located(
            message=index
        )
    role = message.get("role")
    expected = Role.USER if turn % 2 == 0 else Role.ASSISTANT
    if role != expected.value:
        # Only a short role is echoed: a long one may be misplaced user text.
        shown = repr(role) if isinstance(role, str) and len(role) <= 20 else "an invalid role"
        raise PromptError(
            PromptReason.ROLE,
            f"message {index} has role {shown}; expected {expected.value!r}: roles must "
            f"alternate user/assistant starting with user ({rule})",
        ).located(message=index)
    return expected


def parse_messages(
    messages: Sequence[Mapping[str, object]] | Conversation,
    *,
    ignored_roles: Collection[str] = (),
) -> Conversation:
    """Validate `messages` into a `Conversation` (a `Conversation` is returned as is).

    Messages whose role is in `ignored_roles` are left out unread (the OpenAI-compatible API
    passes "system" and "developer": the template has no system role, and the hosted API's own
    sample sends one); errors still number messages as the caller's list does."""
    if isinstance(messages, Conversation):
        return messages
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise PromptError(PromptReason.CONTENT, "messages must be a list of message objects")
    if not messages:
        raise PromptError(PromptReason.EMPTY, "the conversation has no messages")
    rule = (
        f"{' and '.join(sorted(ignored_roles))} messages are ignored"
        if ignored_roles
        else "no system message"
    )
    turns: list[Turn] = []
    image: ImagePart | None = None
    for index, raw in enumerate(messages):
        message = _message(raw, index)
        role_name = message.get("role")
        if isinstance(role_name, str) and role_name in ignored_roles:
            continue
        role = _check_turn(message, index, len(turns), rule)
        texts: list[str] = []
        for part_index, part in enumerate(_parts(message["content"], index)):
            where = f"message {index} part {part_index}"
            kind = part.get("type") if isinstance(part, Mapping) else None
            if not isinstance(part, Mapping) or not isinstance(kind, str) or kind not in _PART_KEYS:
                shown = "missing" if kind is None else _shown(kind, 24)
                raise PromptError(
                    PromptReason.CONTENT, f"{where} type is {shown}; expected 'text' or 'image'"
                ).located(message=index, part=part_index)
            unknown = sorted(set(part) - _PART_KEYS[kind], key=str)
            if unknown:
                raise PromptError(
                    PromptReason.CONTENT, f"{where} has unknown key {_shown(unknown[0])}"
                ).located(message=index, part=part_index)
            if kind == "text":
                texts.append(_check_text(part.get("text"), index, part_index))
            elif image is not None:
                raise PromptError(
                    PromptReason.IMAGES,
                    f"{where} is a second image (the first is message {image.message_index} "
                    f"part {image.part_index}); Llama Guard 3 Vision judges one image per "
                    "conversation",
                ).located(message=index, part=part_index)
            else:
                image = ImagePart(index, part_index, part.get("image"))
        turns.append(Turn(role, tuple(texts)))
    if not turns:  # every message was of an ignored role
        raise PromptError(PromptReason.EMPTY, "the conversation has no user or assistant message")
    return Conversation(turns=tuple(turns), image=image)
