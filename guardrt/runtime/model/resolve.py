"""Which checkpoint directory a model name means: a path, or the generated `tiny-random`.

Torch-free (serving an exported engine imports this); generating tiny-random needs torch and
imports it only then.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_RANDOM = "tiny-random"
_VERSION = 2  # bump when the generated checkpoint changes, so caches regenerate


def cache_root() -> Path:
    """Where generated models are kept: $GUARDRT_CACHE, else ~/.cache/guardrt."""
    configured = os.environ.get("GUARDRT_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "guardrt"


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A checkpoint directory for `model`: the name `tiny-random` is generated on first use
    (atomically, so concurrent first uses are safe); anything else is a directory path."""
    if str(model) != TINY_RANDOM:
        return Path(model)
    target = cache_root() / f"{TINY_RANDOM}-v{_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{TINY_RANDOM}-", dir=target.parent))
    from guardrt.runtime.model.tiny import write_tiny_random  # noqa: PLC0415 (needs torch)

    try:
        write_tiny_random(scratch)
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer's success
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
