"""guardrt: an inference runtime for Llama Guard 3 11B Vision.

`guardrt.Guard` (the torch back end) and `guardrt.Verdict` are imported on first use, so that
`import guardrt` stays light and never needs torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from guardrt.runtime.guard import Guard
    from guardrt.runtime.verdict import Label, Verdict

__all__ = ["Guard", "Label", "Verdict", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Guard":
        from guardrt.runtime.guard import Guard  # noqa: PLC0415

        return Guard
    if name in ("Verdict", "Label"):
        from guardrt.runtime import verdict  # noqa: PLC0415

        return getattr(verdict, name)
    raise AttributeError(f"module 'guardrt' has no attribute {name!r}")
