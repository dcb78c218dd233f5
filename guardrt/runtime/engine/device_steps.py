"""A `StepModel` over the two TensorRT plans with the K/V caches in GPU memory.

The layouts are `GraphSteps`' (host caches, ONNX Runtime), with K and V folded into the layer
axis as `Cuda.copy_rows` addresses them (see `cuda_memory.py`):

    self cache   (self layers·2, rows, Hkv, capacity, d)  grown on demand up to max_seq
    image cache  (cross layers·2, image rows, Hkv, image_keys, d)  allocated at load

(Only the first `image_rows` rows can hold an image, as in `GraphSteps`: a shared prefix's row
costs no 420 MB image row.)

A step gathers each batch row's past from its cache row into the decoder's `past_kv` feed, and
its image K/V into `cross_kv`, and stores the step's `present_kv` back, all GPU to GPU: one
copy per run of consecutive cache rows for the gathers (one for a batch in rows 0..B-1), one
per batch row for the store. Only the tokens, positions and the head's few values cross PCIe
(the logits of the ids a step asks for and each row's normaliser: `HeadScores`). (With host
caches, an image step would copy its 420 MB of fp32 image K/V to the GPU at every step.) The
`cross_kv` feed is kept while its rows' images are unchanged, so the decode steps that follow
an image prefill copy no image K/V at all.

Caches are zeroed when allocated: a row's attention reads positions past its own before
masking them, and 0 × NaN from uninitialised memory would be NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from guardrt.runtime.capacity import grown_capacity
from guardrt.runtime.engine.cuda_memory import (
    Cuda,
    DeviceArray,
    DeviceBuffers,
    DeviceError,
    RowRun,
    byte_size,
)
from guardrt.runtime.engine.graph_steps import (
    HeadScores,
    VocabFeed,
    check_image_slots,
    decoder_feeds,
    image_rows_of,
    image_slots,
)
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.preprocess import TiledImage, stack_pixels

F32 = np.dtype(np.float32)


class DeviceRunner(Protocol):
    """The plans as `DeviceSteps` runs them: K/V outputs stay on the GPU."""

    cuda: Cuda
    stream: Any

    def vision(
        self, pixel_values: np.ndarray, aspect_ratio_ids: np.ndarray, aspect_ratio_mask: np.ndarray
    ) -> DeviceArray:
        """(N, T, 3, H, W) f32, (N,) i64, (N, T) i64 → cross_kv (C, 2, N, Hkv, L, d) f32 on the
        GPU, valid until the next vision run."""
        ...

    def decoder(
        self, feeds: Mapping[str, np.ndarray | DeviceArray]
    ) -> tuple[HeadScores, DeviceArray]:
        """The decoder's inputs by name (host or GPU) → its head on the host and present_kv on
        the GPU (valid until the next decoder run)."""
        ...


def position_runs(positions: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first index, first position, count) for each run of consecutive positions at
    consecutive indices, in position order: where a row's step tokens go in its cache row, or
    (given a step's slots) which batch rows are consecutive cache rows. A position given more
    than once (a row's pads stop at the last position) keeps its last index, as the host
    cache's indexed write does. [5, 6, 7, 7, 7] → [(0, 5, 2), (4, 7, 1)]."""
    last = {position: index for index, position in enumerate(positions)}
    runs: list[tuple[int, int, int]] = []
    for position in sorted(last):
        index = last[position]
        if runs and runs[-1][1] + runs[-1][2] == position and runs[-1][0] + runs[-1][2] == index:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((index, position, 1))
    return runs


def folded(array: DeviceArray) -> DeviceArray:
    """A graph's (layers, 2, rows, Hkv, positions, d) K/V as (layers·2, rows, Hkv, positions, d)."""
    layers, two, *rest = array.shape
    return DeviceArray(array.pointer, (layers * two, *rest), array.dtype)


