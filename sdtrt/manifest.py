"""The engine folder's ``manifest.json``: the contract between export, engine build and runtime.

Written by ``sdtrt.export``; read, without torch, by ``sdtrt build`` and ``sdtrt.runtime``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from sdtrt.config import from_dict, to_json, write_json_atomic
from sdtrt.errors import ManifestError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

# A dimension is either fixed (int) or named and dynamic (str, e.g. "batch", "height").
Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``min_shape``/``max_shape`` bound every dimension, inclusive."""

    name: str
    dtype: str  # numpy dtype name: "float16", "float32", "int32"
    shape: tuple[Dim, ...]
    min_shape: tuple[int, ...]
    max_shape: tuple[int, ...]

    def check_shape(self, shape: tuple[int, ...], label: str = "exported range") -> str | None:
        """Return why ``shape`` is not allowed, or None when it is."""
        if len(shape) != len(self.shape):
            return f"{self.name}: expected rank {len(self.shape)}, got shape {tuple(shape)}"
        for axis, (n, lo, hi, dim) in enumerate(zip(shape, self.min_shape, self.max_shape, self.shape)):
            if not lo <= n <= hi:
                dim_label = dim if isinstance(dim, str) else f"axis {axis}"
                allowed = f"{lo}" if lo == hi else f"{lo}..{hi}"
                return f"{self.name}: {dim_label} = {n} is outside the {label} {allowed}"
        return None


@dataclass(frozen=True)
class ValidationResult:
    """One parity check of an ONNX graph (ONNX Runtime) against the PyTorch FP32 module."""

    shape: str  # human-readable, e.g. "batch=3 512x320"
    max_abs_error: float
    max_rel_error: float  # max|onnx - torch| / max|torch|
    tolerance: float
    passed: bool
    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the case's input shapes
    values: dict[str, float] = field(default_factory=dict)  # its scalar inputs (timestep, guidance_scale)


@dataclass(frozen=True)
class Component:
    file: str
    sha256: str
    size_bytes: int
    precision: str  # "fp16" or "fp32": the compute precision of the graph's bulk
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[str, ...] = ()
    fp32_islands: tuple[str, ...] = ()  # what was kept in FP32 inside an fp16 graph, and why
    validation: tuple[ValidationResult, ...] = ()
    notes: str = ""

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


@dataclass(frozen=True)
class ModelInfo:
    family: str  # "tiny", "sd15", "sd2", ... or "sd1"/"sd2" for a diffusers folder
    source: str  # what was given to `sdtrt export`
    prediction_type: str  # "epsilon" or "v_prediction"
    latent_channels: int
    vae_scale_factor: int  # pixels per latent (8 for SD)
    vae_scaling_factor: float  # latents are divided by this before decoding (0.18215 for SD 1.5)
    text_hidden_size: int
    max_text_length: int  # tokens per prompt, BOS and EOS included (77)
    vocab_size: int
    weights_seed: int | None = None  # built-in architectures: the seed of their random weights
    default_size: int = 512  # pixels: the U-Net's sample_size times the VAE scale factor (diffusers' default)


@dataclass(frozen=True)
class Ranges:
    """Shapes the export was validated for and that engine profiles default to (pixels)."""

    batch_min: int
    batch_max: int
    size_min: int
    size_max: int


@dataclass(frozen=True)
class BuiltEngine:
    file: str
    sha256: str
    size_bytes: int
    profile: dict[str, tuple[tuple[int, ...], ...]]  # input -> (min, opt, max) shapes
    build_seconds: float = 0.0


@dataclass(frozen=True)
class EndToEndCheck:
    """A short generation on the TensorRT device loop against the same on ONNX Runtime (``sdtrt build``)."""

    psnr_db: float  # 999 when the images are identical, 0 when one is not finite
    min_psnr_db: float
    passed: bool
    width: int
    height: int
    batch: int
    steps: int
    sampler: str
    reference: str  # the ONNX Runtime backend that made the reference image


@dataclass(frozen=True)
class TensorRTBuild:
    """What `sdtrt build` made, and for which TensorRT and GPU: engines run only there."""

    version: str
    gpu: str
    compute_capability: str
    engines: dict[str, BuiltEngine]
    timing_cache: str = ""
    opt_level: int = 3
    workspace_gb: float | None = None
    static: bool = False
    # each engine against ONNX Runtime on the same ONNX, on the GPU it was built on (empty: --no-verify)
    verification: dict[str, tuple[ValidationResult, ...]] = field(default_factory=dict)
    end_to_end: EndToEndCheck | None = None


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    precision: str
    ranges: Ranges
    components: dict[str, Component]
    tokenizer_dir: str = "tokenizer"
    scheduler_config: str = "scheduler/scheduler_config.json"
    tools: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    created_by: str = "sdtrt"
    tensorrt: TensorRTBuild | None = None

    def to_json(self) -> str:
        return to_json(self)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        write_json_atomic(path, self.to_json())
        return path

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as ex:
            raise ManifestError(f"manifest.json is not valid JSON ({ex})") from None
        if not isinstance(data, dict):
            raise ManifestError("manifest.json does not hold a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest.json has schema version {version!r}; this sdtrt reads version {SCHEMA_VERSION} "
                "(re-export the model with this sdtrt)"
            )
        try:
            return from_dict(cls, data)
        except ValueError as ex:
            raise ManifestError(f"manifest.json is malformed: {ex}") from None

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        folder = Path(folder)
        if not folder.is_dir():
            raise ManifestError(f"engine folder {folder} does not exist")
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{path} not found: is {folder} an sdtrt engine folder (made by `sdtrt export`)?")
        return cls.from_json(path.read_text())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
