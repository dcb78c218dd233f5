"""Long steps of the exported graphs run in blocks of tokens (`engine/step_blocks.py`): each
block is an ordinary step over the caches the blocks before it filled, every logit comes from
the block holding its column, and an ONNX engine answering in blocks of 16 tokens decides as
one answering each prompt in a single step (text, a response, 1-4 tiles, a custom policy,
greedy decoding, a streaming session)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from guardrt.runtime.engine.step_blocks import BlockedSteps
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.preprocess import TiledImage
from tests.test_onnx_engine import assert_close_decoded, checked_in_session, onnx_engine, requests


class Recording:
    """A step model whose value at (b, r) is the position of the column asked for, and the
    token there: what the caller asked for is visible in what it gets."""

    max_batch, max_seq = 4, 4096

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []  # (positions, logit_index)
        self.other: list[str] = []

    def write_images(self, slots: Sequence[int], images: Sequence[TiledImage]) -> None:
        self.other.append("write_images")

    def clear_images(self, slots: Sequence[int]) -> None:
        self.other.append("clear_images")

    def copy_kv(self, source: int, target: int, length: int) -> None:
        self.other.append(f"copy_kv {source} {target} {length}")

    def release(self) -> None:
        self.other.append("release")

    def step(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        image_start: np.ndarray,
        num_tiles: np.ndarray,
        logit_index: np.ndarray,
        vocab: np.ndarray | None = None,
        log_probs: bool = False,
    ) -> np.ndarray:
        assert tokens.shape == positions.shape
        assert tokens.flags.c_contiguous
        self.calls.append((positions, logit_index))
        at = np.take_along_axis(positions, logit_index, axis=1)  # (B, R)
        token = np.take_along_axis(tokens, logit_index, axis=1)
        return np.stack([at, token], axis=-1).astype(np.float32)  # (B, R, 2)


def _step(steps: BlockedSteps, width: int, index: list[list[int]]) -> np.ndarray:
    positions = np.asarray([[7 + j for j in range(width)], [100 + j for j in range(width)]])
    tokens = positions * 3 + 1
    return steps.step(
        tokens,
        positions,
        np.asarray([0, 1]),
        np.asarray([5, 4096]),
        np.asarray([2, 0]),
        np.asarray(index),
        np.asarray([1, 2]),
        log_probs=True,
    )


def test_blocks_feed_columns_and_gather_rows() -> None:
    inner = Recording()
    steps = BlockedSteps(inner, block=4)
    index = [[9, 0, 3], [4, 8, 7]]  # columns in the third, first and second blocks
    values = _step(steps, 10, index)
    firsts = [int(positions[0, 0]) for positions, _ in inner.calls]
    widths = [positions.shape[1] for positions, _ in inner.calls]
    assert (firsts, widths) == ([7, 11, 15], [4, 4, 2])
    expected_at = np.asarray([[16, 7, 10], [104, 108, 107]], np.float32)
    assert np.array_equal(values[..., 0], expected_at)
    assert np.array_equal(values[..., 1], expected_at * 3 + 1)
    for _, local in inner.calls:  # indices relative to the block, all inside it
        assert (local >= 0).all()
        assert (local < 4).all()


def test_short_steps_pass_through_and_the_rest_delegates() -> None:
    inner = Recording()
    steps = BlockedSteps(inner, block=4)
    index = [[3], [0]]
    values = _step(steps, 4, index)
    assert len(inner.calls) == 1
    assert np.array_equal(inner.calls[0][1], np.asarray(index))
    assert values.shape == (2, 1, 2)
    steps.write_images([0], [])
    steps.clear_images([1])
    steps.copy_kv(2, 3, 9)
    steps.release()
    assert inner.other == ["write_images", "clear_images", "copy_kv 2 3 9", "release"]
    assert (steps.max_batch, steps.max_seq) == (4, 4096)
    with pytest.raises(ValueError, match="a step block of 0 tokens"):
        BlockedSteps(inner, block=0)


def test_an_index_outside_the_step_stays_nan() -> None:
    """Fail closed: nothing the caller asked for is made up."""
    values = _step(BlockedSteps(Recording(), block=4), 10, [[12], [2]])
    assert np.isnan(values[0]).all()
    assert np.array_equal(values[1, 0], [102, 307])


@pytest.mark.parametrize("decode", ["constrained", "greedy"])
def test_engine_in_blocks_decides_as_in_one_step(
    onnx_fp32: Path, preparer: Preparer, decode: str
) -> None:
    batch = requests(preparer)
    assert min(len(request.prompt) for request in batch) > 3 * 16  # every prompt in blocks
    blocked = onnx_engine(onnx_fp32, decode=decode, max_step_tokens=16)
    whole = onnx_engine(onnx_fp32, decode=decode)
    for a, b in zip(blocked.execute(batch), whole.execute(batch), strict=True):
        assert_close_decoded(a, b)


def test_engine_session_in_blocks(onnx_fp32: Path, preparer: Preparer) -> None:
    blocked = onnx_engine(onnx_fp32, max_sessions=1, max_step_tokens=16)
    in_session, checks = checked_in_session(blocked, preparer)
    for a, b in zip(in_session, onnx_engine(onnx_fp32).execute(checks), strict=True):
        assert_close_decoded(a, b)
    with pytest.raises(ConfigError, match="max_step_tokens 0 must be ≥ 1"):
        onnx_engine(onnx_fp32, max_step_tokens=0)
