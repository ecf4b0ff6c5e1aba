"""The engine folder's ``manifest.json``: the contract between export, engine build and runtime.

Written by ``sdtrt.export``; read, without torch, by ``sdtrt build`` and ``sdtrt.runtime``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from sdtrt.config import from_dict, to_json, write_json_atomic
from sdtrt.errors import ManifestError
from sdtrt.manifest_check import folder_problem, values_problem

# 2: prompt chunks and CLIP-skip outputs in the text encoder, the VAE encoder, inpainting inputs and the blend in
# the sampler update; 3: ControlNet residual inputs in the U-Net, ControlNet components (graph I/O changed: older
# folders must be re-exported)
SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
# sampler_update: needed by the device loops only
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
CONTROLNET_PREFIX = "controlnet_"  # components named controlnet_NAME are ControlNets (NAME: what users pick)

# A dimension is either fixed (int) or named and dynamic (str, e.g. "batch", "height").
Dim = int | str


def level_dim(base: str, factor: int) -> str:
    """The name of ``base`` downsampled ``factor`` times (a U-Net level): ``latent_height_4``; ``base`` for 1."""
    return base if factor == 1 else f"{base}_{factor}"


def dim_value(name: str, values: dict[str, int]) -> int:
    """A named dimension's value: ``values[name]``, or for a level dim ``latent_height_4`` ceil(latent_height / 4),
    what a stride-2 convolution with padding 1 makes of an odd size at each level."""
    if name in values:
        return values[name]
    base, _, factor = name.rpartition("_")
    if base in values and factor.isdigit() and int(factor) > 0:
        return -(-values[base] // int(factor))
    raise KeyError(name)


def resolve_shape(dims: tuple[Dim, ...], values: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else dim_value(d, values) for d in dims)


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
class AttentionSite:
    """One attention of a graph, as the export measured it: its score matrix is rows x heads x q x k, with
    rows = ``rows_per_row`` x dim 0 of ``rows_input`` and q, k = a x (spatial size) + b tokens, the spatial size
    being the product of the dims after the first two of the graph's first 4-D input (its latent pixels)."""

    rows_input: str
    rows_per_row: float
    heads: int
    query: tuple[float, float]
    key: tuple[float, float]


@dataclass(frozen=True)
class MemoryModel:
    """What a graph's peak working memory grows with (``sdtrt.memory`` turns it into bytes for a shape)."""

    attention: tuple[AttentionSite, ...] = ()
    # elements of the largest intermediate tensor per row: a x (spatial size) + b
    activation: tuple[float, float] = (0.0, 0.0)
    activation_rows_input: str = ""


@dataclass(frozen=True)
class FlopModel:
    """A graph run's floating-point operations (a multiply-add counts 2, as torch's FlopCounterMode counts them):
    rows x (a x hw^2 + b x hw + c), with rows = dim 0 of ``rows_input`` and hw its spatial size as ``AttentionSite``'s,
    for one 77-token prompt chunk. Counted: convolutions, matrix products and attention (Q K^T and P V); not norms,
    activations and other elementwise work (``sdtrt.memory.flops`` evaluates it at a shape)."""

    rows_input: str
    per_row: tuple[float, float, float]  # a, b, c: the hw^2, hw and constant coefficients of one row


@dataclass(frozen=True)
class WeightEntry:
    """Where a model weight lives in a graph (``export/weight_map.py``): its initializer, stored transposed or not, and
    its bytes in the graph's external data file (a LoRA's update is added to them at generation time)."""

    initializer: str
    transposed: bool
    file: str
    offset: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Component:
    file: str
    sha256: str
    size_bytes: int
    precision: str  # "fp16" or "fp32": the compute precision of the graph's bulk
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[str, ...] = ()
    external_sha256: dict[str, str] = field(default_factory=dict)  # external data file -> sha256
    fp32_islands: tuple[str, ...] = ()  # what was kept in FP32 inside an fp16 graph, and why
    validation: tuple[ValidationResult, ...] = ()
    notes: str = ""
    memory: MemoryModel | None = None  # None: exported before sdtrt recorded it (no estimate, no refusal)
    source: str = ""  # ControlNets: the folder it was exported from, or "random" (the built-in)
    weights: dict[str, WeightEntry] = field(default_factory=dict)  # module path -> where its weight is (LoRA)
    flops: FlopModel | None = None  # None: exported before sdtrt counted them (``bench`` counts them itself)

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


