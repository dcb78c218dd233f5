"""The exported decoder graph (`guardrt/export/decoder.py`), on the real exported graph in ONNX
Runtime.

Its head: the logits of the ids a step asks for and each row's normaliser, reduced in the graph,
so that the graph back ends bring a few values a row to the host instead of 128,256
(`HeadScores`); against a float64 log-softmax of its own full-vocabulary logits, and a NaN logit
outside the ids asked for making the verdict fail closed.

Its cross layers: in an ONNX engine, If nodes skip them in all-text batches; the flat graph a
TensorRT engine is built from computes exactly the same. (Both against the torch model:
tests/test_onnx_engine.py.)
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch

from guardrt.export.decoder import export_decoder, log_sum_exp
from guardrt.export.parity import probes
from guardrt.runtime.engine.graph_steps import GraphSteps
from guardrt.runtime.engine.manifest import file_entries, read_manifest, write_manifest
from guardrt.runtime.engine.onnx_engine import OrtRunner
from guardrt.runtime.jsonfile import read_json_object
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.scores import prefill_vocab
from tests.test_onnx_engine import onnx_engine

NAN_ID = 4242  # a token no verdict reads


def _steps(directory: Path) -> GraphSteps:
    manifest = read_manifest(directory)
    runner = OrtRunner(directory, manifest, "cpu", 0)
    return GraphSteps(runner, ModelConfig.from_dict(manifest.config), 1, 1024)


def _prefill(
    steps: GraphSteps, prompt: list[int], vocab: np.ndarray | None, log_probs: bool
) -> np.ndarray:
    """The values at the last two prompt tokens: (1, 2, V)."""
    tokens = np.asarray([prompt], np.int64)  # (1, S)
    return steps.step(
        tokens,
        np.arange(len(prompt), dtype=np.int64)[None],
        np.zeros(1, np.int64),
        np.full(1, 1024, np.int64),  # no image
        np.zeros(1, np.int64),
        np.asarray([[len(prompt) - 2, len(prompt) - 1]], np.int64),  # (1, R = 2)
        vocab,
        log_probs,
    )


def test_head_is_a_float64_log_softmax_of_the_full_logits(
    onnx_fp32: Path, preparer: Preparer
) -> None:
    """The ids asked for, in the order asked (not only sorted), as logits and as log-softmax
    values: the graph's fp32 normaliser against float64 over its own 128,256 logits."""
    prompt = list(probes(preparer)[0].prompt)
    full = _prefill(_steps(onnx_fp32), prompt, None, False)  # (1, 2, 128256): every id
    assert full.shape == (1, 2, 128_256)
    wide = full.astype(np.float64)
    top = wide.max(axis=-1, keepdims=True)
    exact = wide - top - np.log(np.exp(wide - top).sum(axis=-1, keepdims=True))
    vocab = np.concatenate((prefill_vocab([probes(preparer)[0].grammar]), [128_255, 3]))
    picked = _prefill(_steps(onnx_fp32), prompt, vocab, False)
    assert picked.dtype == np.float32
    assert np.array_equal(picked, full[..., vocab])
    log_probs = _prefill(_steps(onnx_fp32), prompt, vocab, True)
    assert log_probs.dtype == np.float32
    np.testing.assert_allclose(log_probs, exact[..., vocab], rtol=1e-6, atol=2e-6)
    assert not np.array_equal(log_probs, picked)  # (the normaliser is not 0)


