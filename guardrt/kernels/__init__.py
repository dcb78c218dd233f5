"""Custom GPU kernels (Triton), each beside a plain-PyTorch reference it is tested against.

Lives under `guardrt` because transformers imports a top-level `kernels` package if one exists.
"""
