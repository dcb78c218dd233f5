"""A shared thread pool for the parts of preprocessing that release the GIL.

Pillow's resampling and numpy's ufuncs drop the GIL, so plain threads use several cores. Work is
always split so that the result does not depend on the number of threads.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="guardrt-preprocess")


def map_threads(threads: int, func: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """`[func(x) for x in items]`, on up to `threads` threads; exceptions propagate."""
    work = list(items)
    if threads <= 1 or len(work) <= 1:
        return [func(item) for item in work]
    return list(_pool(threads).map(func, work))


def cuts(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) ranges splitting `total` into at most `parts` near-equal, non-empty pieces."""
    parts = max(1, min(parts, total))
    edges = [total * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(edges))
