"""`guardrt export build`: the manifest (steps, parity, files, graphs, tools) is present and
true; int8 stays within its measured bound; bad options and corrupted or mismatched engine
directories are refused with clear errors."""

from __future__ import annotations

import errno
import importlib.metadata
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from guardrt.cli import main
from guardrt.export import build as build_module
from guardrt.export import engine_model, onnx_ops, scratch
from guardrt.export.build import BuildOptions, build
from guardrt.export.errors import ExportError
from guardrt.export.parity import deviation, probe_digest, probe_logits, probes
from guardrt.runtime.classify import TorchSteps
from guardrt.runtime.engine import EngineOptions, backend_for, load_engine
from guardrt.runtime.engine.graph_steps import GraphSteps
from guardrt.runtime.engine.manifest import EngineDirError, read_manifest, sha256_file
from guardrt.runtime.engine.onnx_engine import OrtRunner
from guardrt.runtime.model.checkpoint import load_model, read_entries
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.prepare import Preparer


def manifest_of(directory: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    return document


def test_manifest_records_the_build(onnx_fp32: Path, checkpoint: Path) -> None:
    document = manifest_of(onnx_fp32)
    assert (document["engine_format"], document["precision"]) == ("onnx", "fp32")
    assert (document["max_batch"], document["max_seq"], document["semantics"]) == (4, 1024, "meta")
    assert document["config"] == json.loads((checkpoint / "config.json").read_text())
    source = document["source"]["files"]
    assert source["model.safetensors"] == sha256_file(checkpoint / "model.safetensors")
    assert document["tools"]["onnxruntime"] == importlib.metadata.version("onnxruntime")
    assert document["tools"]["torch"] == importlib.metadata.version("torch")
    # Every file is listed with its true size and hash; the graphs are among them.
    listed = {p.name for p in onnx_fp32.iterdir()} - {"manifest.json"}
    assert set(document["files"]) == listed
    for name, entry in document["files"].items():
        assert entry["sha256"] == sha256_file(onnx_fp32 / name)
    assert {"vision.onnx", "decoder.onnx", "tokenizer.json"} <= listed
    names = [t["name"] for t in document["graphs"]["decoder"]["inputs"]]
    assert names[:4] == ["input_ids", "position_ids", "past_kv", "cross_kv"]
    assert backend_for(onnx_fp32) == "onnx"
    assert backend_for(checkpoint) == "torch"


def test_parity_section_is_true(onnx_fp32: Path, checkpoint: Path, preparer: Preparer) -> None:
    """Recompute the build step's parity from the engine and the torch model: same numbers."""
    document = manifest_of(onnx_fp32)
    steps = {step["name"]: step for step in document["steps"]}
    assert list(steps) == ["convert", "quantize", "build"]
    assert steps["convert"]["parity"]["max_relative_logit_error"] == 0.0
    assert "skipped" in steps["quantize"]
    requests = probes(preparer)
    assert document["probes"] == {"count": len(requests), "sha256": probe_digest(requests)}
    model = load_model(checkpoint)
    model.setup_caches(1, 1024)
    manifest = read_manifest(onnx_fp32)
    graph = GraphSteps(
        OrtRunner(onnx_fp32, manifest, "cpu", 0), ModelConfig.from_dict(manifest.config), 1, 1024
    )
    reference = [probe_logits(TorchSteps(model), r) for r in requests]
    engine = [probe_logits(graph, r) for r in requests]
    tokens = requests[0].grammar.tokens
    measured = deviation(reference, engine, tokens.unsafe, tokens.safe)
    recorded = steps["build"]["parity"]
    assert recorded["max_relative_logit_error"] == pytest.approx(
        measured.max_relative_logit_error, rel=1e-3, abs=1e-9
    )
    assert recorded["max_relative_logit_error"] < 1e-4  # ONNX fp32 = torch within 1e-4
    assert recorded["verdicts_agree"] == recorded["probes"] == 8
    assert document["deviation"]["max_relative_logit_error"] < 1e-4


def test_int8_within_its_bound(onnx_int8: Path) -> None:
    """int8 weights (per channel, head kept): measured on this model (CPU) max relative logit
    error ≈2e-2 and |ΔP(unsafe)| ≈1e-7 (weight-only), 2.7e-2 / 1.3e-7 with int8 activations;
    the bounds (README) leave room for other platforms."""
    document = manifest_of(onnx_int8)
    quantization = document["quantization"]
    assert quantization["weights"] == "int8"
    assert quantization["compute"] == "weight-only"
    assert quantization["kept_full_precision"] == ["lm_head"]
    assert quantization["quantized_bytes"] < 0.3 * quantization["original_bytes"]
    for parity in (document["deviation"], *document["alternatives"].values()):
        assert 0 < parity["max_relative_logit_error"] < 0.05
        assert parity["max_abs_delta_p_unsafe"] < 1e-3
    build_step = document["steps"][2]["parity"]  # the graphs = the quantized torch model
    assert build_step["against"].startswith("quantize")
    assert build_step["max_relative_logit_error"] < 1e-4
    # The int8 weights are in the graph as int8 (the .data file is far smaller than fp32's).
    assert list(document["alternatives"]) == ["weight-only", "weight+activation"]
    assert document["alternatives"]["weight-only"] == document["deviation"]  # the engine's mode
    assert document["alternatives"]["weight+activation"] != document["deviation"]


def test_int8_graph_stores_int8_weights(onnx_int8: Path, onnx_fp32: Path, checkpoint: Path) -> None:
    onnx: Any = pytest.importorskip("onnx")
    graph = onnx.load(str(onnx_int8 / "decoder.onnx"), load_external_data=False)
    kinds = {i.data_type for i in graph.graph.initializer}
    assert onnx.TensorProto.INT8 in kinds
    ops = {node.op_type for node in graph.graph.node}
    assert "DequantizeLinear" in ops
    # The token embedding, the largest table after the head, is int8 too (one scale per row),
    # as the torch engine serves it: no fp32 (rows, hidden) table is left but the head's.
    text = ModelConfig.from_checkpoint(checkpoint).text
    table = [text.vocab_size + 8, text.hidden_size]
    tables = {
        i.name: i.data_type for i in graph.graph.initializer if list(i.dims) == table
    }  # the embedding's (vocab + 8 rows; the head has vocab rows)
    assert list(tables.values()) == [onnx.TensorProto.INT8], tables
    embedding = manifest_of(onnx_int8)["quantization"]["embedding"]
    assert embedding.startswith("int8, one fp32 scale per row")
    fp32 = (onnx_fp32 / "decoder.onnx.data").stat().st_size
    int8 = (onnx_int8 / "decoder.onnx.data").stat().st_size
    assert int8 < fp32


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _edit_manifest(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        document = manifest_of(directory)
        change(document)
        (directory / "manifest.json").write_text(json.dumps(document))

    return edit


def _rename_input(document: dict[str, Any]) -> None:
    document["graphs"]["decoder"]["inputs"][0]["name"] = "tokens"


CORRUPTIONS: dict[str, tuple[Callable[[Path], object], str]] = {
    "flipped byte": (lambda d: _flip_byte(d / "decoder.onnx.data"), "does not match its sha256"),
    "truncated": (
        lambda d: (d / "vision.onnx.data").write_bytes(b"\0" * 10),
        "has 10 bytes, the manifest says",
    ),
    "missing": (lambda d: (d / "decoder.onnx").unlink(), "decoder.onnx is missing"),
    "no manifest": (lambda d: (d / "manifest.json").unlink(), "not found"),
    "other config": (
        lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama"})),
        "config.json",
    ),
    "newer version": (
        _edit_manifest(lambda m: m.update(version=3)),
        "has version 3; this guardrt reads version 2",
    ),
    "older version": (  # version 1's decoder returned every logit, and no normaliser
        _edit_manifest(lambda m: m.update(version=1)),
        r"has version 1; this guardrt reads version 2 \(rebuild the engine",
    ),
    "tensorrt format": (
        _edit_manifest(lambda m: m.update(engine_format="tensorrt")),
        "holds a tensorrt engine, not onnx",
    ),
    "graph inputs": (_edit_manifest(_rename_input), "inputs .* are not the manifest's"),
    "bad precision": (
        _edit_manifest(lambda m: m.update(precision="int4")),
        "precision 'int4' is not one of",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_engine_refused(onnx_fp32: Path, tmp_path: Path, case: str) -> None:
    corrupt, message = CORRUPTIONS[case]
    directory = _copy(onnx_fp32, tmp_path / "engine")
    corrupt(directory)
    options = EngineOptions(directory, device="cpu", max_seq=1024)
    with pytest.raises(EngineDirError, match=message):
        load_engine("onnx", options)


def test_bad_build_options(checkpoint: Path, tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("x")
    out = tmp_path / "o"
    cases = {
        "is not a checkpoint directory": BuildOptions(tmp_path, tmp_path / "out"),
        "exists and is not empty": BuildOptions(checkpoint, occupied),
        "--precision 'int4'": BuildOptions(checkpoint, out, precision="int4"),
        "^--max-batch-size 0 must be ≥ 1$": BuildOptions(checkpoint, out, max_batch=0),
        "^--max-seq-len 63 must be ≥ 64$": BuildOptions(checkpoint, out, max_seq=63),
        "^--max-seq-len 131073 is over the model's 131072 positions": BuildOptions(
            checkpoint, out, max_seq=131_073
        ),
        "must not be the checkpoint": BuildOptions(checkpoint, checkpoint, force=True),
        "--int8-compute weight[+]activation is for --precision int8, not bf16": BuildOptions(
            checkpoint, out, precision="bf16", int8_compute="weight+activation"
        ),
        "is a file, not a directory": BuildOptions(checkpoint, occupied / "file", force=True),
        f"engine: {occupied / 'file'} is a file, not a directory": BuildOptions(
            checkpoint, occupied / "file" / "engine"
        ),
    }
    for message, options in cases.items():
        with pytest.raises(ExportError, match=message):
            build(options)
    assert not out.exists()
    assert (occupied / "file").read_text() == "x"


@pytest.mark.parametrize("allowed", [0, 1], ids=["first-refused", "second-refused"])
def test_an_output_the_build_cannot_write_is_refused_before_any_step(
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    allowed: int,
) -> None:
    """A directory the user may not write in (faked: these tests may run as root, who may),
    from the first scratch directory or the second: nothing is left behind either way."""
    steps: list[str] = []
    monkeypatch.setattr(build_module, "_build_into", lambda *args: steps.append("built"))
    make = tempfile.mkdtemp
    made: list[str] = []

    def refuse(**kwargs: Any) -> str:
        if len(made) < allowed:
            made.append(make(**kwargs))
            return made[-1]
        raise PermissionError(13, "Permission denied", kwargs["dir"])

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    code = main(["export", "build", "--model", str(checkpoint), "-o", str(tmp_path / "e")])
    assert code == 2
    error = capsys.readouterr().err
    expected = f"-o {tmp_path / 'e'}: cannot write in {tmp_path}: Permission denied"
    assert f"guardrt: error: {expected}" in error
    assert steps == []
    assert len(made) == allowed
    assert list(tmp_path.iterdir()) == []


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


def test_a_disk_too_small_for_the_engine_is_refused_before_any_step(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = {name: int(np.prod(e.shape)) for name, e in read_entries(checkpoint).items()}
    head = sizes.pop("language_model.lm_head.weight")
    int8_least = sum(sizes.values()) + 4 * head  # a byte a weight; the head kept in fp32
    steps: list[str] = []
    monkeypatch.setattr(build_module, "_build_into", lambda *args: steps.append("built"))
    free = int8_least - 1
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(10**12, 0, free))
    out = tmp_path / "new" / "e"  # its parent does not exist yet: measured where it would be
    shown = f"{(int8_least - 1) / 1e6:.1f} MB"
    with pytest.raises(ExportError, match=rf"-o {out}: {tmp_path} has {shown} free; the engine "):
        build(BuildOptions(checkpoint, out, precision="int8"))
    assert steps == []
    assert list(tmp_path.iterdir()) == []
    free = int8_least  # enough (a lower bound: the build may still need more, see below)
    build(BuildOptions(checkpoint, out, precision="int8"))
    assert steps == ["built"]
    with pytest.raises(ExportError, match="needs at least"):  # 4 bytes a weight
        build(BuildOptions(checkpoint, out, precision="fp32", force=True))
    # TensorRT keeps the ONNX graphs beside the plans (its build stops earlier here: no TensorRT)
    entries = read_entries(checkpoint).values()
    with pytest.raises(ExportError, match="needs at least"):
        scratch.check_free_space(out, scratch.least_engine_bytes(entries, "int8", "tensorrt"))


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError("Not enough free space to write 32833536 bytes after offset 8901152"),  # numpy
    ],
)
def test_a_disk_that_fills_during_the_build_is_named_and_cleaned_up(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    def fill_the_disk(scratch_dir: Path, *args: object) -> None:
        (scratch_dir / "decoder.onnx.data").write_bytes(b"x" * 10)
        raise error

    monkeypatch.setattr(build_module, "_build_into", fill_the_disk)
    out = tmp_path / "e"
    with pytest.raises(ExportError, match=rf"-o {out}: the disk filled up while the engine was "):
        build(BuildOptions(checkpoint, out, precision="int8"))
    assert list(tmp_path.iterdir()) == []  # the partial build is gone


def test_other_write_errors_keep_their_own_type(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "decoder.onnx")

    monkeypatch.setattr(build_module, "_build_into", fail)
    with pytest.raises(PermissionError):
        build(BuildOptions(checkpoint, tmp_path / "e", precision="int8"))


def test_tensorrt_format_fails_fast_without_tensorrt(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where TensorRT is absent, the command says so before any long step and leaves nothing."""
    try:
        importlib.metadata.version("tensorrt")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        pytest.skip("TensorRT is installed here: this checks the message where it is not")
    out = tmp_path / "trt"
    code = main(
        ["export", "build", "--model", str(checkpoint), "--format", "tensorrt", "-o", str(out)]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "guardrt[tensorrt]" in error
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_build_reports_steps(
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`guardrt export build` end to end (bf16: its graphs cannot run on ONNX Runtime's CPU
    provider, so the build step's parity says why it was not run). The graphs are traced in a
    child process: tracing in this one would fail."""

    def traced_here(*args: object) -> None:
        raise AssertionError("the graphs were traced in the build's own process")

    monkeypatch.setattr(engine_model, "export_graphs", traced_here)
    out = tmp_path / "bf16"
    stale = tmp_path / ".bf16-x1y2z3"  # a killed build's scratch directory
    stale.mkdir()
    with (stale / "decoder.onnx.data").open("wb") as data:
        data.truncate(300_000_000)  # sparse: its size counts, no disk is used
    code = main(
        [
            "export",
            "build",
            "--model",
            str(checkpoint),
            "--precision",
            "bf16",
            "-o",
            str(out),
            "--max-seq-len",
            "1024",
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    assert "[4/5] build: onnx graphs" in printed.err
    note = f"note: {stale} (0.3 GB) is left from an interrupted build of {out}; delete it"
    assert note in printed.err
    assert stale.is_dir()  # never removed: another build may be using it
    assert "convert   max rel logit err" in printed.out
    assert "build     NOT RUN: " in printed.out
    document = manifest_of(out)
    assert document["precision"] == "bf16"
    assert "not_run" in document["steps"][2]["parity"]
    convert = document["steps"][0]["parity"]
    assert 0 < convert["max_relative_logit_error"] < 0.05  # bf16 rounding vs fp32
    assert np.isfinite(convert["max_abs_delta_p_unsafe"])


def test_exporter_noise_silenced_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    """`guardrt export build` prints its steps, not torch's exporter's known noise; any other
    warning still shows."""
    registration = logging.getLogger(onnx_ops._REGISTRATION_LOG)
    with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        with onnx_ops._quiet_exporter():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, 1)
            warnings.warn("# The axis name: batch will not be used, since ...", UserWarning, 1)
            warnings.warn("something else", UserWarning, 1)
            registration.warning("torchvision is not installed. Skipping torchvision::nms")
            registration.error("a real registration failure")
        registration.warning("after the export")
    assert [str(w.message) for w in shown] == ["something else"]
    logged = [record.getMessage() for record in caplog.records if record.name == registration.name]
    assert logged == ["a real registration failure", "after the export"]
