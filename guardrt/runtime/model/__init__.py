"""Our PyTorch mllama (needs the `torch` extra): config, vision, text, composition, loading."""
