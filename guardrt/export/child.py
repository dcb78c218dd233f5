"""Running one step of a build in a child process, so that all its memory returns when it ends.

Why: torch's ONNX exporter keeps tensors of the model it traced alive after it returns, held
from C++ where `gc` cannot free them (`del model`, `gc.collect()`, `torch._dynamo.reset()` and
`malloc_trim` do not help). Measured on a 1.93 B-parameter model at the 11B's widths, ~4 GB of
the int8 model stayed resident through the rest of the build, while ONNX Runtime loaded the
engine for its parity runs; for the 11B model it would be its whole ~11 GB int8 model. A
spawned process (not forked: forking after torch's thread pools are running is unsafe) returns
every byte when it exits.

The child's result and any exception it raised come back through a pipe; the exception is
re-raised here with the child's traceback attached as its cause. A child that dies without a
word (killed by the kernel's out-of-memory killer, most often) is an `ExportError` naming how
it ended.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from guardrt.export.errors import ExportError

T = TypeVar("T")


class ChildTracebackError(Exception):
    """The traceback of an exception raised in the child (its text, as the child printed it)."""


def run_in_child(what: str, function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` run in a spawned process; its result, or its exception re-raised.

    `function` and `args` must be picklable (a module-level function; paths, dataclasses), as
    must the result. `what` names the step in errors ("tracing the graphs")."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=_child, args=(function, args, send), name=f"guardrt {what}", daemon=True
    )
    process.start()
    send.close()  # the child holds the only writer: its exit without a message ends `recv`
    try:
        try:
            message = receive.recv()
        except EOFError:
            message = None
        process.join()
    finally:
        receive.close()
        if process.is_alive():  # interrupted while waiting (Ctrl-C): do not leave it running
            process.terminate()
            process.join()
    if message is None:
        raise ExportError(f"{what} failed: the child process {_ended(process.exitcode)}")
    ok, value, text = message
    if ok:
        result: T = value
        return result
    raise value from ChildTracebackError(text)


def _child(function: Callable[..., Any], args: tuple[Any, ...], send: Connection) -> None:
    try:
        send.send((True, function(*args), ""))
    except BaseException as exc:  # noqa: BLE001 (every failure goes back to the parent)
        send.send((False, _portable(exc), traceback.format_exc()))
    finally:
        send.close()


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling both ways (an exception whose constructor takes other
    arguments than its `args` pickles but fails to unpickle), else its words as an ExportError."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001
        return ExportError(f"{type(exc).__name__}: {exc}")
    return exc


def _ended(exitcode: int | None) -> str:
    """How a child that sent nothing ended, in words."""
    if exitcode is not None and exitcode < 0:
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
