"""Messages into a Conversation and categories into a Policy: accepted shapes and refusals."""

from __future__ import annotations

from typing import Any

import pytest

from guardrt.runtime.conversation import Conversation, ImagePart, Role, Turn, parse_messages
from guardrt.runtime.errors import PromptError, PromptReason
from guardrt.runtime.policy import DEFAULT_CATEGORIES, DEFAULT_POLICY, Policy, make_policy

# Put in every user text of a refused input: refusals name indexes, keys and codes, never text.
SECRET = "SECRET-USER-TEXT"

REFERENCE_NAMES = {
    "S1": "Violent Crimes.",
    "S2": "Non-Violent Crimes.",
    "S3": "Sex Crimes.",
    "S4": "Child Exploitation.",
    "S5": "Defamation.",
    "S6": "Specialized Advice.",
    "S7": "Privacy.",
    "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.",
    "S10": "Hate.",
    "S11": "Self-Harm.",
    "S12": "Sexual Content.",
    "S13": "Elections.",
}
DEFAULT_CODES = tuple(REFERENCE_NAMES)


def user(content: Any = SECRET) -> dict[str, Any]:
    return {"role": "user", "content": content}


def agent(content: Any = SECRET) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def text(value: Any = SECRET) -> dict[str, Any]:
    return {"type": "text", "text": value}


def image(payload: Any = b"\x89PNG") -> dict[str, Any]:
    return {"type": "image", "image": payload}


# --- accepted conversations -------------------------------------------------------------------


def test_string_content_is_one_text_part() -> None:
    conversation = parse_messages([user("Hi there")])
    assert conversation == Conversation(turns=(Turn(Role.USER, ("Hi there",)),), image=None)
    assert conversation.judged is Role.USER


def test_list_of_text_parts_keeps_order_and_whitespace() -> None:
    conversation = parse_messages([user([text("  first "), text("\nsecond\n"), text("")])])
    assert conversation.turns[0].texts == ("  first ", "\nsecond\n", "")


def test_image_part_with_bytes_payload() -> None:
    payload = b"\x89PNG\r\n\x1a\n"
    conversation = parse_messages([user([text("What is this?"), image(payload)])])
    assert conversation.image == ImagePart(message_index=0, part_index=1, source=payload)
    assert conversation.image.source is payload  # carried, not read or copied
    assert conversation.turns[0].texts == ("What is this?",)


def test_image_part_without_payload() -> None:
    conversation = parse_messages([user([{"type": "image"}, text("Describe it")])])
    assert conversation.image == ImagePart(message_index=0, part_index=0, source=None)
    assert conversation.turns[0].texts == ("Describe it",)


def test_image_only_message() -> None:
    conversation = parse_messages([user([image()])])
    assert conversation.turns == (Turn(Role.USER, ()),)
    assert conversation.image is not None


def test_image_position_in_a_later_message() -> None:
    messages = [user("a"), agent("b"), user([text("c"), text("d"), image()])]
    image_part = parse_messages(messages).image
    assert image_part is not None
    assert (image_part.message_index, image_part.part_index) == (2, 2)


def test_conversation_is_passed_through_unchanged() -> None:
    conversation = parse_messages([user("a"), agent([text("b")])])
    assert parse_messages(conversation) is conversation


def test_tuples_and_mixed_content_are_accepted() -> None:
    conversation = parse_messages(({"role": "user", "content": (text("a"),)}, agent("b")))
    assert conversation.turns == (Turn(Role.USER, ("a",)), Turn(Role.ASSISTANT, ("b",)))


@pytest.mark.parametrize(
    ("count", "judged"),
    [(1, Role.USER), (2, Role.ASSISTANT), (3, Role.USER), (4, Role.ASSISTANT)],
)
def test_judged_role_follows_the_message_count(count: int, judged: Role) -> None:
    messages = [user(f"u{i}") if i % 2 == 0 else agent(f"a{i}") for i in range(count)]
    conversation = parse_messages(messages)
    assert conversation.judged is judged
    assert [turn.role for turn in conversation.turns] == [
        Role.USER if i % 2 == 0 else Role.ASSISTANT for i in range(count)
    ]


