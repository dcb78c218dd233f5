"""Benchmarks that need the package's internals: the full-size latency benchmark
(`guardrt bench`, `benchmarks/latency.py`) and its parts. Needs torch; the transformers
baseline needs the `test` extra."""
