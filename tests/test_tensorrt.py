"""The TensorRT build and back end without TensorRT: the profile shapes, the refusals where
TensorRT (or a GPU) is absent, and both sides driven through small fakes of `tensorrt` and of
cuda-python's runtime (tests/fake_tensorrt.py) that record what they were asked and move bytes in
host memory."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guardrt.export.build import BuildOptions, _engine_logits
from guardrt.export.decoder import decoder_spec
from guardrt.export.errors import ExportError
from guardrt.export.graphs import GraphSpec, vision_spec
from guardrt.export.progress import Progress
from guardrt.export.tensorrt_build import (
    TIMING_CACHE,
    WORKSPACE_BYTES,
    ProfileLimits,
    build_plans,
    limits_for,
    profile_shapes,
    require_tensorrt,
)
from guardrt.runtime.engine import EngineOptions, load_engine
from guardrt.runtime.engine import tensorrt_engine as te
from guardrt.runtime.engine.cuda_memory import Cuda
from guardrt.runtime.engine.manifest import (
    FORMAT,
    VERSION,
    EngineDirError,
    GraphEntry,
    Manifest,
    TensorSpec,
    file_entries,
    parse_manifest,
    write_manifest,
)
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.config import ModelConfig
from tests.fake_tensorrt import (
    FakeCudart,
    FakeEngine,
    FakeLogger,
    FakeTrt,
    decoder_compute,
    fetch,
    vision_compute,
)
from tests.models import small_config, write_small

_CONFIG = small_config("gqa2-cross2,4")


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GraphSpec]:
    directory = write_small(tmp_path_factory.mktemp("trt-model"), _CONFIG, 17)
    model = load_model(directory)
    return {
        "vision": vision_spec(model, directory / "vision.onnx"),
        "decoder": decoder_spec(model, directory / "decoder.onnx"),
    }


# --- profiles -------------------------------------------------------------------------------


def test_decoder_profile(specs: dict[str, GraphSpec]) -> None:
    limits = limits_for(specs, max_batch=4, max_seq=8192, vocab_size=128256)
    assert limits.image_keys == 20  # 4 tiles × 5 patches
    shapes = profile_shapes(specs["decoder"], limits)
    assert list(shapes) == [t.name for t in specs["decoder"].inputs]
    assert shapes["input_ids"] == ((1, 1), (1, 512), (4, 8192))
    # (Ls, 2, batch, Hkv, past, d): a prefill's past is empty, so the minimum is 0.
    assert shapes["past_kv"] == ((3, 2, 1, 2, 0, 8), (3, 2, 1, 2, 0, 8), (3, 2, 4, 2, 8192, 8))
    # (C, 2, batch, Hkv, image_keys, d): 1 key (zeros) for text, tuned for an image.
    assert shapes["cross_kv"] == ((2, 2, 1, 2, 1, 8), (2, 2, 1, 2, 20, 8), (2, 2, 4, 2, 20, 8))
    assert shapes["image_start"] == ((1,), (1,), (4,))
    assert shapes["logit_index"] == ((1, 1), (1, 2), (4, 16))
    assert shapes["vocab"] == ((1,), (32,), (128256,))  # tuned for a constrained step's ~20


def test_vision_profile(specs: dict[str, GraphSpec]) -> None:
    shapes = profile_shapes(specs["vision"], ProfileLimits(3, 1024, 20, 128256))
    assert shapes["pixel_values"] == ((1, 4, 3, 28, 28), (1, 4, 3, 28, 28), (3, 4, 3, 28, 28))
    assert shapes["aspect_ratio_mask"] == ((1, 4), (1, 4), (3, 4))


def test_profile_limits_small_sequence() -> None:
    ranges = ProfileLimits(max_batch=1, max_seq=64, image_keys=20, vocab_size=16).ranges()
    assert (ranges["tokens"].min, ranges["tokens"].opt, ranges["tokens"].max) == (1, 64, 64)
    vocab = ranges["vocab_ids"]
    assert (vocab.min, vocab.opt, vocab.max) == (1, 16, 16)
    assert all(r.min <= r.opt <= r.max for r in ranges.values())


def test_profile_refuses_an_unknown_dim(tmp_path: Path) -> None:
    spec = GraphSpec(tmp_path / "g.onnx", (TensorSpec("x", "float32", ("frames", 3)),), ())
    with pytest.raises(ExportError, match="'frames'"):
        profile_shapes(spec, ProfileLimits(1, 64, 1, 16))


# --- refusals without TensorRT --------------------------------------------------------------


def test_require_tensorrt_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt → ImportError
    with pytest.raises(ExportError) as info:
        require_tensorrt()
    assert "pip install 'guardrt[tensorrt]'" in str(info.value)
    assert "NVIDIA GPU" in str(info.value)
    assert "--format onnx" in str(info.value)


@pytest.mark.parametrize(("device", "index"), [("auto", 0), ("cuda", 0), ("cuda:3", 3)])
def test_cuda_device_index(device: str, index: int) -> None:
    assert te.cuda_device_index(device) == index


@pytest.mark.parametrize("device", ["cpu", "cuda:x", "gpu", "cuda:"])
def test_cuda_device_index_refuses(device: str) -> None:
    with pytest.raises(ConfigError, match="NVIDIA GPUs only" if device == "cpu" else "cuda:N"):
        te.cuda_device_index(device)


def _engine_dir(directory: Path, specs: dict[str, GraphSpec], plans: dict[str, bytes]) -> Path:
    """A TensorRT engine directory with the given plan bytes and a manifest listing them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(_CONFIG))
    for name, blob in plans.items():
        (directory / f"{name}.plan").write_bytes(blob)
    document = _document(specs) | {"files": file_entries(directory)}
    parse_manifest(document)
    write_manifest(directory, document)
    return directory


