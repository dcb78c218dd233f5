#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then serve moderation over gRPC.
# With no --model it serves tiny-random, a generated random model: its verdicts are meaningless.
#   bash scripts/serve.sh [guardrt serve flags, e.g. --model /models/Llama-Guard-3-11B-Vision]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/guardrt serve "$@"
