"""The Llama 3 tokenizer as Llama Guard 3 Vision reads it (reference §2).

One BPE (tiktoken's, over the Llama 3 ranks and regex) whatever file it is loaded from:

* a checkpoint's `tokenizer.json` (what the HF checkpoint ships),
* a tiktoken `tokenizer.model` (Meta's format),
* by default, the `tokenizer.model` inside the `llama-models` package.

Special tokens carry HF's ids and names: `<|image|>` is 128256 (Meta's tiktoken table calls
128011 `<|image|>` and rewrites it to 128256 before the model; HF names 128011
`<|reserved_special_token_2|>`). Text is always encoded as ordinary text: a special token's
spelling typed by a user becomes the plain tokens of that spelling, never the control token.
Only `guardrt.runtime.prompt` places special ids, where the template puts them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from guardrt.runtime.errors import ConfigError
from guardrt.runtime.tokenizer_files import (
    IMAGE_TOKEN_ID,
    LLAMA3_PATTERN,
    BpeTables,
    read_tiktoken_file,
    read_tokenizer_json,
)

# Special ids the prompt template places (reference §2.2). The only place they are spelled.
BOS_ID = 128_000  # <|begin_of_text|>
END_OF_TEXT_ID = 128_001  # <|end_of_text|>
START_HEADER_ID = 128_006  # <|start_header_id|>
END_HEADER_ID = 128_007  # <|end_header_id|>
EOM_ID = 128_008  # <|eom_id|>
EOT_ID = 128_009  # <|eot_id|>
IMAGE_ID = IMAGE_TOKEN_ID  # <|image|>, an id past the lm_head: the model can never emit it

# sha256 of llama-models 0.3.0's llama3/tokenizer.model (reference §2.1).
DEFAULT_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


class Tokenizer:
    """Encodes ordinary text to ids and decodes ids (special ones by name); thread-safe."""

    def __init__(self, tables: BpeTables) -> None:
        self._encoding = tiktoken.Encoding(
            name="llama3",
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=dict(tables.ranks),
            special_tokens=dict(tables.specials),
        )
        self._special_by_id = {token_id: name for name, token_id in tables.specials.items()}
        self._special_by_name = dict(tables.specials)
        self.source = tables.source
        self.vocab_size = len(tables.ranks) + len(tables.specials)  # 128257

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` as ordinary text: the result never contains a special id."""
        return self._encoding.encode_ordinary(text)

    def encode_with_specials(self, text: str) -> list[int]:
        """Ids of `text` where special-token spellings become special ids.

        Only for trusted, template-made text (tests and tools); never for user content.
        """
        return self._encoding.encode(text, allowed_special="all")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_by_id

    def special_id(self, name: str) -> int:
        """The id of a special token by its name, e.g. `<|eot_id|>`; KeyError if none."""
        return self._special_by_name[name]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token; a special token's bytes are its name.

        An id outside the vocabulary (only a broken engine produces one) reads as
        `<|invalid_token:N|>`, so whatever shows the output can still show it.
        """
        if token_id in self._special_by_id:
            return self._special_by_id[token_id].encode()
        if not 0 <= token_id < self.vocab_size:
            return f"<|invalid_token:{token_id}|>".encode()
        return self._encoding.decode_single_token_bytes(token_id)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens by name; invalid UTF-8 becomes U+FFFD."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def default_tokenizer_path() -> Path:
    """Where the default tokenizer file is: llama-models' `llama3/tokenizer.model`."""
    try:
        root = importlib.resources.files("llama_models")
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "no tokenizer given and the default one comes from the llama-models package, which "
            "is not installed: pip install 'guardrt[default-tokenizer]', or pass a checkpoint "
            "directory (with tokenizer.json) or a tokenizer file"
        ) from exc
    return Path(str(root / "llama3" / "tokenizer.model"))


def _checked_default() -> BpeTables:
    path = default_tokenizer_path()
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"cannot read the default tokenizer {path}: {exc.strerror}") from exc
    if digest != DEFAULT_TOKENIZER_SHA256:
        raise ConfigError(f"{path} has sha256 {digest}, not Llama 3's {DEFAULT_TOKENIZER_SHA256}")
    return read_tiktoken_file(path)


def _tokenizer_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return path / name
        raise ConfigError(f"{path} has neither tokenizer.json nor tokenizer.model")
    if not path.is_file():
        raise ConfigError(f"tokenizer file {path} does not exist")
    return path


@functools.cache
def _load_cached(path: Path | None) -> Tokenizer:
    if path is None:
        return Tokenizer(_checked_default())
    if path.suffix == ".json":
        return Tokenizer(read_tokenizer_json(path))
    return Tokenizer(read_tiktoken_file(path))


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory, a `tokenizer.json`/`tokenizer.model`, or the
    default (llama-models' `tokenizer.model`, checked by sha256). Loaded once per file.

    A directory's `tokenizer.json` is preferred: it is what the HF checkpoint ships.
    """
    return _load_cached(None if path is None else _tokenizer_file(Path(path).resolve()))
