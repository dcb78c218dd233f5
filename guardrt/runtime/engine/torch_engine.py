"""The torch back end: guardrt's PyTorch mllama in-process (needs the `torch` extra)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from guardrt.export.quantize import QuantKind
from guardrt.kernels.device import cuda_capability
from guardrt.kernels.dispatch import precision_warning
from guardrt.runtime.classify import Classifier
from guardrt.runtime.decoding import Decode, parse_decode
from guardrt.runtime.engine import (
    EngineInfo,
    EngineOptions,
    check_positions,
    memory_refusal,
    out_of_memory,
)
from guardrt.runtime.engine.manifest import DTYPE_PRECISIONS
from guardrt.runtime.engine.torch_device import on_device, usable_device
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.model.fuse import fuse_projections
from guardrt.runtime.model.mllama import SEMANTICS, Semantics
from guardrt.runtime.model.tune import tune_for_device
from guardrt.runtime.requests import Decoded, PreparedRequest
from guardrt.runtime.scores import prefill_vocab
from guardrt.runtime.static_steps import StaticSteps, setup_steps, uses_graphs

log = logging.getLogger(__name__)
# Cache positions allocated at start: a few-hundred-token prompt never grows it (growing drops
# captured CUDA graphs); a row of the 11B's 8,192 would cost 1.1 GB at once.
_INITIAL_POSITIONS = 1024
QUANT_KINDS: tuple[QuantKind, ...] = ("int8", "fp8")
INT8_COMPUTE = ("weight-only", "weight+activation")  # as `guardrt export build --int8-compute`

_PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPES = {name: _PRECISION_DTYPES[p] for name, p in DTYPE_PRECISIONS.items()}


def parse_quantize(value: str | None) -> QuantKind | None:
    """None, "int8" (weight-only; the Triton kernel for small steps on a GPU) or "fp8" (e4m3
    with rowwise activation scales, `torch._scaled_mm` on sm ≥ 8.9)."""
    if value is None:
        return None
    for kind in QUANT_KINDS:
        if value == kind:
            return kind
    raise ConfigError(f"quantize must be one of {', '.join(QUANT_KINDS)} (or none), not {value!r}")


def parse_int8_compute(value: str, kind: QuantKind | None) -> bool:
    """Whether int8 layers may quantize their activations ("weight+activation")."""
    if value not in INT8_COMPUTE:
        raise ConfigError(f"int8_compute must be one of {', '.join(INT8_COMPUTE)}, not {value!r}")
    activations = value == "weight+activation"
    if activations and kind != "int8":
        raise ConfigError(f"int8_compute {value!r} needs quantize='int8', not {kind!r}")
    return activations


def static_steps_for(options: EngineOptions, device: torch.device) -> bool:
    """Whether this engine's steps are `StaticSteps` (`uses_graphs`)."""
    return uses_graphs(device, options.cuda_graphs)


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """None → float32 on the CPU (bf16 matmuls are slow there), the stored dtype elsewhere."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class TorchEngine:
    def __init__(self, options: EngineOptions) -> None:
        semantics = options.semantics or "meta"
        if semantics not in SEMANTICS:
            raise ConfigError(f"semantics must be one of {SEMANTICS}, not {semantics!r}")
        decode = parse_decode(options.decode)
        if options.warmup_max_batch < 1:
            raise ConfigError(f"warmup_max_batch {options.warmup_max_batch} must be ≥ 1")
        self.options = options
        options.check_sizes()
        check_positions(ModelConfig.from_checkpoint(options.model), options.max_seq)  # first
        device = usable_device(options.device)
        self.device = device
        with on_device(device):
            self._load(options, device, semantics, decode)

    def _load(
        self, options: EngineOptions, device: torch.device, semantics: Semantics, decode: Decode
    ) -> None:
        kind = parse_quantize(options.quantize)
        activations = parse_int8_compute(options.int8_compute, kind)
        # 8-bit weights are made while loading: the device never holds the bf16 model.
        self.model = load_model(
            options.model,
            device=device,
            dtype=parse_dtype(options.dtype, device),
            semantics=semantics,
            quantize=kind,
            activations=activations,
        )
        # Reported by the precision names engine directories use (fp32, bf16, int8, ...).
        dtype = kind or DTYPE_PRECISIONS[str(self.model.weight_dtype).removeprefix("torch.")]
        warning = precision_warning(kind, cuda_capability(device))
        if warning:
            log.warning("%s", warning)
        fuse_projections(self.model)
        for line in tune_for_device(self.model).lines():  # measured on a GPU only
            log.info("%s", line)
        static = static_steps_for(options, device)
        try:
            self.steps = setup_steps(
                self.model, options.cache_rows, options.max_seq, static, _INITIAL_POSITIONS,
                image_rows=options.image_rows,
            )  # fmt: skip
        except RuntimeError as exc:
            if not out_of_memory(exc):
                raise
            raise memory_refusal(options, str(device), "allocating the K/V caches", exc) from exc
        cache = self.model.cache
        size = sum(t.numel() * t.element_size() for t in (cache.self_kv, cache.cross_kv))
        log.info(
            "K/V caches: %d rows, %d of %d positions allocated (more on demand), %.2f GB "
            "(--max-batch-size, --max-streams and --max-seq size them)",
            self.model.max_batch, cache.capacity, options.max_seq, size / 1e9,
        )  # fmt: skip
        self.classifier = Classifier(
            self.model, decode, options.max_sessions, options.max_prefixes, self.steps
        )
        self.info = EngineInfo(
            backend="torch",
            device=str(device),
            dtype=dtype,
            semantics=semantics,
            decode=options.decode,
            max_batch=options.max_batch,
            max_seq=options.max_seq,
        )

    def warmup(self, sample: Sequence[PreparedRequest]) -> None:
        """Capture the common steps (CUDA graphs) of batches up to `warmup_max_batch`, then run
        the sample requests alone, together, and at every batch bucket, so the first real
        batches pay no lazy initialisation (and the shapes they hit are captured now). Logs how
        long it took."""
        with on_device(self.device):
            self._warmup(sample)

    def _warmup(self, sample: Sequence[PreparedRequest]) -> None:
        started = time.perf_counter()
        if isinstance(self.steps, StaticSteps):
            largest = max(1, min(self.options.warmup_max_batch, self.info.max_batch))
            constrained = self.classifier.decode == "constrained" and bool(sample)
            label = len(prefill_vocab([r.grammar for r in sample])) if constrained else 0
            self.steps.prepare(self.steps.common_keys(label, max_batch=largest))
        for request in sample:
            self.execute([request])
        self.execute(sample)
        if isinstance(self.steps, StaticSteps):
            # One batch per bucket a batch can land in (the buckets also cover session rows).
            top = self.info.max_batch
            for size in sorted({min(b, top) for b in self.steps.buckets.batch} - {len(sample)}):
                if size > 1:
                    self.execute([sample[i % len(sample)] for i in range(size)])
            log.info(
                "warm-up %.1f s: %d CUDA graphs captured in %.1f s",
                time.perf_counter() - started, self.steps.graphs, self.steps.capture_s,
            )  # fmt: skip
        else:
            log.info("warm-up %.1f s", time.perf_counter() - started)

    def execute(self, batch: Sequence[PreparedRequest]) -> list[Decoded]:
        with on_device(self.device):
            return self.classifier.run(batch)

    def open_session(self) -> int | None:
        return self.classifier.sessions.open()

    def close_session(self, session: int) -> None:
        self.classifier.sessions.close(session)

    def close(self) -> None:
        self.model.setup_caches(0, 0)
