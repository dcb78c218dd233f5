"""Small random mllama checkpoints and inputs for the model tests (fast on 2 CPU cores).

The vocabulary is the real one (prompts come from the real tokenizer); everything else is tiny:
28-px tiles of 14-px patches (5 tokens per tile, padded to 8), a few layers of width 16/32.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from guardrt.runtime.classify import TorchSteps
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.model.safetensors_io import write_safetensors
from guardrt.runtime.model.tiny import (
    PREPROCESSOR_CONFIG,
    random_state,
    tiny_config,
    write_checkpoint,
)
from guardrt.runtime.preprocess import ImageConfig, TiledImage, preprocess_image
from guardrt.runtime.requests import Decoded

# The device the model tests run on: the CPU in CI; GUARDRT_TEST_DEVICE=cuda on a GPU machine
# runs the same parity checks there (scripts/gpu_check.sh).
DEVICE = os.environ.get("GUARDRT_TEST_DEVICE", "cpu")
TILE = 28
SMALL_VISION = {
    "image_size": TILE,
    "patch_size": 14,
    "hidden_size": 16,
    "attention_heads": 2,
    "intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_global_layers": 1,
    "intermediate_layers_indices": [0, 2],
    "vision_output_dim": 48,
}
# (name, text overrides): GQA ratios 1, 2 and 4; cross layers first, inner and last.
_WIDTHS = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
TEXT_VARIANTS: dict[str, dict[str, Any]] = {
    "gqa1-cross1,3": _WIDTHS
    | {"num_key_value_heads": 4, "num_hidden_layers": 5, "cross_attention_layers": [1, 3]},
    "gqa4-cross0": _WIDTHS
    | {"num_key_value_heads": 1, "num_hidden_layers": 3, "cross_attention_layers": [0]},
    "gqa2-cross2,4": _WIDTHS
    | {"num_key_value_heads": 2, "num_hidden_layers": 5, "cross_attention_layers": [2, 4]},
}
# Image sizes (width, height) whose canvas has 1, 2, 3 and 4 tiles of 28 px.
TILE_SIZES = {1: (28, 28), 2: (56, 28), 3: (28, 84), 4: (56, 56)}
IMAGE_CONFIG = ImageConfig(tile_size=TILE)


def small_config(variant: str) -> dict[str, Any]:
    return tiny_config(text_config=TEXT_VARIANTS[variant], vision_config=SMALL_VISION)


def write_small(directory: Path, config: dict[str, Any], seed: int = 0) -> Path:
    """config.json, model.safetensors and preprocessor_config.json (no tokenizer files)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    write_safetensors(
        directory / "model.safetensors", random_state(ModelConfig.from_dict(config), seed)
    )
    preprocessor = PREPROCESSOR_CONFIG | {"size": {"height": TILE, "width": TILE}}
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory


def write_guard_checkpoint(directory: Path, variant: str = "gqa1-cross1,3", seed: int = 5) -> Path:
    """A complete small checkpoint (tokenizer files included), as Guard and the server load."""
    config = small_config(variant)
    write_checkpoint(directory, config, random_state(ModelConfig.from_dict(config), seed))
    return directory


def image(tiles: int, seed: int = 0) -> TiledImage:
    width, height = TILE_SIZES[tiles]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    tiled = preprocess_image(pixels, config=IMAGE_CONFIG)
    assert tiled.num_tiles == tiles
    return tiled


class CountingSteps:
    """A `StepModel` over a `TorchSteps` counting forwards, prefix fills and K/V copies."""

    def __init__(self, inner: TorchSteps) -> None:
        self.inner, self.steps, self.copies, self.fills = inner, 0, 0, 0
        self.max_batch, self.max_seq = inner.max_batch, inner.max_seq

    def write_images(self, slots: Sequence[int], images: Sequence[TiledImage]) -> None:
        self.inner.write_images(slots, images)

    def clear_images(self, slots: Sequence[int]) -> None:
        self.inner.clear_images(slots)

    def copy_kv(self, source: int, target: int, length: int) -> None:
        self.copies += 1
        self.inner.copy_kv(source, target, length)

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
        self.steps += 1
        self.fills += int(logit_index.shape[1] == 1)  # constrained steps read 2 rows; fills 1
        arrays = (tokens, positions, slots, image_start, num_tiles, logit_index)
        return self.inner.step(*arrays, vocab, log_probs)


def assert_same_decoded(got: Sequence[Decoded], expected: Sequence[Decoded]) -> None:
    """Same generated ids, and scores within 1e-4 relative (NaN where the reference has none)."""
    for a, b in zip(got, expected, strict=True):
        assert a.generated == b.generated
        if math.isnan(b.unsafe_probability):
            assert math.isnan(a.unsafe_probability)
        else:
            assert math.isclose(a.unsafe_probability, b.unsafe_probability, rel_tol=1e-4)
        for code, value in b.category_probabilities.items():
            assert math.isclose(a.category_probabilities[code], value, rel_tol=1e-4, abs_tol=1e-9)


def mixed_batch_logits(model: MllamaModel, decode: bool = False) -> np.ndarray:
    """Logits at every position of a text row and a 2-tile image row, one batch (cross layers,
    grouped kv heads), and with `decode` one decode step after it, all flattened."""
    model.setup_caches(2, 64)
    steps = TorchSteps(model)
    steps.write_images([1], [image(2, seed=4)])
    steps.clear_images([0])
    tokens = np.random.default_rng(0).integers(0, 1000, (2, 12))
    tokens[1, 3] = 128256  # <|image|>
    positions = np.tile(np.arange(12), (2, 1))
    slots, starts, tiles = np.array([0, 1]), np.array([64, 3]), np.array([0, 2])
    prefill = steps.step(tokens, positions, slots, starts, tiles, positions)
    if not decode:
        return prefill
    step = steps.step(tokens[:, :1], positions[:, :1] + 12, slots, starts, tiles,
                      np.zeros((2, 1), dtype=np.int64))  # fmt: skip
    return np.concatenate([prefill.reshape(-1), step.reshape(-1)])
