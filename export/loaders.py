"""Model loaders: a built-in architecture or a local diffusers folder -> PyTorch modules.

Everything is read from local files; hub access is switched off before diffusers is imported.
Pickled weights (``.ckpt``, ``.bin``, ``.pt``) are refused unless the caller allows them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sdtrt.errors import ModelSourceError, UnsafeCheckpointError
from sdtrt.export.architectures import BUILTIN_ARCHITECTURES, Architecture

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
REQUIRED_COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # sdtrt logs its own progress


def _quiet(*modules) -> None:
    """No per-file progress bars from transformers/diffusers in the middle of sdtrt's log."""
    for module in modules:
        logging = getattr(getattr(module, "utils", None), "logging", None)
        if logging is not None and hasattr(logging, "disable_progress_bar"):
            logging.disable_progress_bar()


@dataclass(frozen=True)
class LoadedModel:
    """The PyTorch pieces an export needs, in eval mode, FP32, on the CPU."""

    family: str
    source: str
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    scheduler_config: dict[str, Any]

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def save_pretrained(self, folder: Path) -> None:
        """Write a diffusers-format folder (safetensors), loadable by StableDiffusionPipeline."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=make_scheduler(self.scheduler_config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(folder, safe_serialization=True)


def make_scheduler(config: dict[str, Any]):
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", "PNDMScheduler"))
    return cls.from_config(config)


def build_builtin(arch: Architecture, seed: int = 0) -> LoadedModel:
    _offline()
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtrt.export.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(arch.tokenizer_merges, pad_token=arch.tokenizer_pad_token)
    text_kwargs = dict(arch.text_encoder)
    text_kwargs.setdefault("vocab_size", len(tokenizer))
    text_kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    # One seed per component, so changing one component's shape leaves the others' weights alone.
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_kwargs))
    # Trained CLIP layer norms have non-trivial scales and biases; left at (1, 0), every token of the final hidden
    # state has mean exactly 0, and A1111's emphasis (which rescales by the chunk's mean) would divide noise by noise.
    for module in text_encoder.modules():
        if isinstance(module, torch.nn.LayerNorm):
            with torch.no_grad():
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**arch.unet)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**arch.vae)
    scheduler_config = {"_class_name": arch.scheduler_class, **arch.scheduler}
    scheduler_config = dict(make_scheduler(scheduler_config).config)
    scheduler_config["_class_name"] = arch.scheduler_class
    return LoadedModel(
        family=arch.family, source=arch.name, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        unet=unet.eval(), vae=vae.eval(), scheduler_config=_jsonable(scheduler_config),
    )


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(config), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _has_weights(folder: Path, suffixes: tuple[str, ...]) -> bool:
    return any(p.suffix in suffixes for p in folder.iterdir() if p.is_file())


def _check_diffusers_folder(path: Path, allow_pickle: bool) -> dict[str, Any]:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelSourceError(f"{path} is not a diffusers model folder: model_index.json is missing")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as ex:
        raise ModelSourceError(f"{index_file} is not valid JSON ({ex})") from None
    if not isinstance(index, dict):
        raise ModelSourceError(f"{index_file} does not hold a JSON object")
    pipeline_class = index.get("_class_name", "")
    if "XL" in pipeline_class:
        raise ModelSourceError(f"{path} is a {pipeline_class}: {BUILTIN_ARCHITECTURES['sdxl'].unsupported_reason}")
    missing = [c for c in REQUIRED_COMPONENTS if c not in index or not (path / c).is_dir()]
    if missing:
        raise ModelSourceError(f"{path} is not a Stable Diffusion diffusers folder: missing {', '.join(missing)}")
    for component in ("text_encoder", "unet", "vae"):
        folder = path / component
        if _has_weights(folder, (".safetensors",)):
            continue
        if _has_weights(folder, PICKLE_SUFFIXES):
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{folder} holds only pickled weights, which can run arbitrary code when loaded; "
                    "convert them to safetensors, or pass --allow-pickle if you trust the file"
                )
            continue
        raise ModelSourceError(f"{folder} holds no weights (*.safetensors)")
    return index


def load_diffusers_folder(path: Path, allow_pickle: bool = False) -> LoadedModel:
    _check_diffusers_folder(path, allow_pickle)
    _offline()
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _quiet(diffusers, transformers)

    use_safetensors = None if allow_pickle else True

    def load(component: str, loader, **kwargs):
        # transformers, diffusers and torch raise whatever type the malformed file provokes (TypeError for a config
        # value of the wrong type, UnpicklingError for a pickle torch refuses, ...): at this boundary any of them
        # means "this component cannot be loaded", said in one line
        try:
            return loader(path / component, local_files_only=True, **kwargs)
        except Exception as ex:  # noqa: BLE001
            first = str(ex).strip().splitlines()[0] if str(ex).strip() else ""
            raise ModelSourceError(f"cannot load {component} from {path}: {type(ex).__name__}"
                                   f"{': ' + first[:300] if first else ''}") from None

    tokenizer = load("tokenizer", CLIPTokenizer.from_pretrained)
    text_encoder = load("text_encoder", CLIPTextModel.from_pretrained, use_safetensors=use_safetensors)
    positions = int(text_encoder.config.max_position_embeddings)
    if len(tokenizer) < 3 or tokenizer.eos_token_id is None or not 3 <= tokenizer.model_max_length <= positions:
        # transformers builds an empty tokenizer from a folder without vocabulary files, with no length limit
        raise ModelSourceError(f"{path / 'tokenizer'} holds no usable CLIP tokenizer: {len(tokenizer)} tokens, "
                               f"model_max_length {tokenizer.model_max_length} (the text encoder has {positions} "
                               "positions); vocab.json, merges.txt and tokenizer_config.json are needed")
    unet = load("unet", UNet2DConditionModel.from_pretrained, use_safetensors=use_safetensors)
    vae = load("vae", AutoencoderKL.from_pretrained, use_safetensors=use_safetensors)
    if getattr(unet.config, "addition_embed_type", None):
        raise ModelSourceError(f"{path}: U-Nets with added conditioning ({unet.config.addition_embed_type}) are not supported yet")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(scheduler_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as ex:
        raise ModelSourceError(f"cannot read {scheduler_file}: {ex}") from None
    if not isinstance(scheduler_config, dict):
        raise ModelSourceError(f"{scheduler_file} does not hold a JSON object")
    cross_dim = unet.config.cross_attention_dim
    family = {768: "sd1", 1024: "sd2"}.get(cross_dim, "custom")
    return LoadedModel(
        family=family, source=str(path), text_encoder=text_encoder.float().eval(), tokenizer=tokenizer,
        unet=unet.float().eval(), vae=vae.float().eval(), scheduler_config=scheduler_config,
    )


def resolve_source(source: str, allow_pickle: bool = False) -> Architecture | Path:
    """Check ``source`` without loading weights: a supported built-in, or a loadable diffusers folder."""
    if source in BUILTIN_ARCHITECTURES:
        arch = BUILTIN_ARCHITECTURES[source]
        if not arch.supported:
            raise ModelSourceError(f"model {source!r}: {arch.unsupported_reason}")
        return arch
    path = Path(source).expanduser()
    looks_like_path = os.sep in source or source.startswith(".") or path.suffix != ""
    if not path.exists():
        if looks_like_path:
            raise ModelSourceError(f"model path {source} does not exist")
        known = ", ".join(n for n, a in BUILTIN_ARCHITECTURES.items() if a.supported)
        raise ModelSourceError(f"unknown model {source!r}: give a diffusers folder or one of the built-ins ({known})")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeCheckpointError(
                f"{path} is a pickled checkpoint ({path.suffix}); pickles can run arbitrary code when loaded, "
                "so only safetensors are read: convert it to a diffusers folder with safetensors weights"
            )
        if path.suffix.lower() == ".safetensors":
            raise ModelSourceError(
                f"{path} is a single-file checkpoint; export needs a diffusers folder "
                "(convert it with diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR))"
            )
        raise ModelSourceError(f"{path} is a file, not a diffusers model folder")
    _check_diffusers_folder(path, allow_pickle)
    return path


@lru_cache(maxsize=2)
def load_model(source: str, allow_pickle: bool = False, seed: int = 0) -> LoadedModel:
    """Load a built-in architecture (seeded random weights) or a diffusers folder.

    Cached by (source, options): exporting the same model twice in one process (fp16 then fp32)
    builds or reads it once. Callers must not modify the returned modules.
    """
    resolved = resolve_source(source, allow_pickle)
    if isinstance(resolved, Architecture):
        return build_builtin(resolved, seed=seed)
    return load_diffusers_folder(resolved, allow_pickle=allow_pickle)
