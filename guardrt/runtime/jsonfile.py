"""Reading the JSON files guardrt is configured with; each failure a ConfigError naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from guardrt.runtime.errors import ConfigError


def read_json(path: Path, what: str) -> Any:
    """The parsed content of `path` (`what` names it in messages, e.g. "categories file")."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot read {what} {path}: not found") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{what} {path} nests JSON too deeply to read") from exc


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """Like `read_json`, for files that must hold one JSON object."""
    document = read_json(path, what)
    if not isinstance(document, dict):
        raise ConfigError(f"{what} {path} is not a JSON object")
    return document
