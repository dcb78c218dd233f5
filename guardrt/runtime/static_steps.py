"""Decoder steps at a few static shapes, captured as CUDA graphs (issue 8).

A batch-1 verdict is launch-bound: ~1,600 kernels whose launches cost more than their work
(`benchmarks/results/h100-profile-eager.txt`). A CUDA graph replays a whole step with one launch,
but only at the shapes it was captured at. So a step is padded up to a bucket, (batch, tokens,
keys attended), and each bucket's step is captured once, at warm-up or on first use, into one
memory pool shared by every bucket (steps run one at a time and their output is copied out
before the next, so their scratch memory can overlap).

Padding keeps results exact:
- extra rows write into a scratch cache row no request owns (the model's last row);
- extra tokens of a real row continue its positions, after its real tokens (so its real queries
  never see them, as the decoding loop's own right padding); a step whose padded positions would
  pass the last cache position runs eagerly instead;
- attending to a bucket's worth of keys is the same as attending to `kv_len` of them, because the
  causal mask hides every cache position after a row's own.

A graph holds the cache's address: when the cache grows (`KVCache.reserve`), every captured step
is dropped and recaptured on first use.

On the CPU (or with `capture=False`) the padded steps run eagerly: the tests check the padding
there against unpadded steps; the capture itself needs CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from guardrt.runtime.classify import TorchSteps
from guardrt.runtime.decoding import PAD_ID
from guardrt.runtime.model.mllama import MllamaModel

log = logging.getLogger(__name__)

LOGIT_ROWS = 2  # constrained steps read 2 rows per request, fills and greedy steps 1
MAX_GRAPHS = 256  # beyond this many captured shapes, steps run eagerly


@dataclass(frozen=True)
class BucketKey:
    batch: int
    tokens: int
    keys: int
    cross: bool  # whether the step runs the cross-attention layers (any row has an image)
    vocab: int = 0  # token ids returned (a category step's few head rows), 0: every token
    log_probs: bool = False  # log-softmax values (a constrained prefill), not logits


@dataclass(frozen=True)
class Buckets:
    """The static shapes steps are padded to. A step larger than `max_tokens` (batch × tokens)
    is compute-bound, so launches don't matter there: it runs eagerly at its own shape."""

    batch: tuple[int, ...]
    tokens: tuple[int, ...]
    keys: tuple[int, ...]
    max_tokens: int
    vocab: tuple[int, ...] = (16, 64, 256, 1024)  # a category step's head rows (codes + 2)
    # A constrained prefill's log-probabilities (codes + 4: 17 for the default policy). Its
    # head computes every row regardless, so one coarse bucket serves policies of 1 to 60
    # categories alike (fewer graphs), where head rows are worth a finer step.
    label_vocab: tuple[int, ...] = (64, 1024)

    @classmethod
    def default(cls, max_batch: int, max_seq: int, max_tokens: int = 1024) -> Buckets:
        """Batch: powers of two up to `max_batch`; tokens: 2 (decode steps), 16 … 128, then
        steps of 64 up to 512 (a prefill pads its ~360 tokens to 384, not 512: padding is
        compute); keys: powers of two from 64 up to `max_seq` (always a bucket)."""
        batch = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch} | {max_batch})
        widths = (2, 16, 32, 64, 128, 192, 256, 320, 384, 448, 512)
        tokens = [t for t in widths if t <= min(max_seq, max_tokens)]
        keys = sorted({k for k in (64, 128, 256, 512, 1024, 2048, 4096) if k < max_seq} | {max_seq})
        return cls(tuple(batch), tuple(tokens), tuple(keys), max_tokens)

    def key(
        self,
        batch: int,
        tokens: int,
        kv_len: int,
        cross: bool,
        vocab: int = 0,
        log_probs: bool = False,
    ) -> BucketKey | None:
        """The smallest bucket holding a step, or None when it has none (too large)."""
        b = next((x for x in self.batch if x >= batch), None)
        t = next((x for x in self.tokens if x >= tokens), None)
        k = next((x for x in self.keys if x >= kv_len), None)
        v = self.vocab_bucket(vocab, log_probs)
        if b is None or t is None or k is None or v is None or b * t > self.max_tokens:
            return None
        return BucketKey(b, t, k, cross, v, log_probs)

    def vocab_bucket(self, vocab: int, log_probs: bool) -> int | None:
        """The smallest bucket holding `vocab` ids returned (0: every token), None past them."""
        sizes = self.label_vocab if log_probs else self.vocab
        return next((x for x in sizes if x >= vocab), None) if vocab else 0