def test_role_labels() -> None:
    assert Role.USER.label == "User"
    assert Role.ASSISTANT.label == "Agent"
    assert (Role.USER.value, Role.ASSISTANT.value) == ("user", "assistant")


# --- refused conversations --------------------------------------------------------------------

MESSAGE_REFUSALS = [
    pytest.param([], PromptReason.EMPTY, "no messages", id="empty"),
    pytest.param(SECRET, PromptReason.CONTENT, "list of message objects", id="a-string"),
    pytest.param(SECRET.encode(), PromptReason.CONTENT, "list of message objects", id="bytes"),
    pytest.param(user(), PromptReason.CONTENT, "list of message objects", id="a-dict"),
    pytest.param(iter([user()]), PromptReason.CONTENT, "list of message", id="an-iterator"),
    pytest.param([SECRET], PromptReason.CONTENT, "message 0 is str", id="message-a-string"),
    pytest.param(
        [user(), [SECRET]], PromptReason.CONTENT, "message 1 is list", id="message-a-list"
    ),
    pytest.param(
        [{"role": "user", "content": SECRET, "name": "bob"}],
        PromptReason.CONTENT,
        "message 0 has unknown key 'name'",
        id="unknown-message-key",
    ),
    pytest.param(
        [user(), {"role": "assistant"}],
        PromptReason.CONTENT,
        "message 1 has no content",
        id="no-content",
    ),
    pytest.param(
        [{"role": "system", "content": SECRET}, user()],
        PromptReason.ROLE,
        "message 0 has role 'system'",
        id="system-first",
    ),
    pytest.param(
        [user(), {"role": "system", "content": SECRET}],
        PromptReason.ROLE,
        "message 1 has role 'system'",
        id="system-second",
    ),
    pytest.param(
        [agent()], PromptReason.ROLE, "message 0 has role 'assistant'", id="assistant-first"
    ),
    pytest.param([user(), user()], PromptReason.ROLE, "message 1", id="two-users"),
    pytest.param([user(), agent(), agent()], PromptReason.ROLE, "message 2", id="two-agents"),
    pytest.param(
        [{"role": 1, "content": SECRET}], PromptReason.ROLE, "an invalid role", id="role-an-int"
    ),
    pytest.param([{"content": SECRET}], PromptReason.ROLE, "an invalid role", id="role-missing"),
    pytest.param(
        [{"role": SECRET + " " + SECRET, "content": SECRET}],
        PromptReason.ROLE,
        "an invalid role",
        id="role-long-string",
    ),
    pytest.param([user(7)], PromptReason.CONTENT, "message 0 content is int", id="content-int"),
    pytest.param(
        [user(SECRET.encode())],
        PromptReason.CONTENT,
        "message 0 content is bytes",
        id="content-bytes",
    ),
    pytest.param(
        [user(text())], PromptReason.CONTENT, "message 0 content is dict", id="content-dict"
    ),
    pytest.param(
        [user([text(), SECRET])], PromptReason.CONTENT, "message 0 part 1", id="part-a-string"
    ),
    pytest.param(
        [user([{"type": "image_url", "image_url": SECRET}])],
        PromptReason.CONTENT,
        "'image_url'",
        id="part-image-url",
    ),
    pytest.param(
        [user([{"text": SECRET}])],
        PromptReason.CONTENT,
        "message 0 part 0 type is missing",
        id="part-no-type",
    ),
    pytest.param(
        [user([{"type": ["text"], "text": SECRET}])],
        PromptReason.CONTENT,
        "message 0 part 0",
        id="part-type-unhashable",
    ),
    pytest.param(
        [user([{"type": "text", "text": SECRET, "extra": 1}])],
        PromptReason.CONTENT,
        "message 0 part 0 has unknown key 'extra'",
        id="text-part-unknown-key",
    ),
    pytest.param(
        [user([text(), {"type": "image", "image": b"x", "url": "u"}])],
        PromptReason.CONTENT,
        "message 0 part 1 has unknown key 'url'",
        id="image-part-unknown-key",
    ),
    pytest.param(
        [user([text(5)])], PromptReason.TEXT, "message 0 part 0 text is int", id="text-int"
    ),
    pytest.param(
        [user([{"type": "text"}])], PromptReason.TEXT, "text is NoneType", id="text-missing"
    ),
    pytest.param(
        [user(SECRET + "\ud800")],
        PromptReason.TEXT,
        f"message 0 part 0 text has a lone surrogate at offset {len(SECRET)}",
        id="lone-surrogate",
    ),
    pytest.param(
        [user(), agent([text(), text("\udfff" + SECRET)])],
        PromptReason.TEXT,
        "message 1 part 1 text has a lone surrogate at offset 0",
        id="lone-surrogate-in-a-part",
    ),
    pytest.param(
        [user([text(), image(), image()])],
        PromptReason.IMAGES,
        "message 0 part 2 is a second image (the first is message 0 part 1)",
        id="two-images-in-one-message",
    ),
    pytest.param(
        [user([image(), text()]), agent(), user([text(), image()])],
        PromptReason.IMAGES,
        "message 2 part 1 is a second image (the first is message 0 part 0)",
        id="two-images-across-messages",
    ),
]


