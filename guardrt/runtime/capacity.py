"""How far a self-attention K/V cache grows: one rule for the torch cache and the graphs' numpy one.

A served engine's rows are sized for the model's 8,192-token context, but most prompts are a few
hundred tokens: caches start small and grow when a step needs more. Powers of two keep the number
of reallocations (and of CUDA-graph recaptures, which follow the cache's address) logarithmic.
"""

from __future__ import annotations

MIN_CAPACITY = 256  # smaller caches would regrow on the first few prompts of any real size


def grown_capacity(capacity: int, length: int, max_seq: int) -> int:
    """The positions a cache of `capacity` must hold for positions 0..length-1: `capacity` when
    they fit, else the next power of two ≥ length (at least MIN_CAPACITY), at most `max_seq`."""
    if length <= capacity:
        return capacity
    if length > max_seq:
        raise IndexError(f"position {length - 1} is past the cache's {max_seq}")
    return min(max_seq, max(MIN_CAPACITY, 1 << (length - 1).bit_length()))
