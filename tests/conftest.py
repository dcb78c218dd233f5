"""Shared fixtures: the references that are expensive to build are built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardrt.runtime.engine import Engine, EngineOptions, load_engine
from guardrt.runtime.prepare import Preparer, load_preparer
from guardrt.runtime.tokenizer import Tokenizer, load_tokenizer
from guardrt.testing.references import converted_tokenizer_json
from tests.models import write_guard_checkpoint


@pytest.fixture(scope="session")
def converted_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """transformers' converter output for the default tokenizer.model (~4 s, once)."""
    return converted_tokenizer_json(tmp_path_factory.mktemp("converted"))


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    """The default tokenizer (llama-models' tokenizer.model)."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_guard_checkpoint(tmp_path_factory.mktemp("server-ckpt"))


@pytest.fixture(scope="session")
def preparer(checkpoint: Path) -> Preparer:
    return load_preparer(checkpoint, 1024)


@pytest.fixture(scope="session")
def engine(checkpoint: Path) -> Engine:
    return load_engine("torch", EngineOptions(checkpoint, max_batch=4, max_seq=1024))
