"""Benchmark suite: sdtrt against eager PyTorch (diffusers), side by side."""