def unfolded(array: DeviceArray) -> DeviceArray:
    """The inverse of `folded`: (layers·2, ...) → (layers, 2, ...), the graphs' layout."""
    slices, *rest = array.shape
    return DeviceArray(array.pointer, (slices // 2, 2, *rest), array.dtype)


class DeviceSteps:
    def __init__(
        self,
        runner: DeviceRunner,
        config: ModelConfig,
        rows: int,
        max_seq: int,
        image_rows: int | None = None,
    ) -> None:
        text = config.text
        self.runner, self.cuda, self.max_batch, self.max_seq = runner, runner.cuda, rows, max_seq
        self.image_rows = image_rows_of(rows, image_rows)
        self._heads, self._head_dim = text.num_kv_heads, text.head_dim
        self._self_slices = 2 * len(text.self_attention_layers)
        self._cross_slices = 2 * len(text.cross_attention_layers)
        self._image_keys = config.vision.max_num_tiles * config.vision.num_patches
        self._vocab = VocabFeed(text.vocab_size)
        # No positions yet, so no memory (pointer 0) until the first step reserves some.
        self._self = DeviceArray(0, (self._self_slices, rows, self._heads, 0, self._head_dim), F32)
        self._images: DeviceArray | None = self._image_cache()
        self._feeds = DeviceBuffers(self.cuda)
        self._image_version = 0  # bumped by every change to the image cache
        self._cross_feed: tuple[tuple[int, ...], int] | None = None  # (slots, version) it holds

    def _image_cache(self) -> DeviceArray:
        """Every row's image K/V, allocated now: an engine that cannot hold them fails to load
        rather than on its first image (the torch engine allocates its image rows up front too).
        fp32, the graphs' type at their boundary: 420 MB a row at full size."""
        shape = (self._cross_slices, self.image_rows, self._heads, self._image_keys, self._head_dim)
        try:
            return self._zeros(shape)
        except DeviceError as exc:
            row = byte_size(shape, F32) // self.image_rows
            size = f"{row / 1e6:.0f} MB" if row >= 1e6 else f"{row:,} bytes"
            raise ConfigError(
                f"the image K/V cache does not fit: {self.image_rows} rows × {size} ({exc}); "
                "serve with a smaller --max-batch-size or --max-sessions"
            ) from exc

    def _zeros(self, shape: tuple[int, ...]) -> DeviceArray:
        """A new zeroed f32 array owned by this object."""
        array = DeviceArray(self.cuda.malloc(byte_size(shape, F32)), shape, F32)
        self.cuda.zero(array.pointer, array.nbytes, self.runner.stream)
        return array

    def release(self) -> None:
        """Free the caches and feed buffers (the engine is closing)."""
        self.cuda.select()
        self.cuda.synchronize(self.runner.stream)  # no copy may still use them
        for array in (self._self, self._images):
            if array is not None and array.pointer:
                self.cuda.free(array.pointer)
        self._self = DeviceArray(0, (*self._self.shape[:3], 0, self._head_dim), F32)
        self._images, self._cross_feed = None, None
        self._feeds.release()

    def _reserve(self, length: int) -> None:
        """Grow the self-attention cache to hold positions 0..length-1 (`grown_capacity`)."""
        old = self._self
        capacity = old.shape[3]
        grown = grown_capacity(capacity, length, self.max_seq)
        if grown == capacity:
            return
        bigger = self._zeros((*old.shape[:3], grown, self._head_dim))
        run = RowRun(0, 0, capacity, rows=self.max_batch)
        self.cuda.copy_rows(bigger, run, old, run, self.runner.stream)
        self.cuda.synchronize(self.runner.stream)  # before the old memory goes back
        if old.pointer:  # (none before the first step or after `release`)
            self.cuda.free(old.pointer)
        self._self = bigger

    def write_images(self, slots: Sequence[int], images: Sequence[TiledImage]) -> None:
        check_image_slots(slots, self.image_rows)
        self.cuda.select()
        pixels = stack_pixels(images)  # (N, T, 3, H, W)
        ids = np.asarray([image.aspect_ratio_id for image in images], dtype=np.int64)
        masks = np.stack([image.aspect_ratio_mask for image in images]).astype(np.int64)
        kv = folded(self.runner.vision(pixels, ids, masks))  # (C·2, N, Hkv, L, d)
        if self._images is None:  # (after `release`)
            self._images = self._image_cache()
        keys = self._image_keys
        for index, slot in enumerate(slots):
            target, source = RowRun(slot, 0, keys), RowRun(index, 0, keys)
            self.cuda.copy_rows(self._images, target, kv, source, self.runner.stream)
        self._image_version += 1

    def clear_images(self, slots: Sequence[int]) -> None:
        if self._images is None:
            return
        self.cuda.select()
        for slot in image_slots(slots, self.image_rows):
            self._zero_row(self._images, slot)
        self._image_version += 1

    def _zero_row(self, array: DeviceArray, row: int) -> None:
        """Row `row` of a (slices, rows, Hkv, L, d) array: one zeroed block per slice."""
        slices, rows, *rest = array.shape
        block = byte_size(tuple(rest), array.dtype)  # one row of one slice
        for index in range(slices):
            pointer = array.pointer + (index * rows + row) * block
            self.cuda.zero(pointer, block, self.runner.stream)

    def copy_kv(self, source: int, target: int, length: int) -> None:
        """Through a scratch row: cudaMemcpy3D's source and destination may not overlap, and
        two rows of one cache interleave (their bytes are disjoint, their boxes are not)."""
        self.cuda.select()
        self._reserve(length)
        shape = (self._self_slices, 1, self._heads, length, self._head_dim)
        scratch, run = self._feeds.array("copied_kv", shape, F32), RowRun(0, 0, length)
        stream = self.runner.stream
        self.cuda.copy_rows(scratch, run, self._self, RowRun(source, 0, length), stream)
        self.cuda.copy_rows(self._self, RowRun(target, 0, length), scratch, run, stream)

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
        self.cuda.select()  # the calling thread's GPU (the helpers below assume it)
        past = int(positions[:, 0].max())  # every row's past lies below its first position
        self._reserve(past)
        head, present = self.runner.decoder(
            decoder_feeds(
                tokens,
                positions,
                unfolded(self._past(slots, past)),
                unfolded(self._cross(slots, num_tiles)),
                image_start,
                num_tiles,
                logit_index,
                self._vocab(vocab),
            )
        )
        self._store(folded(present), slots, positions)
        return head.values(log_probs)

    def _past(self, slots: np.ndarray, past: int) -> DeviceArray:
        """Positions 0..past-1 of each slot's cache row: (Ls·2, B, Hkv, past, d)."""
        shape = (self._self_slices, len(slots), self._heads, past, self._head_dim)
        feed = self._feeds.array("past_kv", shape, F32)
        self._gather(feed, self._self, slots, past)
        return feed

    def _cross(self, slots: np.ndarray, num_tiles: np.ndarray) -> DeviceArray:
        """Each slot's image K/V (C·2, B, Hkv, L, d); for an all-text batch one zero key, which
        the graph's masks and gates zero out."""
        if self._images is None or not bool((num_tiles > 0).any()):
            shape = (self._cross_slices, len(slots), self._heads, 1, self._head_dim)
            feed = self._feeds.array("text_cross_kv", shape, F32)
            self.cuda.zero(feed.pointer, feed.nbytes, self.runner.stream)
            return feed
        keys = self._image_keys
        shape = (self._cross_slices, len(slots), self._heads, keys, self._head_dim)
        feed = self._feeds.array("cross_kv", shape, F32)
        holds = (tuple(int(slot) for slot in slots), self._image_version)
        if self._cross_feed == holds:  # the decode steps after an image prefill
            return feed
        if bool((slots < self.image_rows).all()):
            self._gather(feed, self._images, slots, keys)
        else:  # rows that hold no image (a shared prefix's) get zeros, one copy per other row
            for index, slot in enumerate(slots.tolist()):
                if slot < self.image_rows:
                    to_run, from_run = RowRun(index, 0, keys), RowRun(slot, 0, keys)
                    stream = self.runner.stream
                    self.cuda.copy_rows(feed, to_run, self._images, from_run, stream)
                else:
                    self._zero_row(feed, index)
        self._cross_feed = holds
        return feed

    def _gather(self, feed: DeviceArray, cache: DeviceArray, slots: np.ndarray, count: int) -> None:
        """Positions 0..count-1 of each slot's cache row into the feed's batch rows, in order:
        one copy per run of consecutive slots (one for a batch in rows 0..B-1)."""
        for index, slot, rows in position_runs(slots.tolist()):
            to_run, from_run = RowRun(index, 0, count, rows), RowRun(slot, 0, count, rows)
            self.cuda.copy_rows(feed, to_run, cache, from_run, self.runner.stream)

    def _store(self, present: DeviceArray, slots: np.ndarray, positions: np.ndarray) -> None:
        """present (Ls·2, B, Hkv, S, d) at (slot, position); positions stay below max_seq
        (the decoding loop stops pads at the last one), as the torch cache requires too."""
        self._reserve(int(positions.max()) + 1)
        for index, slot in enumerate(slots):
            for first, position, count in position_runs(positions[index].tolist()):
                to_run, from_run = RowRun(int(slot), position, count), RowRun(index, first, count)
                self.cuda.copy_rows(self._self, to_run, present, from_run, self.runner.stream)
