"""A `StepModel` over the two exported graphs, with the K/V caches in host memory (numpy).

The ONNX Runtime back end's: its `GraphRunner` runs the vision graph and the decoder graph;
this file owns the caches and the feeds. (TensorRT keeps them on the GPU: `DeviceSteps`.) The
layouts are the graphs' (see `guardrt/export/decoder.py`):

    self_kv   (self layers, 2, rows, Hkv, capacity, d)  grown on demand up to max_seq
    cross_kv  (cross layers, 2, image rows, Hkv, image_keys, d)  allocated with the first image

Only the first `image_rows` rows can hold an image (the rows after them hold shared policy
prefixes, which never do: no image K/V is kept for them); a step that puts such a row beside
an image row feeds it zeros, as it would any row without an image.

A step feeds each row's past (positions before its first position this step; the graph masks
the rest) and writes the step's K/V back at the step's positions. The graph's head returns the
logits of the ids the step asks for and each row's normaliser (`HeadScores`): nothing
vocabulary-sized crosses to the host or is reduced there, unless a step asks for every logit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from guardrt.runtime.capacity import grown_capacity
from guardrt.runtime.decoding import StepModel
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.preprocess import TiledImage, stack_pixels


def vision_feeds(
    pixel_values: np.ndarray, aspect_ratio_ids: np.ndarray, aspect_ratio_mask: np.ndarray
) -> dict[str, np.ndarray]:
    """The vision graph's inputs by name (its manifest's contract)."""
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": aspect_ratio_ids,
        "aspect_ratio_mask": aspect_ratio_mask,
    }


KV = TypeVar("KV")  # where a back end keeps K/V: numpy arrays (host) or `DeviceArray`s (GPU)


def decoder_feeds(
    tokens: np.ndarray,
    positions: np.ndarray,
    past_kv: KV,
    cross_kv: KV,
    image_start: np.ndarray,
    num_tiles: np.ndarray,
    logit_index: np.ndarray,
    vocab: np.ndarray,
) -> dict[str, np.ndarray | KV]:
    """The decoder graph's inputs by name (its manifest's contract; `guardrt/export/decoder.py`
    says what each holds)."""
    return {
        "input_ids": tokens,
        "position_ids": positions,
        "past_kv": past_kv,
        "cross_kv": cross_kv,
        "image_start": image_start,
        "num_tiles": num_tiles,
        "logit_index": logit_index,
        "vocab": vocab,
    }


@dataclass(frozen=True)
class HeadScores:
    """The decoder graph's head: `logits` (B, R, V) f32 at the step's `vocab` feed, and each
    row's `normaliser` (B, R) f32, the log-sum-exp of its every logit."""

    logits: np.ndarray
    normaliser: np.ndarray

    def values(self, log_probs: bool) -> np.ndarray:
        """`StepModel.step`'s result: the logits, or with `log_probs` log-softmax values (a NaN
        normaliser, from a NaN logit anywhere in the row, makes them all NaN: fail closed)."""
        if not log_probs:
            return self.logits
        result: np.ndarray = self.logits - self.normaliser[..., None]  # (B, R, V) f32
        return result


class VocabFeed:
    """The decoder's `vocab` input of a step: the ids asked for, or every id (kept, built once)."""

    def __init__(self, vocab_size: int) -> None:
        self.every = np.arange(vocab_size, dtype=np.int64)

    def __call__(self, vocab: np.ndarray | None) -> np.ndarray:
        return self.every if vocab is None else np.ascontiguousarray(vocab, dtype=np.int64)


class EngineSteps(StepModel, Protocol):
    """The `StepModel` a graph back end serves with: it also frees its caches."""

    def release(self) -> None: ...


class StepsRunner(Protocol):
    """A back end's graph runner: it makes the `StepModel` that runs it, and closes."""

    def steps(
        self, config: ModelConfig, rows: int, max_seq: int, image_rows: int | None = None
    ) -> EngineSteps:
        """`rows` cache rows of `max_seq` positions each, the first `image_rows` (all: None)
        of which can hold an image."""
        ...

    def close(self) -> None: ...


class GraphRunner(Protocol):
    def vision(
        self, pixel_values: np.ndarray, aspect_ratio_ids: np.ndarray, aspect_ratio_mask: np.ndarray
    ) -> np.ndarray:
        """(N, T, 3, H, W) f32, (N,) i64, (N, T) i64 → cross_kv (C, 2, N, Hkv, L, d) f32."""
        ...

    def decoder(self, feeds: dict[str, np.ndarray]) -> tuple[HeadScores, np.ndarray]:
        """The decoder graph's inputs by name → (its head, present_kv)."""
        ...


def image_rows_of(rows: int, image_rows: int | None) -> int:
    """How many of `rows` cache rows can hold an image (None: all)."""
    if image_rows is None:
        return rows
    if not 0 < image_rows <= rows:
        raise ValueError(f"image_rows {image_rows} is not within 1..{rows} (the cache rows)")
    return image_rows