@dataclass(frozen=True)
class TextEncoderInfo:
    """One text encoder of a model family: what the runtime feeds it and takes from it. The U-Net attends to the
    encoders' hidden states joined along the feature axis, in the manifest's order (SDXL: CLIP ViT-L's 768 then
    OpenCLIP bigG's 1280 = 2048; Podell et al. 2023, arXiv:2307.01952, section 2.1)."""

    component: str = "text_encoder"  # its graph in the folder
    tokenizer: str = "tokenizer"  # its tokenizer folder (the padding token differs: CLIP's EOS, OpenCLIP's "!")
    hidden_size: int = 0  # its hidden state's width
    # the hidden state used without CLIP skip, as an output: hidden_state_skip{skip_offset}, 0 the last layer's (SD);
    # SDXL's 1: always the penultimate layer, un-normalised; CLIP skip c takes hidden_state_skip{c + skip_offset}
    skip_offset: int = 0
    pooled: str = ""  # its output that is the pooled text embedding (SDXL: "text_embeds"); "" none
    # its name in diffusers' pipeline, which LoRA and embedding files go by ("" the component's; the SDXL refiner's
    # one encoder, this folder's text_encoder, is diffusers' text_encoder_2)
    diffusers_name: str = ""

    @property
    def lora_name(self) -> str:
        return self.diffusers_name or self.component


@dataclass(frozen=True)
class AddedConditions:
    """The U-Net's added conditioning besides the text (diffusers' ``addition_embed_type="text_time"``, SDXL): the
    pooled text embedding and the micro-conditioning ``time_ids``, each item two numbers (height, width / top, left)
    except ``aesthetic_score`` (one; the refiner, diffusers' ``requires_aesthetics_score``). diffusers'
    ``_get_add_time_ids``; the negative branch gets its own (``negative_original_size``, ...)."""

    pooled_input: str = "text_embeds"  # U-Net input (kB, pooled width)
    time_ids_input: str = "time_ids"  # U-Net input (kB, n)
    time_ids: tuple[str, ...] = ("original_size", "crops_coords_top_left", "target_size")

    @property
    def time_ids_width(self) -> int:
        return sum(1 if item == "aesthetic_score" else 2 for item in self.time_ids)


