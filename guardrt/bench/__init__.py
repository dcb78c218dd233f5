"""Benchmarks that need the package's internals: `guardrt bench` (`command.py`; the torch
engine's run in `latency.py`, which needs torch and, for the transformers baseline, the `test`
extra; an engine directory's run in `engine_dir.py`, which needs neither) and their parts."""
