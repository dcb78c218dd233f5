"""Numerical references for tests and benchmarks (needs the `test` extra; never used to serve)."""
