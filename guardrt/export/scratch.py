"""Where a build writes: its scratch directories beside `-o`, and the disk space they take.

The engine is written into a scratch directory beside the output and renamed into place at the
end (a failed build leaves nothing that looks like an engine); graphs TensorRT parses are traced
into a second one. An 11B build converts and probes for many minutes before it writes a byte,
so a disk that cannot hold the engine is refused before the first step, and a disk that fills
during the build is named as the cause instead of the writer's own message.
"""

from __future__ import annotations

import errno
import math
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from guardrt.export.engine_model import EIGHT_BIT
from guardrt.export.errors import ExportError
from guardrt.export.quantize import keeps_full_precision
from guardrt.runtime.model.safetensors_io import TensorEntry

# The narrowest a weight is stored at in each precision. 8-bit builds keep the head in fp32 (counted
# below), fp8 the token embedding too, and add one fp32 scale per output channel (not counted):
# what this gives is a lower bound.
_BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1}
# numpy's message when it finds no room for a write (its OSError carries no errno).
_NUMPY_NO_SPACE = "Not enough free space to write"


def gigabytes(size: int) -> str:
    """A size for messages: GB down to 0.1 GB, MB below."""
    return f"{size / 1e9:.1f} GB" if size >= 100_000_000 else f"{size / 1e6:.1f} MB"


def least_engine_bytes(entries: Iterable[TensorEntry], precision: str, engine_format: str) -> int:
    """What the build writes, at least: every weight at `precision`'s narrowest width, twice for
    TensorRT (its ONNX graphs stay in the scratch directory until the plans are written)."""
    width = _BYTES_PER_WEIGHT[precision]
    kept = 4 if precision in EIGHT_BIT else width
    stored = sum(
        math.prod(entry.shape)
        * (kept if keeps_full_precision(entry.name.removesuffix(".weight")) else width)
        for entry in entries
    )
    return stored * (2 if engine_format == "tensorrt" else 1)


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest of its parents that exists (where the build's mkdir starts)."""
    return next(p for p in (path, *path.absolute().parents) if p.exists())


def check_free_space(output: Path, needed: int) -> None:
    """Refuse a build whose output's disk has less free space than `needed` bytes."""
    above = nearest_existing(output)
    free = shutil.disk_usage(above).free
    if free < needed:
        raise ExportError(
            f"-o {output}: {above} has {gigabytes(free)} free; the engine needs at least "
            f"{gigabytes(needed)} (free some space or choose another -o)"
        )


def _is_full_disk(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or str(exc).startswith(_NUMPY_NO_SPACE)


@contextmanager
def full_disk_named(output: Path, needed: int) -> Iterator[None]:
    """Turn a write that found the disk full into an error that says so, with the free space
    measured while the build's partial files still take theirs."""
    try:
        yield
    except OSError as exc:
        if not _is_full_disk(exc):
            raise
        free = shutil.disk_usage(output.parent).free
        raise ExportError(
            f"-o {output}: the disk filled up while the engine was written ({gigabytes(free)} "
            f"free in {output.parent}, the engine needs more than {gigabytes(needed)}); the "
            f"partial build is removed ({exc})"
        ) from exc


def stale_scratch(output: Path, ours: tuple[Path, ...] = ()) -> list[Path]:
    """Scratch directories of builds of `output` beside it, other than `ours`: a build that was
    killed (out of memory, say) could not remove its own, and they can hold gigabytes."""
    prefix = f".{output.name}-"
    return sorted(
        path
        for path in output.parent.iterdir()
        if path.name.startswith(prefix)
        and path.is_dir()
        and not path.is_symlink()
        and path not in ours
    )


def scratch_directories(output: Path) -> tuple[Path, Path]:
    """The build's two scratch directories beside `output` (the engine, renamed into place at
    the end, and the traced graphs), made before any long step: a place the build cannot write
    is an error now, not after the model has been converted."""
    made: list[Path] = []
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        for prefix in (f".{output.name}-", f".{output.name}-work-"):
            made.append(Path(tempfile.mkdtemp(prefix=prefix, dir=output.parent)))
    except OSError as exc:
        for directory in made:  # the first made, the second refused: leave nothing behind
            directory.rmdir()
        raise ExportError(f"-o {output}: cannot write in {output.parent}: {exc.strerror}") from exc
    scratch, work = made
    return scratch, work


def directory_size(directory: Path) -> str:
    return gigabytes(sum(path.stat().st_size for path in directory.rglob("*") if path.is_file()))
