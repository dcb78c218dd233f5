#!/usr/bin/env bash
# Everything issue 8 owes the GPU, as one call on the device machine (torch with CUDA,
# transformers 5.17, triton preinstalled; no internet). Most important first, each part
# time-boxed inside one deadline (GPU_CHECK_DEADLINE seconds, default 560, under the device's
# 600-s call) so that a slow or failing part neither stops the rest nor loses what came before.
#   1. guardrt bench: full-size random model, bf16, the transformers baseline right after it,
#      then int8 / fp8 / int8-wa (phases that would overrun are skipped and named);
#   2. on CUDA with the compiled Triton kernels (TRITON_INTERPRET=0): the model's parity tests,
#      the static-step / CUDA-graph tests, the attention-plan tests (fp32, TF32 off); then the
#      load-time int8 measurement, 8-bit steps replayed in graphs, the load-time timer, the
#      memory of an int8 model quantized while it loads, the fused norm / RoPE / SwiGLU kernels,
#      and the fused activation quantization and int8 epilogue of the 8-bit products;
#   3. benchmarks/norm_rope.py (the fused norm / RoPE / SwiGLU / fp8 activation quantization
#      against their references);
#   4. benchmarks/kernels.py (every quantized-linear path against its reference);
#   5. a torch.profiler trace of one text and one image verdict on the served path (bf16; other
#      precisions with GPU_CHECK_PROFILE_ARGS);
#   6. the bf16 cases without CUDA graphs, to show what they bring;
#   7. the TensorRT back end's GPU-resident K/V caches (3-D copies through cuda-python's CUDA
#      runtime) against the host caches (not issue 8's torch path);
#   8. `guardrt export build --device cuda` on tiny-random (int8), never run on a GPU (last).
# The device returns at most 8 files from $OUT, so every part writes under a work folder and,
# after each part, the folder is packed into $OUT/results.tgz (a kill keeps what was packed);
# $OUT also gets steps.txt. Unpack with `tar -xzf results.tgz -C DIR`.
# The machine lacks llama_models, may lack cuda-python (cuda-bindings 13.0, the driver's CUDA,
# and cuda-pathfinder) and has older exporter packages than those tested here: `bash
# scripts/gpu_carry.sh` puts them all in .gpu_carry/ (ignored by git; seconds, from the local
# package mirror), and the device tool's run takes carry [".gpu_carry"]:
#   bash scripts/gpu_check.sh
# Before any part, a preflight imports what every part needs (torch with CUDA, triton, guardrt,
# llama_models, transformers) and stops the call at once if one is missing: a broken set-up
# then costs seconds of device time, not one failing part after another, and leaves the time to
# fix it and call again.
# GPU_CHECK_PARTS (comma-separated, default all) runs only the parts named, in the order above,
# for a second call that redoes what the first lost:
#   latency, cuda_tests, kernel_tests, norm_rope, kernels, profile, eager, device_kv, export_cuda
# GPU_CHECK_LATENCY_ARGS adds `guardrt bench` options to the latency part (see there).
set -uo pipefail
cd "$(dirname "$0")/.."
back="${OUT:-/tmp}"  # what the device returns: results.tgz and steps.txt
out="${GPU_CHECK_WORK:-/tmp/gpu_check}"  # every part's files
rm -rf "$out" && mkdir -p "$out"
deadline="${GPU_CHECK_DEADLINE:-560}"
export PYTHONPATH="$PWD/.gpu_carry:$PWD:${PYTHONPATH:-}"
# The parts call `python`; where the image has only `python3`, a link on the PATH stands in.
if ! command -v python > /dev/null && command -v python3 > /dev/null; then
    shim="$(mktemp -d)" && ln -s "$(command -v python3)" "$shim/python" && export PATH="$shim:$PATH"
fi
started=$(date +%s)
elapsed() { echo $(($(date +%s) - started)); }
stamp() { echo "[$(elapsed) s] $*" | tee -a "$out/steps.txt"; cp "$out/steps.txt" "$back/"; }
pack() { tar -czf "$back/results.tgz.part" -C "$out" . && mv "$back/results.tgz.part" "$back/results.tgz"; }

