"""Verdict latency on this machine's GPU against transformers, in one run (see
`guardrt/bench/latency.py`; the same as `guardrt bench`).

Usage: python benchmarks/latency.py [--model DIR] [--precisions bf16,int8,fp8,int8-wa] [--repeat N]
                                    [--budget-s S]
"""

from __future__ import annotations

from guardrt.bench.latency import main

if __name__ == "__main__":
    raise SystemExit(main())
