#!/usr/bin/env bash
# Everything CI checks, from a fresh clone: set-up, lint, types, tests. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# shellcheck disable=SC1091
. "${GUARDRT_VENV:-.venv}/bin/activate"
ruff check .
ruff format --check .
mypy
# pytest exits 5 when it collects no test: set -e turns that into a failure too.
python -m pytest -q "$@"
