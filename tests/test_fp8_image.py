"""Which image products an fp8 model keeps in bf16 (`guardrt/kernels/fp8_image.py`): measured
before quantizing, on a GPU only. Here the timer is a table (the CPU measures nothing); the GPU
run times the real paths."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from guardrt.bench import report
from guardrt.bench.fullsize import SIZES, random_model
from guardrt.export.quantize import QuantizedLinear
from guardrt.kernels import fp8_image
from guardrt.kernels.fp8_image import Fp8ImageChoice, Product
from guardrt.kernels.timer import Timer
from guardrt.runtime.model.checkpoint import load_model, quantize_for_serving
from guardrt.runtime.model.fuse import fuse_projections
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.model.tune import tune_for_device
from tests.models import small_config, write_small

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bf16_model() -> MllamaModel:
    return random_model(SIZES["tiny"], CPU, torch.bfloat16)


def _table_timer(fp8_ms: Callable[[int, int], float]) -> Timer:
    """bf16 takes 1 ms for every shape; fp8 what `fp8_ms(out, in)` says (raising if it raises)."""

    def timer(call: Callable[[], object]) -> float:
        assert isinstance(call, functools.partial)
        if isinstance(call.func, QuantizedLinear):
            return fp8_ms(call.func.out_features, call.func.in_features)
        return 1.0

    return timer


def test_the_image_products_are_the_tower_the_projector_and_the_cross_kv(
    bf16_model: MllamaModel,
) -> None:
    vision = bf16_model.config.vision
    products = fp8_image.image_products(bf16_model)
    linears = {n for n, m in bf16_model.named_modules() if isinstance(m, nn.Linear)}
    tower = {n for n in linears if n.startswith("vision_model.")}
    cross_kv = {n for n in linears if n.endswith((".cross_attn.k_proj", ".cross_attn.v_proj"))}
    assert tower
    assert cross_kv
    assert set(products) == tower | cross_kv | {"multi_modal_projector"}
    for name in tower:
        assert products[name].rows == vision.max_num_tiles * vision.padded_patches
    for name in cross_kv | {"multi_modal_projector"}:
        assert products[name].rows == vision.max_num_tiles * vision.num_patches
    projector = bf16_model.multi_modal_projector
    assert products["multi_modal_projector"] == Product(
        projector.out_features, projector.in_features, products["multi_modal_projector"].rows, True
    )


def test_fp8_keeps_bf16_where_it_is_not_faster(bf16_model: MllamaModel) -> None:
    """Per shape: faster in fp8 → quantized; as fast, slower, NaN or failing → kept in bf16."""
    products = fp8_image.image_products(bf16_model)
    shapes = sorted({(p.out_features, p.in_features) for p in products.values()})
    assert len(shapes) >= 4
    faster, equal, nan, failing = shapes[0], shapes[1], shapes[2], shapes[3]

    def fp8_ms(n: int, k: int) -> float:
        if (n, k) == failing:
            raise RuntimeError("no fp8 here")
        return {faster: 0.5, equal: 1.0, nan: math.nan}.get((n, k), 2.0)

    choice = fp8_image.choose(products, CPU, torch.bfloat16, _table_timer(fp8_ms))
    assert choice.measured
    expected = {n for n, p in products.items() if (p.out_features, p.in_features) != faster}
    assert choice.kept == expected
    assert not any(choice.keeps(n) for n, p in products.items() if n not in expected)
    failed = [p.name for p in products.values() if (p.out_features, p.in_features) == failing]
    assert set(choice.failed) == set(failed)
    assert all("RuntimeError: no fp8 here" in why for why in choice.failed.values())
    assert all("fp8" not in choice.timings_ms[name] for name in failed)
    lines = choice.lines()
    assert lines[-1] == f"fp8 image products kept in bf16: {len(expected)} layers"
    assert any("fp8 failed: RuntimeError" in line for line in lines)
    assert choice.to_json()["kept_bf16_layers"] == len(expected)


def test_nothing_is_measured_on_the_cpu_or_for_fp32_weights(bf16_model: MllamaModel) -> None:
    assert fp8_image.measuring_timer(CPU, torch.bfloat16) is None
    assert fp8_image.measuring_timer(torch.device("cuda"), torch.float32) is None
    assert fp8_image.measuring_timer(torch.device("cuda"), torch.bfloat16) is not None
    products = fp8_image.image_products(bf16_model)
    choice = fp8_image.choose(products, CPU, torch.bfloat16, None)
    assert choice == Fp8ImageChoice()
    assert choice.lines() == []


def _encode(model: MllamaModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The image's projected states and its cross K/V, from fixed random pixels."""
    vision = model.config.vision
    generator = torch.Generator().manual_seed(0)
    tiles = vision.max_num_tiles
    pixels = torch.randn((1, tiles, 3, vision.image_size, vision.image_size), generator=generator)
    with torch.inference_mode():
        states = model.encode_images(
            pixels.to(torch.bfloat16), torch.tensor([1]), torch.ones((1, tiles), dtype=torch.long)
        )
        return states, model.image_kv(states)


