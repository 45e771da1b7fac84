"""Kernel implementations (Triton, compiled extension bindings) behind the public functions."""