def image_slots(slots: Sequence[int], image_rows: int) -> list[int]:
    """The slots among `slots` that can hold an image (a shared prefix's row holds none)."""
    return [slot for slot in slots if slot < image_rows]


def check_image_slots(slots: Sequence[int], image_rows: int) -> None:
    """Refuse an image for a row that cannot hold one (a caller's bug, never a request's)."""
    beyond = [slot for slot in slots if slot >= image_rows]
    if beyond:
        raise ValueError(f"cache rows {beyond} hold no image (only rows 0..{image_rows - 1} do)")


class GraphSteps:
    def __init__(
        self,
        runner: GraphRunner,
        config: ModelConfig,
        rows: int,
        max_seq: int,
        image_rows: int | None = None,
    ) -> None:
        text = config.text
        self.runner, self.max_batch, self.max_seq = runner, rows, max_seq
        self.image_rows = image_rows_of(rows, image_rows)
        self._self_shape = (len(text.self_attention_layers), 2, rows, text.num_kv_heads)
        crosses, heads = len(text.cross_attention_layers), text.num_kv_heads
        self._cross_shape = (crosses, 2, self.image_rows, heads)
        self._head_dim = text.head_dim
        self._image_keys = config.vision.max_num_tiles * config.vision.num_patches
        self._vocab = VocabFeed(text.vocab_size)
        self.self_kv = np.zeros((*self._self_shape, 0, text.head_dim), np.float32)
        self.cross_kv: np.ndarray | None = None

    def release(self) -> None:
        """Free the caches (the engine is closing)."""
        self.self_kv = self.self_kv[:, :, :, :, :0].copy()
        self.cross_kv = None

    def _reserve(self, length: int) -> None:
        """Grow the self-attention cache to hold positions 0..length-1 (`grown_capacity`)."""
        capacity = self.self_kv.shape[4]
        grown = grown_capacity(capacity, length, self.max_seq)
        if grown == capacity:
            return
        bigger = np.zeros((*self._self_shape, grown, self._head_dim), np.float32)
        bigger[:, :, :, :, :capacity] = self.self_kv
        self.self_kv = bigger

    def write_images(self, slots: Sequence[int], images: Sequence[TiledImage]) -> None:
        check_image_slots(slots, self.image_rows)
        pixels = stack_pixels(images)  # (N, T, 3, H, W)
        ids = np.asarray([image.aspect_ratio_id for image in images], dtype=np.int64)
        masks = np.stack([image.aspect_ratio_mask for image in images]).astype(np.int64)
        kv = self.runner.vision(pixels, ids, masks)  # (C, 2, N, Hkv, L, d)
        if self.cross_kv is None:
            shape = (*self._cross_shape, self._image_keys, self._head_dim)
            self.cross_kv = np.zeros(shape, np.float32)
        self.cross_kv[:, :, list(slots)] = kv

    def copy_kv(self, source: int, target: int, length: int) -> None:
        self._reserve(length)
        self.self_kv[:, :, target, :, :length] = self.self_kv[:, :, source, :, :length]

    def clear_images(self, slots: Sequence[int]) -> None:
        if self.cross_kv is not None:
            self.cross_kv[:, :, image_slots(slots, self.image_rows)] = 0

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
        """`StepModel.step`: the graph picks `vocab`'s logits and reduces the normaliser."""
        past = int(positions[:, 0].max())  # every row's past lies below its first position
        self._reserve(past)
        past_kv = self.self_kv[:, :, slots, :, :past]  # (Ls, 2, B, Hkv, P, d)
        if self.cross_kv is not None and bool((num_tiles > 0).any()):
            # (C, 2, B, Hkv, L, d), a copy: zeros for rows that hold no image
            cross_kv = self.cross_kv[:, :, np.minimum(slots, self.image_rows - 1)]
            cross_kv[:, :, slots >= self.image_rows] = 0
        else:  # an all-text batch: one zero key, which the graph's masks and gates zero out
            layers, _, _, heads = self._cross_shape
            cross_kv = np.zeros((layers, 2, len(slots), heads, 1, self._head_dim), np.float32)
        head, present = self.runner.decoder(
            decoder_feeds(
                tokens,
                positions,
                np.ascontiguousarray(past_kv),
                np.ascontiguousarray(cross_kv),
                image_start,
                num_tiles,
                logit_index,
                self._vocab(vocab),
            )
        )
        self._store(present, slots, positions)
        return head.values(log_probs)

    def _store(self, present: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> None:
        """present (Ls, 2, B, Hkv, S, d) at (slot, position); positions stay below max_seq
        (the decoding loop stops pads at the last one), as the torch cache requires too."""
        self._reserve(int(positions.max()) + 1)
        rows = slots[:, None]  # (B, 1) with positions (B, S)
        # Advanced indices split by slices go first: the target is (B, S, Ls, 2, Hkv, d).
        self.self_kv[:, :, rows, :, positions] = present.transpose(2, 4, 0, 1, 3, 5)
