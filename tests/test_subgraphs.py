"""Initializers read by one If branch only move into it (`guardrt/export/subgraphs.py`); the
graph computes the same in ONNX Runtime, and an int8 weight inside a branch then loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from guardrt.export.subgraphs import localize_file, localize_initializers


def _model() -> onnx.ModelProto:
    """y = If(c, then: x·W_then·S + b_shared, else: x + b_shared + e_twice·0 + e_twice), where
    W_then is int8 behind DequantizeLinear (what ONNX Runtime fuses into MatMulNBits only when
    the weight and scales are the branch's own), b_shared is read by both branches and the main
    graph, and e_twice by both branches."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-127, 127, (8, 8), dtype=np.int8), "w_then")
    scales = numpy_helper.from_array(np.full(8, 0.01, np.float32), "s_then")
    shared = numpy_helper.from_array(np.ones(8, np.float32), "b_shared")
    twice = numpy_helper.from_array(np.full(8, 2.0, np.float32), "e_twice")
    then = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w_then", "s_then"], ["w"], axis=1),
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "e_twice"], ["then_y"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [
            helper.make_node("Add", ["x", "b_shared"], ["xb"]),
            helper.make_node("Add", ["xb", "e_twice"], ["else_y"]),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, None)],
    )
    main = helper.make_graph(
        [
            helper.make_node("If", ["c"], ["y0"], then_branch=then, else_branch=other),
            helper.make_node("Add", ["y0", "b_shared"], ["y"]),
        ],
        "main",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [weight, scales, shared, twice],
    )
    return helper.make_model(main, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run(model: onnx.ModelProto, condition: bool, optimize: bool = True) -> np.ndarray:
    """y; with `optimize` (ONNX Runtime's default) the int8 weight runs as MatMulNBits, which
    rounds differently (~1e-2 here); without, DequantizeLinear then MatMul, as written."""
    import onnxruntime as ort  # type: ignore[import-untyped]  # noqa: PLC0415

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options)
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    (y,) = session.run(None, {"x": x, "c": np.array(condition)})
    result: np.ndarray = y
    return result


def test_only_what_one_branch_reads_moves() -> None:
    model = _model()
    assert localize_initializers(model) == 2
    assert [t.name for t in model.graph.initializer] == ["b_shared", "e_twice"]
    (then,) = [a.g for a in model.graph.node[0].attribute if a.name == "then_branch"]
    assert [t.name for t in then.initializer] == ["w_then", "s_then"]
    onnx.checker.check_model(model, full_check=True)


def _expected(condition: bool) -> np.ndarray:
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    if not condition:
        return x + 1 + 2 + 1
    weight = np.random.default_rng(0).integers(-127, 127, (8, 8), dtype=np.int8)
    return x @ (weight.astype(np.float32) * np.float32(0.01)) + 2 + 1


def test_the_graph_computes_the_same(tmp_path: Path) -> None:
    """ONNX Runtime refuses the graph as the exporter leaves it and runs it once localized,
    both branches; through a file with external data too, whose bytes stay in place."""
    with pytest.raises(Exception, match="Missing required weight: w_then"):
        _run(_model(), True)
    model = _model()
    localize_initializers(model)
    for condition in (True, False):
        np.testing.assert_allclose(_run(model, condition, False), _expected(condition), 1e-6)
        np.testing.assert_allclose(_run(model, condition), _expected(condition), 1e-2, 0.05)
    path = tmp_path / "g.onnx"
    onnx.save(
        _model(), str(path), save_as_external_data=True, location="g.onnx.data", size_threshold=0
    )
    data = (tmp_path / "g.onnx.data").read_bytes()
    assert localize_file(path) == 2
    assert (tmp_path / "g.onnx.data").read_bytes() == data
    loaded = onnx.load(str(path))  # the moved tensors' bytes, read from their old offsets
    for condition in (True, False):
        np.testing.assert_allclose(_run(loaded, condition, False), _expected(condition), 1e-6)