def _document(specs: dict[str, GraphSpec]) -> dict[str, Any]:
    graphs = {
        name: {
            "file": f"{name}.plan",
            "inputs": [t.to_json() for t in spec.inputs],
            "outputs": [t.to_json() for t in spec.outputs],
        }
        for name, spec in specs.items()
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "engine_format": "tensorrt",
        "precision": "fp32",
        "quantization": None,
        "semantics": "meta",
        "max_batch": 2,
        "max_seq": 256,
        "config": _CONFIG,
        "graphs": graphs,
        "files": {},
    }


def _manifest(specs: dict[str, GraphSpec]) -> Manifest:
    return parse_manifest(_document(specs))


def test_engine_refuses_without_tensorrt(
    tmp_path: Path, specs: dict[str, GraphSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = _engine_dir(tmp_path / "engine", specs, {"vision": b"v", "decoder": b"d"})
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ConfigError, match=r"pip install 'guardrt\[tensorrt\]'"):
        load_engine("tensorrt", EngineOptions(directory, device="cuda", max_batch=2, max_seq=256))
    with pytest.raises(ConfigError, match="NVIDIA GPUs only"):
        load_engine("tensorrt", EngineOptions(directory, device="cpu", max_batch=2, max_seq=256))
    with pytest.raises(ConfigError, match="exceeds the 2"):  # bounded by the built profiles
        load_engine("tensorrt", EngineOptions(directory, device="cuda", max_batch=3, max_seq=256))


def _options(tmp_path: Path) -> BuildOptions:
    return BuildOptions(model=tmp_path, output=tmp_path / "out", max_batch=2, max_seq=128)


def _build_files(specs: dict[str, GraphSpec], root: Path) -> dict[str, GraphSpec]:
    """The specs, their ONNX files made (empty) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    placed = {}
    for name, spec in specs.items():
        path = root / spec.path.name
        path.write_bytes(b"")
        placed[name] = GraphSpec(path, spec.inputs, spec.outputs)
    return placed


def test_build_plans(
    tmp_path: Path, specs: dict[str, GraphSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARDRT_CACHE", str(tmp_path / "cache"))
    placed = _build_files(specs, tmp_path / "work")
    trt = FakeTrt(placed)
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    progress = Progress(1, io.StringIO())
    work, options = tmp_path / "work", _options(tmp_path)
    summary = build_plans(trt, placed, engine_dir, work, options, progress, vocab_size=128256)

    assert (engine_dir / "vision.plan").read_bytes() == b"plan of vision"
    assert (engine_dir / "decoder.plan").read_bytes() == b"plan of decoder"
    vision, decoder = trt.builds
    limits = ProfileLimits(max_batch=2, max_seq=128, image_keys=20, vocab_size=128256)
    for calls, name in ((vision, "vision"), (decoder, "decoder")):
        assert calls["flags"] == 1 << 1  # STRONGLY_TYPED, and no other flag
        assert calls["onnx"] == str(placed[name].path)
        assert calls["pool"] == (FakeTrt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        assert calls["profiles"] == [profile_shapes(placed[name], limits)]
    assert decoder["profiles"][0]["past_kv"][0][4] == 0
    assert "TensorRT 10.99.0, strongly typed" in summary
    assert "past 0..128 (opt 0)" in summary
    # The timing cache: none at first, then each build starts from the one saved before it.
    cache = tmp_path / "cache" / TIMING_CACHE
    assert vision["timing_blobs"] == [b""]
    assert decoder["timing_blobs"] == [b"+timed"]
    assert cache.read_bytes() == b"+timed+timed"


def test_build_plans_replaces_a_foreign_timing_cache(
    tmp_path: Path, specs: dict[str, GraphSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARDRT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / TIMING_CACHE).write_bytes(b"from another GPU")
    placed = _build_files(specs, tmp_path / "work")
    trt = FakeTrt(placed)
    (tmp_path / "engine").mkdir()
    progress = Progress(1, io.StringIO())
    work, options = tmp_path / "work", _options(tmp_path)
    build_plans(trt, placed, tmp_path / "engine", work, options, progress, vocab_size=128256)
    assert trt.builds[0]["timing_blobs"] == [b"from another GPU", b""]
    assert (tmp_path / "cache" / TIMING_CACHE).read_bytes() == b"+timed+timed"


def test_build_plans_names_parser_errors(
    tmp_path: Path, specs: dict[str, GraphSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARDRT_CACHE", str(tmp_path / "cache"))
    placed = _build_files(specs, tmp_path / "work")
    progress = Progress(1, io.StringIO())
    with pytest.raises(ExportError, match=r"vision.onnx: node '/layers.0/Attention' \(FancyOp\)"):
        build_plans(
            FakeTrt(placed, fail_parse=True),
            placed,
            tmp_path,
            tmp_path / "work",
            _options(tmp_path),
            progress,
            vocab_size=128256,
        )
    assert not (tmp_path / "vision.plan").exists()


@pytest.fixture
def fakes(
    specs: dict[str, GraphSpec], monkeypatch: pytest.MonkeyPatch
) -> tuple[FakeTrt, FakeCudart]:
    trt, cudart = FakeTrt(specs), FakeCudart()
    limits = ProfileLimits(max_batch=2, max_seq=256, image_keys=20, vocab_size=128256)
    trt.engines[b"vision"] = FakeEngine(specs["vision"], vision_compute, limits)
    trt.engines[b"decoder"] = FakeEngine(specs["decoder"], decoder_compute, limits)
    monkeypatch.setattr(te, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(te, "import_cudart", lambda: cudart)
    return trt, cudart


def _decoder_feeds(past: int, tokens: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.array([[5, 6, 7][:tokens], [8, 9, 10][:tokens]], np.int64),
        "position_ids": np.arange(past, past + tokens, dtype=np.int64)[None].repeat(2, 0),
        "past_kv": np.zeros((3, 2, 2, 2, past, 8), np.float32),
        "cross_kv": np.zeros((2, 2, 2, 2, 1, 8), np.float32),
        "image_start": np.array([256, 256], np.int64),
        "num_tiles": np.array([0, 0], np.int64),
        "logit_index": np.array([[0, tokens - 1], [tokens - 1, 0]], np.int64),
        "vocab": np.array([0, 7, 128255], np.int64),
    }


def test_trt_runner_runs_both_plans(
    tmp_path: Path, specs: dict[str, GraphSpec], fakes: tuple[FakeTrt, FakeCudart]
) -> None:
    _, cudart = fakes
    plans = {"vision": b"vision", "decoder": b"decoder"}
    directory = _engine_dir(tmp_path / "engine", specs, plans)
    runner = te.TrtRunner(directory, _manifest(specs), "cuda:1")
    assert cudart.device == 1
    assert runner.device == "cuda:1 (TensorRT 10.99.0)"

    kv = runner.vision(
        np.zeros((2, 4, 3, 28, 28), np.float32),
        np.array([3, 6], np.int64),
        np.array([[1, 0, 0, 0], [1, 1, 1, 1]], np.int64),
    )
    assert kv.shape == (2, 2, 2, 2, 20, 8)
    assert (fetch(kv)[:, :, 0] == 4).all()  # id 3 + 1 tile: the K/V stay on the GPU
    assert (fetch(kv)[:, :, 1] == 10).all()  # id 6 + 4 tiles
    assert "cudaMemcpyDeviceToHost" not in cudart.copies

    head, present = runner.decoder(_decoder_feeds(past=0, tokens=3))  # empty past: 0 bytes
    assert head.logits.shape == (2, 2, 3)  # the ids asked for only
    assert head.logits[:, :, 0].tolist() == [[5, 7], [10, 8]]
    assert np.allclose(head.normaliser, head.logits[:, :, 0] + np.log(128256))
    assert present.shape == (3, 2, 2, 2, 3, 8)
    assert fetch(present)[0, 0, 1, 0, :, 0].tolist() == [0, 1, 2]
    assert cudart.copies.count("cudaMemcpyDeviceToHost") == 2  # the head's logits, normalisers

    mallocs = len(cudart.mallocs)
    for past in (3, 4, 5):  # decode steps: the past K/V grows a position each, buffers double
        head, present = runner.decoder(_decoder_feeds(past=past, tokens=1))
        assert fetch(present)[0, 0, 0, 0, :, 0].tolist() == [2 * past]
    # past_kv grew at 3 positions and at 4 (doubling to 6), not at 5; nothing else grew
    assert len(cudart.mallocs) - mallocs == 2

    # A K/V input already on the GPU is bound where it is: no copy.
    copies = len(cudart.copies)
    feeds = _decoder_feeds(past=0, tokens=1) | {"past_kv": present}
    head, present = runner.decoder(feeds)
    assert cudart.copies[copies:].count("cudaMemcpyHostToDevice") == 7  # the other inputs
    # position 0 + a past of 1 position + the sum of that past: 192 values of 2·5
    assert fetch(present)[0, 0, 0, 0, :, 0].tolist() == [0 + 1 + 192 * 10]

    runner.close()
    assert not cudart.live  # every device buffer freed


def test_plan_binds_a_scalar_input_as_a_scalar(tmp_path: Path) -> None:
    """A 0-D input keeps shape () (np.ascontiguousarray made it (1,), outside the profile) and
    a strided one is copied contiguous."""
    spec = GraphSpec(
        tmp_path / "scaled.onnx",
        inputs=(TensorSpec("scale", "float32", ()), TensorSpec("x", "float32", ("batch",))),
        outputs=(TensorSpec("y", "float32", ("batch",)),),
    )
    trt, cudart = FakeTrt({}), FakeCudart()
    limits = ProfileLimits(max_batch=4, max_seq=8, image_keys=1, vocab_size=8)
    trt.engines[b"scaled"] = FakeEngine(spec, lambda f: {"y": f["x"] * f["scale"]}, limits)
    (tmp_path / "scaled.plan").write_bytes(b"scaled")
    cuda = Cuda(cudart, 0)
    entry = GraphEntry("scaled.plan", spec.inputs, spec.outputs)
    plan = te.Plan(trt, trt.Runtime(FakeLogger("WARNING")), cuda, tmp_path / "scaled.plan", entry)
    stream = cuda.stream()
    strided = np.arange(8, dtype=np.float32)[::2]  # (4,), not contiguous
    host, _ = plan.run({"scale": np.array(3, np.float32), "x": strided}, stream)
    assert plan.context.shapes["scale"] == ()
    assert host["y"].tolist() == [0, 6, 12, 18]
    plan.close()
    assert not cudart.live


def test_trt_runner_refuses_shapes_outside_the_profile(
    tmp_path: Path, specs: dict[str, GraphSpec], fakes: tuple[FakeTrt, FakeCudart]
) -> None:
    directory = _engine_dir(
        tmp_path / "engine", specs, {"vision": b"vision", "decoder": b"decoder"}
    )
    runner = te.TrtRunner(directory, _manifest(specs), "cuda")
    feeds = _decoder_feeds(past=0, tokens=3) | {"logit_index": np.zeros((2, 17), np.int64)}
    with pytest.raises(te.DeviceError, match=r"logit_index shape \(2, 17\) is outside"):
        runner.decoder(feeds)
    with pytest.raises(ValueError, match="input_ids is int32, not int64"):
        runner.decoder(_decoder_feeds(0, 3) | {"input_ids": np.zeros((2, 3), np.int32)})


def test_trt_runner_checks_the_engines_against_the_manifest(
    tmp_path: Path, specs: dict[str, GraphSpec], fakes: tuple[FakeTrt, FakeCudart]
) -> None:
    trt, _ = fakes
    directory = _engine_dir(tmp_path / "engine", specs, {"vision": b"vision", "decoder": b"d16"})
    half = tuple(
        TensorSpec(t.name, "float16", t.shape) if t.name == "past_kv" else t
        for t in specs["decoder"].inputs
    )
    limits = ProfileLimits(2, 256, 20, 128256)
    trt.engines[b"d16"] = FakeEngine(
        GraphSpec(specs["decoder"].path, half, specs["decoder"].outputs), decoder_compute, limits
    )
    with pytest.raises(EngineDirError, match=r"input past_kv is DataType.HALF, the manifest says"):
        te.TrtRunner(directory, _manifest(specs), "cuda")
    (directory / "decoder.plan").write_bytes(b"garbage")
    with pytest.raises(EngineDirError, match="cannot load"):
        te.TrtRunner(directory, _manifest(specs), "cuda")


def test_trt_runner_reports_cuda_errors(
    tmp_path: Path, specs: dict[str, GraphSpec], fakes: tuple[FakeTrt, FakeCudart]
) -> None:
    _, cudart = fakes
    directory = _engine_dir(
        tmp_path / "engine", specs, {"vision": b"vision", "decoder": b"decoder"}
    )
    runner = te.TrtRunner(directory, _manifest(specs), "cuda")
    cudart.fail_malloc = True
    with pytest.raises(
        te.DeviceError, match=r"cudaMalloc.* cuda:0 failed: cudaErrorMemoryAllocation"
    ):
        runner.decoder(_decoder_feeds(0, 3))


def test_tensorrt_engine_loads_and_closes(
    tmp_path: Path, specs: dict[str, GraphSpec], fakes: tuple[FakeTrt, FakeCudart]
) -> None:
    _, cudart = fakes
    directory = _engine_dir(
        tmp_path / "engine", specs, {"vision": b"vision", "decoder": b"decoder"}
    )
    engine = load_engine(
        "tensorrt", EngineOptions(directory, device="auto", max_batch=2, max_seq=256)
    )
    assert (engine.info.backend, engine.info.device) == ("tensorrt", "cuda:0 (TensorRT 10.99.0)")
    engine.close()
    assert not cudart.live


def test_tensorrt_engine_refuses_to_load_without_room_for_the_image_cache(
    tmp_path: Path, specs: dict[str, GraphSpec], fakes: tuple[FakeTrt, FakeCudart]
) -> None:
    """The image K/V cache is allocated at load: too large for the GPU, the engine does not
    load (rather than failing every image later), says why, and frees what it held."""
    _, cudart = fakes
    directory = _engine_dir(
        tmp_path / "engine", specs, {"vision": b"vision", "decoder": b"decoder"}
    )
    cudart.max_malloc = 3 * 5120 - 1  # a row: 2 cross layers × K, V × 2 heads × 20 keys × 8 × 4 B
    options = EngineOptions(directory, device="cuda", max_batch=2, max_seq=256, max_sessions=1)
    with pytest.raises(
        ConfigError,
        match=r"image K/V cache does not fit: 3 rows × 5,120 bytes \(cudaMalloc\(15360\).*"
        r"cudaErrorMemoryAllocation.*smaller --max-batch-size or --max-sessions$",
    ):
        load_engine("tensorrt", options)
    assert not cudart.live
    cudart.max_malloc = 3 * 5120  # 2 batch rows, 1 session row (a prefix row has none): fits
    load_engine("tensorrt", options).close()
    assert not cudart.live


def test_build_parity_not_run_when_the_caches_do_not_fit() -> None:
    """The build's parity probes run the engine as it serves (its runner's caches); where
    those cannot be made on this GPU, parity is recorded as not run, with the reason, and the
    runner is closed."""

    class Runner:
        closed = False

        def steps(
            self, config: ModelConfig, rows: int, max_seq: int, image_rows: int | None = None
        ) -> Any:
            raise ConfigError("the image K/V cache does not fit: 1 rows × 420 MB")

        def close(self) -> None:
            self.closed = True

    runner = Runner()
    config = ModelConfig.from_dict(_CONFIG)
    logits, why = _engine_logits(lambda: runner, config, [], 256, Progress(1, io.StringIO()))
    assert logits is None
    assert why == "the image K/V cache does not fit: 1 rows × 420 MB"
    assert runner.closed
