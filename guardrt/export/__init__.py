"""Offline side: convert and quantize a checkpoint into ONNX / TensorRT engine directories.

Populated by the export issue; the package exists so the layout is fixed from the start.
"""
