"""Up to how many rows each int8 layer runs the Triton kernel, measured at load
(`guardrt/kernels/int8_rows.py`): the limit is the largest size up to which the kernel was the
faster at every size measured, per layer shape; a kernel whose output is wrong is never used; on
the CPU nothing is measured. The kernel runs under Triton's interpreter (conftest.py)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from guardrt.export.quantize import QuantizedLinear, quantize_linears, quantize_model
from guardrt.kernels import dispatch, int8_rows
from guardrt.kernels.dispatch import INT8_TRITON_MAX_ROWS
from guardrt.kernels.timer import cuda_timer
from guardrt.runtime.classify import Classifier
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.fuse import fuse_projections, modules_in_use
from guardrt.runtime.model.text import MLP, CrossAttention, SelfAttention
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.static_steps import StaticSteps, setup_steps
from tests.models import DEVICE, assert_same_decoded

pytest.importorskip("triton")  # the test extra installs it (x86-64 Linux)

ROWS = (1, 16, 64, 128)


def _layers() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(64, 32, bias=False), nn.Linear(64, 48))
    quantize_linears(model, kind="int8")
    return model


def _timer(faster_up_to: dict[int, int]) -> Any:
    """A timer by layer width: the kernel is faster than the alternative up to the given
    rows, slower above (runs each call once, as real timers do)."""

    def timer(fn: functools.partial[torch.Tensor]) -> float:
        fn()
        layer, x = fn.args[:2]
        rows = x.shape[0]
        kernel = fn.func is int8_rows._kernel
        win = rows <= faster_up_to[layer.out_features]
        return 1.0 if kernel == win else 2.0

    return timer


def test_nothing_is_measured_on_the_cpu() -> None:
    model = _layers()
    assert int8_rows.tune(model.modules(), torch.float32) == int8_rows.RowsTuning()
    assert {layer.triton_rows for layer in model} == {INT8_TRITON_MAX_ROWS}


def test_each_shape_gets_its_measured_limit() -> None:
    model = _layers()
    tuning = int8_rows.tune(model.modules(), torch.float32, _timer({32: 64, 48: 1}), ROWS)
    assert tuning.limits == {"32×64": 64, "48×64": 1}
    assert [layer.triton_rows for layer in model] == [64, 64, 1]  # both 32×64 layers
    assert tuning.refused == {}
    assert set(tuning.timings_ms["32×64"]) == {1, 16, 64, 128}  # measured until it lost
    assert set(tuning.timings_ms["48×64"]) == {1, 16}
    x = torch.zeros(100, 64, dtype=torch.bfloat16)  # 100 rows: past 64, within 128
    layer = model[0]
    assert isinstance(layer, QuantizedLinear)
    hopper = (9, 0)
    assert dispatch.choose_path(x[:64], layer.qweight, layer.scales, hopper, True,
                                triton_rows=layer.triton_rows) == "int8_triton"  # fmt: skip
    assert dispatch.choose_path(x, layer.qweight, layer.scales, hopper, True,
                                triton_rows=layer.triton_rows) == "int8_cast_mm"  # fmt: skip


def test_the_fastest_block_shape_is_kept_per_rows_per_program() -> None:
    """Narrow blocks win the decode sizes here, the default the larger ones; each rows-per-
    program bucket keeps its own, and the layer's forward runs them."""
    fastest = {16: (16, 256), 64: (64, 64)}  # by block_m: M ≤ 16 → 16 rows a program, ≥ 33 → 64

    def timer(fn: Any) -> float:  # a functools.partial
        fn()
        if fn.func is not int8_rows._kernel:
            return 10.0  # the reference: always slower here
        _, x, block = fn.args
        return 1.0 if block == fastest[dispatch._int8_module().block_m(x.shape[0])] else 2.0

    model = _layers()
    tuning = int8_rows.tune(model.modules(), torch.float32, timer, (1, 16, 64))
    assert tuning.limits == {"32×64": 64, "48×64": 64}
    assert tuning.blocks["32×64"] == fastest
    layer = model[0]
    assert isinstance(layer, QuantizedLinear)
    assert layer.triton_blocks == fastest
    times = tuning.timings_ms["32×64"]
    assert set(times[1]) == {"int8_triton", "otherwise"} | {
        f"int8_triton {bn}x{bk}" for bn, bk in dispatch._int8_module().BLOCKS
    }  # every shape tried at the first size of a bucket
    assert set(times[16]) == {"int8_triton", "otherwise", "int8_triton 16x256"}  # then its best


