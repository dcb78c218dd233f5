"""Shared fixtures: the references that are expensive to build are built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardrt.runtime.tokenizer import Tokenizer, load_tokenizer
from guardrt.testing.references import converted_tokenizer_json


@pytest.fixture(scope="session")
def converted_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """transformers' converter output for the default tokenizer.model (~4 s, once)."""
    return converted_tokenizer_json(tmp_path_factory.mktemp("converted"))


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    """The default tokenizer (llama-models' tokenizer.model)."""
    return load_tokenizer()
