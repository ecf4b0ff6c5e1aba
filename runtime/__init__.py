"""Lean runtime: tokenizer, samplers, engine backends and the txt2img pipeline.

Imports no torch, diffusers or transformers (a test enforces it); TensorRT and CUDA load lazily.
"""
