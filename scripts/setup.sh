#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install guardrt into it.
#   bash scripts/setup.sh          runtime (numpy, pillow, grpcio, protobuf, tiktoken) and the
#                                  default tokenizer (llama-models)
#   bash scripts/setup.sh test     plus torch (pinned CPU build) and the test references
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GUARDRT_VENV:-.venv}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
if [ "${1:-}" = "test" ]; then
    # torch first and pinned: an unpinned `torch` pulls a multi-GB CUDA build. 2.13.0 is the CPU
    # wheel on our machines; elsewhere point pip at a CPU index (see README).
    python -m pip install --quiet "${GUARDRT_TORCH_SPEC:-torch==2.13.0}"
    python -m pip install --quiet -e ".[test]"
else
    python -m pip install --quiet -e ".[default-tokenizer]"
fi
