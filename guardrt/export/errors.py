"""The export side's error: a build that cannot proceed, saying why and what to do."""

from __future__ import annotations

from guardrt.runtime.errors import ConfigError


class ExportError(ConfigError):
    """An export that cannot proceed; the message says why and what to do."""