@dataclass(frozen=True)
class PaddedStep:
    """A step's inputs at its bucket's shape (int64): tokens, positions (Bb, Tb); slots,
    image_start, num_tiles (Bb,); logit_index (Bb, LOGIT_ROWS); vocab (Vb,), empty for the
    whole vocabulary."""

    tokens: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    image_start: np.ndarray
    num_tiles: np.ndarray
    logit_index: np.ndarray
    vocab: np.ndarray

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (
            self.tokens,
            self.positions,
            self.slots,
            self.image_start,
            self.num_tiles,
            self.logit_index,
            self.vocab,
        )


def pad_step(
    arrays: Sequence[np.ndarray],
    key: BucketKey,
    scratch: int,
    max_seq: int,
    vocab: np.ndarray | None = None,
) -> PaddedStep | None:
    """`StepModel.step`'s six arrays (and its vocab) padded to `key`'s shape, or None when a
    padded position would pass the last cache position (the step then runs unpadded)."""
    tokens, positions, slots, image_start, num_tiles, logit_index = arrays
    batch, width = tokens.shape
    rows = logit_index.shape[1]
    extra = key.tokens - width
    if int(positions.max()) + extra > max_seq - 1 or rows > LOGIT_ROWS:
        return None
    out_tokens = np.full((key.batch, key.tokens), PAD_ID, dtype=np.int64)
    out_tokens[:batch, :width] = tokens
    # Real rows continue their positions; pad rows count from 0 in the scratch row.
    steps = np.arange(1, extra + 1, dtype=np.int64)  # (extra,)
    out_positions = np.tile(np.arange(key.tokens, dtype=np.int64), (key.batch, 1))
    out_positions[:batch, :width] = positions
    out_positions[:batch, width:] = positions[:, -1:] + steps[None, :]
    out_slots = np.full(key.batch, scratch, dtype=np.int64)
    out_slots[:batch] = slots
    out_start = np.full(key.batch, max_seq, dtype=np.int64)  # no image
    out_start[:batch] = image_start
    out_tiles = np.zeros(key.batch, dtype=np.int64)
    out_tiles[:batch] = num_tiles
    out_index = np.zeros((key.batch, LOGIT_ROWS), dtype=np.int64)
    out_index[:batch, :rows] = logit_index
    out_vocab = np.zeros(key.vocab, dtype=np.int64)
    if key.vocab:
        assert vocab is not None
        out_vocab[:] = vocab[-1]  # repeats of a wanted id: extra head rows nobody reads
        out_vocab[: len(vocab)] = vocab
    return PaddedStep(
        out_tokens, out_positions, out_slots, out_start, out_tiles, out_index, out_vocab
    )


class _Static:
    """One bucket's step: its inputs live in one device buffer (one host→device copy per
    step), its forward is captured as a CUDA graph or, without capture, run on the buffer."""

    def __init__(self, model: MllamaModel, key: BucketKey) -> None:
        self.model, self.key = model, key
        b, t = key.batch, key.tokens
        self._sizes = [b * t, b * t, b, b, b, b * LOGIT_ROWS, key.vocab]
        self._shapes = [(b, t), (b, t), (b,), (b,), (b,), (b, LOGIT_ROWS), (key.vocab,)]
        self.host = torch.zeros(sum(self._sizes), dtype=torch.int64, device="cpu")
        if model.device.type == "cuda":
            self.host = self.host.pin_memory()
        self._host_view = self.host.numpy()  # the same memory: steps are packed straight into it
        self.buffer = torch.zeros(sum(self._sizes), dtype=torch.int64, device=model.device)
        views = torch.split(self.buffer, self._sizes)
        self.inputs = [v.view(shape) for v, shape in zip(views, self._shapes, strict=True)]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def load(self, step: PaddedStep) -> None:
        # Safe to overwrite: the previous step's copy from this buffer has finished, as every
        # step ends reading its logits back synchronously.
        np.concatenate([a.reshape(-1) for a in step.arrays()], out=self._host_view)
        self.buffer.copy_(self.host, non_blocking=True)

    def forward(self) -> torch.Tensor:
        tokens, positions, slots, image_start, num_tiles, logit_index, vocab = self.inputs
        logits: torch.Tensor = self.model(
            tokens, positions, slots, image_start, num_tiles, logit_index,
            kv_len=self.key.keys, use_cross=self.key.cross,
            vocab=vocab if self.key.vocab else None, log_probs=self.key.log_probs,
        )  # fmt: skip
        return logits

    def capture(self, pool: Any) -> None:
        """Warm up on a side stream (lazy initialisation must not be captured), then capture.
        The forward runs on the loaded inputs: rerunning a step rewrites the same K/V."""
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.output = self.forward()
        except Exception:
            _after_failed_capture(stream, pool)
            raise
        self.graph = graph

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        assert self.output is not None
        return self.output


