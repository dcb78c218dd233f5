"""An engine directory's manifest: what was built, from what, how, and how close it is.

`guardrt export build` writes ENGINE_DIR/manifest.json; the ONNX and TensorRT back ends read it
(torch-free) and refuse a directory whose manifest, files or graphs do not match. The document:

    format, version                 "guardrt-engine", 2 (2: the decoder's head picks the ids
                                    asked for and returns each row's normaliser)
    engine_format                   "onnx" | "tensorrt"
    precision                       fp32 | fp16 | bf16 | int8 | fp8
    quantization                    what was quantized, how (null for fp32/fp16/bf16)
    semantics, max_batch, max_seq   what the graphs were traced / profiles built for
    source                          checkpoint path, sha256 of its files, per-file hashes
    config                          the checkpoint's config.json
    tools                           versions of python, guardrt, torch, onnx, onnxruntime, ...
    graphs                          {vision, decoder}: file, inputs and outputs with shapes
    files                           every file of the directory but the manifest: bytes, sha256
    steps                           convert → quantize → build, each with its parity check
                                    against the step before
    deviation                       the engine against the fp32 model on the fixed probes
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardrt.runtime.errors import ConfigError
from guardrt.runtime.jsonfile import read_json_object

MANIFEST = "manifest.json"
FORMAT, VERSION = "guardrt-engine", 2
ENGINE_FORMATS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
GRAPHS = ("vision", "decoder")
# `--dtype` spellings → precision names: torch's (`bfloat16`) and ours (`bf16`) are one thing.
DTYPE_PRECISIONS = {
    "float32": "fp32",
    "fp32": "fp32",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "fp16": "fp16",
}


def dtype_precision(dtype: str) -> str:
    """The precision name of a `--dtype` value (fp32, bf16 or fp16)."""
    if dtype not in DTYPE_PRECISIONS:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_PRECISIONS)}")
    return DTYPE_PRECISIONS[dtype]


class EngineDirError(ConfigError):
    """An engine directory that cannot be served as it is; the message says what is wrong."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy / ONNX element type name: float32, int64, ...
    shape: tuple[str | int, ...]  # symbolic dims by name

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphEntry:
    file: str  # relative to the engine directory
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Manifest:
    engine_format: str
    precision: str
    semantics: str
    max_batch: int
    max_seq: int
    config: dict[str, Any]
    graphs: dict[str, GraphEntry]
    files: dict[str, tuple[int, str]]  # name → (bytes, sha256)
    int8_compute: str | None  # "weight-only" | "weight+activation" for int8 engines
    document: dict[str, Any]


def is_engine_dir(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    """bytes and sha256 of every file under `directory` but the manifest, by relative name."""
    return {
        path.relative_to(directory).as_posix(): {
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def write_manifest(directory: Path, document: Mapping[str, Any]) -> None:
    text = json.dumps(document, indent=2, sort_keys=False, allow_nan=False)
    (directory / MANIFEST).write_text(text + "\n", encoding="utf-8")


def _field(document: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in document:
        raise EngineDirError(f"{where} lacks {key!r}")
    value = document[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise EngineDirError(f"{where}.{key} is {value!r}, not a {kind.__name__}")
    return value


def _choice(document: Mapping[str, Any], key: str, allowed: tuple[str, ...], where: str) -> str:
    value: str = _field(document, key, str, where)
    if value not in allowed:
        raise EngineDirError(f"{where}.{key} {value!r} is not one of {', '.join(allowed)}")
    return value


def _tensors(items: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list):
        raise EngineDirError(f"{where} is not a list of tensors")
    specs = []
    for index, item in enumerate(items):
        at = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise EngineDirError(f"{at} is not an object")
        shape = _field(item, "shape", list, at)
        if not all(isinstance(d, str | int) and not isinstance(d, bool) for d in shape):
            raise EngineDirError(f"{at}.shape {shape!r} holds something not a name or a size")
        specs.append(
            TensorSpec(_field(item, "name", str, at), _field(item, "dtype", str, at), tuple(shape))
        )
    return tuple(specs)


def parse_manifest(document: Mapping[str, Any], where: str = MANIFEST) -> Manifest:
    if document.get("format") != FORMAT:
        raise EngineDirError(f"{where} is not a guardrt engine manifest (format {FORMAT!r})")
    if document.get("version") != VERSION:
        raise EngineDirError(
            f"{where} has version {document.get('version')!r}; this guardrt reads version "
            f"{VERSION} (rebuild the engine with this guardrt's `guardrt export build`)"
        )
    graphs_doc = _field(document, "graphs", dict, where)
    graphs = {}
    for name in GRAPHS:
        entry = _field(graphs_doc, name, dict, f"{where}.graphs")
        at = f"{where}.graphs.{name}"
        graphs[name] = GraphEntry(
            _field(entry, "file", str, at),
            _tensors(entry.get("inputs"), f"{at}.inputs"),
            _tensors(entry.get("outputs"), f"{at}.outputs"),
        )
    files = {}
    for name, entry in _field(document, "files", dict, where).items():
        at = f"{where}.files.{name}"
        if not isinstance(entry, dict):
            raise EngineDirError(f"{at} is not an object")
        files[name] = (_field(entry, "bytes", int, at), _field(entry, "sha256", str, at))
    quantization = document.get("quantization")
    compute = quantization.get("compute") if isinstance(quantization, dict) else None
    return Manifest(
        engine_format=_choice(document, "engine_format", ENGINE_FORMATS, where),
        precision=_choice(document, "precision", PRECISIONS, where),
        semantics=_choice(document, "semantics", ("meta", "transformers"), where),
        max_batch=_field(document, "max_batch", int, where),
        max_seq=_field(document, "max_seq", int, where),
        config=_field(document, "config", dict, where),
        graphs=graphs,
        files=files,
        int8_compute=compute if isinstance(compute, str) else None,
        document=dict(document),
    )


def read_manifest(directory: Path, verify: bool = True) -> Manifest:
    """The manifest of `directory`, checked; with `verify`, every listed file is present with
    its recorded size and sha256, each graph file is listed, and config.json is the manifest's."""
    if not directory.is_dir():
        raise EngineDirError(f"engine directory {directory} does not exist")
    path = directory / MANIFEST
    try:
        manifest = parse_manifest(read_json_object(path, "engine manifest"), str(path))
    except EngineDirError:
        raise
    except ConfigError as exc:
        raise EngineDirError(str(exc)) from exc
    if verify:
        verify_files(directory, manifest)
    return manifest


def verify_files(directory: Path, manifest: Manifest) -> None:
    for graph in manifest.graphs.values():
        if graph.file not in manifest.files:
            raise EngineDirError(f"{directory}: graph file {graph.file} is not in the manifest")
    for name, (size, digest) in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise EngineDirError(f"{directory}: {name} is missing (the manifest lists it)")
        if path.stat().st_size != size:
            raise EngineDirError(
                f"{directory}: {name} has {path.stat().st_size} bytes, the manifest says {size} "
                "(truncated or replaced)"
            )
        if sha256_file(path) != digest:
            raise EngineDirError(
                f"{directory}: {name} does not match its sha256 in the manifest (corrupted or "
                "replaced)"
            )
    config = read_json_object(directory / "config.json", "engine config")
    if config != manifest.config:
        raise EngineDirError(f"{directory}: config.json differs from the manifest's config")