# part KEY NAME LIMIT LOG COMMAND...: run COMMAND (output to LOG) under `timeout` for LIMIT
# seconds or what is left before the deadline, whichever is less; skip it (and say so) when
# under 20 s are left or KEY is not in GPU_CHECK_PARTS.
part() {
    local key="$1" name="$2" limit="$3" log="$4"
    shift 4
    case ",$parts," in
        *",$key,"*) ;;
        *) stamp "not asked for: $name ($key)"; return 0 ;;
    esac
    local left=$((deadline - $(elapsed) - 15))  # room for -k's 10 s
    if [ "$left" -lt 20 ]; then
        stamp "SKIPPED $name: $left s left"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    stamp "$name (up to $limit s)"
    timeout -k 10 "$limit" "$@" > "$log" 2>&1  # -k: a part deaf to SIGTERM is killed
    local rc=$?
    stamp "$name: exit $rc"
    pack
}

all_parts="latency,cuda_tests,kernel_tests,norm_rope,kernels,profile,eager,device_kv,export_cuda"
parts="${GPU_CHECK_PARTS:-$all_parts}"
for key in ${parts//,/ }; do
    case ",$all_parts," in
        *",$key,"*) ;;
        *) echo "GPU_CHECK_PARTS: unknown part '$key' (known: $all_parts)" >&2; exit 2 ;;
    esac
done

stamp "preflight"
timeout 120 env TRITON_INTERPRET=0 python -c "
import torch, triton
assert torch.cuda.is_available(), 'torch sees no CUDA device'
import llama_models, transformers
import guardrt.bench.latency, guardrt.kernels.activation_quant, guardrt.runtime.model.tune
print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())
" > "$out/device.txt" 2>&1
preflight=$?
cat "$out/device.txt"
if [ "$preflight" -ne 0 ]; then
    stamp "STOPPED: preflight exit $preflight (device.txt says why); no part was run"
    pack
    exit 1
fi

# --budget-s: phases that would run past it are skipped and named; the files are written after
# every phase, so even a timeout keeps what was measured.
# GPU_CHECK_LATENCY_ARGS (word-split) goes after these: a second call redoes only the phases
# the first skipped past the budget, e.g. "--precisions int8-wa --no-baseline".
# shellcheck disable=SC2086
part latency "latency" 300 "$out/latency.txt" \
    python -m guardrt.bench.latency --results "$out" --budget-s 270 ${GPU_CHECK_LATENCY_ARGS:-}
tail -50 "$out/latency.txt" 2>/dev/null
# Issue 8's targets judged from what the bench wrote (benchmarks/targets.py: the README's table
# and met / missed / not measured per target; no GPU needed, so it costs no device time to speak
# of). The eager run's file is in eager/, not matched here.
for results in "$out"/latency-*.json; do
    [ -f "$results" ] || continue
    python benchmarks/targets.py "$results" > "$out/targets.md" 2>&1
    cat "$out/targets.md"
    pack
done

part cuda_tests "parity + static steps + attention plan on CUDA" 120 "$out/parity_cuda.txt" \
    env GUARDRT_TEST_DEVICE=cuda TRITON_INTERPRET=0 python -m pytest -q -rfE -p no:cacheprovider \
    tests/test_model_parity.py tests/test_static_steps.py tests/test_attention_plan.py \
    tests/test_device_pixels.py
tail -5 "$out/parity_cuda.txt" 2>/dev/null

# The compiled Triton kernels (no interpreter): the other tests of these files run CPU tensors
# through the interpreter, so only these run here.
part kernel_tests "int8 rows, 8-bit graphs, timer, int8 load memory, fused kernels on CUDA" 100 \
    "$out/int8_rows_cuda.txt" \
    env GUARDRT_TEST_DEVICE=cuda TRITON_INTERPRET=0 python -m pytest -q -rfE -p no:cacheprovider \
    tests/test_int8_rows.py tests/test_quantize.py tests/test_norm_rope.py tests/test_activation_quant.py \
    -k "load_tuning or graphs or timer or holds_no_bf16 or compiled_kernels"
