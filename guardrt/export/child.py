"""Running one step of a build in a child process, so that all its memory returns when it ends.

Why: torch's ONNX exporter keeps tensors of the model it traced alive after it returns, held
from C++ where `gc` cannot free them (`del model`, `gc.collect()`, `torch._dynamo.reset()` and
`malloc_trim` do not help). Measured on a 1.93 B-parameter model at the 11B's widths, ~4 GB of
the int8 model stayed resident through the rest of the build, while ONNX Runtime loaded the
engine for its parity runs; for the 11B model it would be its whole ~11 GB int8 model. A child
process returns every byte when it exits.

The child is a fresh interpreter (`python -m guardrt.export.child JOB RESULT`), not a fork
(forking after torch's thread pools are running is unsafe) and not multiprocessing's spawn,
which re-runs the caller's main script in the child: a script calling `build()` without an
`if __name__ == "__main__"` guard would build again in it and fail. The job (the caller's
`sys.path`, the function and its arguments) and the result travel as pickles in files of a
private temporary directory; the child's output and warnings go where the caller's do.

The child's exceptions are re-raised here with its traceback attached as their cause. A child
that dies without a result (killed by the kernel's out-of-memory killer, most often) is an
`ExportError` saying how it ended.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from guardrt.export.errors import ExportError

T = TypeVar("T")


class ChildTracebackError(Exception):
    """The traceback of an exception raised in the child (its text, as the child printed it)."""


def run_in_child(what: str, function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` run in a child interpreter; its result, or its exception re-raised.

    `function` (importable by name: a module-level function), `args` and the result must
    pickle. `what` names the step in errors ("tracing the graphs")."""
    with tempfile.TemporaryDirectory(prefix="guardrt-child-") as scratch:
        job, result = Path(scratch) / "job.pkl", Path(scratch) / "result.pkl"
        # Two layers: the child sets sys.path before it unpickles what needs it to import.
        job.write_bytes(pickle.dumps((list(sys.path), pickle.dumps((function, args)))))
        command = [sys.executable, "-m", "guardrt.export.child", str(job), str(result)]
        process = subprocess.Popen(command)
        try:
            code = process.wait()
        finally:
            if process.poll() is None:  # interrupted while waiting (Ctrl-C): not left running
                process.kill()
                process.wait()
        if not result.is_file():
            raise ExportError(f"{what} failed: the child process {_ended(code)}")
        ok, value, text = pickle.loads(result.read_bytes())
    if ok:
        returned: T = value
        return returned
    raise value from ChildTracebackError(text)


def _ended(exitcode: int) -> str:
    """How a child that left no result ended, in words."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            return (
                f"was killed by {name}, on Linux most often the out-of-memory killer: give the "
                "build more memory (or swap)"
            )
        return f"was killed by {name}"
    return f"exited with code {exitcode} before it could report"


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling both ways (an exception whose constructor takes other
    arguments than its `args` pickles but fails to unpickle), else its words as an ExportError."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001
        return ExportError(f"{type(exc).__name__}: {exc}")
    return exc


def _run(job: Path) -> tuple[bool, Any, str]:
    """(In the child.) The job's (ok, result or exception, traceback text)."""
    path, payload = pickle.loads(job.read_bytes())
    sys.path[:] = path
    try:
        function, args = pickle.loads(payload)
        value = function(*args)
    except BaseException as exc:  # noqa: BLE001 (every failure goes back to the parent)
        return False, _portable(exc), traceback.format_exc()
    try:
        pickle.dumps(value)
    except Exception as exc:  # noqa: BLE001
        error = ExportError(f"the child's result ({type(value).__name__}) does not pickle: {exc}")
        return False, error, traceback.format_exc()
    return True, value, ""


def main(argv: list[str]) -> int:
    job, result = Path(argv[0]), Path(argv[1])
    outcome = _run(job)
    partial = result.with_suffix(".partial")
    partial.write_bytes(pickle.dumps(outcome))
    os.replace(partial, result)  # whole or absent: a child killed mid-write leaves none
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
