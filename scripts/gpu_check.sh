#!/usr/bin/env bash
# The model's parity checks on a CUDA GPU (the device machine: torch with CUDA and
# transformers 5.17 preinstalled, no internet). Runs tests/test_model_parity.py with
# GUARDRT_TEST_DEVICE=cuda (fp32, TF32 off) and saves the report under ${OUT:-/tmp}.
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
python -c "import torch; assert torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
# What the tests import beyond torch/transformers; missing ones are reported, not installed.
python - <<'PY' | tee -a "$out/device.txt"
import importlib.util as u
for name in ("tiktoken", "llama_models", "pytest", "hypothesis", "safetensors", "PIL", "grpc"):
    print(name, "ok" if u.find_spec(name) else "MISSING")
PY
PYTHONPATH=".:${PYTHONPATH:-}" GUARDRT_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider \
    tests/test_model_parity.py 2>&1 | tee "$out/parity_cuda.txt"
# The latency benchmark (full-size random model, all precisions, transformers baseline).
PYTHONPATH=".:${PYTHONPATH:-}" python -m guardrt.bench.latency --results "$out" 2>&1 | tee "$out/latency.txt"
