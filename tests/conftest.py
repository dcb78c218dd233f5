"""Shared fixtures: the references that are expensive to build are built once per session."""

from __future__ import annotations

import os

# Triton kernels run under Triton's CPU interpreter in the tests (on CPU tensors, on any
# machine). Triton decides when it is first imported (transformers and others import it), so
# this comes before any import. On a GPU, benchmarks/kernels.py checks them against the reference.
os.environ.setdefault("TRITON_INTERPRET", "1")

import io
from pathlib import Path

import pytest

from guardrt.runtime.engine import Engine, EngineOptions, load_engine
from guardrt.runtime.prepare import Preparer, load_preparer
from guardrt.runtime.tokenizer import Tokenizer, load_tokenizer
from guardrt.testing.references import converted_tokenizer_json
from tests.models import DEVICE, write_guard_checkpoint


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
    options = EngineOptions(checkpoint, device=DEVICE, max_batch=4, max_seq=1024)
    return load_engine("torch", options)


def _build(checkpoint: Path, output: Path, precision: str) -> Path:
    from guardrt.export.build import BuildOptions, build  # noqa: PLC0415
    from guardrt.export.progress import Progress  # noqa: PLC0415

    options = BuildOptions(checkpoint, output, precision, max_batch=4, max_seq=1024)
    build(options, Progress(5, io.StringIO()))
    return output


@pytest.fixture(scope="session")
def onnx_fp32(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`guardrt export build --precision fp32 --format onnx` of the checkpoint (once)."""
    return _build(checkpoint, tmp_path_factory.mktemp("engines") / "fp32", "fp32")


@pytest.fixture(scope="session")
def onnx_int8(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with int8 weights (weight-only compute)."""
    return _build(checkpoint, tmp_path_factory.mktemp("engines") / "int8", "int8")
