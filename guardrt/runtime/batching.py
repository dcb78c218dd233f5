"""Which queued requests share a batch: the oldest always, others only where batching saves work.

A batch's prefill is right-padded to its longest prompt, so a 100-token prompt batched with a
2,000-token one computes 2,000 tokens, and waits for them. Batching still pays below the GPU's
memory-bound knee, where a step's time is reading the weights whatever its size, and it saves a
pass over the weights for every later step. The rule: a request joins the batch when the batch
with it costs no more than the batch without it plus running it alone, with

    cost(batch) = KNEE + max(KNEE, rows × longest)      (in prompt tokens)

KNEE stands for a weight pass: at ~256 tokens an H100's bf16 matmuls turn from memory-bound to
compute-bound (785 TFLOP/s ÷ 2.96 TB/s ≈ 265 FLOP per weight byte, 2 bytes per weight). Image
requests cost their vision tower alike batched or alone, so only prompt tokens enter. Candidates
are tried interactive before bulk (`Shape.bulk`), then most alike first: same kind (image or
not), then nearest length, then oldest.

The oldest request is always taken, so no request waits behind more batches than there were
requests ahead of it, as with first-in-first-out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from guardrt.runtime.requests import PreparedRequest

KNEE = 256


@dataclass(frozen=True)
class Shape:
    """What batching a request costs: the tokens its prefill computes, and whether it has an
    image."""

    tokens: int
    image: bool
    bulk: bool = False  # a backlog's request: joins a batch after every interactive candidate

    @classmethod
    def of(cls, request: PreparedRequest, bulk: bool = False) -> Shape:
        # A text prompt's policy head is shared (computed once per policy); a session's earlier
        # prompt is cached too, but how much of it is known only to the engine: counted whole.
        shared = request.prefix_len if request.image is None and request.session is None else 0
        return cls(max(1, len(request.prompt) - shared), request.image is not None, bulk)


def cost(shapes: Sequence[Shape]) -> int:
    """A batch's cost in prompt tokens (see the module docstring)."""
    longest = max(shape.tokens for shape in shapes)
    return KNEE + max(KNEE, len(shapes) * longest)


def choose(shapes: Sequence[Shape], max_batch: int) -> list[int]:
    """Indices into `shapes` (queue order, the oldest first) of the next batch, ascending;
    index 0 always."""
    head = shapes[0]
    order = sorted(
        range(1, len(shapes)),
        key=lambda i: (
            shapes[i].bulk,
            shapes[i].image != head.image,
            abs(shapes[i].tokens - head.tokens),
            i,
        ),
    )
    chosen = [head]
    picked = [0]
    for index in order:
        if len(picked) == max_batch:
            break
        candidate = shapes[index]
        if cost([*chosen, candidate]) <= cost(chosen) + cost([candidate]):
            chosen.append(candidate)
            picked.append(index)
    return sorted(picked)


def fifo(shapes: Sequence[Shape], max_batch: int) -> list[int]:
    """First in, first out: the oldest `max_batch`, whatever their lengths."""
    return list(range(min(len(shapes), max_batch)))


Policy = Callable[[Sequence[Shape], int], list[int]]
POLICIES: dict[str, Policy] = {"cost": choose, "fifo": fifo}  # `guardrt serve --batching`
