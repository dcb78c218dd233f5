"""Reading and writing safetensors files with no copy on the way in.

Format: an 8-byte little-endian header length, a JSON header mapping each name to its dtype,
shape and byte range, then the raw data. The header is read alone first, so every key, shape and
dtype of a checkpoint is checked before any weight is touched. Tensors are then views of a
private (copy-on-write) memory map: the only copy is the one to the target device or dtype, and
none at all when the target is the CPU in the file's dtype.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from guardrt.runtime.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path
    begin: int  # byte offsets into the file
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors a file holds, from its header alone; malformed files are refused by name."""
    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise ConfigError(f"{path} is not a safetensors file (too short)")
            (size,) = struct.unpack("<Q", prefix)
            if size > min(_MAX_HEADER, file_size - 8):
                raise ConfigError(
                    f"{path} declares a {size}-byte header in a {file_size}-byte file"
                )
            header = json.loads(handle.read(size))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path} has an unreadable safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: the safetensors header is not a JSON object")
    entries: dict[str, TensorEntry] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (8 + size + int(offset) for offset in spec["data_offsets"])
            shape = tuple(int(dim) for dim in spec["shape"])
            entry = TensorEntry(name, str(spec["dtype"]), shape, path, begin, end)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: tensor {name!r} has a malformed header entry") from exc
        if entry.dtype not in DTYPES:
            raise ConfigError(f"{path}: tensor {name!r} has unsupported dtype {entry.dtype}")
        count = 1
        for dim in entry.shape:
            count *= dim
        fits = 8 + size <= begin <= end <= file_size and min(shape, default=0) >= 0
        if not fits or end - begin != count * DTYPES[entry.dtype].itemsize:
            raise ConfigError(f"{path}: tensor {name!r} has a byte range that does not fit")
        entries[name] = entry
    return entries


class MappedFile:
    """A private memory map of one safetensors file; tensors it returns share its memory."""

    def __init__(self, path: Path) -> None:
        with path.open("rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        dtype = DTYPES[entry.dtype]
        count = (entry.end - entry.begin) // dtype.itemsize
        if count == 0:
            return torch.empty(entry.shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=entry.begin)
        return flat.view(entry.shape)


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` (contiguous CPU copies are made as needed) in safetensors format."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    blobs: list[bytes] = []
    for name, tensor in tensors.items():
        data = tensor.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        header[name] = {
            "dtype": _NAMES[data.dtype],
            "shape": list(data.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for blob in blobs:
            handle.write(blob)