TIME_ID_ITEMS = ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score")


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
    max_chunks: int = 1  # a prompt may take this many 77-token chunks (A1111's 75 tokens + BOS + EOS each)
    clip_skips: int = 0  # the text encoder also returns hidden_state_skip1 .. skipN
    loras: tuple[str, ...] = ()  # LoRAs fused at export: "name:scale:sha256 (first 12 hex digits)"
    embedding_slots: int = 0  # spare token-embedding rows for textual-inversion vectors (ids vocab_size ...)
    # the model family as data (``encoders``): empty means SD 1.x/2.x's one encoder, "text_encoder" with "tokenizer"
    text_encoders: tuple[TextEncoderInfo, ...] = ()
    added_conditions: AddedConditions | None = None  # SDXL's pooled embedding and time ids; None: none
    # diffusers' force_zeros_for_empty_prompt (SDXL base): an empty negative prompt is all zeros, not the encoding of ""
    force_zeros_for_empty_prompt: bool = False

    @property
    def encoders(self) -> tuple[TextEncoderInfo, ...]:
        return self.text_encoders or (TextEncoderInfo(hidden_size=self.text_hidden_size),)


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
    workspace_bytes: int = 0  # the builder's workspace limit it was built with (0: not recorded)
    device_memory_bytes: int = 0  # its execution context's memory at the profile's largest shapes (device_memory_size_v2)


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
    timing_cache: str = ""  # its file name in the folder; "" when kept elsewhere (--timing-cache) or never saved
    opt_level: int = 3
    workspace_gb: float | None = None
    static: bool = False
    # each engine against ONNX Runtime on the same ONNX, on the GPU it was built on (empty: --no-verify)
    verification: dict[str, tuple[ValidationResult, ...]] = field(default_factory=dict)
    end_to_end: EndToEndCheck | None = None
    refittable: bool = False  # the U-Net and text encoder engines take new weights (LoRAs) through trt.Refitter
    gpu_free_bytes: int = 0  # GPU memory free when the build started (cudaMemGetInfo; 0: not recorded)


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
        if version != SCHEMA_VERSION or type(version) is not int:
            what = f"schema version {version}" if type(version) is int else \
                f"a schema_version that is not an integer ({version!r})"
            raise ManifestError(f"manifest.json has {what}; this sdtrt reads version {SCHEMA_VERSION} "
                                "(re-export the model with this sdtrt)")
        try:
            manifest = from_dict(cls, data)
            problem = manifest.problem()
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as ex:
            raise ManifestError(f"manifest.json is malformed: {ex}") from None
        if problem:
            raise ManifestError(f"manifest.json holds impossible values: {problem} (re-export the model)")
        return manifest

    def problem(self) -> str | None:
        """Why these values cannot describe a working engine folder, or None."""
        m, r = self.model, self.ranges
        checks = [
            (m.latent_channels >= 1, f"latent_channels = {m.latent_channels}"),
            (m.vae_scale_factor >= 1 and m.vae_scale_factor & (m.vae_scale_factor - 1) == 0,
             f"vae_scale_factor = {m.vae_scale_factor} (a power of 2)"),
            (math.isfinite(m.vae_scaling_factor) and m.vae_scaling_factor > 0, f"vae_scaling_factor = {m.vae_scaling_factor}"),
            (m.text_hidden_size >= 1, f"text_hidden_size = {m.text_hidden_size}"),
            (m.max_text_length >= 3, f"max_text_length = {m.max_text_length}"),
            (1 <= m.max_chunks <= 64, f"max_chunks = {m.max_chunks}"),
            (0 <= m.clip_skips <= 64, f"clip_skips = {m.clip_skips}"),
            (m.vocab_size >= 1, f"vocab_size = {m.vocab_size}"),
            (m.prediction_type in ("epsilon", "v_prediction"), f"prediction_type = {m.prediction_type!r}"),
            (1 <= r.batch_min <= r.batch_max, f"batch range {r.batch_min}..{r.batch_max}"),
            (8 <= r.size_min <= r.size_max and r.size_min % 8 == 0 and r.size_max % 8 == 0,
             f"size range {r.size_min}..{r.size_max}"),
            (self.precision in ("fp16", "fp32"), f"precision = {self.precision!r}"),
            (r.size_min <= m.default_size <= r.size_max and m.default_size % max(8, m.vae_scale_factor) == 0,
             f"default_size = {m.default_size} (a multiple of {max(8, m.vae_scale_factor)} in "
             f"{r.size_min}..{r.size_max})"),
            # the names LoRA keys and SDXL embeddings address the encoders by: diffusers' two, each once
            (all(e.lora_name in ("text_encoder", "text_encoder_2") for e in m.text_encoders)
             and len({e.lora_name for e in m.text_encoders}) == len(m.text_encoders),
             "text encoders' diffusers names " + repr([e.lora_name for e in m.text_encoders])),
        ]
        for ok, what in checks:
            if not ok:
                return what
        for name in REQUIRED_COMPONENTS + tuple(e.component for e in m.encoders):
            if name not in self.components:
                return f"no {name} component"
        if sum(e.hidden_size for e in m.encoders) != m.text_hidden_size:
            return (f"text_hidden_size = {m.text_hidden_size}, but the text encoders' widths add up to "
                    f"{sum(e.hidden_size for e in m.encoders)}")
        if len({e.component for e in m.encoders}) != len(m.encoders) or \
                len({e.tokenizer for e in m.encoders}) != len(m.encoders):
            return "two text encoders share a graph or a tokenizer folder"
        for e in m.encoders:
            if not 0 <= e.skip_offset <= m.clip_skips or e.hidden_size < 1:
                return f"text encoder {e.component}: skip_offset {e.skip_offset}, hidden_size {e.hidden_size}"
        added = m.added_conditions
        if added is not None and (not set(added.time_ids) <= set(TIME_ID_ITEMS) or not added.time_ids or
                                  sum(1 for e in m.encoders if e.pooled) != 1):
            return (f"added conditions {added.time_ids} (items of {', '.join(TIME_ID_ITEMS)}) need exactly one "
                    "text encoder with a pooled output")
        for name, c in self.components.items():
            for file in (c.file, *c.external_data):
                if not file or "/" in file or "\\" in file or file in (".", ".."):
                    return f"{name} file {file!r} (a file name inside the folder)"
            for spec in c.inputs + c.outputs:
                if spec.dtype not in ("float16", "float32", "int32", "int64"):
                    return f"{name}.{spec.name} has dtype {spec.dtype!r}"
                if not (len(spec.shape) == len(spec.min_shape) == len(spec.max_shape)) or any(
                        lo < 0 or lo > hi for lo, hi in zip(spec.min_shape, spec.max_shape)):
                    return f"{name}.{spec.name} has inconsistent shapes"
        return values_problem(self) or self._graph_problem()

    def _graph_problem(self) -> str | None:
        """Model facts that the graphs' own specs also state must agree (a wrong vae_scale_factor would make
        images of another size than asked for)."""
        m = self.model
        dec = self.components["vae_decoder"]
        lat, img = _spec(dec.inputs, "latents"), _spec(dec.outputs, "image")
        if lat is not None and img is not None and len(lat.max_shape) == len(img.max_shape) == 4:
            if lat.max_shape[2] * m.vae_scale_factor != img.max_shape[2]:
                return (f"vae_scale_factor = {m.vae_scale_factor}, but the VAE decoder maps {lat.max_shape[2]} latent "
                        f"rows to {img.max_shape[2]} pixels")
            if lat.max_shape[1] != m.latent_channels:
                return f"latent_channels = {m.latent_channels}, but the VAE decoder takes {lat.max_shape[1]}"
        for e in m.encoders:
            outputs = {o.name: o for o in self.components[e.component].outputs}
            missing = [f"hidden_state_skip{k}" for k in range(1, m.clip_skips + 1)
                       if f"hidden_state_skip{k}" not in outputs] + ([e.pooled] if e.pooled and e.pooled not in outputs else [])
            if missing:
                return f"clip_skips = {m.clip_skips}, but {e.component} has no {missing[0]} output"
            hidden = outputs.get("last_hidden_state")
            if hidden is not None and hidden.shape[-1] != e.hidden_size:
                return f"{e.component} gives hidden states {hidden.shape[-1]} wide, the manifest says {e.hidden_size}"
        unet = self.components["unet"]
        if m.added_conditions is not None:
            a, pooled = m.added_conditions, next(e for e in m.encoders if e.pooled)
            te, ti = _spec(unet.inputs, a.pooled_input), _spec(unet.inputs, a.time_ids_input)
            width = _spec(self.components[pooled.component].outputs, pooled.pooled)
            if te is None or ti is None or width is None or te.shape[-1] != width.shape[-1] or \
                    ti.shape[-1] != a.time_ids_width:
                return (f"the U-Net's added-condition inputs do not match the manifest's ({a.pooled_input} from "
                        f"{pooled.component}.{pooled.pooled}, {a.time_ids_input} of {a.time_ids_width})")
        levels = self.residual_levels()
        if not levels:
            return "the U-Net has no ControlNet residual inputs (down_residual_i, mid_residual)"
        for name, c in self.controlnets.items():
            if residual_levels(c.outputs) != levels:
                return f"ControlNet {name}'s residuals do not match the U-Net's residual inputs"
            # the device loop feeds the U-Net's buffers to the ControlNets and theirs to the U-Net
            added = (m.added_conditions.pooled_input, m.added_conditions.time_ids_input) if m.added_conditions else ()
            shared = [(c.inputs, unet.inputs, n, n) for n in ("latents", "timestep", "encoder_hidden_states", *added)]
            shared += [(c.outputs, unet.inputs, s.name, s.name) for s in c.outputs]
            shared += [(c.inputs, unet.inputs, s.name + "_in", s.name) for s in c.outputs]
            for specs, unet_specs, mine, theirs in shared:
                a, b = _spec(specs, mine), _spec(unet_specs, theirs)
                if a is None or b is None or a.dtype != b.dtype:
                    return (f"ControlNet {name}'s {mine} is {a.dtype if a else 'missing'}, the U-Net's {theirs} "
                            f"{b.dtype if b else 'missing'}")
        return None

    @property
    def controlnets(self) -> dict[str, Component]:
        """NAME -> component of every ControlNet in the folder, in the order they were added."""
        return {k[len(CONTROLNET_PREFIX):]: c for k, c in self.components.items() if k.startswith(CONTROLNET_PREFIX)}

    def residual_levels(self) -> list[tuple[int, int]]:
        """(channels, downsampling factor) of each ControlNet residual the U-Net takes, the mid block's last."""
        return residual_levels(self.components["unet"].inputs)

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        folder = Path(folder)
        if folder.is_file():
            raise ManifestError(f"{folder} is a file, not an engine folder (give the folder `sdtrt export` wrote)")
        if not folder.is_dir():
            raise ManifestError(f"engine folder {folder} does not exist")
        path = folder / MANIFEST_NAME
        if path.exists() and not path.is_file():
            raise ManifestError(f"{path} is not a file: is {folder} an sdtrt engine folder (made by `sdtrt export`)?")
        if not path.is_file():
            raise ManifestError(f"{path} not found: is {folder} an sdtrt engine folder (made by `sdtrt export`)?")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ManifestError(f"{path} is not UTF-8 text: not a manifest written by sdtrt") from None
        except OSError as ex:
            raise ManifestError(f"cannot read {path}: {ex.strerror}") from None
        manifest = cls.from_json(text)
        problem = folder_problem(manifest, folder)
        if problem:
            raise ManifestError(f"{path} is refused: {problem}; an engine folder's files must lie inside it")
        return manifest


