"""The TensorRT back end's GPU-resident K/V caches (`DeviceSteps`, `Cuda.copy_rows`): the same
steps as the host caches of `GraphSteps`, the same results and the same cache contents, bit for
bit. On a fake of cuda-python whose "device" memory is host memory and which refuses any copy
outside an allocation or a pitch; and where cuda-python and a GPU are present (the GPU check
carries cuda-bindings), on the GPU through the real CUDA runtime."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guardrt.export.graphs import GraphSpec
from guardrt.export.tensorrt_build import limits_for
from guardrt.runtime.engine import EngineOptions, load_engine
from guardrt.runtime.engine import tensorrt_engine as te
from guardrt.runtime.engine.cuda_memory import Cuda, DeviceArray, DeviceBuffers, RowRun
from guardrt.runtime.engine.device_steps import DeviceSteps, position_runs
from guardrt.runtime.engine.graph_steps import GraphSteps, HeadScores, vision_feeds
from guardrt.runtime.engine.manifest import file_entries, parse_manifest, write_manifest
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.preprocess import TiledImage
from tests.fake_tensorrt import FakeCudart, FakeEngine, FakeTrt
from tests.models import image, small_config
from tests.test_onnx_engine import checked_in_session, onnx_engine, requests

CONFIG = ModelConfig.from_dict(small_config("gqa2-cross2,4"))
VOCAB = 16
F32 = np.dtype(np.float32)


@pytest.mark.parametrize(
    ("positions", "runs"),
    [
        ([0, 1, 2], [(0, 0, 3)]),
        ([7], [(0, 7, 1)]),
        ([5, 6, 7, 7, 7], [(0, 5, 2), (4, 7, 1)]),  # pads stopped at the last position
        ([3, 4, 9, 10], [(0, 3, 2), (2, 9, 2)]),
        ([2, 1, 0], [(2, 0, 1), (1, 1, 1), (0, 2, 1)]),
        ([], []),
    ],
)
def test_position_runs(positions: list[int], runs: list[tuple[int, int, int]]) -> None:
    assert position_runs(positions) == runs


@pytest.fixture(params=["fake", "gpu"])
def cuda(request: pytest.FixtureRequest) -> Cuda:
    """cuda-python's runtime on GPU 0, or its fake."""
    if request.param == "fake":
        return Cuda(FakeCudart(), 0)
    try:
        runtime = importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        pytest.skip("needs cuda-python (cuda-bindings) and a GPU")
    error, count = runtime.cudaGetDeviceCount()
    if error != runtime.cudaError_t.cudaSuccess or not count:
        pytest.skip(f"cuda-python sees no GPU ({getattr(error, 'name', error)})")
    return Cuda(runtime, 0)


def _upload(cuda: Cuda, array: np.ndarray) -> DeviceArray:
    on_device = DeviceArray(cuda.malloc(array.nbytes), array.shape, array.dtype)
    cuda.to_device(on_device.pointer, np.ascontiguousarray(array), 0)
    cuda.synchronize(0)
    return on_device


def _download(cuda: Cuda, array: DeviceArray) -> np.ndarray:
    host = np.empty(array.shape, array.dtype)
    cuda.synchronize(0)
    cuda.to_host(host, array.pointer, 0)
    cuda.synchronize(0)
    return host


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_copy_rows_is_slicing(cuda: Cuda, dtype: type) -> None:
    rng = np.random.default_rng(0)
    src: np.ndarray = rng.standard_normal((6, 5, 3, 11, 4)).astype(
        dtype
    )  # (slices, rows, Hkv, P, d)
    dst: np.ndarray = rng.standard_normal((6, 2, 3, 7, 4)).astype(dtype)
    on_src, on_dst = _upload(cuda, src), _upload(cuda, dst)
    for (to_row, to_start), (from_row, from_start), count, rows in (
        ((0, 0), (4, 2), 7, 1),  # a whole destination row
        ((1, 3), (0, 10), 1, 1),  # the last source position
        ((1, 0), (2, 0), 0, 1),  # nothing
        ((0, 1), (3, 4), 5, 2),  # two consecutive rows at once
    ):
        to_run, from_run = (
            RowRun(to_row, to_start, count, rows),
            RowRun(from_row, from_start, count, rows),
        )
        cuda.copy_rows(on_dst, to_run, on_src, from_run, 0)
        dst[:, to_row : to_row + rows, :, to_start : to_start + count] = src[
            :, from_row : from_row + rows, :, from_start : from_start + count
        ]
        assert np.array_equal(_download(cuda, on_dst), dst)
    assert np.array_equal(_download(cuda, on_src), src)  # the source untouched
    cuda.free(on_src.pointer)
    cuda.free(on_dst.pointer)


