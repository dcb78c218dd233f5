"""The vision tower's attention plan: every way of running it gives torch's default answer, the
tuner keeps the fastest candidate that does, and a tuned model answers what an untuned one does.
And the decoder's grouped attention, laid out for its output projection."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from guardrt.runtime.model import functional
from guardrt.runtime.model.attention_plan import (
    DEFAULT_PLAN,
    AttentionPlan,
    candidates,
    choose_plan,
    planned_attention,
)
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.functional import blocked_attention, padded_attention, vision_mask
from tests.models import DEVICE, image

CPU = torch.device("cpu")


def _qkv(shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(3)]


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (4, 4)])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_rows_is_attention_laid_out_for_the_projection(
    heads: int, kv_heads: int, tokens: int, masked: bool
) -> None:
    """(B, S, H·d) with head h at columns h·d…, given the step's mask as `attention_bias` makes
    it once (additive, folded): grouped-query attention by definition (K/V repeated for each
    kv head's query heads, the boolean mask), transposed and flattened, for q as the model has
    it (a strided view of a fused projection's output); `attention` is the same in (B, H, S, d).
    Within float32 rounding: SDPA's kernel runs g·S query rows at once, not S of each head.
    The additive mask holds exactly the values SDPA makes of the boolean one: bit for bit."""
    generator = torch.Generator().manual_seed(5)
    width = (heads + 2 * kv_heads) * 16
    qkv = torch.randn(2, tokens, width, generator=generator)  # (B, S, (H + 2·Hkv)·d)
    q = qkv.view(2, tokens, -1, 16).transpose(1, 2)[:, :heads]  # (B, H, S, d), strided
    k, v = (torch.randn(2, kv_heads, 7, 16, generator=generator) for _ in range(2))
    mask = torch.rand(2, 1, tokens, 7, generator=generator) < 0.6 if masked else None
    if mask is not None:
        mask[..., 0] = True  # every query may attend to a key
    group = heads // kv_heads
    keys, values = (t.repeat_interleave(group, dim=1) for t in (k, v))  # (B, H, 7, d)
    by_definition = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    want = by_definition.transpose(1, 2).reshape(2, tokens, -1)
    bias = None if mask is None else functional.attention_bias(mask, heads, kv_heads, q.dtype)
    got = functional.attention_rows(q, k, v, bias)
    assert got.shape == (2, tokens, heads * 16)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        functional.attention(q, k, v, mask), by_definition, rtol=1e-6, atol=1e-6
    )
    if mask is not None:  # ungrouped: the additive mask against the boolean one, same kernel
        additive = functional.attention_bias(mask, heads, heads, q.dtype)
        same = F.scaled_dot_product_attention(q, keys, values, attn_mask=additive)
        assert torch.equal(same, by_definition)


@pytest.mark.parametrize(("heads", "kv_heads", "tokens", "keys"), [(8, 2, 5, 7), (4, 4, 1, 6404)])
def test_an_aligned_bias_is_the_same_bias(
    heads: int, kv_heads: int, tokens: int, keys: int
) -> None:
    """Rows `align` elements apart (what SDPA's memory-efficient CUDA kernel takes without
    padding the bias on every call; 6,404 is the cross layers' image keys): every stride but
    the last a multiple of 16, the same values, and the same attention bit for bit."""
    generator = torch.Generator().manual_seed(9)
    mask = torch.rand(2, 1, tokens, keys, generator=generator) < 0.6
    mask[..., 0] = True
    plain = functional.attention_bias(mask, heads, kv_heads, torch.float32)
    aligned = functional.attention_bias(mask, heads, kv_heads, torch.float32, align=16)
    assert plain.is_contiguous()  # the CPU default: no slice for a traced graph
    assert aligned.shape == plain.shape
    assert aligned.stride(-1) == 1
    assert all(stride % 16 == 0 for stride in aligned.stride()[:-1]), aligned.stride()
    assert torch.equal(aligned, plain)
    q = torch.randn(2, heads, tokens, 16, generator=generator)
    k, v = (torch.randn(2, kv_heads, keys, 16, generator=generator) for _ in range(2))
    assert torch.equal(
        functional.attention_rows(q, k, v, aligned), functional.attention_rows(q, k, v, plain)
    )


@pytest.mark.parametrize("backend", [None, "MATH", "FLASH_ATTENTION"])
@pytest.mark.parametrize("width", [None, 96, 128])
def test_every_plan_gives_the_default_answer(backend: str | None, width: int | None) -> None:
    q, k, v = _qkv((2, 3, 37, 80))
    got = planned_attention(q, k, v, AttentionPlan(backend, width))
    assert got.shape == (2, 3, 37, 80)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_padded_attention_with_a_plan_equals_the_full_mask() -> None:
    """The split (unmasked plan + padding queries against real keys) = the padding-pair mask."""
    q, k, v = _qkv((2, 2, 24, 80), seed=1)
    padding = torch.zeros(2, 24, dtype=torch.bool)
    padding[0, 20:] = True  # image 0: 4 pad slots
    padding[1, 8:] = True  # image 1: a padding tile's worth
    rows = [row.nonzero().flatten() for row in padding]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=vision_mask(padding))
    for plan in (DEFAULT_PLAN, AttentionPlan(None, 128), AttentionPlan("MATH", 96)):
        got = padded_attention(q, k, v, padding, rows, plan)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [1, 7, 8, 24, 100])
def test_blocked_attention_equals_the_full_mask(block: int) -> None:
    """The traced graphs' attention, in blocks of query rows (the last one short or not), =
    the padding-pair mask over all rows at once."""
    q, k, v = _qkv((2, 2, 24, 80), seed=2)
    padding = torch.zeros(2, 24, dtype=torch.bool)
    padding[0, 20:] = True
    padding[1, 8:] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=vision_mask(padding))
    got = blocked_attention(q, k, v, padding, block)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_candidates() -> None:
    plans = candidates(80, ("FLASH_ATTENTION",))
    assert [p.name for p in plans] == [
        "default/d=as is", "default/d=96", "default/d=128",
        "FLASH_ATTENTION/d=as is", "FLASH_ATTENTION/d=96", "FLASH_ATTENTION/d=128",
    ]  # fmt: skip
    assert [p.head_dim for p in candidates(128, ())] == [None, 192, 256]


def _table_timer(table: dict[str, float]) -> Any:
    """A timer answering each plan's time from `table` (runs the call once, as timers do)."""

    def timer(fn: functools.partial[torch.Tensor]) -> float:
        fn()
        plan: AttentionPlan = fn.args[-1]
        return table[plan.name]

    return timer


def test_the_fastest_correct_candidate_is_chosen() -> None:
    table = {p.name: 5.0 for p in candidates(80, ("MATH", "FLASH_ATTENTION"))}
    table["FLASH_ATTENTION/d=128"] = 1.0
    table["MATH/d=96"] = 2.0
    tuning = choose_plan((1, 2, 40, 80), torch.float32, CPU, ("MATH", "FLASH_ATTENTION"),
                         _table_timer(table))  # fmt: skip
    assert tuning.plan == AttentionPlan("FLASH_ATTENTION", 128)
    assert tuning.timings_ms == table
    assert tuning.rejected == {}


def test_failing_and_wrong_candidates_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A back end that cannot run is skipped; so is one whose answer is wrong, however fast:
    here padding is broken (it scales what it pads), so every padded plan must lose."""
    pad = F.pad

    def broken_pad(t: torch.Tensor, p: tuple[int, ...], *args: Any, **kwargs: Any) -> torch.Tensor:
        # Only the plan's own call (no mode) is broken: torch 2.11 on the GPU machine calls
        # F.pad with a mode inside attention too (which a two-argument stand-in refused, so
        # the plan was rejected for a TypeError, not for its answer).
        return pad(t, p, *args, **kwargs) if args or kwargs else pad(t * 1.5, p)

    monkeypatch.setattr(F, "pad", broken_pad)
    table = {p.name: 1.0 if p.head_dim else 3.0 for p in candidates(80, ("EFFICIENT_ATTENTION",))}
    table["default/d=as is"] = 2.0
    tuning = choose_plan((1, 2, 40, 80), torch.float32, CPU, ("EFFICIENT_ATTENTION",),
                         _table_timer(table))  # fmt: skip
    assert tuning.plan == DEFAULT_PLAN
    assert set(tuning.timings_ms) == {"default/d=as is"}
    assert "max |Δ|" in tuning.rejected["default/d=128"]
    assert "No viable backend" in tuning.rejected["EFFICIENT_ATTENTION/d=as is"]  # CPU lacks it


def test_a_slightly_wrong_scale_is_rejected_over_many_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over many keys N(0, 1) attention is near uniform and its outputs small, so the check must
    be relative to catch a subtly wrong candidate: here padding scales q by 2%, as a kernel
    whose softmax scale is 2% off would (an absolute 2e-2 let it through: max |Δ| 0.014)."""
    pad, calls = F.pad, itertools.count()

    def q_scaled(t: torch.Tensor, widths: tuple[int, int]) -> torch.Tensor:
        return pad(t * 1.02 if next(calls) % 3 == 0 else t, widths)  # q, k, v in turn

    monkeypatch.setattr(F, "pad", q_scaled)
    table = {p.name: 1.0 if p.head_dim else 2.0 for p in candidates(80, ())}
    tuning = choose_plan((1, 2, 2048, 80), torch.float32, CPU, (), _table_timer(table))
    assert tuning.plan == DEFAULT_PLAN
    assert set(tuning.rejected) == {"default/d=96", "default/d=128"}


def test_a_tuned_model_answers_what_an_untuned_one_does(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[AttentionPlan] = []

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> Any:
        used.append(plan)
        return planned_attention(q, k, v, plan)

    monkeypatch.setattr(functional, "planned_attention", spy)
    device = torch.device(DEVICE)
    model = load_model(checkpoint, device=device)
    vision = model.vision_model
    tiled = image(3)  # a padding tile and pad slots: the split's second call runs
    inputs = (
        torch.from_numpy(np.stack([tiled.pixel_values])).to(device),
        torch.tensor([tiled.aspect_ratio_id], device=device),
        torch.from_numpy(np.stack([tiled.aspect_ratio_mask])).long().to(device),
    )
    with torch.no_grad():
        expected = vision(*inputs)
        measured = vision.tune_attention()  # times on a GPU (gpu_check.sh); not on the CPU
        if DEVICE == "cpu":
            assert (measured.plan, measured.timings_ms) == (DEFAULT_PLAN, {})
        else:
            assert measured.timings_ms, measured.rejected
            torch.testing.assert_close(vision(*inputs), expected, atol=1e-5, rtol=1e-5)
        fastest = candidates(model.config.vision.head_dim, ("MATH",))[-1]  # MATH, padded most
        assert fastest.backend == "MATH"
        assert fastest.head_dim
        table = {p.name: 1.0 if p == fastest else 2.0
                 for p in candidates(model.config.vision.head_dim, ("MATH",))}  # fmt: skip
        tuning = model.vision_model.tune_attention(("MATH",), _table_timer(table))
        assert model.vision_model.attention_plan == tuning.plan == fastest
        used.clear()
        got = model.vision_model(*inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    layers = model.config.vision.num_layers + model.config.vision.num_global_layers
    assert used == [fastest] * layers  # every layer ran the tuned plan