@pytest.mark.parametrize(("messages", "reason", "names"), MESSAGE_REFUSALS)
def test_refused_messages(messages: Any, reason: PromptReason, names: str) -> None:
    with pytest.raises(PromptError) as info:
        parse_messages(messages)
    message = str(info.value)
    assert info.value.reason is reason, message
    assert names in message
    assert SECRET not in message


SYSTEM = {"role": "system", "content": SECRET}


def test_ignored_roles_are_left_out_unread() -> None:
    unread = {"role": "developer", "content": object(), "name": "x"}  # neither key checked
    messages = [SYSTEM, user("hi"), unread, agent("ok")]
    got = parse_messages(messages, ignored_roles=("developer", "system"))
    assert got == parse_messages([user("hi"), agent("ok")])


@pytest.mark.parametrize(
    ("messages", "reason", "names"),
    [
        pytest.param(
            [SYSTEM, agent()],
            PromptReason.ROLE,
            "message 1 has role 'assistant'; expected 'user': roles must alternate user/assistant"
            " starting with user (system messages are ignored)",
            id="alternation-counts-kept-messages",
        ),
        pytest.param(
            [SYSTEM, user([text(), image(), image()])],
            PromptReason.IMAGES,
            "message 1 part 2 is a second image (the first is message 1 part 1)",
            id="indexes-count-ignored-messages",
        ),
        pytest.param(
            [SYSTEM, SYSTEM], PromptReason.EMPTY, "no user or assistant message", id="all"
        ),
        pytest.param(
            [{"role": ["system"], "content": SECRET}],  # unhashable: compared, not hashed
            PromptReason.ROLE,
            "message 0 has role an invalid role",
            id="unhashable-role",
        ),
    ],
)
def test_refused_with_ignored_roles(messages: Any, reason: PromptReason, names: str) -> None:
    with pytest.raises(PromptError) as info:
        parse_messages(messages, ignored_roles=frozenset({"system"}))
    assert info.value.reason is reason, str(info.value)
    assert names in str(info.value)
    assert SECRET not in str(info.value)


def test_system_messages_are_refused_unless_ignored() -> None:
    with pytest.raises(PromptError, match=r"message 0 has role 'system'.*no system message"):
        parse_messages([SYSTEM, user()])


# --- the policy -------------------------------------------------------------------------------


