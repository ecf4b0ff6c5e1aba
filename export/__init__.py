"""Export stage: a Stable Diffusion checkpoint -> validated ONNX graphs + manifest.json.

Needs the ``[export]`` extra (torch, diffusers, transformers, onnx). Heavy imports happen inside
functions so that ``import sdtrt.export`` stays cheap and the CLI can report missing extras clearly.
"""

from sdtrt.export.architectures import BUILTIN_ARCHITECTURES, Architecture
from sdtrt.export.exporter import ExportConfig, export

__all__ = ["BUILTIN_ARCHITECTURES", "Architecture", "ExportConfig", "export"]
