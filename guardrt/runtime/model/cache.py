"""The runtime's K/V store: preallocated caches addressed by slot and position.

Self-attention K/V of every self layer live in one tensor (layers, 2, rows, Hkv, max_seq, d) and
image K/V of every cross layer in one (cross layers, 2, rows, Hkv, L, d): the exported graphs'
`past_kv` / `cross_kv` layouts, so the ONNX back end's numpy caches and this one read alike.
A row ("slot") belongs to one request of a batch or to one streaming session.

The self-attention cache holds `capacity` positions and grows (doubling, up to `max_seq`) when a
step needs more: a served engine's rows are sized for the model's 8,192-token context, but most
prompts are a few hundred tokens, and 10 rows × 8,192 positions are 11 GB at full size. Growing
reallocates the tensor, so whoever captured its address (a CUDA graph) must check `version`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from guardrt.runtime.capacity import grown_capacity


@dataclass(frozen=True)
class CacheLayout:
    """The sizes of a K/V cache: (layers, 2, rows, Hkv, positions, d) per attention kind."""

    self_layers: int
    cross_layers: int
    rows: int
    kv_heads: int
    max_seq: int
    image_keys: int
    head_dim: int
    # The first rows, which alone may hold an image (None: all). Later rows (shared prefixes,
    # the scratch row) never do and get no image K/V: 210 MB a row at full size.
    image_rows: int | None = None


class KVCache:
    def __init__(
        self,
        layout: CacheLayout,
        *,
        device: torch.device,
        dtype: torch.dtype,
        capacity: int | None = None,
    ) -> None:
        """`capacity`: positions allocated now (default all `max_seq`)."""
        rows, image_rows = layout.rows, layout.image_rows
        self.max_seq = layout.max_seq
        self.capacity = self.max_seq if capacity is None else min(capacity, self.max_seq)
        self.image_rows = rows if image_rows is None else min(image_rows, rows)
        self.version = 0  # counts reallocations of self_kv
        self.self_kv = torch.zeros(
            (layout.self_layers, 2, rows, layout.kv_heads, self.capacity, layout.head_dim),
            device=device,
            dtype=dtype,
        )
        image = (layout.cross_layers, 2, self.image_rows, layout.kv_heads, layout.image_keys)
        self.cross_kv = torch.zeros((*image, layout.head_dim), device=device, dtype=dtype)

    def reserve(self, length: int) -> bool:
        """Hold positions 0..length-1 (`grown_capacity`), keeping every row's K/V. True when
        the tensor was reallocated."""
        grown = grown_capacity(self.capacity, length, self.max_seq)
        if grown == self.capacity:
            return False
        shape = (*self.self_kv.shape[:4], grown, self.self_kv.shape[5])
        bigger = self.self_kv.new_zeros(shape)
        bigger[:, :, :, :, : self.capacity] = self.self_kv
        self.self_kv, self.capacity = bigger, grown
        self.version += 1
        return True

    def write_images(self, slots: torch.Tensor, cross_kv: torch.Tensor) -> None:
        """Image K/V (cross layers, 2, N, Hkv, L, d) into rows `slots` (N,)."""
        self.cross_kv[:, :, slots] = cross_kv

    def clear_images(self, slots: torch.Tensor) -> None:
        """Zero the image K/V of rows that hold no image (their attention reads these values
        uniformly before the output is zeroed; zeros keep that product finite)."""
        self.cross_kv[:, :, slots] = 0

    def copy_kv(self, source: int, target: int, length: int) -> None:
        """Self-attention K/V of row `source` at positions 0..length-1 into row `target`."""
        self.reserve(length)
        self.self_kv[:, :, target, :, :length] = self.self_kv[:, :, source, :, :length]

    def step(self, slots: torch.Tensor, positions: torch.Tensor, kv_len: int) -> CacheStep:
        return CacheStep(self, slots, positions, kv_len)


class CacheStep:
    """One step's view (a `KVStore`): writes K/V at (slot, position), reads positions
    0..kv_len-1 of each slot (the mask hides those past a row's own position)."""

    def __init__(
        self, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor, kv_len: int
    ) -> None:
        self.cache, self.slots, self.positions, self.kv_len = cache, slots, positions, kv_len

    @functools.cached_property
    def image_slots(self) -> torch.Tensor:
        """The rows whose image K/V the step's cross layers read (once per step, and only by
        steps that run them). Rows past the image rows (a shared prefix, the scratch row) hold
        no image: where a cross layer runs over them anyway (a pad row of an image step), they
        read the last image row's K/V, and their output is discarded or zeroed. A tensor op,
        not a host read, so CUDA graphs capture it."""
        rows, image_rows = self.cache.self_kv.shape[2], self.cache.image_rows
        return self.slots if image_rows == rows else self.slots.clamp(max=image_rows - 1)

    def self_kv(self, layer: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache.self_kv[layer]  # (2, rows, Hkv, capacity, d)
        rows = self.slots[:, None]  # (B, 1) with positions (B, S) → cache[:, (B, S), :, :]
        # K and V in one write and one gather (one kernel each per layer, not two)
        cache[:, rows, :, self.positions] = kv  # (B, S, 2, Hkv, d): indexed dims go first
        both = cache[:, self.slots, :, : self.kv_len]  # (2, B, Hkv, K, d)
        return both[0], both[1]

    def cross_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.cache.cross_kv[layer]  # (2, image rows, Hkv, L, d)
        both = image[:, self.image_slots]  # (2, B, Hkv, L, d): K and V in one gather
        return both[0], both[1]

    def image_keys(self) -> int:
        return self.cache.cross_kv.shape[-2]
