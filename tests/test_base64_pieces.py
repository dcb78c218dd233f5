"""The HTTP API's base64 decoding in pieces (`b64decode_strict`): the same bytes and the same
refusals as one `base64.b64decode(validate=True)` call, whatever the piece size."""

from __future__ import annotations

import base64
import binascii

from hypothesis import example, given, settings
from hypothesis import strategies as st

from guardrt.runtime.server.openai_compat import b64decode_strict

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _decoded(payload: str, piece: int | None = None) -> bytes | str:
    try:
        if piece is None:
            return base64.b64decode(payload, validate=True)
        return b64decode_strict(payload, piece)
    except (binascii.Error, ValueError):
        return "refused"


# Valid encodings, then up to three characters put in (padding, whitespace, a URL-safe or a
# non-ASCII character) or the padding doubled: the decoder's edge cases, at any place.
_payloads = st.tuples(
    st.binary(max_size=60).map(lambda raw: base64.b64encode(raw).decode()),
    st.lists(st.tuples(st.integers(0, 200), st.sampled_from([*"=A/ \n-_.é", "=="])), max_size=3),
).map(lambda edit: _edited(*edit))


def _edited(payload: str, inserts: list[tuple[int, str]]) -> str:
    for index, text in inserts:
        at = index % (len(payload) + 1)
        payload = payload[:at] + text + payload[at:]
    return payload


# The end's own rules: excess padding after a whole group, a group cut short, padding alone.
_ends = st.tuples(
    st.binary(min_size=6, max_size=60).map(lambda raw: base64.b64encode(raw).decode()),
    st.sampled_from(["", "=", "==", "===", "A", "A=", "AB=", "ABC", "=A"]),
).map("".join)


@settings(max_examples=300)
@given(
    st.one_of(_payloads, _ends, st.text(alphabet=_ALPHABET + "=", max_size=60)),
    st.sampled_from([4, 8, 12, 64]),
)
@example("AAAAAAAAAAAA=", 4)
@example("AAAAAAAAAA==AAAA", 4)
def test_pieces_decode_as_one_call(payload: str, piece: int) -> None:
    assert _decoded(payload, piece) == _decoded(payload)


def test_a_large_payload_is_decoded_in_pieces_to_the_same_bytes() -> None:
    raw = bytes(range(256)) * 4099  # 1,049,344 bytes: four pieces of the default size
    payload = base64.b64encode(raw).decode()
    assert b64decode_strict(payload) == raw
    assert _decoded(payload[:-1] + "!") == _decoded(payload[:-1] + "!", 1 << 18) == "refused"
    middle = len(payload) // 2 // 4 * 4
    assert _decoded(payload[:middle] + "==" + payload[middle:], 1 << 18) == "refused"
