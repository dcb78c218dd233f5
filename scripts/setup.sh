#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install guardrt into it.
#   bash scripts/setup.sh          the runtime with the torch back end (torch pinned, CPU build
#                                  on our machines) and the default tokenizer (llama-models)
#   bash scripts/setup.sh test     plus the test tools and numerical references
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GUARDRT_VENV:-.venv}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
# torch first and pinned: an unpinned `torch` pulls a multi-GB CUDA build. 2.13.0 is the CPU
# wheel on our machines; elsewhere point GUARDRT_TORCH_SPEC at the build you want (see README).
python -m pip install --quiet "${GUARDRT_TORCH_SPEC:-torch==2.13.0}"
if [ "${1:-}" = "test" ]; then
    python -m pip install --quiet -e ".[torch,default-tokenizer,test]"
    # The openai npm client for the JavaScript sample test (pinned by tests/js/package-lock.json).
    if command -v npm > /dev/null; then
        npm ci --prefix tests/js --no-audit --no-fund --silent
    fi
else
    python -m pip install --quiet -e ".[torch,default-tokenizer]"
fi
