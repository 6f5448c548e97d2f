"""Tensor files, one tensor at a time: safetensors (and, when allowed, pickle) read and write, raw copies."""