def test_default_policy_has_the_reference_categories() -> None:
    assert dict(DEFAULT_CATEGORIES) == REFERENCE_NAMES
    assert DEFAULT_POLICY.categories == tuple(REFERENCE_NAMES.items())
    assert DEFAULT_POLICY.excluded == frozenset()
    assert DEFAULT_POLICY.codes == DEFAULT_CODES
    assert DEFAULT_POLICY.listed == DEFAULT_POLICY.categories
    assert make_policy() == DEFAULT_POLICY
    assert make_policy(None, ()) == DEFAULT_POLICY


def test_exclusions_skip_codes_without_renumbering() -> None:
    policy = make_policy(excluded_categories=["S1", "S13"])
    assert policy.codes == DEFAULT_CODES[1:12] == tuple(f"S{n}" for n in range(2, 13))
    assert policy.listed == DEFAULT_CATEGORIES[1:12]
    assert policy.categories == DEFAULT_CATEGORIES  # the excluded ones are kept, just not listed
    assert policy.excluded == frozenset({"S1", "S13"})


def test_exclusions_accept_any_iterable_of_codes() -> None:
    expected = make_policy(excluded_categories=["S5"])
    assert make_policy(excluded_categories=("S5",)) == expected
    assert make_policy(excluded_categories={"S5"}) == expected
    assert make_policy(excluded_categories=(c for c in ["S5"])) == expected
    assert make_policy(excluded_categories=["S5", "S5"]) == expected


def test_custom_categories_from_a_dict_keep_order() -> None:
    policy = make_policy({"S3": "Custom three", "S1": "Custom one.", "S20": "Twenty"})
    assert policy.categories == (("S3", "Custom three"), ("S1", "Custom one."), ("S20", "Twenty"))
    assert policy.codes == ("S3", "S1", "S20")


def test_custom_categories_from_pairs_keep_order() -> None:
    pairs = [("S999", "  Spaced, verbatim  "), ("S2", "Two.")]
    policy = make_policy(pairs)
    assert policy.categories == (("S999", "  Spaced, verbatim  "), ("S2", "Two."))
    assert make_policy(tuple(pairs)) == policy
    as_lists: Any = [list(pair) for pair in pairs]  # JSON gives lists, not tuples
    assert make_policy(as_lists) == policy


def test_custom_categories_with_exclusions() -> None:
    policy = make_policy({"S1": "A.", "S2": "B.", "S3": "C."}, excluded_categories=["S2"])
    assert policy.listed == (("S1", "A."), ("S3", "C."))
    assert policy.codes == ("S1", "S3")


def test_policies_are_hashable_and_equal_when_built_alike() -> None:
    from_dict = make_policy({"S1": "A.", "S2": "B."}, excluded_categories=["S2"])
    from_pairs = make_policy([("S1", "A."), ("S2", "B.")], excluded_categories=("S2",))
    assert from_dict == from_pairs
    assert hash(from_dict) == hash(from_pairs)
    assert len({from_dict, from_pairs, DEFAULT_POLICY}) == 2
    assert make_policy(excluded_categories=["S1", "S13"]) == make_policy(
        excluded_categories=["S13", "S1"]
    )
    assert make_policy({"S1": "A.", "S2": "B."}) != make_policy({"S2": "B.", "S1": "A."})
    assert isinstance(hash(DEFAULT_POLICY), int)
    assert Policy(DEFAULT_CATEGORIES) == DEFAULT_POLICY


