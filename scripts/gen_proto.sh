#!/usr/bin/env bash
# Regenerate guardrt/v1/ (Python messages, gRPC stubs and type stubs) from proto/guardrt/v1/.
# The output is committed; tests/test_proto.py fails when it is stale.
#   bash scripts/gen_proto.sh [OUT_ROOT]     (default: the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
mkdir -p "$out/guardrt/v1"
python -m grpc_tools.protoc -I proto \
    --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
    proto/guardrt/v1/moderation.proto
