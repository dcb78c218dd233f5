"""Reading and writing the two files the Llama 3 tokenizer ships as (reference §2).

* Meta's tiktoken `tokenizer.model`: 128,000 lines of `base64(token bytes) rank`.
* Hugging Face's `tokenizer.json`: the same ranks spelled as byte-level unicode strings, the
  merges transformers' `TikTokenConverter` derives from them, and the added special tokens.

Both are reduced to one `BpeTables` (byte-string ranks plus special tokens), so every loader
feeds the same BPE. Readers are strict: a file that would tokenize differently from the Llama 3
tokenizer is refused with a `ConfigError` naming what differs.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardrt.runtime.errors import ConfigError

# The pre-tokenization regex of Llama 3 (tiktoken `pat_str`; the same in HF's converter).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_MERGEABLE = 128_000
FIRST_SPECIAL = 128_000
IMAGE_TOKEN_ID = 128_256


def _special_names() -> tuple[str, ...]:
    """HF's names of ids 128000..128256 (reference §2.2: HF shifts the reserved names by one)."""
    named = (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    )
    reserved = tuple(f"<|reserved_special_token_{i}|>" for i in range(2, 247))
    return (*named, *reserved, "<|image|>")


SPECIAL_NAMES = _special_names()
assert FIRST_SPECIAL + len(SPECIAL_NAMES) - 1 == IMAGE_TOKEN_ID
# Ids whose name must match exactly in a checkpoint's tokenizer.json; the reserved ones may be
# spelled differently (they never occur in a Llama Guard prompt or verdict).
_FUNCTIONAL_SPECIALS = frozenset(range(FIRST_SPECIAL, FIRST_SPECIAL + 11)) | {IMAGE_TOKEN_ID}


@dataclass(frozen=True)
class BpeTables:
    """What a BPE tokenizer is made of, independent of the file it came from."""

    ranks: Mapping[bytes, int]  # token bytes -> rank (= id), 0..127999
    specials: Mapping[str, int]  # special token name -> id, 128000..128256
    source: str  # the file it was read from, for messages


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE files."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def _to_unicode(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def _from_unicode(text: str, where: str) -> bytes:
    inverse = _unicode_to_byte()
    try:
        return bytes(inverse[c] for c in text)
    except KeyError as exc:
        raise ConfigError(f"{where}: {exc.args[0]!r} is not a byte-level BPE character") from exc


def _check_ranks(ranks: Mapping[bytes, int], source: str) -> None:
    if len(ranks) != NUM_MERGEABLE or set(ranks.values()) != set(range(NUM_MERGEABLE)):
        raise ConfigError(
            f"{source}: expected the Llama 3 vocabulary of {NUM_MERGEABLE} tokens ranked "
            f"0..{NUM_MERGEABLE - 1}, found {len(ranks)} tokens"
        )
    for b in range(256):
        if bytes([b]) not in ranks:
            raise ConfigError(f"{source}: the single byte 0x{b:02x} has no token")


def read_tiktoken_file(path: Path) -> BpeTables:
    """Meta's `tokenizer.model`; its special tokens are HF's (ids fixed by the model)."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read tokenizer file {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise ConfigError(f"{path}: line {number} is not 'base64 rank'")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except binascii.Error as exc:
            raise ConfigError(f"{path}: line {number} has invalid base64") from exc
        if token in ranks:
            raise ConfigError(f"{path}: line {number} repeats a token")
        ranks[token] = int(parts[1])
    _check_ranks(ranks, str(path))
    specials = {name: FIRST_SPECIAL + i for i, name in enumerate(SPECIAL_NAMES)}
    return BpeTables(ranks=ranks, specials=specials, source=str(path))


def _expect(value: Any, expected: Any, what: str, source: str) -> None:
    if value != expected:
        raise ConfigError(f"{source}: {what} is {value!r}; guardrt implements {expected!r}")


def _check_pre_tokenizer(spec: Any, source: str) -> None:
    """The Split(regex, isolated) + ByteLevel(no regex) pair HF's converter writes."""
    steps = spec.get("pretokenizers") if isinstance(spec, dict) else None
    _expect(
        [s.get("type") for s in steps] if isinstance(steps, list) else spec,
        ["Split", "ByteLevel"],
        "pre_tokenizer",
        source,
    )
    assert isinstance(steps, list)
    split, byte_level = steps
    _expect(split.get("pattern"), {"Regex": LLAMA3_PATTERN}, "the pre-tokenizer regex", source)
    _expect(split.get("behavior"), "Isolated", "the split behavior", source)
    _expect(split.get("invert"), False, "the split invert flag", source)
    _expect(byte_level.get("use_regex"), False, "ByteLevel.use_regex", source)
    _expect(byte_level.get("add_prefix_space"), False, "ByteLevel.add_prefix_space", source)