tail -5 "$out/int8_rows_cuda.txt" 2>/dev/null

part norm_rope "norm/rope" 60 "$out/norm_rope.txt" \
    env TRITON_INTERPRET=0 python benchmarks/norm_rope.py --out "$out/norm_rope.json"
cat "$out/norm_rope.txt" 2>/dev/null

part kernels "kernels" 80 "$out/kernels.txt" \
    env TRITON_INTERPRET=0 python benchmarks/kernels.py --budget 60 --out "$out/kernels.json"
tail -25 "$out/kernels.txt" 2>/dev/null

# GPU_CHECK_PROFILE_ARGS (word-split) goes after these, e.g. "--precisions fp8,int8": where an
# 8-bit verdict's time goes (profile-fp8.txt, profile-int8.txt; bf16's is profile.txt).
# shellcheck disable=SC2086
part profile "profile" 90 "$out/profile.log" \
    python benchmarks/profile_gpu.py --out "$out" ${GPU_CHECK_PROFILE_ARGS:-}
grep "==\|^NVIDIA" "$out"/profile*.txt 2>/dev/null

mkdir -p "$out/eager"
part eager "latency, eager bf16" 70 "$out/eager/latency.txt" \
    python -m guardrt.bench.latency --precisions bf16 --no-baseline --no-cuda-graphs \
    --concurrency 8 --requests 32 --budget-s 40 --results "$out/eager"
grep -E "safe|unsafe|throughput" "$out/eager/latency.txt" 2>/dev/null | head -12
# cuda-python from the carried wheels where the machine has none (they are zip files); grpcio,
# grpc_health, grpc_reflection and protobuf always from theirs (the tests import the servers,
# whose generated code refuses an older grpcio or protobuf; the image has neither grpc_health
# nor grpc_reflection).
part device_kv "TensorRT back end's device K/V copies on CUDA" 60 "$out/device_kv.txt" bash -c '
    if ! python -c "import cuda.bindings.runtime" 2> /dev/null; then
        for wheel in .gpu_carry/wheels/*.whl; do python -m zipfile -e "$wheel" /tmp/cuda_python; done
        export PYTHONPATH="/tmp/cuda_python:$PYTHONPATH"
    fi
    for wheel in .gpu_carry/serve_wheels/*.whl; do python -m zipfile -e "$wheel" /tmp/serve_python; done
    export PYTHONPATH="/tmp/serve_python:$PYTHONPATH"
    exec python -m pytest -q -rfEs -p no:cacheprovider tests/test_device_steps.py -k gpu'
tail -5 "$out/device_kv.txt" 2>/dev/null
# `guardrt export build --device cuda`, never run on a GPU: convert, quantize and the torch side
# of parity on the GPU, the graphs traced from the GPU model. The machine may lack the exporter's
# packages (onnx, onnxscript, onnx-ir, ml_dtypes, protobuf): each missing one comes from its
# carried cp312 wheel in .gpu_carry/export_wheels/. The engine stays in /tmp (not packed).
part export_cuda "export build --device cuda (tiny-random, int8)" 90 "$out/export_cuda.txt" bash -c '
    for pair in onnx:onnx- onnxscript:onnxscript- onnx_ir:onnx_ir- ml_dtypes:ml_dtypes- \
        google.protobuf:protobuf-; do
        module="${pair%%:*}" wheel="${pair#*:}"
        if ! python -c "import $module" 2> /dev/null; then
            for file in .gpu_carry/export_wheels/"$wheel"*.whl; do
                python -m zipfile -e "$file" /tmp/export_python
            done
        fi
    done
    export PYTHONPATH="/tmp/export_python:$PYTHONPATH"
    exec python -m guardrt export build --model tiny-random --precision int8 --device cuda \
        -o /tmp/export_cuda_engine --force'
tail -12 "$out/export_cuda.txt" 2>/dev/null

stamp "done"
pack