def test_copy_rows_refuses() -> None:
    cuda = Cuda(FakeCudart(), 0)
    a = _upload(cuda, np.zeros((4, 2, 3, 8, 4), np.float32))
    b = _upload(cuda, np.zeros((4, 3, 3, 5, 4), np.float32))
    with pytest.raises(IndexError, match="outside K/V of shape"):
        cuda.copy_rows(a, RowRun(0, 4, 5), b, RowRun(0, 0, 5), 0)  # positions 4..8 of 8
    with pytest.raises(IndexError, match="outside K/V of shape"):
        cuda.copy_rows(a, RowRun(2, 0, 1), b, RowRun(0, 0, 1), 0)  # row 2 of 2
    with pytest.raises(IndexError, match="outside K/V of shape"):
        cuda.copy_rows(a, RowRun(1, 0, 1, rows=2), b, RowRun(0, 0, 1, rows=2), 0)  # rows 1, 2
    with pytest.raises(ValueError, match="differ in size"):
        cuda.copy_rows(a, RowRun(0, 0, 2), b, RowRun(0, 0, 3), 0)
    with pytest.raises(ValueError, match="differ in size"):
        cuda.copy_rows(a, RowRun(0, 0, 2, rows=2), b, RowRun(0, 0, 2), 0)
    c = _upload(cuda, np.zeros((4, 2, 2, 8, 4), np.float32))
    with pytest.raises(ValueError, match="cannot copy K/V rows"):
        cuda.copy_rows(a, RowRun(0, 0, 1), c, RowRun(0, 0, 1), 0)


# --- the same computation, on host caches and on device caches ----------------------------