# what every export writes, whatever a manifest says: the folders sdtrt owns by name
# made at load: .sdtrt-ort, ONNX Runtime's optimized graphs for this CPU (runtime/ort_cache.py); .sdtrt-openvino,
# OpenVINO's compiled models (runtime/openvino.py)
OWNED_FOLDERS = ("tokenizer", "scheduler", ".sdtrt-ort", ".sdtrt-openvino")
ENCODER_TOKENIZERS = ("tokenizer_2",)  # owned too when the manifest's text encoders name them (SDXL)
OWNED_SUFFIXES = (".onnx", ".onnx.data", ".plan")


def owned_entries(folder: Path) -> set[str] | None:
    """The names in ``folder`` that sdtrt wrote (what ``export --force`` may replace): the manifest, the hash record,
    the ``tokenizer`` and ``scheduler`` folders, and the graph, external-data and engine files the manifest lists;
    None when the folder holds no sdtrt manifest. Read from the raw JSON, so a manifest of another schema version
    still says what it owns. A manifest is not trusted to name anything else: a listed name counts only as a plain
    file name with a graph or engine suffix that is a file (or link) in the folder, never a path or a folder (a
    hand-edited manifest naming ``photos/x.onnx`` or ``~`` makes nothing of the user's sdtrt's to replace)."""
    folder = Path(folder)
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "schema_version" not in data or not isinstance(data.get("components"), dict):
        return None
    from sdtrt.integrity import CACHE

    names = []
    for component in data["components"].values():
        if isinstance(component, dict):
            names += [component.get("file"), *(component.get("external_data") or ())]
    engines = (data.get("tensorrt") or {}).get("engines") if isinstance(data.get("tensorrt"), dict) else None
    for engine in (engines or {}).values():
        if isinstance(engine, dict):
            names.append(engine.get("file"))
    owned = {MANIFEST_NAME, CACHE, *OWNED_FOLDERS}
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    for encoder in model.get("text_encoders") or ():
        if isinstance(encoder, dict) and encoder.get("tokenizer") in ENCODER_TOKENIZERS:
            owned.add(encoder["tokenizer"])
    for name in names:
        if (isinstance(name, str) and name.endswith(OWNED_SUFFIXES) and Path(name).name == name
                and "\\" not in name and not (folder / name).is_dir()):
            owned.add(name)
    return owned


def residual_levels(specs) -> list[tuple[int, int]]:
    """(channels, factor) of the down_residual_i and mid_residual tensors among ``specs``, in order."""
    named = {s.name: s for s in specs}
    order = [f"down_residual_{i}" for i in range(len(named)) if f"down_residual_{i}" in named] + ["mid_residual"]
    out = []
    for name in order:
        if name in named:
            dim = named[name].shape[2]
            factor = dim.rpartition("_")[2] if isinstance(dim, str) else ""
            out.append((int(named[name].shape[1]), int(factor) if factor.isdigit() else 1))
    return out


def _spec(specs, name: str) -> TensorSpec | None:
    return next((s for s in specs if s.name == name), None)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
