"""int8 weight quantization: the per-tensor arithmetic, the Linear swap, and its effect on the
model's verdict scores (tiny random mllama; the bounds asserted are the ones measured)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from guardrt.export import quantize as quantize_module
from guardrt.export.parity import deviation
from guardrt.export.quantize import (
    QMAX,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantKind,
    quantize_linears,
    quantize_model,
    quantize_weight,
)
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.model.tiny import tiny_config
from guardrt.runtime.prompt import encode_prompt
from guardrt.runtime.tokenizer import IMAGE_ID, Tokenizer
from guardrt.testing.references import hf_inputs
from tests.models import DEVICE, SMALL_VISION, image, small_config, write_small

UNSAFE, SAFE = 39257, 19193


@pytest.mark.parametrize("group_size", [None, 8, 16])
def test_round_trip_error_is_half_a_step(group_size: int | None) -> None:
    weight = torch.randn(24, 32, generator=torch.Generator().manual_seed(0))
    weight[3] = 0.0  # an all-zero row stays exactly zero
    quantized = quantize_weight(weight, group_size)
    assert quantized.qweight.dtype == torch.int8
    assert int(quantized.qweight.abs().max()) <= QMAX
    restored = quantized.dequantize()
    step = quantized.scales.repeat_interleave(quantized.group_size, dim=1)  # (out, in)
    assert torch.all((restored - weight).abs() <= step / 2 + 1e-7)
    assert torch.equal(restored[3], torch.zeros(32))


def test_groups_are_at_least_as_accurate_as_channels() -> None:
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    weight[:, 5] *= 40  # an outlier column: per-channel scales suffer for the whole row
    error = {
        size: float((quantize_weight(weight, size).dequantize() - weight).abs().mean())
        for size in (None, 32)
    }
    assert error[32] < error[None]
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(weight, 48)


def test_quantized_linear_is_the_dequantized_linear() -> None:
    linear = nn.Linear(32, 16)
    quantized = quantize_weight(linear.weight, 16)
    swapped = QuantizedLinear(quantized, linear.bias)
    x = torch.randn(5, 32)
    expected = nn.functional.linear(x, quantized.dequantize(), linear.bias)
    assert torch.equal(swapped(x), expected)


def _logits(model: MllamaModel, prompt: list[int], tiles: int) -> torch.Tensor:
    tiled = image(tiles, seed=tiles) if tiles else None
    n, start, count = len(prompt), model.max_seq, 0
    with torch.inference_mode():
        if tiled is not None:
            inputs = hf_inputs(prompt, tiled)
            states = model.encode_images(
                inputs["pixel_values"][:, 0],
                inputs["aspect_ratio_ids"][:, 0],
                inputs["aspect_ratio_mask"][:, 0],
            )
            model.write_images(torch.tensor([0]), states)
            start, count = prompt.index(IMAGE_ID), tiled.num_tiles
        logits = model(
            torch.tensor([prompt]),
            torch.arange(n)[None],
            torch.tensor([0]),
            torch.tensor([start]),
            torch.tensor([count]),
            torch.arange(n)[None],
        )
    result: torch.Tensor = logits[0]
    return result


def test_int8_model_stays_close_to_fp32(tmp_path: Path, tok: Tokenizer) -> None:
    directory = write_small(tmp_path, small_config("gqa2-cross2,4"), seed=13)
    reference, quantized = load_model(directory), load_model(directory)
    report = quantize_linears(quantized, keep=lambda name: name.endswith("lm_head"))
    # Every projection but the head: 7 per text layer (q, k, v, o, gate, up, down), 6 per vision
    # layer (q, k, v, o, fc1, fc2), and the projector.
    assert report.layers == 5 * 7 + 4 * 6 + 1
    assert report.int8_bytes < 0.3 * report.original_bytes
    assert report.worst_layer_error < 1 / QMAX
    for model in (reference, quantized):
        model.setup_caches(1, 512)
    outputs: dict[str, list[torch.Tensor]] = {"fp32": [], "int8": []}
    for tiles in (0, 1, 4):
        content: list[dict[str, str]] = [{"type": "text", "text": "Is this fine?"}]
        if tiles:
            content.insert(0, {"type": "image"})
        prompt = [*encode_prompt([{"role": "user", "content": content}], tokenizer=tok), 271]
        outputs["fp32"].append(_logits(reference, prompt, tiles))
        outputs["int8"].append(_logits(quantized, prompt, tiles))
    measured = deviation(
        [x.numpy() for x in outputs["fp32"]], [x.numpy() for x in outputs["int8"]], UNSAFE, SAFE, -1
    )
    # Measured on this model (CPU, fp32 activations): max relative logit error 2.1e-2 per
    # channel (1.6e-2 with groups of 16), |ΔP(unsafe)| 5e-8 (its P(unsafe) is ~1e-5). The
    # bounds leave room for platform differences.
    assert 0 < measured.max_relative_logit_error < 0.05
    assert measured.max_abs_delta_p_unsafe < 1e-3


def test_quantized_embedding_reads_the_dequantized_table() -> None:
    torch.manual_seed(3)
    table = nn.Embedding(40, 16).to(torch.bfloat16)
    quantized = quantize_weight(table.weight, None, "int8")
    embedding = QuantizedEmbedding(quantized, torch.bfloat16)
    ids = torch.tensor([[0, 7, 39], [7, 7, 1]])
    got = embedding(ids)
    assert got.dtype == torch.bfloat16
    assert got.shape == (2, 3, 16)
    torch.testing.assert_close(got, quantized.dequantize(torch.bfloat16)[ids], atol=0, rtol=0)
    # The table it reads is within half an int8 step of the original, row by row (fp32).
    error = (quantized.dequantize() - table.weight.float()).abs()  # (40, 16)
    step = table.weight.float().abs().amax(dim=1, keepdim=True) / QMAX  # (40, 1)
    assert bool((error <= step / 2 * (1 + 1e-5)).all())
    with pytest.raises(ValueError, match="one scale per row"):
        QuantizedEmbedding(quantize_weight(table.weight, 8, "int8"), torch.bfloat16)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantize_model_takes_the_token_embedding_to_int8_only(
    tmp_path: Path, kind: QuantKind
) -> None:
    model = load_model(write_small(tmp_path, small_config("gqa2-cross2,4"), seed=13))
    table_bytes = model.language_model.model.embed_tokens.weight.numel() * 4  # fp32
    report = quantize_model(model, kind)
    embed = model.language_model.model.embed_tokens
    assert isinstance(embed, QuantizedEmbedding) == (kind == "int8")
    assert model.weight_dtype == torch.float32  # remembered through the int8 table
    assert model.device == torch.device("cpu")
    linears = 5 * 7 + 4 * 6 + 1
    assert report.layers == linears + (kind == "int8")
    if kind == "int8":
        assert isinstance(embed, QuantizedEmbedding)
        assert embed.qweight.dtype == torch.int8
        assert report.original_bytes > table_bytes  # the table counted
        assert report.worst_layer_error < 1 / QMAX


def test_fp8_round_trip_is_within_e4m3_precision() -> None:
    weight = torch.randn(24, 32, generator=torch.Generator().manual_seed(2))
    quantized = quantize_weight(weight, kind="fp8")
    assert quantized.qweight.dtype == torch.float8_e4m3fn
    assert quantized.kind == "fp8"
    restored = quantized.dequantize()
    # e4m3 keeps 3 mantissa bits: half a step is 1/16 of the value (normal range), and the
    # subnormal floor is 2^-10 of the channel's scale·448.
    bound = weight.abs() / 16 + quantized.scales * 2.0**-9 + 1e-7
    assert torch.all((restored - weight).abs() <= bound)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_linear_exports_as_dequantize_linear(kind: QuantKind, tmp_path: Path) -> None:
    """The custom op becomes ONNX DequantizeLinear on the 8-bit weight; ONNX Runtime computes
    the same as the torch reference (its int8 MatMulNBits fusion asked for fp32 compute)."""
    onnx: Any = pytest.importorskip("onnx")
    ort: Any = pytest.importorskip("onnxruntime")
    from guardrt.export.onnx_ops import check_exportable, trace  # noqa: PLC0415

    linear = nn.Linear(32, 16, bias=False)
    module = QuantizedLinear(quantize_weight(linear.weight, kind=kind), None)
    x = torch.randn(3, 32)
    path = tmp_path / "linear.onnx"
    trace(module, (x,), path, ["x"], ["y"])
    graph = onnx.load(str(path))
    assert "DequantizeLinear" in {node.op_type for node in graph.graph.node}
    storage = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}[kind]
    assert storage in {init.data_type for init in graph.graph.initializer}
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.inference_mode():
        expected = module(x).numpy()
    assert abs(got - expected).max() <= 1e-5 * abs(expected).max()
    grouped = QuantizedLinear(quantize_weight(linear.weight, 8), None)
    with pytest.raises(ValueError, match="per-group scales"):
        check_exportable(grouped)


@pytest.mark.parametrize(("kind", "group_size"), [("int8", None), ("int8", 8), ("fp8", None)])
def test_quantizing_in_chunks_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, kind: QuantKind, group_size: int | None
) -> None:
    """Rows (and their groups) are quantized independently: chunks of 3 rows, from a bf16
    cast, give exactly what one pass over the cast weight gives, and the same error measure."""
    weight = torch.randn(25, 32, generator=torch.Generator().manual_seed(2))
    whole, whole_error = quantize_module.quantize_measured(weight.bfloat16(), group_size, kind)
    monkeypatch.setattr(quantize_module, "_CHUNK_ELEMENTS", 3 * 32)
    chunked, error = quantize_module.quantize_measured(
        weight, group_size, kind, dtype=torch.bfloat16
    )
    assert torch.equal(chunked.qweight.view(torch.int8), whole.qweight.view(torch.int8))
    assert torch.equal(chunked.scales, whole.scales)
    assert error == whole_error
    restored = whole.dequantize()
    expected = float(
        (restored - weight.bfloat16().float()).abs().max() / weight.bfloat16().abs().max()
    )
    assert error == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("kind", "activations"), [("int8", False), ("int8", True), ("fp8", False)])
def test_quantizing_while_loading_equals_loading_then_quantizing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: QuantKind, activations: bool
) -> None:
    """`load_model(quantize=...)` (the file's tensors quantized where they are mapped, a chunk
    at a time, cast to the asked dtype first) gives the model `load_model` then
    `quantize_model` gives: the same modules, tensors, dtypes and devices, bit for bit."""
    monkeypatch.setattr(quantize_module, "_CHUNK_ELEMENTS", 1000)  # several chunks a weight
    directory = write_small(tmp_path / "ckpt", small_config("gqa2-cross2,4"), seed=8)
    expected = load_model(directory, dtype=torch.bfloat16)
    quantize_model(expected, kind, activations)
    got = load_model(directory, dtype=torch.bfloat16, quantize=kind, activations=activations)
    assert [type(m) for m in got.modules()] == [type(m) for m in expected.modules()]
    want = dict(expected.state_dict())
    have = dict(got.state_dict())
    assert have.keys() == want.keys()
    for name, tensor in want.items():
        assert have[name].dtype == tensor.dtype, name
        assert have[name].device == tensor.device, name
        assert torch.equal(have[name].view(torch.uint8), tensor.view(torch.uint8)), name
    linears = [m for m in got.modules() if isinstance(m, QuantizedLinear)]
    assert linears
    assert {m.activations for m in linears} == {activations}
    assert torch.equal(got.inv_freq, expected.inv_freq)
    assert isinstance(got.language_model.model.embed_tokens, QuantizedEmbedding) == (kind == "int8")
    assert got.weight_dtype == torch.bfloat16


@pytest.mark.skipif(DEVICE != "cuda", reason="measures CUDA memory (gpu_check.sh runs it)")
def test_quantizing_while_loading_holds_no_bf16_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the int8 load peaks at its own weights plus a chunk's temporaries, under the
    bf16 model's size: it fits a card the bf16 model would not (a 16 GB one at full size)."""
    monkeypatch.setattr(quantize_module, "_CHUNK_ELEMENTS", 1 << 20)  # ~20 MB of temporaries
    text = {
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "cross_attention_layers": [1],
    }
    config = tiny_config(text_config=text, vision_config=SMALL_VISION)
    directory = write_small(tmp_path / "ckpt", config, seed=3)
    bf16 = load_model(directory, device=DEVICE, dtype=torch.bfloat16)
    bf16_bytes = sum(t.numel() * t.element_size() for t in bf16.state_dict().values())
    del bf16
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = load_model(directory, device=DEVICE, dtype=torch.bfloat16, quantize="int8")
    held = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before
    assert held < 0.8 * bf16_bytes  # the head stays bf16: int8 is ~0.7 of bf16 at this size
    assert peak - held < 40 << 20, (peak, held)
    assert peak < bf16_bytes
    assert all(t.device.type == "cuda" for t in model.state_dict().values())
