#!/usr/bin/env bash
# Builds .gpu_carry/, what scripts/gpu_check.sh needs on the device machine beyond its image
# (Python 3.12, torch, triton, transformers, onnxruntime, grpcio; no internet):
#   llama_models/      the default tokenizer and Meta's reference code (from this .venv);
#   wheels/            cuda-bindings 13.0 and cuda-pathfinder, cp312 (the TensorRT part's
#                      device K/V copies go through cuda-python's runtime);
#   export_wheels/     onnx, onnxscript, onnx-ir, ml_dtypes and protobuf, cp312 (the export
#                      part; the image's onnx and onnx-ir are older than those tested here);
#   serve_wheels/      grpcio, grpcio-health-checking, grpcio-reflection and protobuf as this
#                      .venv has them, cp312 (the TensorRT part's tests import the servers:
#                      guardrt/v1's generated code demands at least the grpcio and protobuf it
#                      was generated with, and the image has neither grpc_health nor
#                      grpc_reflection).
# It is ignored by git: pass it to the device tool's run as carry [".gpu_carry"]. Run
# `bash scripts/setup.sh test` first (for .venv). Idempotent: it starts from an empty folder.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GUARDRT_VENV:-.venv}"
source_dir="$("$venv/bin/python" -c 'import llama_models, pathlib; print(pathlib.Path(llama_models.__file__).parent)')"
rm -rf .gpu_carry && mkdir -p .gpu_carry/wheels .gpu_carry/export_wheels .gpu_carry/serve_wheels
cp -r "$source_dir" .gpu_carry/llama_models
find .gpu_carry/llama_models -name __pycache__ -prune -exec rm -rf {} +
download() {  # folder, platform, requirement...
    local folder="$1" platform="$2"
    shift 2
    "$venv/bin/python" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.12 --platform "$platform" --platform manylinux2014_x86_64 \
        -d ".gpu_carry/$folder" "$@"
}
download wheels manylinux_2_28_x86_64 "cuda-bindings==13.0.*" cuda-pathfinder
# protobuf as this .venv has it (the version the generated guardrt/v1 code is tested with)
protobuf="$("$venv/bin/python" -c 'import google.protobuf as p; print(p.__version__)')"
download export_wheels manylinux_2_28_x86_64 "onnx==1.23.2" "onnxscript==0.7.2" "onnx-ir==1.1.0" \
    "ml_dtypes==0.6.0" "protobuf==$protobuf"
version() { "$venv/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
download serve_wheels manylinux_2_28_x86_64 "grpcio==$(version grpcio)" \
    "grpcio-health-checking==$(version grpcio-health-checking)" \
    "grpcio-reflection==$(version grpcio-reflection)" "protobuf==$protobuf"
ls .gpu_carry/wheels .gpu_carry/export_wheels .gpu_carry/serve_wheels
du -sh .gpu_carry
