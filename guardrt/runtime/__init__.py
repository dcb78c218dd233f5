"""Serving side: image tiling, prompting, the model, engine back ends, scheduler and servers.

Nothing here imports torch at import time: serving an ONNX/TensorRT engine must not need it.
"""