def _read_specials(added: Any, source: str) -> dict[str, int]:
    if not isinstance(added, list):
        raise ConfigError(f"{source}: added_tokens is not a list")
    by_id = {t.get("id"): t for t in added if isinstance(t, dict)}
    specials: dict[str, int] = {}
    for offset, name in enumerate(SPECIAL_NAMES):
        token_id = FIRST_SPECIAL + offset
        token = by_id.get(token_id)
        if token is None or not token.get("special"):
            raise ConfigError(f"{source}: id {token_id} ({name}) is not an added special token")
        if token_id in _FUNCTIONAL_SPECIALS:
            _expect(token.get("content"), name, f"the name of token {token_id}", source)
        specials[str(token.get("content"))] = token_id
    extra = sorted(set(by_id) - set(specials.values()), key=str)
    if extra:
        raise ConfigError(f"{source}: unexpected added tokens with ids {extra[:5]}")
    return specials


def _strings(items: list[Any]) -> bool:
    return all(isinstance(item, str) for item in items)


def _merge_pairs(merges: Any, source: str) -> Iterator[tuple[str, str]]:
    """Merges as pairs, in either spelling tokenizers has used (`"a b"` or `["a", "b"]`)."""
    if not isinstance(merges, list):
        raise ConfigError(f"{source}: model.merges is not a list")
    for index, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2 and _strings(pair)):
            raise ConfigError(f"{source}: merge {index} is not a pair of tokens")
        yield pair[0], pair[1]


def _count_splits(ranks: Mapping[bytes, int]) -> int:
    """How many (left, right) splits of vocabulary tokens have both halves in the vocabulary."""
    return sum(
        1
        for token in ranks
        for cut in range(1, len(token))
        if token[:cut] in ranks and token[cut:] in ranks
    )


def _check_merges(
    merges: Any, ranks: Mapping[str, int], byte_ranks: Mapping[bytes, int], source: str
) -> None:
    """The merges must be exactly every split of every token, ordered by the merged token's rank.

    That is what transformers' converter writes, and what makes HF's merge-driven BPE give the
    same ids as tiktoken's rank-driven BPE, which is what guardrt runs.
    """
    previous = -1
    count = 0
    for index, (left, right) in enumerate(_merge_pairs(merges, source)):
        merged = ranks.get(left + right)
        if merged is None or left not in ranks or right not in ranks:
            raise ConfigError(f"{source}: merge {index} joins tokens outside the vocabulary")
        if merged < previous:
            raise ConfigError(f"{source}: merge {index} is out of rank order")
        previous = merged
        count += 1
    expected = _count_splits(byte_ranks)
    if count != expected:
        raise ConfigError(
            f"{source}: {count} merges, expected the {expected} that the ranks imply "
            "(this BPE would not tokenize as Llama 3 does)"
        )


def read_tokenizer_json(path: Path) -> BpeTables:
    """A checkpoint's `tokenizer.json`, checked to be the Llama 3 BPE in HF's spelling."""
    source = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read tokenizer file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: no 'model' object")
    _expect(model.get("type"), "BPE", "model.type", source)
    _expect(bool(model.get("byte_fallback")), False, "model.byte_fallback", source)
    _expect(data.get("normalizer"), None, "normalizer", source)
    _check_pre_tokenizer(data.get("pre_tokenizer"), source)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ConfigError(f"{source}: model.vocab is not an object")
    ranks = {_from_unicode(token, source): rank for token, rank in vocab.items()}
    _check_ranks(ranks, source)
    _check_merges(model.get("merges"), vocab, ranks, source)
    specials = _read_specials(data.get("added_tokens"), source)
    return BpeTables(ranks=ranks, specials=specials, source=source)


def derive_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, ordered as transformers' converter orders it.

    Within one merged token the splits are sorted by (rank of left, rank of right); across
    tokens by the merged token's rank (Python's sort is stable, as the converter relies on).
    """
    merges: list[tuple[bytes, bytes, int]] = []
    for token, rank in ranks.items():
        local = [
            (token[:cut], token[cut:], rank)
            for cut in range(1, len(token))
            if token[:cut] in ranks and token[cut:] in ranks
        ]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    return [(left, right) for left, right, _ in merges]


def tokenizer_json(tables: BpeTables) -> dict[str, Any]:
    """The `tokenizer.json` document transformers' `TikTokenConverter` writes for these tables.

    guardrt writes it into the checkpoints it generates (`guardrt export tiny-random`), so they
    load in transformers without a converter run.
    """
    ordered = sorted(tables.ranks.items(), key=lambda item: item[1])
    added = [
        {
            "id": token_id,
            "content": name,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for name, token_id in sorted(tables.specials.items(), key=lambda item: item[1])
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": LLAMA3_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },
        "post_processor": {**byte_level, "trim_offsets": False, "use_regex": True},
        "decoder": {**byte_level, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {_to_unicode(token): rank for token, rank in ordered},
            "merges": [[_to_unicode(a), _to_unicode(b)] for a, b in derive_merges(tables.ranks)],
        },
    }
