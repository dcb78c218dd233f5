"""Offline side: convert and quantize a checkpoint into ONNX / TensorRT engine directories.

`build.py` runs the chain (convert → quantize → build, parity at each step, manifest);
`quantize.py` is the one int8/fp8 weight quantization; `graphs.py` and `decoder.py` trace the
vision and decoder graphs; `parity.py` holds the fixed probes and the deviation measure;
`tensorrt_build.py` builds TensorRT engines from the ONNX graphs.
"""