POLICY_REFUSALS = [
    pytest.param({}, (), PromptReason.CATEGORY, "empty", id="categories-empty-dict"),
    pytest.param([], (), PromptReason.CATEGORY, "empty", id="categories-empty-list"),
    pytest.param({"S0": SECRET}, (), PromptReason.CATEGORY, "'S0'", id="code-S0"),
    pytest.param({"S01": SECRET}, (), PromptReason.CATEGORY, "'S01'", id="code-S01"),
    pytest.param({"S1000": SECRET}, (), PromptReason.CATEGORY, "'S1000'", id="code-S1000"),
    pytest.param({"X1": SECRET}, (), PromptReason.CATEGORY, "'X1'", id="code-X1"),
    pytest.param({"s1": SECRET}, (), PromptReason.CATEGORY, "'s1'", id="code-lowercase"),
    pytest.param({"S1 ": SECRET}, (), PromptReason.CATEGORY, "'S1 '", id="code-trailing-space"),
    pytest.param({1: SECRET}, (), PromptReason.CATEGORY, "code 1 is not", id="code-int"),
    pytest.param([(None, SECRET)], (), PromptReason.CATEGORY, "code None", id="code-none"),
    pytest.param(
        [("S1", SECRET), ("S1", SECRET)],
        (),
        PromptReason.CATEGORY,
        "S1 appears twice",
        id="duplicate",
    ),
    pytest.param({"S1": ""}, (), PromptReason.CATEGORY, "S1 needs a non-empty", id="empty-desc"),
    pytest.param(
        {"S1": " \t "}, (), PromptReason.CATEGORY, "S1 needs a non-empty", id="blank-desc"
    ),
    pytest.param({"S2": 5}, (), PromptReason.CATEGORY, "S2 needs a non-empty", id="desc-an-int"),
    pytest.param(
        {"S1": SECRET + "\nS2: " + SECRET},
        (),
        PromptReason.CATEGORY,
        "S1's description",
        id="desc-lf",
    ),
    pytest.param(
        {"S1": "A.", "S3": SECRET + "\r" + SECRET},
        (),
        PromptReason.CATEGORY,
        "S3's description contains a line break",
        id="desc-cr",
    ),
    pytest.param("S1: " + SECRET, (), PromptReason.CATEGORY, "not str", id="categories-a-string"),
    pytest.param({("S1", SECRET)}, (), PromptReason.CATEGORY, "not set", id="categories-a-set"),
    pytest.param(
        [("S1", SECRET), ("S2",)], (), PromptReason.CATEGORY, "category 1 is not a", id="not-a-pair"
    ),
    pytest.param(
        [SECRET[:2]], (), PromptReason.CATEGORY, "category 0 is not a", id="pair-a-string"
    ),
    pytest.param(None, ["S14"], PromptReason.EXCLUDED, "S14", id="excluded-unknown"),
    pytest.param({"S1": SECRET}, ["S2"], PromptReason.EXCLUDED, "'S2'", id="excluded-not-custom"),
    pytest.param(None, "S1,S13", PromptReason.EXCLUDED, "not a string", id="excluded-a-string"),
    pytest.param(None, "S1", PromptReason.EXCLUDED, "not a string", id="excluded-one-code-string"),
    pytest.param(None, DEFAULT_CODES, PromptReason.EXCLUDED, "every category", id="all-excluded"),
    pytest.param({"S7": SECRET}, ["S7"], PromptReason.EXCLUDED, "every category", id="all-custom"),
    pytest.param(None, ["S1", 13], PromptReason.EXCLUDED, "category 13 is not", id="excluded-int"),
    pytest.param(None, [None], PromptReason.EXCLUDED, "None", id="excluded-none"),
]


@pytest.mark.parametrize(("categories", "excluded", "reason", "names"), POLICY_REFUSALS)
def test_refused_policies(categories: Any, excluded: Any, reason: PromptReason, names: str) -> None:
    with pytest.raises(PromptError) as info:
        make_policy(categories, excluded)
    message = str(info.value)
    assert info.value.reason is reason, message
    assert names in message
    assert SECRET not in message


def test_long_codes_are_shown_truncated() -> None:
    with pytest.raises(PromptError) as info:
        make_policy({"S" + "9" * 100: "A."})
    assert info.value.reason is PromptReason.CATEGORY
    assert "S99999" in str(info.value)
    assert "9" * 60 not in str(info.value)
