"""Strict loading of HF-format checkpoint directories into `MllamaModel` (reference §5.5).

A directory holds `config.json` and `model.safetensors`, or shards listed by
`model.safetensors.index.json`. The model is built on the meta device; every header is read and
every key, shape and dtype checked before any weight is read; then each tensor goes once from
the memory-mapped file to its device and dtype and is assigned in place (no second copy).

Names are mapped in one place (`canonical_name`): the hub layout (`language_model.model.*`,
`language_model.lm_head.*`, `vision_model.*`, `multi_modal_projector.*`, what the published
checkpoint uses) is guardrt's own; the layout transformers 5.x keeps in memory
(`model.language_model.*`, `lm_head.*`, `model.vision_model.*`, ...) maps onto it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from guardrt.export.quantize import (
    QuantizationReport,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantKind,
    quantize_model,
)
from guardrt.kernels import fp8_image
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.model.functional import rope_inv_freq
from guardrt.runtime.model.mllama import MllamaModel, Semantics
from guardrt.runtime.model.safetensors_io import DTYPES, MappedFile, TensorEntry, read_header

_RENAMES = (  # transformers 5.x in-memory prefix → hub prefix
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
log = logging.getLogger(__name__)

_FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})
_SHOWN = 5


class CheckpointError(ConfigError):
    """A checkpoint whose tensors do not match the configured model; the message names keys."""


def canonical_name(name: str) -> str:
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _listing(names: Iterable[str]) -> str:
    ordered = sorted(names)
    shown = ", ".join(ordered[:_SHOWN])
    return shown + (f" and {len(ordered) - _SHOWN} more" if len(ordered) > _SHOWN else "")


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one file, or the index's shards)."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index") from exc
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} is not a safetensors index (weight_map is no object)")
        files = sorted({directory / str(name) for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{directory}: shards listed in the index are missing: {missing}")
        return files
    if single.is_file():
        return [single]
    raise CheckpointError(f"{directory} has neither model.safetensors nor an index of shards")


def read_entries(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint by canonical name; a name stored twice is refused."""
    entries: dict[str, TensorEntry] = {}
    for path in checkpoint_files(directory):
        for name, entry in read_header(path).items():
            key = canonical_name(name)
            if key in entries:
                raise CheckpointError(f"{directory}: tensor {key} is stored twice")
            entries[key] = entry
    return entries


def check_entries(entries: dict[str, TensorEntry], expected: dict[str, torch.Size]) -> None:
    """Refuse missing, unexpected and misshaped keys, and non-float weights, all named."""
    missing = expected.keys() - entries.keys()
    extra = entries.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {_listing(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors: {_listing(extra)}")
    misshaped = [
        f"{name} is {list(entries[name].shape)}, expected {list(shape)}"
        for name, shape in sorted(expected.items())
        if name in entries and tuple(entries[name].shape) != tuple(shape)
    ]
    if misshaped:
        problems.append(f"{len(misshaped)} misshaped: {'; '.join(misshaped[:_SHOWN])}")
    not_float = sorted(
        n for n, e in entries.items() if n in expected and e.dtype not in _FLOAT_DTYPES
    )
    if not_float:
        problems.append(f"non-float weights: {_listing(not_float)}")
    if problems:
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(problems))


def load_model(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    semantics: Semantics = "meta",
    quantize: QuantKind | None = None,
    activations: bool = False,
) -> MllamaModel:
    """Build and load the model of a checkpoint directory (dtype None = the stored dtype).

    `quantize` ("int8", "fp8"; `activations` as `quantize_model`'s): the 8-bit model, made
    while loading. The tensors stay mapped from the files until their layer is quantized onto
    the device a chunk of rows at a time, so the device never holds the full-precision model:
    int8 serves in ~11 GB, which a 16 GB card holds, where loading 21 GB of bf16 first would
    not fit. The result equals loading, then `quantize_model`."""
    directory = Path(directory)
    config = ModelConfig.from_checkpoint(directory)
    with torch.device("meta"):
        model = MllamaModel(config, semantics)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    entries = read_entries(directory)
    check_entries(entries, expected)
    # One dtype for the whole model: asked for, else the one most weights are stored in.
    stored = Counter(entry.dtype for entry in entries.values()).most_common(1)[0][0]
    target = dtype or DTYPES[stored]
    maps = {path: MappedFile(path) for path in {e.path for e in entries.values()}}
    state = {}
    for name, entry in entries.items():
        mapped = maps[entry.path].tensor(entry)  # a view of the file: no copy yet
        state[name] = mapped if quantize else mapped.to(device=device, dtype=target)
    model.load_state_dict(state, strict=True, assign=True)
    if quantize is not None:
        report = quantize_for_serving(model, quantize, activations, device=device, dtype=target)
        log.info(
            "%s weights: %d layers, %.2f GB (were %.2f GB)",
            quantize, report.layers, report.int8_bytes / 1e9, report.original_bytes / 1e9,
        )  # fmt: skip
        place_rest(model, torch.device(device), target)
    # The RoPE table is computed, not stored: rebuild it off the meta device.
    model.inv_freq = rope_inv_freq(config.text.rope, config.text.head_dim).to(device)
    return model.eval()


def quantize_for_serving(
    model: MllamaModel,
    kind: QuantKind,
    activations: bool = False,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> QuantizationReport:
    """`quantize_model` as the torch engine serves: fp8 first measures, on a GPU, which image
    products are faster in bf16 and keeps those (`guardrt/kernels/fp8_image.py`; recorded as
    `model.fp8_image`, which `tune_for_device` reports: the engine logs it with the rest).
    `device` / `dtype`: where and in what the weights will be (the model's own by default; a
    model still on the meta device, as `load_model` builds it, needs them)."""
    keep = None
    if kind == "fp8":
        target = torch.device(device) if device is not None else model.device
        weights = dtype or model.weight_dtype
        products = fp8_image.image_products(model)
        timer = fp8_image.measuring_timer(target, weights)
        choice = fp8_image.choose(products, target, weights, timer)
        model.fp8_image, keep = choice, choice.keeps
    return quantize_model(model, kind, activations, device=device, dtype=dtype, keep=keep)


def place_rest(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """After quantizing: every other parameter and buffer to `device`, floating ones in `dtype`
    (the 8-bit modules' buffers are there already, and their fp32 scales stay fp32)."""
    for module in model.modules():
        quantized = isinstance(module, QuantizedLinear | QuantizedEmbedding)
        for name, param in list(module._parameters.items()):
            if param is not None:
                moved = param.detach().to(device, dtype if param.is_floating_point() else None)
                module._parameters[name] = nn.Parameter(moved, requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and not buffer.is_meta:  # computed ones are rebuilt after
                floating = buffer.is_floating_point() and not quantized
                module._buffers[name] = buffer.to(device, dtype if floating else None)
