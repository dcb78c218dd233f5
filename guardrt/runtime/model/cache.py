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

import torch

from guardrt.runtime.capacity import grown_capacity


class KVCache:
    def __init__(
        self,
        *,
        self_layers: int,
        cross_layers: int,
        rows: int,
        kv_heads: int,
        max_seq: int,
        image_keys: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        capacity: int | None = None,
    ) -> None:
        """`capacity`: positions allocated now (default all `max_seq`)."""
        self.max_seq = max_seq
        self.capacity = max_seq if capacity is None else min(capacity, max_seq)
        self.version = 0  # counts reallocations of self_kv
        self.self_kv = torch.zeros(
            (self_layers, 2, rows, kv_heads, self.capacity, head_dim), device=device, dtype=dtype
        )
        self.cross_kv = torch.zeros(
            (cross_layers, 2, rows, kv_heads, image_keys, head_dim), device=device, dtype=dtype
        )

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

    def self_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.self_kv[layer, 0], self.cache.self_kv[layer, 1]
        rows = self.slots[:, None]  # (B, 1) with positions (B, S) → cache[(B, S), :, :]
        keys[rows, :, self.positions] = k.transpose(1, 2)  # (B, S, Hkv, d)
        values[rows, :, self.positions] = v.transpose(1, 2)
        return keys[self.slots, :, : self.kv_len], values[self.slots, :, : self.kv_len]

    def cross_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.cache.cross_kv[layer]  # (2, rows, Hkv, L, d)
        return image[0, self.slots], image[1, self.slots]