def test_log_sum_exp_is_shifted_and_spelled_out(onnx_fp32: Path) -> None:
    """Logits far past exp's fp32 range (88) still give a finite normaliser, a NaN anywhere
    makes its row's NaN; and the graph holds the shifted reduction, not ReduceLogSumExp (slow
    in ONNX Runtime's CPU kernel; TensorRT's importer may lower it unshifted)."""
    logits = torch.tensor([[1000.0, 999.0, -5.0], [0.0, float("nan"), 1.0], [3.0, 3.0, 3.0]])
    got = log_sum_exp(logits)
    assert math.isclose(got[0].item(), 1000 + math.log(1 + math.exp(-1)), rel_tol=1e-7)
    assert math.isnan(got[1].item())
    assert math.isclose(got[2].item(), 3 + math.log(3), rel_tol=1e-7)
    graph = onnx.load(str(onnx_fp32 / "decoder.onnx"), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    assert "ReduceLogSumExp" not in ops
    assert {"ReduceMax", "Exp", "ReduceSum", "Log"} <= ops


def _with_nan_logit(source: Path, target: Path) -> Path:
    """A copy of the engine whose lm_head row NAN_ID is NaN (a broken kernel's logit there)."""
    shutil.copytree(source, target)
    path = target / "decoder.onnx"
    graph = onnx.load(str(path))  # its weights stay in the external data file
    vocab_size = read_json_object(target / "config.json", "config")["text_config"]["vocab_size"]
    # The head's weight: the one initializer with a vocabulary-sized dim (the exporter may
    # store it transposed, (D, vocab), under a name of its own; the embedding has vocab + 8).
    (head,) = [t for t in graph.graph.initializer if vocab_size in t.dims]
    weights = onnx.numpy_helper.to_array(head, base_dir=str(target)).copy()
    weights.swapaxes(0, list(head.dims).index(vocab_size))[NAN_ID] = np.nan
    head.CopyFrom(onnx.numpy_helper.from_array(weights, head.name))  # now stored inline
    onnx.save(graph, str(path))
    document = read_json_object(target / "manifest.json", "manifest")
    document["files"] = file_entries(target)
    write_manifest(target, document)
    return target


def test_a_nan_logit_anywhere_fails_the_verdict_closed(
    onnx_fp32: Path, preparer: Preparer, tmp_path: Path
) -> None:
    """NaN at an id no step asks for still reaches the normaliser, so every log-probability
    of the row is NaN and the verdict is `unsafe`, never `safe`."""
    broken = _with_nan_logit(onnx_fp32, tmp_path / "broken")
    request = probes(preparer)[0]
    prompt = list(request.prompt)
    vocab = prefill_vocab([request.grammar])
    assert NAN_ID not in vocab
    picked = _prefill(_steps(broken), prompt, vocab, False)
    assert np.isfinite(picked).all()  # the logits read are fine
    assert np.isnan(_prefill(_steps(broken), prompt, vocab, True)).all()

    healthy = onnx_engine(onnx_fp32).execute([request])[0]
    decided = onnx_engine(broken).execute([request])[0]
    assert not math.isnan(healthy.unsafe_probability)
    assert math.isnan(decided.unsafe_probability)
    tokens = request.grammar.tokens
    assert tuple(decided.generated[:2]) == (tokens.blank, tokens.unsafe)


def test_cross_layers_are_skipped_in_text_batches_and_the_flat_graph_agrees(
    onnx_fp32: Path, checkpoint: Path, tmp_path: Path
) -> None:
    """The ONNX engine's decoder holds one If per cross layer (the manifest says so); the flat
    graph TensorRT builds from gives bitwise the same outputs for all-text, mixed and image
    batches."""
    import onnxruntime as ort  # type: ignore[import-untyped]  # noqa: PLC0415

    manifest = read_manifest(onnx_fp32)
    config = ModelConfig.from_dict(manifest.config)
    text = config.text
    graph = onnx.load(str(onnx_fp32 / "decoder.onnx"), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("If") == len(text.cross_attention_layers) == 2
    assert "If nodes" in manifest.document["graphs"]["decoder"]["cross_layers"]

    model = load_model(checkpoint)
    model.setup_caches(0, 0)
    export_decoder(model, tmp_path / "flat.onnx", 4, 1024, conditional_cross=False)
    flat_ops = [n.op_type for n in onnx.load(str(tmp_path / "flat.onnx")).graph.node]
    assert "If" not in flat_ops
    flat = ort.InferenceSession(str(tmp_path / "flat.onnx"))
    conditional = ort.InferenceSession(str(onnx_fp32 / "decoder.onnx"))

    rng = np.random.default_rng(5)
    heads, dim = text.num_kv_heads, text.head_dim
    selfs, crosses = len(text.self_attention_layers), len(text.cross_attention_layers)
    for tiles in ([0, 0], [0, 3], [4, 1]):
        keys = model.image_keys if any(tiles) else 1
        cross = rng.standard_normal((crosses, 2, 2, heads, keys, dim)).astype(np.float32)
        feeds = {
            "input_ids": rng.integers(0, 128_000, (2, 9)),
            "position_ids": np.arange(4, 13)[None].repeat(2, 0),
            "past_kv": rng.standard_normal((selfs, 2, 2, heads, 4, dim)).astype(np.float32),
            "cross_kv": cross if any(tiles) else np.zeros_like(cross),
            "image_start": np.asarray([2 if t else 1024 for t in tiles]),
            "num_tiles": np.asarray(tiles),
            "logit_index": np.asarray([[8, 3], [8, 0]]),
            "vocab": np.asarray([0, 271, 39_257, 128_255]),
        }
        for a, b in zip(flat.run(None, feeds), conditional.run(None, feeds), strict=True):
            assert np.array_equal(a, b), tiles
