"""The ONNX Runtime back end (an engine directory from `guardrt export build`) against guardrt's
torch model: logits at the verdict rows, scores and verdicts alone and in batches, greedy
decoding, cache sessions; its options; and serving an engine with torch unimportable."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from guardrt.export.parity import probe_logits, probes
from guardrt.runtime.classify import TorchSteps
from guardrt.runtime.decoding import Decoder
from guardrt.runtime.engine import Engine, EngineOptions, load_engine
from guardrt.runtime.engine.graph_steps import GraphSteps
from guardrt.runtime.engine.manifest import read_manifest
from guardrt.runtime.engine.onnx_engine import ARENA_SHRINKAGE, OrtRunner, providers_for
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.guard import Guard
from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.requests import Decoded, PreparedRequest
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.main import build_stack
from guardrt.v1 import moderation_pb2 as pb
from guardrt.v1 import moderation_pb2_grpc as pb_grpc

REL = 1e-4


def onnx_engine(directory: Path, **settings: object) -> Engine:
    options = EngineOptions(directory, device="cpu", max_batch=4, max_seq=1024)
    return load_engine("onnx", dataclasses.replace(options, **settings))  # type: ignore[arg-type]


def requests(preparer: Preparer) -> list[PreparedRequest]:
    """Text, a response check, 1-4 tiles, and a custom policy."""
    custom = preparer.prepare(
        [{"role": "user", "content": "hello there"}], excluded_categories=["S1", "S13"]
    )
    return [*probes(preparer), custom]


def assert_close_decoded(a: Decoded, b: Decoded, rel: float = REL) -> None:
    assert a.generated == b.generated
    if math.isnan(b.unsafe_probability):  # greedy output that left the grammar's path
        assert math.isnan(a.unsafe_probability)
    else:
        assert math.isclose(a.unsafe_probability, b.unsafe_probability, rel_tol=rel)
    assert a.category_probabilities.keys() == b.category_probabilities.keys()
    for code, value in a.category_probabilities.items():
        assert math.isclose(value, b.category_probabilities[code], rel_tol=rel, abs_tol=1e-7)


def test_logits_match_torch(onnx_fp32: Path, checkpoint: Path, preparer: Preparer) -> None:
    """The verdict rows (last prompt token, label, category) of text-only and 1-4 tile probes."""
    model = load_model(checkpoint)
    model.setup_caches(1, 1024)
    reference = TorchSteps(model)
    manifest = read_manifest(onnx_fp32)
    runner = OrtRunner(onnx_fp32, manifest, "cpu", 0)
    graph = GraphSteps(runner, ModelConfig.from_dict(manifest.config), 1, 1024)
    tiles = []
    for request in probes(preparer):
        expected = probe_logits(reference, request)
        got = probe_logits(graph, request)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= REL * np.abs(expected).max()
        tiles.append(request.image.num_tiles if request.image else 0)
    assert sorted(set(tiles)) == [0, 1, 2, 3, 4]


def test_batches_match_torch(onnx_fp32: Path, engine: Engine, preparer: Preparer) -> None:
    """11 requests (text, response, 1-4 tiles, custom policy) in batches of up to 4, twice in
    different orders: every row's verdict and scores equal the torch engine's."""
    batch = requests(preparer)
    batch = [*batch, *reversed(batch[:-2])]
    onnx = onnx_engine(onnx_fp32)
    for a, b in zip(onnx.execute(batch), engine.execute(batch), strict=True):
        assert_close_decoded(a, b)
    assert (onnx.info.backend, onnx.info.dtype) == ("onnx", "fp32")


def test_greedy_matches_torch(onnx_fp32: Path, checkpoint: Path, preparer: Preparer) -> None:
    batch = requests(preparer)[2:7]
    torch_greedy = load_engine(
        "torch", EngineOptions(checkpoint, device="cpu", decode="greedy", max_seq=1024)
    )
    onnx = onnx_engine(onnx_fp32, decode="greedy")
    for a, b in zip(onnx.execute(batch), torch_greedy.execute(batch), strict=True):
        assert_close_decoded(a, b)
        assert len(a.generated) > 1


def growing_answer(preparer: Preparer) -> tuple[PreparedRequest, PreparedRequest]:
    """An answer about an image, streamed: checked part-way, then whole."""
    picture = (np.linspace(0, 255, 40 * 60 * 3).reshape(40, 60, 3)).astype(np.uint8)
    parts = [{"type": "image", "image": picture}, {"type": "text", "text": "What is it?"}]
    question = {"role": "user", "content": parts}
    first = preparer.prepare([question, {"role": "assistant", "content": "It is a grad"}])
    second = preparer.prepare([question, {"role": "assistant", "content": "It is a gradient."}])
    return first, second


def checked_in_session(
    engine: Engine, preparer: Preparer
) -> tuple[list[Decoded], list[PreparedRequest]]:
    """`growing_answer` checked twice in one cache session of `engine` (the session closed
    after): the answers, of which the second reused more than half the prompt's K/V, and the
    two requests, to check fresh."""
    checks = list(growing_answer(preparer))
    session = engine.open_session()
    assert session is not None
    answers = [engine.execute([dataclasses.replace(r, session=session)])[0] for r in checks]
    assert answers[1].reused_tokens > len(checks[0].prompt) // 2
    engine.close_session(session)
    return answers, checks


def test_session_reuses_cache(onnx_fp32: Path, preparer: Preparer) -> None:
    """A growing answer checked twice in one session = each checked fresh."""
    in_session, checks = checked_in_session(onnx_engine(onnx_fp32, max_sessions=1), preparer)
    for a, b in zip(in_session, onnx_engine(onnx_fp32).execute(checks), strict=True):
        assert_close_decoded(a, b)


def test_every_run_shrinks_the_cpu_arena(onnx_fp32: Path, preparer: Preparer) -> None:
    """Both graphs run with the run option that hands the CPU arena's free chunks back after
    the run (`arena_shrinkage`), over a batch with images and a text-only one."""
    manifest = read_manifest(onnx_fp32)
    runner = OrtRunner(onnx_fp32, manifest, "cpu", 0)
    seen: list[tuple[str, str]] = []
    for name, session in runner.sessions.items():

        def recording(
            outputs: Any, feeds: Any, options: Any = None, *, n: str = name, run: Any = session.run
        ) -> Any:
            entry = "" if options is None else options.get_run_config_entry(ARENA_SHRINKAGE[0])
            seen.append((n, entry))
            return run(outputs, feeds, options)

        session.run = recording
    steps = runner.steps(ModelConfig.from_dict(manifest.config), 4, 1024)
    batch = requests(preparer)
    images = [request for request in batch if request.image is not None]
    Decoder(steps).run(images[:3])
    Decoder(steps).run([request for request in batch if request.image is None][:1])
    assert {name for name, _ in seen} == {"vision", "decoder"}
    assert {entry for _, entry in seen} == {"cpu:0"}


def test_options_refused(onnx_fp32: Path) -> None:
    with pytest.raises(ConfigError, match="exported with semantics 'meta'"):
        onnx_engine(onnx_fp32, semantics="transformers")
    for dtype in ("bf16", "bfloat16", "float16"):
        with pytest.raises(ConfigError, match=f"fp32 engine; dtype '{dtype}'"):
            onnx_engine(onnx_fp32, dtype=dtype)
    with pytest.raises(ConfigError, match="dtype 'float64' is not one of"):
        onnx_engine(onnx_fp32, dtype="float64")
    for dtype in ("fp32", "float32"):  # torch's name and ours for the engine's precision
        assert onnx_engine(onnx_fp32, dtype=dtype).info.dtype == "fp32"
    with pytest.raises(ConfigError, match="needs onnxruntime's CUDA or TensorRT provider"):
        onnx_engine(onnx_fp32, device="cuda")
    with pytest.raises(ConfigError, match="decode must be one of"):
        onnx_engine(onnx_fp32, decode="beam")
    with pytest.raises(ConfigError, match="max_seq 131073 is over the model's 131072 positions"):
        onnx_engine(onnx_fp32, max_seq=131_073)
    with pytest.raises(ConfigError, match="fp32 engine; quantize='int8' applies to a checkpoint"):
        onnx_engine(onnx_fp32, quantize="int8")


def test_caches_that_do_not_fit_stop_serve_at_warm_up(
    onnx_fp32: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine directory's host caches grow at the first steps: memory they cannot get (say
    --max-batch-size 100000) stops `serve` at its warm-up with the sizes to lower, the engine
    closed; not numpy's traceback."""
    shown = "Unable to allocate 36.6 GiB for an array with shape (3, 2, 100005, 2, 512, 16)"

    def reserve(self: GraphSteps, length: int) -> None:
        raise MemoryError(f"{shown} and data type float32")  # numpy's words

    closed: list[bool] = []
    monkeypatch.setattr(GraphSteps, "_reserve", reserve)
    monkeypatch.setattr(GraphSteps, "release", lambda self: closed.append(True))
    config = ServerConfig(model=str(onnx_fp32), device="cpu", max_batch_size=100_000)
    expected = (
        f"out of memory on CPUExecutionProvider in the warm-up ({shown} and data type float32); "
        "the K/V caches have 100005 rows (max_batch 100000 + max_sessions 4 + max_prefixes 1): "
        "lower --max-batch-size or --max-streams"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        build_stack(config)
    assert closed == [True]


def test_other_warm_up_failures_keep_their_type(
    onnx_fp32: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def reserve(self: GraphSteps, length: int) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(GraphSteps, "_reserve", reserve)
    with pytest.raises(ValueError, match="a bug"):
        build_stack(ServerConfig(model=str(onnx_fp32), device="cpu"))


def test_providers() -> None:
    cpu = ["CPUExecutionProvider"]
    both = ["TensorrtExecutionProvider", "CUDAExecutionProvider", *cpu]
    assert providers_for("auto", cpu) == cpu
    assert providers_for("cpu", both) == cpu
    assert providers_for("auto", both) == [
        ("TensorrtExecutionProvider", {"device_id": 0}),
        ("CUDAExecutionProvider", {"device_id": 0}),
        *cpu,
    ]
    assert providers_for("cuda:1", ["CUDAExecutionProvider", *cpu]) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        *cpu,
    ]
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(ConfigError, match="is not cpu, auto, cuda or cuda:N"):
            providers_for(bad, both)


# Runs `guardrt serve` with every import of torch failing.
_NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is unimportable in this test: " + name)
            return None

    sys.meta_path.insert(0, NoTorch())
    from guardrt.cli import main
    code = main(sys.argv[1:])
    print("torch imported:", "torch" in sys.modules, flush=True)
    sys.exit(code)
    """
)


def test_serve_engine_without_torch(onnx_int8: Path, checkpoint: Path) -> None:
    """`guardrt serve --model ENGINE_DIR` (int8) answers gRPC and HTTP with scores close to the
    torch model's, in a process where torch cannot be imported."""
    command = [sys.executable, "-c", _NO_TORCH, "serve", "--model", str(onnx_int8)]
    command += ["--grpc-port", "0", "--http-port", "0", "--host", "localhost"]
    command += ["--max-seq", "1024", "--grace-s", "5"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        if "HTTP API on" in line:
            break
    else:
        pytest.fail("".join(lines))
    output = "".join(lines)
    grpc_port = int(output.split("(gRPC)")[0].rsplit(":", 1)[1])
    http_port = int(lines[-1].rsplit(":", 1)[1])
    text = "How do I pick a lock?"
    expected = Guard.load(checkpoint, device="cpu", max_seq=1024).moderate(
        [{"role": "user", "content": text}]
    )
    try:
        with grpc.insecure_channel(f"localhost:{grpc_port}") as channel:
            stub = pb_grpc.ModerationStub(channel)
            message = pb.Message(role=pb.USER, content=[pb.Content(text=text)])
            verdict = stub.Moderate(pb.ModerateRequest(messages=[message]), timeout=30).verdict
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=30)
        body = json.dumps(
            {
                "model": "meta-llama/Llama-Guard-3-11B-Vision",
                "messages": [{"role": "user", "content": text}],
            }
        ).encode()
        http = urllib.request.Request(
            f"http://localhost:{http_port}/v1/chat/completions",
            body,
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(http, timeout=30) as response:
            chat = json.loads(response.read())
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=30)
    assert process.returncode == 0, rest
    assert "torch imported: False" in rest
    assert (info.backend, info.dtype) == ("onnx", "int8")
    # int8 bound measured on the probes (README): |ΔP(unsafe)| well under 1e-3 on this model.
    assert abs(verdict.unsafe_probability - expected.unsafe_probability) < 1e-3
    assert verdict.label == (pb.UNSAFE if expected.label.value == "unsafe" else pb.SAFE)
    scores = chat["guardrt"]
    assert abs(scores["unsafe_probability"] - expected.unsafe_probability) < 1e-3
