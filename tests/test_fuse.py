"""Model-level speed-ups change no result: fused q/k/v and gate/up projections (`model/fuse.py`,
nor parameters either), and "meta" cross-attention's one mask per row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from guardrt.export.quantize import QuantizedLinear, quantize_linears
from guardrt.runtime.classify import TorchSteps
from guardrt.runtime.model import mllama
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.functional import cross_masks
from guardrt.runtime.model.fuse import fuse_linears, fuse_projections
from guardrt.runtime.model.text import MLP, SelfAttention
from tests.models import image, mixed_batch_logits, small_config, write_small


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small(tmp_path_factory.mktemp("fuse"), small_config("gqa2-cross2,4"), seed=3)


@pytest.mark.parametrize("kind", [None, "int8", "fp8"])
def test_fused_model_gives_the_same_logits(checkpoint: Path, kind: str | None) -> None:
    model = load_model(checkpoint)
    if kind is not None:
        quantize_linears(model, kind=kind, keep=lambda name: name.endswith("lm_head"))  # type: ignore[arg-type]
    before = mixed_batch_logits(model)
    names = {name: tensor.shape for name, tensor in model.state_dict().items()}
    # gqa2-cross2,4: 3 self-attention layers, 5 MLPs; 3 + 1 vision layers (SMALL_VISION)
    assert fuse_projections(model) == 3 + 5 + 4
    assert fuse_projections(model) == 0  # idempotent
    after = mixed_batch_logits(model)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    assert {name: t.shape for name, t in model.state_dict().items()} == names
    attention = next(m for m in model.modules() if isinstance(m, SelfAttention))
    mlp = next(m for m in model.modules() if isinstance(m, MLP))
    assert attention.qkv is not None
    assert mlp.gate_up is not None
    assert "qkv" not in dict(attention.named_children())  # outside the module tree


def test_parts_become_views_of_the_fused_weight() -> None:
    parts = [nn.Linear(8, n, bias=False) for n in (8, 4, 4)]
    x = torch.randn(3, 8)
    expected = torch.cat([p(x) for p in parts], dim=-1)
    fused = fuse_linears(parts)
    assert isinstance(fused, nn.Linear)
    torch.testing.assert_close(fused(x), expected)
    base = fused.weight.data_ptr()
    offsets = [p.weight.data_ptr() - base for p in parts]
    assert offsets == [0, 8 * 8 * 4, 12 * 8 * 4]  # rows 0, 8 and 12 of one (16, 8) fp32 tensor
    with torch.no_grad():
        fused.weight[8, 0] = 42.0
    assert parts[1].weight[0, 0] == 42.0  # one storage


def test_quantized_parts_fuse_with_their_scales() -> None:
    model = nn.Sequential(nn.Linear(32, 16, bias=False), nn.Linear(32, 8, bias=False))
    quantize_linears(model, group_size=8)
    parts = list(model)
    assert all(isinstance(p, QuantizedLinear) for p in parts)
    x = torch.randn(5, 32)
    expected = torch.cat([p(x) for p in parts], dim=-1)
    fused = fuse_linears(parts)
    assert isinstance(fused, QuantizedLinear)
    assert fused.scales.shape == (24, 4)
    torch.testing.assert_close(fused(x), expected)


def test_what_cannot_fuse_is_left_alone() -> None:
    biased = [nn.Linear(8, 4), nn.Linear(8, 4)]
    pointers = [p.weight.data_ptr() for p in biased]
    assert fuse_linears(biased) is None
    widths = [nn.Linear(8, 4, bias=False), nn.Linear(6, 4, bias=False)]
    assert fuse_linears(widths) is None
    mixed = nn.Sequential(nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False))
    quantize_linears(mixed, keep=lambda name: name == "1")
    assert fuse_linears(list(mixed)) is None
    assert [p.weight.data_ptr() for p in biased] == pointers


def test_meta_cross_attention_needs_one_mask_per_row(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In "meta" semantics a row's cross-attention output is zeroed before its image, so one
    (B, 1, 1, L) mask of the real tiles' keys gives what the per-query mask gives, on a batch
    of a text row, and image rows whose text runs before and after `<|image|>`."""
    model = load_model(checkpoint)  # meta
    model.setup_caches(3, 64)
    steps = TorchSteps(model)
    steps.write_images([1, 2], [image(2, seed=4), image(3, seed=5)])
    steps.clear_images([0])
    tokens = np.random.default_rng(1).integers(0, 1000, (3, 12))
    tokens[1, 3] = tokens[2, 7] = 128256  # <|image|>
    positions = np.tile(np.arange(12), (3, 1))
    starts, tiles = np.array([64, 3, 7]), np.array([0, 2, 3])
    arrays = (tokens, positions, np.array([0, 1, 2]), starts, tiles, positions)
    fast = steps.step(*arrays)

    def per_query(num_tiles: torch.Tensor, keys: int, per_tile: int) -> torch.Tensor:
        as_tensors = (torch.as_tensor(positions), torch.as_tensor(starts), num_tiles)
        mask, _ = cross_masks(*as_tensors, keys, per_tile)
        return mask  # (B, 1, S, L)

    monkeypatch.setattr(mllama, "cross_key_mask", per_query)
    full = steps.step(*arrays)
    np.testing.assert_allclose(fast, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
