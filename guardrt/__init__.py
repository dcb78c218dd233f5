"""guardrt: an inference runtime for Llama Guard 3 11B Vision (mllama) on your own GPUs."""

__version__ = "0.1.0"