@pytest.mark.parametrize("slower", [True, False])
def test_serving_quantization_keeps_the_chosen_layers_in_bf16(
    bf16_model: MllamaModel, monkeypatch: pytest.MonkeyPatch, slower: bool
) -> None:
    """Where fp8 lost, the image's states and cross K/V are the bf16 model's bit for bit (the
    layers were never quantized); where it won, they are fp8's. The decoder's products are
    fp8 either way, and the load's report says what was kept."""
    timer = _table_timer(lambda n, k: 2.0 if slower else 0.5)
    monkeypatch.setattr(fp8_image, "measuring_timer", lambda device, dtype: timer)
    model = copy.deepcopy(bf16_model)
    quantize_for_serving(model, "fp8")
    products = fp8_image.image_products(bf16_model)
    assert model.fp8_image is not None
    assert model.fp8_image.kept == (set(products) if slower else set())
    modules = dict(model.named_modules())
    for name in products:
        assert isinstance(modules[name], nn.Linear if slower else QuantizedLinear)
    assert isinstance(modules["language_model.model.layers.0.self_attn.q_proj"], QuantizedLinear)
    states, kv = _encode(model)
    want_states, want_kv = _encode(bf16_model)
    assert torch.equal(states, want_states) == slower
    if slower:
        assert torch.equal(kv, want_kv)
    fuse_projections(model)
    tuning = tune_for_device(model)
    assert tuning.to_json()["fp8_image"]["kept_bf16_layers"] == (len(products) if slower else 0)
    assert tuning.lines()[-1].startswith("fp8 image products kept in bf16")


def test_int8_measures_nothing(bf16_model: MllamaModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8_image, "measuring_timer", lambda device, dtype: pytest.fail("timed"))
    model = copy.deepcopy(bf16_model)
    quantize_for_serving(model, "int8")
    assert model.fp8_image is None
    assert isinstance(model.multi_modal_projector, QuantizedLinear)
    assert "fp8_image" not in tune_for_device(model).to_json()


def test_an_fp8_load_measures_before_it_quantizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`load_model(quantize="fp8")` (the torch engine's load) chooses on the weights' device and
    dtype before anything is quantized; the kept layers land there in bf16, from the files."""
    directory = write_small(tmp_path / "ckpt", small_config("gqa1-cross1,3"), seed=2)
    asked: list[tuple[torch.device, torch.dtype]] = []

    def measuring(device: torch.device, dtype: torch.dtype) -> Timer:
        asked.append((device, dtype))
        return _table_timer(lambda n, k: 2.0 if k == n else 0.5)  # square products lose

    monkeypatch.setattr(fp8_image, "measuring_timer", measuring)
    model = load_model(directory, device="cpu", dtype=torch.bfloat16, quantize="fp8")
    reference = load_model(directory, device="cpu", dtype=torch.bfloat16)
    assert asked == [(CPU, torch.bfloat16)]
    assert model.fp8_image is not None
    assert model.fp8_image.kept
    modules, plain = dict(model.named_modules()), dict(reference.named_modules())
    for name in fp8_image.image_products(reference):
        layer = modules[name]
        if model.fp8_image.keeps(name):
            assert isinstance(layer, nn.Linear)
            assert layer.weight.dtype == torch.bfloat16
            assert torch.equal(layer.weight, plain[name].weight)
        else:
            assert isinstance(layer, QuantizedLinear)
            assert layer.qweight.dtype == torch.float8_e4m3fn


def test_the_bench_table_names_the_choice() -> None:
    run = {
        "fp8_image": {
            "measured": True,
            "kept_bf16_layers": 160,
            "ms": {"1280×1280 at 6432 rows": {"bf16": 0.037, "fp8": 0.063}},
            "failed": {},
        }
    }
    (line,) = report._load_choices("fp8", run)
    assert line == (
        "  fp8 image products (fp8): 160 layers kept in bf16; "
        "1280×1280 at 6432 rows bf16 0.037 / fp8 0.063 ms"
    )
