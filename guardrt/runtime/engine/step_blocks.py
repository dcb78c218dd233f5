"""Long steps of the exported graphs fed in blocks of tokens (chunked prefill).

The exported decoder graph's attention is plain ONNX (MatMul, Softmax, MatMul): a step of S
tokens materialises its scores, (B, 8, 4·S, past + S) for self-attention and (B, 8, 4·S, 6404)
for a cross layer, in fp32. At the model's 8,192-token limit that is 8.6 GB and 6.7 GB a layer
at batch 1, where the fused kernels of the torch back end hold none of it.

`BlockedSteps` feeds a step to the graphs at most `block` tokens (columns) at a time: each
block is an ordinary step whose past is the blocks before it, already in the caches (every row's
past lies below its first position, as in any step). The logits a caller asks for are taken
from the block holding their column. The result is the unblocked step's up to float rounding
(the same sums, in different matmul shapes); a step of at most `block` tokens, every decode
step and the usual ~350-token prompt, passes through unchanged.

Measured on this project's CPU machine (ONNX Runtime 1.31), an int8 engine of the model's
full widths with 3 of its 40 text layers (1 cross) and 5 of its 40 vision layers, one
3,802-token response check: peak memory 10.1 → 5.4 GB and 20.3 → 13.5 s text-only, 19.8 →
12.2 GB and 54.2 → 46.2 s with a 4-tile image, P(unsafe) the same to 7 digits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from guardrt.runtime.engine.graph_steps import EngineSteps
from guardrt.runtime.preprocess import TiledImage

# Tokens per graph run: scores of at most (B, 8, 4096, past + 1024) and (B, 8, 4096, 6404)
# fp32 a layer, ~1 GB each at batch 1; the TensorRT profile's optimum is 512 tokens.
DEFAULT_BLOCK = 1024


class BlockedSteps:
    """`inner`'s steps, fed at most `block` tokens at a time."""

    def __init__(self, inner: EngineSteps, block: int = DEFAULT_BLOCK) -> None:
        if block < 1:
            raise ValueError(f"a step block of {block} tokens must be ≥ 1")
        self.inner, self.block = inner, block
        self.max_batch, self.max_seq = inner.max_batch, inner.max_seq

    def write_images(self, slots: Sequence[int], images: Sequence[TiledImage]) -> None:
        self.inner.write_images(slots, images)

    def clear_images(self, slots: Sequence[int]) -> None:
        self.inner.clear_images(slots)

    def copy_kv(self, source: int, target: int, length: int) -> None:
        self.inner.copy_kv(source, target, length)

    def release(self) -> None:
        self.inner.release()

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
        """`StepModel.step`, in blocks of columns: (B, R, V) at `logit_index`, each value
        from the block holding its column. A value no block holds (an index outside the
        step) stays NaN, which decoding reads as unsafe, never as safe."""
        width = tokens.shape[1]
        if width <= self.block:
            return self.inner.step(
                tokens, positions, slots, image_start, num_tiles, logit_index, vocab, log_probs
            )
        result: np.ndarray | None = None
        for start in range(0, width, self.block):
            stop = min(start + self.block, width)
            inside = (logit_index >= start) & (logit_index < stop)  # (B, R)
            local = np.where(inside, logit_index - start, 0)  # rows elsewhere: discarded
            values = self.inner.step(
                np.ascontiguousarray(tokens[:, start:stop]),
                np.ascontiguousarray(positions[:, start:stop]),
                slots,
                image_start,
                num_tiles,
                local,
                vocab,
                log_probs,
            )  # (B, R, V)
            if result is None:
                result = np.full(values.shape, np.nan, values.dtype)
            result[inside] = values[inside]
        assert result is not None  # width > block ≥ 1: at least one block ran
        return result