def test_a_wrong_kernel_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the kernel's output is 10% off on this "GPU", however fast it is."""
    fast = dispatch.run_fast_path

    def broken(*args: Any) -> torch.Tensor:
        return fast(*args) * 1.1

    monkeypatch.setattr(int8_rows, "run_fast_path", broken)
    model = _layers()
    tuning = int8_rows.tune(model.modules(), torch.float32, _timer({32: 128, 48: 128}), ROWS)
    assert tuning.limits == {"32×64": 0, "48×64": 0}
    assert "max |Δ| / max |reference|" in tuning.refused["32×64"]
    assert tuning.blocks == {"32×64": {}, "48×64": {}}
    assert {layer.triton_rows for layer in model} == {0}
    one_row = torch.zeros(1, 64, dtype=torch.bfloat16)
    for layer in model:
        assert isinstance(layer, QuantizedLinear)
        path = dispatch.choose_path(one_row, layer.qweight, layer.scales, (9, 0), True,
                                    triton_rows=layer.triton_rows)  # fmt: skip
        assert path == "int8_cast_mm"  # cuBLAS on the cast weight


def test_a_kernel_that_fails_here_is_refused_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that cannot build on this GPU (say, bf16 `tl.dot` on an old one) must not stop
    the engine from loading: the layer keeps cuBLAS (the cast path)."""

    def fails(*args: Any) -> torch.Tensor:
        raise AssertionError("triton: unsupported dot operand types")  # not a RuntimeError

    monkeypatch.setattr(int8_rows, "run_fast_path", fails)
    model = _layers()
    tuning = int8_rows.tune(model.modules(), torch.float32, _timer({32: 128, 48: 128}), ROWS)
    assert tuning.limits == {"32×64": 0, "48×64": 0}
    assert "AssertionError: triton: unsupported" in tuning.refused["48×64"]
    assert {layer.triton_rows for layer in model} == {0}


def test_the_fused_layers_are_the_ones_measured(checkpoint: Path) -> None:
    model = load_model(checkpoint)
    quantize_model(model, "int8")
    fuse_projections(model)
    in_use = modules_in_use(model)
    fused = [m.qkv for m in model.modules() if isinstance(m, SelfAttention)]
    fused += [m.gate_up for m in model.modules() if isinstance(m, MLP)]
    parts = [m.q_proj for m in model.modules() if isinstance(m, SelfAttention)]
    assert all(any(f is m for m in in_use) for f in fused)
    assert not any(p is m for p in parts for m in in_use)
    widths = {m.out_features: 1 for m in in_use if isinstance(m, QuantizedLinear)}
    int8_rows.tune(in_use, torch.float32, _timer(widths), (1, 16))
    assert {f.triton_rows for f in fused} == {1}  # type: ignore[union-attr]


def test_load_tuning(checkpoint: Path) -> None:
    """On the CPU nothing is measured; on a GPU (GUARDRT_TEST_DEVICE=cuda, gpu_check.sh) every
    decoder shape is measured with bf16 activations, no kernel is refused, and the tuned model
    scores what it scored before."""
    from guardrt.runtime.model.tune import NO_ACTIVATION_QUANT, tune_for_device  # noqa: PLC0415

    device = torch.device(DEVICE)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    model = load_model(checkpoint, device=device, dtype=dtype)
    quantize_model(model, "int8")
    fuse_projections(model)
    tokens = torch.tensor([[791, 1202, 264, 11, 13]], device=device)
    model.setup_caches(1, 64)
    arguments = (tokens, torch.arange(5, device=device)[None], torch.zeros(1, dtype=torch.long,
                 device=device), torch.tensor([64], device=device), torch.zeros(1,
                 dtype=torch.long, device=device), torch.tensor([[4]], device=device))  # fmt: skip
    with torch.inference_mode():
        before = model(*arguments).float()
    tuning = tune_for_device(model)
    layers = [m for m in modules_in_use(model.language_model) if isinstance(m, QuantizedLinear)]
    # The cross layers' k/v projections read the image's thousands of rows once: never timed,
    # they keep the default (the first GPU run caught this test counting them in).
    image_only = {id(projection) for projection in model.image_kv_projections()}
    assert image_only
    assert image_only <= {id(m) for m in layers}
    per_step = [m for m in layers if id(m) not in image_only]
    if DEVICE == "cpu":
        assert tuning.fused.startswith("not used")
        assert tuning.lines() == [
            f"fused RMSNorm/RoPE/SwiGLU kernels: {tuning.fused}",
            f"fused activation quantization: {NO_ACTIVATION_QUANT}",  # weight-only int8
        ]
        assert tuning.to_json()["int8_rows"]["limits"] == {}
        assert tuning.to_json()["vision_attention"]["plan"] == "default/d=as is"
        assert {m.triton_rows for m in layers} == {INT8_TRITON_MAX_ROWS}
    else:
        assert tuning.fused == "used"
        assert tuning.activation_quant == NO_ACTIVATION_QUANT  # weight-only int8
        assert tuning.int8_rows.limits, "measured"
        assert tuning.int8_rows.refused == {}
        assert {m.triton_rows for m in per_step} == set(tuning.int8_rows.limits.values())
        assert {m.triton_rows for m in layers if id(m) in image_only} == {INT8_TRITON_MAX_ROWS}
    with torch.inference_mode():
        after = model(*arguments).float()
    torch.testing.assert_close(after, before, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_steps_replay_in_graphs(checkpoint: Path, preparer: Preparer, kind: str) -> None:
    """On a GPU (GUARDRT_TEST_DEVICE=cuda with TRITON_INTERPRET=0, gpu_check.sh), bf16 steps of
    an 8-bit model run their kernels (the Triton int8 kernel, fp8 `_scaled_mm`) inside captured
    CUDA graphs, and decode exactly as eager steps of the same model; on the CPU the same steps
    run padded and eagerly through the reference forward."""
    device = torch.device(DEVICE)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    model = load_model(checkpoint, device=device, dtype=dtype, semantics="meta")
    quantize_model(model, kind)  # type: ignore[arg-type]
    fuse_projections(model)
    pixels = np.random.default_rng(4).integers(0, 256, (40, 70, 3), np.uint8)
    requests = [
        preparer.prepare([{"role": "user", "content": text}])
        for text in ("How do I pick a lock?", "Is this fine?")
    ]
    parts = [{"type": "image", "image": pixels}, {"type": "text", "text": "What is this?"}]
    requests.append(preparer.prepare([{"role": "user", "content": parts}]))
    expected = Classifier(model, prefixes=1, steps=setup_steps(model, 3 + 1, 1024, False)).run(
        requests
    )
    steps = setup_steps(model, 3 + 1, 1024, True, image_rows=3)
    assert isinstance(steps, StaticSteps)
    got = Classifier(model, prefixes=1, steps=steps).run(requests)
    assert_same_decoded(got, expected)
    assert steps.graphs == (len(steps._steps) if DEVICE == "cuda" else 0)
    assert steps.eager_steps == 0
    paths = {
        dispatch.select_path(torch.zeros(1, m.in_features, dtype=dtype, device=device),
                             m.qweight, m.scales, m.activations, m.triton_rows)
        for m in modules_in_use(model.language_model) if isinstance(m, QuantizedLinear)
    }  # fmt: skip
    fast = {"int8": "int8_triton", "fp8": "fp8_scaled_mm"}[kind]
    assert paths == ({"reference"} if DEVICE == "cpu" else {fast}), "a decode step's path"


@pytest.mark.skipif(DEVICE != "cuda", reason="times CUDA work (gpu_check.sh runs it on a GPU)")
def test_the_timer_times_the_work_not_its_launch() -> None:
    """The load-time timer measures GPU work: a product with 8× the rows takes longer, where a
    wall clock around eager calls of a few µs each would time Python; work that reads the
    device back is timed too; and the device is usable after."""
    x = torch.randn(2048, 2048, device=DEVICE)
    small = cuda_timer(functools.partial(torch.mm, x[:256], x))
    large = cuda_timer(functools.partial(torch.mm, x, x))
    assert 0 < small < large < 1e3
    assert 0 < cuda_timer(lambda: float(x.sum())) < 1e3
    with torch.inference_mode():
        assert torch.isfinite(x @ x).all()


def test_layers_that_only_read_images_are_not_measured(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cross layers' k/v projections read an image's thousands of states once: the load
    measures the decoder's per-step layers only (q and o of cross layers included)."""
    from guardrt.runtime.model.tune import tune_for_device  # noqa: PLC0415

    model = load_model(checkpoint)
    quantize_model(model, "int8")
    fuse_projections(model)
    measured: list[torch.nn.Module] = []

    def recorded(layers: Any, dtype: torch.dtype) -> int8_rows.RowsTuning:
        measured.extend(layers)
        return int8_rows.RowsTuning()

    monkeypatch.setattr(int8_rows, "tune", recorded)
    tune_for_device(model)
    cross = [m for m in model.language_model.modules() if isinstance(m, CrossAttention)]
    assert cross
    ids = {id(m) for m in measured}
    assert not any(id(c.k_proj) in ids or id(c.v_proj) in ids for c in cross)
    assert all(id(c.q_proj) in ids and id(c.o_proj) in ids for c in cross)
    fused = [m.qkv for m in model.language_model.modules() if isinstance(m, SelfAttention)]
    assert fused
    assert all(id(f) in ids for f in fused)