def _vision(ids: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(C, 2, N, Hkv, L, d): distinct in every element, and per image."""
    text = CONFIG.text
    shape = (len(text.cross_attention_layers), 2, len(ids), text.num_kv_heads, 20, text.head_dim)
    pattern = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 4096
    image = (ids * 10 + masks.sum(1)).astype(np.float32)  # (N,)
    kv: np.ndarray = pattern + image[None, None, :, None, None, None]
    return kv


def _decoder(feeds: dict[str, np.ndarray]) -> tuple[HeadScores, np.ndarray]:
    """logits (B, R, VOCAB): the token at each logit index, and fingerprints of the row's past
    and image K/V (a K/V row gathered from the wrong place changes them), at `vocab`'s ids,
    with their log-sum-exp; present_kv: the token and position, plus where in (layer, K/V,
    head, d) it lies."""
    ids, positions, rows = feeds["input_ids"], feeds["position_ids"], feeds["logit_index"]
    past, cross = feeds["past_kv"], feeds["cross_kv"]
    batch = len(ids)
    logits = np.zeros((batch, rows.shape[1], VOCAB), np.float32)
    logits[:, :, 0] = np.take_along_axis(ids, rows, axis=1)
    for b in range(batch):
        for column, kv in ((1, past[:, :, b]), (2, cross[:, :, b])):
            weights = np.arange(kv.size, dtype=np.float64).reshape(kv.shape) % 97 + 1
            logits[b, :, column] = np.float32((kv * weights).sum(dtype=np.float64))
    text = CONFIG.text
    shape = (len(text.self_attention_layers), 2, text.num_kv_heads, text.head_dim)
    where = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 128
    token = (ids % 64 * 1024 + positions).astype(np.float32)  # (B, S)
    present = token[None, None, :, None, :, None] + where[:, :, None, :, None, :]
    normaliser = np.log(np.exp(logits.astype(np.float64)).sum(-1)).astype(np.float32)  # (B, R)
    head = HeadScores(logits[..., feeds["vocab"]], normaliser)
    return head, present.astype(np.float32)  # (Ls, 2, B, Hkv, S, d)


class HostRunner:
    def vision(self, pixels: np.ndarray, ids: np.ndarray, masks: np.ndarray) -> np.ndarray:
        return _vision(ids, masks)

    def decoder(self, feeds: dict[str, np.ndarray]) -> tuple[HeadScores, np.ndarray]:
        return _decoder(feeds)


class DeviceRunner:
    """`_vision` and `_decoder` with their K/V in device memory."""

    def __init__(self, cuda: Cuda) -> None:
        self.cuda, self.stream = cuda, cuda.stream()
        self.buffers = DeviceBuffers(self.cuda)

    def _put(self, name: str, array: np.ndarray) -> DeviceArray:
        out = self.buffers.array(name, array.shape, array.dtype)
        self.cuda.to_device(out.pointer, np.ascontiguousarray(array), self.stream)
        self.cuda.synchronize(self.stream)  # `array` is a temporary
        return out

    def vision(self, pixels: np.ndarray, ids: np.ndarray, masks: np.ndarray) -> DeviceArray:
        assert vision_feeds(pixels, ids, masks)["pixel_values"].ndim == 5
        return self._put("cross_kv", _vision(ids, masks))

    def decoder(self, feeds: Any) -> tuple[HeadScores, DeviceArray]:
        assert isinstance(feeds["past_kv"], DeviceArray)  # K/V never pass through the host
        assert isinstance(feeds["cross_kv"], DeviceArray)
        host = {
            name: _download(self.cuda, value) if isinstance(value, DeviceArray) else value
            for name, value in feeds.items()
        }
        head, present = _decoder(host)
        return head, self._put("present_kv", present)


def _step(steps: Any, slots: list[int], positions: list[list[int]], tiles: list[int]) -> Any:
    ids = np.asarray(positions, np.int64) * 7 % 50 + 3  # (B, S)
    return steps.step(
        ids,
        np.asarray(positions, np.int64),
        np.asarray(slots, np.int64),
        np.full(len(slots), 2, np.int64),
        np.asarray(tiles, np.int64),
        np.asarray([[len(row) - 1, 0] for row in positions], np.int64),
        vocab=np.asarray([0, 1, 2, 5], np.int64),
        log_probs=len(positions[0]) > 1,  # prefills' (as in constrained decoding)
    )


def _images() -> list[TiledImage]:
    return [image(2, seed=1), image(4, seed=2), image(1, seed=3)]


def _script(steps: Any) -> list[np.ndarray]:
    """Prefills with pads, decode steps, images written and cleared, a row copied, growth past
    the first capacity, pads stopped at the last position, all-text batches."""
    first, second, third = _images()
    out = []
    steps.write_images([0, 1], [first, second])
    out.append(_step(steps, [0, 1], [list(range(7)), [0, 1, 2, 3, 4, 5, 6]], [2, 4]))
    for position in (7, 8, 9):  # decode steps reuse the same image feed
        out.append(_step(steps, [0, 1], [[position], [position]], [2, 4]))
    steps.copy_kv(0, 3, 8)
    out.append(_step(steps, [3], [[8, 9]], [0]))  # an all-text batch
    steps.clear_images([1])
    steps.write_images([2], [third])
    out.append(_step(steps, [1, 2, 0], [[10, 11], [0, 1], [10, 11]], [0, 1, 2]))
    out.append(_step(steps, [2], [list(range(2, 300))], [1]))  # grows to 512 positions
    out.append(_step(steps, [1, 2], [[12], [300]], [0, 1]))
    last = steps.max_seq - 1
    out.append(_step(steps, [0], [[last - 2, last - 1, last, last, last]], [2]))
    out.append(_step(steps, [0, 3], [[10], [10]], [0, 0]))  # reads what the row 0 pads left
    # Row 3 holds no image (a shared prefix's row): beside image rows it is fed zeros.
    steps.clear_images([3])  # (nothing to clear)
    out.append(_step(steps, [3, 2, 0], [[12], [301], [11]], [0, 1, 2]))
    out.append(_step(steps, [3, 2, 0], [[13], [302], [12]], [0, 1, 2]))  # the feed kept
    with pytest.raises(ValueError, match=r"cache rows \[3\] hold no image"):
        steps.write_images([3], [first])
    return out


def test_device_steps_match_host_steps(cuda: Cuda) -> None:
    runner = DeviceRunner(cuda)
    host = GraphSteps(HostRunner(), CONFIG, rows=4, max_seq=600, image_rows=3)
    device = DeviceSteps(runner, CONFIG, rows=4, max_seq=600, image_rows=3)
    on_host = _script(host)
    for a, b in zip(on_host, _script(device), strict=True):
        assert a.dtype == b.dtype == np.float32
        assert np.array_equal(a, b)
    beside_images = on_host[-1]  # (B, R, 4): column 2 fingerprints each row's image feed
    assert (beside_images[0, :, 2] == 0).all()  # row 3: zeros
    assert (beside_images[1:, :, 2] != 0).all()
    assert host.cross_kv is not None
    assert host.cross_kv.shape[2] == 3  # image rows only
    # and the caches themselves, every row and position
    self_kv = _download(cuda, device._self)  # (Ls·2, rows, Hkv, capacity, d)
    assert self_kv.shape[3] == host.self_kv.shape[4] == 600
    assert np.array_equal(self_kv, host.self_kv.reshape(self_kv.shape))
    assert device._images is not None
    images = _download(cuda, device._images)
    assert np.array_equal(images, host.cross_kv.reshape(images.shape))
    device.release()
    if isinstance(cuda.rt, FakeCudart):  # the caches and feeds are freed: the runner's are left
        assert set(cuda.rt.live) == {pointer for pointer, _ in runner.buffers.buffers.values()}
    runner.buffers.release()


def test_device_steps_copy_no_image_kv_in_decode_steps() -> None:
    """After an image prefill, the decode steps of the same rows copy no image K/V: the
    `cross_kv` feed is kept until an image changes. One 3-D copy gathers the past of
    consecutive cache rows, and one per row and run of positions stores the step."""
    cudart = FakeCudart()
    steps = DeviceSteps(DeviceRunner(Cuda(cudart, 0)), CONFIG, rows=3, max_seq=600)
    first, second, _ = _images()
    steps.write_images([0, 1], [first, second])
    _step(steps, [0, 1], [list(range(5)), list(range(5))], [2, 4])
    copies = len(cudart.copies)
    _step(steps, [0, 1], [[5], [5]], [2, 4])
    # past: rows 0 and 1 at once; present: 2 rows; no image K/V gathered
    assert cudart.copies[copies:].count("3d") == 3
    steps.clear_images([1])  # an image changed: the next step gathers again (rows 0, 1 at once)
    copies = len(cudart.copies)
    _step(steps, [0, 1], [[6], [6]], [2, 0])
    assert cudart.copies[copies:].count("3d") == 4
    copies = len(cudart.copies)
    _step(steps, [2, 0], [[0], [7]], [0, 2])  # rows 2 and 0 are not consecutive: two copies
    assert cudart.copies[copies:].count("3d") == 2 + 2 + 2


# --- through the TensorRT back end: plans that compute with ONNX Runtime -------------------


def _trt_twin(onnx_dir: Path, directory: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A TensorRT engine directory whose plans (in a fake `tensorrt`) run `onnx_dir`'s graphs
    in ONNX Runtime: what differs from the ONNX engine is only where the K/V caches live."""
    import onnxruntime as ort  # type: ignore[import-untyped]  # noqa: PLC0415

    document = json.loads((onnx_dir / "manifest.json").read_text())
    manifest = parse_manifest(document)
    directory.mkdir()
    for path in onnx_dir.glob("*.json"):  # the checkpoint's files the engine serves with
        if path.name != "manifest.json":
            shutil.copy(path, directory / path.name)
    specs = {
        name: GraphSpec(directory / f"{name}.plan", graph.inputs, graph.outputs)
        for name, graph in manifest.graphs.items()
    }
    vocab_size = document["config"]["text_config"]["vocab_size"]
    trt, limits = FakeTrt({}), limits_for(specs, max_batch=4, max_seq=1024, vocab_size=vocab_size)
    for name, graph in manifest.graphs.items():
        session = ort.InferenceSession(str(onnx_dir / graph.file))
        names = [output.name for output in session.get_outputs()]

        def compute(feeds: dict[str, np.ndarray], s: Any = session, n: list[str] = names) -> Any:
            return dict(zip(n, s.run(None, feeds), strict=True))

        trt.engines[name.encode()] = FakeEngine(specs[name], compute, limits)
        specs[name].path.write_bytes(name.encode())
        document["graphs"][name]["file"] = specs[name].path.name
    document |= {"engine_format": "tensorrt", "max_batch": 4, "max_seq": 1024}
    document["files"] = file_entries(directory)
    write_manifest(directory, document)
    monkeypatch.setattr(te, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(te, "import_cudart", FakeCudart)
    return directory


def test_tensorrt_engine_equals_onnx_engine(
    onnx_fp32: Path, preparer: Preparer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same graphs with GPU-resident caches decide exactly as with host caches: 11 requests
    (text, a response, 1-4 tiles, a custom policy) in batches of up to 4, greedy too."""
    twin = _trt_twin(onnx_fp32, tmp_path / "trt", monkeypatch)
    batch = requests(preparer)
    batch = [*batch, *reversed(batch[:-2])]
    for decode in ("constrained", "greedy"):
        host = onnx_engine(onnx_fp32, decode=decode)
        device = load_engine(
            "tensorrt", EngineOptions(twin, device="cuda", max_batch=4, max_seq=1024, decode=decode)
        )
        for a, b in zip(device.execute(batch), host.execute(batch), strict=True):
            assert (a.generated, a.reused_tokens) == (b.generated, b.reused_tokens)
            assert np.isnan(b.unsafe_probability) or a.unsafe_probability == b.unsafe_probability
            assert a.category_probabilities == b.category_probabilities
        device.close()


def test_tensorrt_engine_session_equals_fresh(
    onnx_fp32: Path, preparer: Preparer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A growing answer with an image, checked twice in one session (its K/V row copied on
    the GPU), decides exactly as the ONNX engine checking each fresh."""
    twin = _trt_twin(onnx_fp32, tmp_path / "trt", monkeypatch)
    device = load_engine(
        "tensorrt", EngineOptions(twin, device="cuda", max_batch=2, max_seq=1024, max_sessions=1)
    )
    in_session, checks = checked_in_session(device, preparer)
    fresh = onnx_engine(onnx_fp32).execute(checks)
    for a, b in zip(in_session, fresh, strict=True):
        assert a.generated == b.generated
        assert a.unsafe_probability == b.unsafe_probability
    device.close()
