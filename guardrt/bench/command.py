"""`guardrt bench`: the options checked, then the run for what `--model` is (`options.py`).

An engine directory is measured without importing torch (`engine_dir.py`); a checkpoint or
random weights by the torch run (`latency.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

from guardrt.bench import options


def main(argv: Sequence[str]) -> int:
    args = options.parse(list(argv))
    if options.engine_dir(args):
        from guardrt.bench import engine_dir  # noqa: PLC0415 (no torch on this path)

        return engine_dir.run(args)
    from guardrt.bench import latency  # noqa: PLC0415 (imports torch)

    return latency.run(args)
