"""Wan2.1 transformer and its streaming KV cache."""
