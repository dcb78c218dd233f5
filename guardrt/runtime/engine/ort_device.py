"""ONNX Runtime on a GPU with the K/V caches in GPU memory: `DeviceSteps`' runner over the
sessions of an `OrtRunner`, through ONNX Runtime's IO binding.

With host caches (`GraphSteps`) every step of an ONNX engine on ONNX Runtime's CUDA or TensorRT
provider would copy its past K/V to the GPU and its present K/V back, and an image step its
image's K/V too: 420 MB of fp32 at full size, ~17 ms of PCIe per step, about the whole image
target. Here the caches are the TensorRT back end's (`DeviceSteps`, cuda-python's runtime):
a K/V input is bound where it lies (`IOBinding.bind_input` with its device pointer), the K/V
outputs are written into this runner's device buffers (`bind_output` with a pointer and the
shape resolved from the inputs' symbolic dims), and only the ids, positions, pixels and the
head's few values cross PCIe, as with TensorRT.

Ordering: ONNX Runtime runs on its own CUDA stream, the caches' copies run on this runner's.
ONNX Runtime does not wait for other streams before it reads bound inputs (onnxruntime issues
#26609, #32673), so a run first waits for this stream (the gathers into the feeds, the stores
out of the last run's outputs). Its `Run` returns only when its provider's stream is done (it
synchronizes its execution providers unless the run option
`disable_synchronize_execution_providers` says otherwise, which guardrt never sets), so the
outputs are complete when `DeviceSteps` starts copying them.

Set `GUARDRT_ORT_KV=host` to keep the caches in host memory instead (`GraphSteps`); without
cuda-python that is what an engine on a GPU provider does, with a warning.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from guardrt.runtime.engine.cuda_memory import (
    Cuda,
    DeviceArray,
    DeviceBuffers,
    DeviceError,
    host_array,
)
from guardrt.runtime.engine.device_steps import DeviceSteps
from guardrt.runtime.engine.graph_steps import EngineSteps, HeadScores, vision_feeds
from guardrt.runtime.engine.manifest import GraphEntry, TensorSpec
from guardrt.runtime.model.config import ModelConfig


def bind_dims(spec: TensorSpec, shape: tuple[int, ...], sizes: dict[str, int]) -> None:
    """Check `shape` against the manifest's `spec` (rank, fixed dims) and record the sizes of
    its symbolic dims in `sizes`; a symbolic dim seen before must have the same size."""
    if len(shape) != len(spec.shape):
        raise ValueError(f"{spec.name} has shape {shape}, the manifest says {spec.shape}")
    for got, want in zip(shape, spec.shape, strict=True):
        if isinstance(want, int):
            if got != want:
                raise ValueError(f"{spec.name} has shape {shape}, the manifest says {spec.shape}")
        elif sizes.setdefault(want, got) != got:
            raise ValueError(
                f"{spec.name}'s dim {want!r} is {got}, another input's is {sizes[want]}"
            )


def resolved_shape(spec: TensorSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """An output's shape from the sizes of the inputs' symbolic dims (every output dim of the
    exported graphs is fixed or named after an input's: present_kv's `tokens` is input_ids',
    cross_kv's `images` is pixel_values')."""
    missing = [dim for dim in spec.shape if isinstance(dim, str) and dim not in sizes]
    if missing:
        raise ValueError(f"output {spec.name}'s dims {missing} are no input's: {spec.shape}")
    return tuple(dim if isinstance(dim, int) else sizes[dim] for dim in spec.shape)


class OrtDeviceRunner:
    """An `OrtRunner`'s sessions, run with their K/V on the GPU: `DeviceSteps`' runner.

    `memory` is ONNX Runtime's name for where the device pointers lie: "cuda" on a GPU; the
    tests run the same bindings over host memory ("cpu") under a fake of cuda-python."""

    def __init__(
        self,
        sessions: Mapping[str, Any],
        graphs: Mapping[str, GraphEntry],
        cuda: Cuda,
        memory: str = "cuda",
    ) -> None:
        self.sessions, self.graphs, self.cuda, self.memory = sessions, graphs, cuda, memory
        self.stream = cuda.stream()
        self.bindings = {name: session.io_binding() for name, session in sessions.items()}
        self.buffers = {name: DeviceBuffers(cuda) for name in sessions}

    def _run(
        self, name: str, feeds: Mapping[str, np.ndarray | DeviceArray], keep: Collection[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, DeviceArray]]:
        """Outputs for `feeds` (every input by name, host or device): those in `keep` left in
        this graph's device buffers until its next run, the others on the host."""
        graph, binding, index = self.graphs[name], self.bindings[name], self.cuda.index
        self.cuda.select()
        # Our copies into the feeds, and out of the buffers this run overwrites, are done.
        self.cuda.synchronize(self.stream)
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        sizes: dict[str, int] = {}
        for spec in graph.inputs:
            value = feeds[spec.name]
            if value.dtype != np.dtype(spec.dtype):
                raise ValueError(f"{name}: {spec.name} is {value.dtype}, not {spec.dtype}")
            bind_dims(spec, value.shape, sizes)
            if isinstance(value, DeviceArray):
                binding.bind_input(
                    spec.name, self.memory, index, value.dtype.type, value.shape, value.pointer
                )
            else:  # onnxruntime copies it to where the graph reads it
                binding.bind_cpu_input(spec.name, host_array(value))
        kept: dict[str, DeviceArray] = {}
        for spec in graph.outputs:
            if spec.name in keep:
                dtype, shape = np.dtype(spec.dtype), resolved_shape(spec, sizes)
                array = self.buffers[name].array(spec.name, shape, dtype)
                binding.bind_output(spec.name, self.memory, index, dtype.type, shape, array.pointer)
                kept[spec.name] = array
            else:
                binding.bind_output(spec.name, "cpu")
        try:
            self.sessions[name].run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise DeviceError(f"onnxruntime's {name} graph failed: {str(exc)[:300]}") from exc
        values = binding.get_outputs()  # in the order bound: the manifest's
        host = {
            spec.name: np.array(value.numpy())  # a copy: the OrtValue goes with the next run
            for spec, value in zip(graph.outputs, values, strict=True)
            if spec.name not in keep
        }
        return host, kept

    def vision(
        self, pixel_values: np.ndarray, aspect_ratio_ids: np.ndarray, aspect_ratio_mask: np.ndarray
    ) -> DeviceArray:
        feeds = vision_feeds(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        _, kept = self._run("vision", feeds, keep={"cross_kv"})
        return kept["cross_kv"]  # (C, 2, N, Hkv, L, d)

    def decoder(
        self, feeds: Mapping[str, np.ndarray | DeviceArray]
    ) -> tuple[HeadScores, DeviceArray]:
        host, kept = self._run("decoder", feeds, keep={"present_kv"})
        return HeadScores(host["logits"], host["normaliser"]), kept["present_kv"]

    def steps(
        self, config: ModelConfig, rows: int, max_seq: int, image_rows: int | None = None
    ) -> EngineSteps:
        return DeviceSteps(self, config, rows, max_seq, image_rows)

    def close(self) -> None:
        """Free the device buffers and the stream (the sessions go with their runner)."""
        self.cuda.select()
        self.cuda.synchronize(self.stream)
        for buffers in self.buffers.values():
            buffers.release()
        self.cuda.destroy(self.stream)
