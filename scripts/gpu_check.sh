#!/usr/bin/env bash
# Everything issue 8 owes the GPU, as one call on the device machine (torch with CUDA,
# transformers 5.17, triton preinstalled; no internet), each part time-boxed so the whole fits one
# 600-s call and a failing part does not stop the rest. Results go under ${OUT:-/tmp}:
#   1. the model's parity tests, the static-step / CUDA-graph tests and the attention-plan tests
#      on CUDA (fp32, TF32 off); the load-time int8 measurement with the real Triton kernel;
#   2. benchmarks/kernels.py (int8 Triton and fp8 _scaled_mm linears against their references);
#   3. guardrt bench: full-size random model, bf16 / int8 / int8-wa / fp8, transformers baseline;
#   4. the bf16 cases again without CUDA graphs (if time allows), to show what they bring;
#   5. a torch.profiler trace of one text and one image verdict on the served path.
# The machine lacks llama_models: copy .venv/lib/python3.11/site-packages/llama_models into
# .gpu_carry/ and pass carry [".gpu_carry"].
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
export PYTHONPATH="$PWD/.gpu_carry:$PWD:${PYTHONPATH:-}"
started=$(date +%s)
stamp() { echo "[$(($(date +%s) - started)) s] $*" | tee -a "$out/steps.txt"; }

stamp "device"
timeout 30 python -c "import torch, triton; assert torch.cuda.is_available(); print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$out/device.txt"

stamp "parity + static steps on CUDA"
GUARDRT_TEST_DEVICE=cuda timeout 120 python -m pytest -q -p no:cacheprovider -x \
    tests/test_model_parity.py tests/test_static_steps.py tests/test_attention_plan.py \
    2>&1 | tail -40 > "$out/parity_cuda.txt"
tail -3 "$out/parity_cuda.txt"

# The load-time int8 measurement with the real Triton kernel (no interpreter: the other tests of
# that file run CPU tensors through the interpreter, so only this one runs here).
stamp "int8 rows measured on CUDA"
GUARDRT_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout 45 python -m pytest -q -p no:cacheprovider \
    tests/test_int8_rows.py -k load_tuning 2>&1 | tail -20 > "$out/int8_rows_cuda.txt"
tail -3 "$out/int8_rows_cuda.txt"

stamp "kernels"
TRITON_INTERPRET=0 timeout 100 python benchmarks/kernels.py --budget 70 \
    --out "$out/kernels.json" > "$out/kernels.txt" 2>&1
tail -25 "$out/kernels.txt"

stamp "latency"
# --budget-s: phases that would run past the time box are skipped and named, not killed.
timeout 330 python -m guardrt.bench.latency --results "$out" --budget-s 300 \
    > "$out/latency.txt" 2>&1
tail -45 "$out/latency.txt"

# What the CUDA graphs bring: the same bf16 cases eagerly, if the time allows.
if [ $(($(date +%s) - started)) -lt 420 ]; then
    stamp "latency, eager bf16"
    mkdir -p "$out/eager"
    timeout 90 python -m guardrt.bench.latency --precisions bf16 --no-baseline --no-cuda-graphs \
        --concurrency 8 --requests 32 --results "$out/eager" > "$out/eager/latency.txt" 2>&1
    grep -E "safe|unsafe|throughput" "$out/eager/latency.txt" | head -12
fi

if [ $(($(date +%s) - started)) -lt 520 ]; then
    stamp "profile"
    timeout 70 python benchmarks/profile_gpu.py --out "$out" > /dev/null 2>&1
    grep "==" "$out/profile.txt"
fi
stamp "done"
