"""Checkpoint I/O: the HF boundary (`hf`); safetensors and JSON only, never pickles."""