def _after_failed_capture(stream: torch.cuda.Stream, pool: Any) -> None:
    """Undo what a capture that raised leaves behind in torch 2.11, best effort: its context
    manager does not restore the current stream, and the caching allocator still routes
    allocations to the graph's pool (pytorch#180395, fixed in 2.12), which breaks every later
    capture and `empty_cache`. Where the allocator was already released, the call raises and
    is ignored."""
    torch.cuda.set_stream(stream)
    end_pool = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if end_pool is not None:  # private: a torch without it, or with another signature, is let be
        with contextlib.suppress(RuntimeError, TypeError):
            end_pool(torch.cuda.current_device(), pool)


class StaticSteps(TorchSteps):
    """`TorchSteps` whose small steps run at bucket shapes, as CUDA graphs when `capture`.

    The model's caches need one row more than the decoding loop uses: the last row is the pad
    rows' scratch, so `max_batch` here is the model's minus one.
    """

    def __init__(
        self, model: MllamaModel, buckets: Buckets | None = None, capture: bool | None = None
    ) -> None:
        super().__init__(model)
        if model.max_batch < 2:
            raise ValueError("StaticSteps needs a cache row for the batch and one for scratch")
        self.scratch = model.max_batch - 1
        self.max_batch = model.max_batch - 1
        self.buckets = buckets or Buckets.default(self.max_batch, self.max_seq)
        self.capture = model.device.type == "cuda" if capture is None else capture
        if self.capture and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self._steps: dict[BucketKey, _Static] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.capture_s = 0.0  # time spent capturing, for the warm-up report
        self.eager_steps = 0  # steps that had no bucket
        self.dropped = 0  # captured steps dropped because the cache grew
        # The cache the steps were set up on, weakly (holding it would keep a replaced
        # cache's tensors alive), and its growth count.
        self._cache, self._version = weakref.ref(model.cache), model.cache.version

    @property
    def graphs(self) -> int:
        return sum(1 for s in self._steps.values() if s.graph is not None)

    def _static(self, key: BucketKey, padded: PaddedStep) -> _Static | None:
        static = self._steps.get(key)
        if static is not None:
            static.load(padded)
            return static
        if len(self._steps) >= MAX_GRAPHS:
            return None
        static = _Static(self.model, key)
        static.load(padded)
        if self.capture and self._pool is not None:
            started = time.perf_counter()
            try:
                static.capture(self._pool)
            # An op that can't be captured (torch raises RuntimeError; Triton its own types, a
            # compile or out-of-resources error): eager from now on. Whatever else failed fails
            # again in the eager step, which reports it.
            except Exception as exc:  # noqa: BLE001
                first = (str(exc).splitlines() or [""])[0][:300]  # torch's words, no input data
                log.warning(
                    "CUDA graph capture failed (%s: %s); steps run eagerly",
                    type(exc).__name__,
                    first,
                )
                self.capture = False
                return None
            self.capture_s += time.perf_counter() - started
            log.info(
                "captured step batch=%d tokens=%d keys=%d cross=%s vocab=%d in %.2f s",
                key.batch, key.tokens, key.keys, key.cross, key.vocab,
                time.perf_counter() - started,
            )  # fmt: skip
        self._steps[key] = static
        return static

    def common_keys(self, prefill_vocab: int, max_batch: int = 1) -> list[BucketKey]:
        """The buckets a served request meets most, to capture before traffic: for batches up to
        `max_batch`, every prefill width with the smallest and the next key bucket (a request
        after a shared prefix attends to more keys than it feeds), with and without an image,
        and the category steps over the keys a prompt of up to 1,024 tokens needs.
        `prefill_vocab`: how many ids a constrained prefill reads (`scores.prefill_vocab` of
        the policies served), 0 for greedy decoding (logits of every token, no category
        steps)."""
        b, vocab = self.buckets, self.buckets.vocab[0]
        label = b.vocab_bucket(prefill_vocab, log_probs=True)
        if label is None:
            return []  # more categories than a bucket: prefills run eagerly anyway
        found: list[BucketKey] = []
        for batch in (x for x in b.batch if x <= max_batch):
            for tokens in (t for t in b.tokens if t > 2 and batch * t <= b.max_tokens):
                for keys in [k for k in b.keys if k >= tokens][:2]:
                    found += [
                        BucketKey(batch, tokens, keys, cross, label, log_probs=label > 0)
                        for cross in (False, True)
                    ]
            if not prefill_vocab:
                continue
            for keys in (k for k in b.keys if 256 <= k <= 1024):
                found += [BucketKey(batch, 2, keys, cross, vocab) for cross in (False, True)]
        return found

    @torch.inference_mode()
    def prepare(self, keys: Sequence[BucketKey]) -> int:
        """Set up (capture, on a GPU) the steps of `keys` now, on dummy inputs that write only
        the scratch row; returns how many were new."""
        self.model.cache.reserve(max(key.keys for key in keys))
        self._current()
        new = 0
        for key in keys:
            if key in self._steps:
                continue
            positions = np.tile(np.arange(key.tokens, dtype=np.int64), (key.batch, 1))
            dummy = PaddedStep(
                np.full((key.batch, key.tokens), PAD_ID, dtype=np.int64),
                positions,
                np.full(key.batch, self.scratch, dtype=np.int64),
                np.full(key.batch, 0 if key.cross else self.max_seq, dtype=np.int64),
                np.full(key.batch, 1 if key.cross else 0, dtype=np.int64),
                np.zeros((key.batch, LOGIT_ROWS), dtype=np.int64),
                np.zeros(key.vocab, dtype=np.int64),
            )
            new += self._static(key, dummy) is not None
        return new

    def _current(self) -> None:
        """Drop every step set up on an older cache tensor: the cache reallocates when it grows
        (whoever grew it: a padded step, an eager one, a prefix copy) or is set up anew, and a
        graph would replay on the freed tensor. They are recaptured on first use."""
        cache = self.model.cache
        if self._cache() is not cache or cache.version != self._version:
            if self._steps:
                log.info(
                    "K/V cache grew to %d positions: %d captured steps dropped",
                    self.model.cache.capacity, len(self._steps),
                )  # fmt: skip
            self.dropped += len(self._steps)
            self._steps.clear()
            self._cache, self._version = weakref.ref(cache), cache.version

    @torch.inference_mode()
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
        arrays = (tokens, positions, slots, image_start, num_tiles, logit_index)
        batch, rows = tokens.shape[0], logit_index.shape[1]
        key = self.buckets.key(
            batch,
            tokens.shape[1],
            int(positions.max()) + 1,
            bool(num_tiles.any()),
            0 if vocab is None else len(vocab),
            log_probs,
        )
        padded = None if key is None else pad_step(arrays, key, self.scratch, self.max_seq, vocab)
        if key is not None and padded is not None:
            self.model.cache.reserve(max(key.keys, int(padded.positions.max()) + 1))
        self._current()
        static = None if key is None or padded is None else self._static(key, padded)
        if static is None:
            self.eager_steps += 1
            return super().step(*arrays, vocab, log_probs)
        scores = static.run()[:batch, :rows]  # (B, R, vocab size or Vb)
        if vocab is not None:
            scores = scores[..., : len(vocab)]  # (B, R, V'): the bucket's repeats dropped
        result: np.ndarray = scores.cpu().numpy()
        return result


def uses_graphs(device: torch.device, enabled: bool = True) -> bool:
    """Whether steps run padded to buckets (`StaticSteps`): on a GPU, where they replay CUDA
    graphs, unless turned off. On the CPU padding only adds work."""
    return enabled and device.type == "cuda"


def setup_steps(
    model: MllamaModel,
    rows: int,
    max_seq: int,
    static: bool,
    capacity: int | None = None,
    image_rows: int | None = None,
) -> TorchSteps:
    """The torch engine's steps over caches for `rows` decoding rows (batch, session and prefix
    rows, in that order), plus the scratch row `StaticSteps` pads into when `static`; the first
    `image_rows` (batch and session rows; default all `rows`) hold image K/V. The old caches
    are let go first, so two are never held at once."""
    model.setup_caches(0, 0)
    model.setup_caches(
        rows + int(static), max_seq, capacity, rows if image_rows is None else image_rows
    )
    return StaticSteps(model) if static else TorchSteps(model)
