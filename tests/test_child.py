"""`run_in_child`: a build step in a spawned process gives back its result, its exceptions with
their traceback, and says clearly how a child that died without a word ended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from guardrt.export.child import ChildTracebackError, run_in_child
from guardrt.export.errors import ExportError


def _where(path: Path) -> tuple[int, Path]:
    return os.getpid(), path / "x"


def _refuse(value: int) -> None:
    raise ValueError(f"value {value} refused")


class _UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("the lock is held")
        self.lock = threading.Lock()  # locks do not pickle


class _UnloadableError(Exception):
    def __init__(self, first: str, second: str) -> None:  # pickles, but fails to unpickle
        super().__init__(f"{first} and {second}")


def _raise(which: str) -> None:
    if which == "unpicklable":
        raise _UnpicklableError
    raise _UnloadableError("this", "that")


def _killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _exits(code: int) -> None:
    os._exit(code)


def test_result_comes_back_from_another_process(tmp_path: Path) -> None:
    pid, path = run_in_child("probing", _where, tmp_path)
    assert pid != os.getpid()
    assert path == tmp_path / "x"


def test_exception_comes_back_with_the_childs_traceback() -> None:
    with pytest.raises(ValueError, match="value 7 refused") as caught:
        run_in_child("probing", _refuse, 7)
    cause = caught.value.__cause__
    assert isinstance(cause, ChildTracebackError)
    assert "in _refuse" in str(cause)  # where in the child it was raised


@pytest.mark.parametrize(
    ("which", "words"),
    [("unpicklable", "_UnpicklableError: the lock is held"), ("unloadable", "this and that")],
)
def test_exception_that_does_not_travel_comes_back_as_its_words(which: str, words: str) -> None:
    with pytest.raises(ExportError, match=words) as caught:
        run_in_child("probing", _raise, which)
    assert isinstance(caught.value.__cause__, ChildTracebackError)


def test_killed_child_is_named_as_killed() -> None:
    with pytest.raises(ExportError) as caught:
        run_in_child("tracing the graphs", _killed)
    message = str(caught.value)
    assert message.startswith("tracing the graphs failed: the child process was killed by SIGKILL")
    assert "out-of-memory killer" in message


def test_child_exiting_silently_names_its_exit_code() -> None:
    with pytest.raises(ExportError, match="exited with code 3 before it could report"):
        run_in_child("probing", _exits, 3)


def _unpicklable_result() -> threading.Event:
    return threading.Event()  # holds a lock: does not pickle


def test_result_that_does_not_pickle_is_the_childs_error() -> None:
    words = r"the child's result \(Event\) does not pickle: cannot pickle"
    with pytest.raises(ExportError, match=words) as caught:
        run_in_child("probing", _unpicklable_result)
    assert isinstance(caught.value.__cause__, ChildTracebackError)


def test_a_script_without_a_main_guard_can_run_children(tmp_path: Path) -> None:
    """The child is a fresh interpreter: it does not run the caller's script again (as
    multiprocessing's spawn would, failing a script that calls `build()` unguarded)."""
    script = tmp_path / "script.py"
    script.write_text(
        "import os\n"
        "from guardrt.export.child import run_in_child\n"
        "print('ran', run_in_child('probing', os.getpid) != os.getpid())\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert (done.returncode, done.stdout) == (0, "ran True\n"), done.stderr
