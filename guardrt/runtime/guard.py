"""`guardrt.Guard`: load a checkpoint, moderate conversations, get verdicts with scores.

    guard = Guard.load("tiny-random")          # or a checkpoint directory
    verdict = guard.moderate([{"role": "user", "content": "How do I pick a lock?"}])
    verdict.label, verdict.categories, verdict.unsafe_probability

A checkpoint directory runs on the torch back end in-process (needs the `torch` extra); an
engine directory from `guardrt export build` runs on its own back end (ONNX Runtime or
TensorRT), without torch. `tiny-random` is a generated random model: it runs the real
tokenizer, prompt and image pipeline, and its verdicts are meaningless.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from guardrt.runtime.engine import Engine, EngineOptions, backend_for, load_engine
from guardrt.runtime.errors import GuardrtError
from guardrt.runtime.model.resolve import resolve_model
from guardrt.runtime.policy import CategoriesInput
from guardrt.runtime.prepare import Preparer, load_preparer
from guardrt.runtime.prompt import Messages
from guardrt.runtime.requests import PreparedRequest
from guardrt.runtime.verdict import Label, Verdict


class Guard:
    """A loaded engine with its tokenizer and image settings, ready to moderate.

    Thread-safe: calls from several threads prepare their requests at once and run on the
    engine one batch at a time (its caches and CUDA graphs are one set: two batches at once
    would each read the other's K/V and give wrong scores, without an error). To batch many
    callers' requests together, serve them (`guardrt serve`) or use `moderate_batch`."""

    def __init__(self, preparer: Preparer, engine: Engine, source: str = "") -> None:
        # The engine's decode (a greedy one refuses thresholds as requests are prepared); the
        # caller's max_seq, which may be tighter than the engine's.
        self.preparer = preparer.for_engine(preparer.max_seq, engine.info.decode)
        self.engine, self.source = engine, source
        self._engine_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] = "tiny-random",
        *,
        device: str = "auto",
        dtype: str | None = None,
        semantics: str | None = None,
        decode: str = "constrained",
        max_batch: int = 4,
        max_seq: int = 8192,
        quantize: str | None = None,
        int8_compute: str = "weight-only",
    ) -> Guard:
        """Load a checkpoint directory (or `tiny-random`, generated on first use) or an engine
        directory (`guardrt export build`).

        `device="auto"` takes the GPU when the back end has one (torch: CUDA; ONNX Runtime: its
        TensorRT or CUDA provider), else the CPU; or name it: cpu, cuda, cuda:N. An engine
        directory fixes its dtype and semantics (asking for others is refused).

        `semantics="meta"` runs the model as it was trained; `"transformers"` as transformers
        ≥ 4.56 computes it. `decode="constrained"` reads the scores from one prefill and follows
        the verdict grammar; `"greedy"` generates freely as transformers' `generate` does.

        `quantize="int8"` or `"fp8"` quantizes a checkpoint's linear weights at load (torch back
        end; per output channel, the head kept), as `guardrt export build --precision` does for
        an engine; `int8_compute="weight+activation"` also quantizes the activations of large
        int8 steps per token on a GPU (int8 tensor cores; opt-in, it moves scores more).
        """
        directory = resolve_model(model)
        options = EngineOptions(
            directory, device, dtype, semantics, decode, max_batch, max_seq,
            quantize=quantize, int8_compute=int8_compute,
        )  # fmt: skip
        preparer = load_preparer(directory, max_seq)  # its files checked before the weights'
        engine = load_engine(backend_for(directory), options)
        preparer = preparer.for_engine(engine.info.max_seq, engine.info.decode)
        return cls(preparer, engine, source=str(directory))

    def prepare(
        self,
        messages: Messages,
        *,
        categories: CategoriesInput | None = None,
        excluded_categories: Iterable[str] = (),
        unsafe_threshold: float | None = None,
    ) -> PreparedRequest:
        """One request for the engine; `unsafe_threshold`: `unsafe` when P(unsafe) ≥ it (in
        (0, 1]; constrained decoding only), else when `unsafe` is likelier than `safe`."""
        return self.preparer.prepare(
            messages,
            categories=categories,
            excluded_categories=excluded_categories,
            unsafe_threshold=unsafe_threshold,
        )

    def moderate(
        self,
        messages: Messages,
        *,
        categories: CategoriesInput | None = None,
        excluded_categories: Iterable[str] = (),
        unsafe_threshold: float | None = None,
    ) -> Verdict:
        """The verdict on the last message of `messages`; invalid input raises a GuardrtError."""
        request = self.prepare(
            messages,
            categories=categories,
            excluded_categories=excluded_categories,
            unsafe_threshold=unsafe_threshold,
        )
        return self._run([request])[0]

    def moderate_batch(
        self, conversations: Iterable[Messages | Mapping[str, Any]]
    ) -> list[Verdict]:
        """Verdicts for many conversations, batched. Each item is a list of messages or
        `{"messages": [...], "categories": ..., "excluded_categories": [...],
        "unsafe_threshold": t}`. An invalid item gets an `error` verdict naming the problem; it
        never fails the others. Items are
        prepared a batch at a time (an image's tiles are 15 MB: a dataset's worth at once
        would not fit in memory); `conversations` may be any iterable, a generator too."""
        verdicts: list[Verdict | None] = []
        pending: list[tuple[int, PreparedRequest]] = []  # prepared, not yet run

        def run_pending() -> None:
            for (index, _), verdict in zip(
                pending, self._run([r for _, r in pending]), strict=True
            ):
                verdicts[index] = verdict
            pending.clear()

        for item in conversations:
            try:
                if isinstance(item, Mapping):
                    messages: Any = item.get("messages")
                    request = self.prepare(
                        messages,
                        categories=item.get("categories"),
                        excluded_categories=item.get("excluded_categories", ()),
                        unsafe_threshold=item.get("unsafe_threshold"),
                    )
                else:
                    request = self.prepare(item)
            except GuardrtError as exc:
                verdicts.append(Verdict(Label.ERROR, [], "", str(exc)))
                continue
            pending.append((len(verdicts), request))
            verdicts.append(None)
            if len(pending) == self.engine.info.max_batch:
                run_pending()
        run_pending()
        done = [verdict for verdict in verdicts if verdict is not None]
        assert len(done) == len(verdicts), "every item has its verdict"
        return done

    def _run(self, requests: list[PreparedRequest]) -> list[Verdict]:
        size = self.engine.info.max_batch
        decoded = []
        for start in range(0, len(requests), size):
            with self._engine_lock:
                decoded.extend(self.engine.execute(requests[start : start + size]))
        return [d.verdict() for d in decoded]
