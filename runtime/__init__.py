"""Lean runtime: tokenizer, samplers, engine backends and the txt2img pipeline.

Imports no torch, diffusers or transformers (a test enforces it); TensorRT and CUDA load lazily.
"""

from sdtrt.runtime.pipeline import GenerationResult, Pipeline, save_png, save_pngs
from sdtrt.runtime.samplers import SAMPLERS, SamplerConfig, SamplerTable, build_table, step

__all__ = ["GenerationResult", "Pipeline", "SAMPLERS", "SamplerConfig", "SamplerTable", "build_table", "save_png",
           "save_pngs", "step"]
