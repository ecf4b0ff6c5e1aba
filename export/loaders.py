"""Model loaders: a built-in architecture or a local diffusers folder -> PyTorch modules.

Everything is read from local files; hub access is switched off before diffusers is imported.
Pickled weights (``.ckpt``, ``.bin``, ``.pt``) are refused unless the caller allows them.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import sys
import types
import typing
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from sdtrt.errors import ModelSourceError, UnsafeCheckpointError, UsageError
from sdtrt.export.architectures import BUILTIN_ARCHITECTURES, Architecture

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
REQUIRED_COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # sdtrt logs its own progress


@contextmanager
def _library_logs_silenced():
    """diffusers logs at error level what it then works around (no safetensors file, before it falls back to the
    allowed pickle), transformers logs a load report and raises "look at the above report", torch warns about
    pickle protocols. sdtrt reports what fails itself, in one line: nothing of theirs while a component loads."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    saved = [(lib, lib.get_verbosity()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in saved:
        lib.set_verbosity(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, level in saved:
            lib.set_verbosity(level)


# diffusers' state-dict error, one line per tensor
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")
# the same, as diffusers words it when it loads with low_cpu_mem_usage (accelerate or peft installed): (key, config,
# weights) in that order
_SIZE_MISMATCH_LOW_MEM = re.compile(r"because (\S+) expected shape torch\.Size\((\[[^\]]*\])\), but got "
                                    r"torch\.Size\((\[[^\]]*\])\)")


def _mismatch_error(component: str, path: Path, mismatches: list[tuple[str, str, str]]) -> ModelSourceError:
    key, weights, config = mismatches[0]
    more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
    return ModelSourceError(f"cannot load {component} from {path}: the weights do not match {component}/config.json: "
                            f"size mismatch for {key}: the weights have shape {weights}, the config gives {config}"
                            f"{more}")


def _check_config_types(config_file: Path, cls) -> None:
    """Refuse a config value of a type ``cls.__init__`` does not take (``"in_channels": "4"``), naming the key and
    the file: diffusers and transformers fail on it deep inside (``TypeError: not all arguments converted during
    string formatting``), or build a model that is not the checkpoint's."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return  # the library names the missing file
    except (OSError, ValueError) as ex:
        raise ModelSourceError(f"cannot read {config_file}: {ex}") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"{config_file} does not hold a JSON object")
    init = inspect.unwrap(cls.__init__)
    namespace = vars(sys.modules[init.__module__])
    for key, param in inspect.signature(init).parameters.items():
        if key not in config or param.annotation is inspect.Parameter.empty:
            continue
        annotation = param.annotation
        if isinstance(annotation, str):  # postponed annotations: resolved where the class is defined, or not checked
            try:
                annotation = eval(annotation, dict(namespace))  # noqa: S307 (the library's own annotation text)
            except Exception:  # noqa: BLE001
                continue
        if not _conforms(config[key], annotation):
            raise ModelSourceError(f"{config_file}: {key} must be {_describe(annotation)}, got {config[key]!r}")


def _conforms(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits an annotation; what is not modelled here (Literal, classes) is the library's to
    check."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is None or tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (list, tuple) or origin in (list, tuple):
        items = {a for a in args if a is not Ellipsis}
        # diffusers writes Tuple[int] for "ints, any number of them"
        return isinstance(value, (list, tuple)) and (len(items) != 1 or all(_conforms(v, *items) for v in value))
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in typing.get_args(tp)))
    names = {type(None): "null", None: "null", bool: "true or false", int: "an integer", float: "a number",
             str: "a string", list: "a list", tuple: "a list", dict: "an object"}
    return names.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))


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
    # SDXL: the second text encoder (CLIPTextModelWithProjection) and its tokenizer. The refiner has only that one,
    # held as ``text_encoder`` (sdtrt's folder names encoders in order; the manifest says what each is).
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    pipeline_config: dict[str, Any] = field(default_factory=dict)  # force_zeros_for_empty_prompt, requires_aesthetics_score

    @property
    def added_conditioning(self) -> bool:
        """The U-Net takes SDXL's pooled text embedding and time ids (diffusers' ``addition_embed_type="text_time"``)."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def encoders(self) -> list[tuple[str, Any, Any]]:
        """(folder name, text encoder, tokenizer) of each text encoder, in the order their hidden states are joined."""
        out = [("text_encoder", self.text_encoder, self.tokenizer)]
        if self.text_encoder_2 is not None:
            out.append(("text_encoder_2", self.text_encoder_2, self.tokenizer_2))
        return out

    @property
    def diffusers_names(self) -> list[str]:
        """Each encoder's name in diffusers' pipeline of this kind (``encoders``' order): an SDXL refiner's one
        encoder is the projected OpenCLIP bigG one, diffusers' ``text_encoder_2``."""
        if self.added_conditioning and self.text_encoder_2 is None:
            return ["text_encoder_2"]
        return [c for c, _, _ in self.encoders]

    @property
    def prediction_type(self) -> str:
        if "prediction_type" in (self.scheduler_config.get("_use_default_values") or ()):
            return "epsilon"  # diffusers ignores a value it lists as defaulted
        return self.scheduler_config.get("prediction_type", "epsilon")

    def save_pretrained(self, folder: Path) -> None:
        """Write a diffusers-format folder (safetensors), loadable by StableDiffusionPipeline (SDXL:
        StableDiffusionXLPipeline, the refiner StableDiffusionXLImg2ImgPipeline, an inpainting U-Net the inpaint one)."""
        self.diffusers_pipeline().save_pretrained(folder, safe_serialization=True)

    def diffusers_pipeline(self, unet=None, encoders: dict | None = None):
        """This model as the diffusers pipeline of its kind (``save_pretrained``'s), with ``unet`` and ``encoders``
        (sdtrt's encoder name -> module, ``encoders``' order) in place of its own when given."""
        from diffusers import StableDiffusionPipeline

        unet = self.unet if unet is None else unet
        modules = {c: m for c, m, _ in self.encoders} | (encoders or {})
        if self.added_conditioning:
            import diffusers

            inpaint = int(unet.config.in_channels) != int(unet.config.out_channels)
            refiner = self.text_encoder_2 is None
            cls = getattr(diffusers, "StableDiffusionXLInpaintPipeline" if inpaint else
                          "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline")
            encoders = dict(text_encoder=None, tokenizer=None)  # the refiner has none of its own
            for name, (component, _, tokenizer) in zip(self.diffusers_names, self.encoders):
                encoders |= {name: modules[component], name.replace("text_encoder", "tokenizer"): tokenizer}
            return cls(vae=self.vae, unet=unet, scheduler=make_scheduler(self.scheduler_config), **encoders,
                       **self.pipeline_config)
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=modules["text_encoder"], tokenizer=self.tokenizer, unet=unet,
            scheduler=make_scheduler(self.scheduler_config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )


def make_scheduler(config: dict[str, Any]):
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", "PNDMScheduler"))
    return cls.from_config(config)


def build_builtin(arch: Architecture, seed: int = 0) -> LoadedModel:
    _offline()
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdtrt.export.tokenizer import build_clip_tokenizer

    def encoder(kwargs: dict, pad_token: str, projected: bool, component_seed: int):
        tokenizer = build_clip_tokenizer(arch.tokenizer_merges, pad_token=pad_token)
        text_kwargs = dict(kwargs)
        text_kwargs.setdefault("vocab_size", len(tokenizer))
        text_kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(component_seed)
        model = (CLIPTextModelWithProjection if projected else CLIPTextModel)(CLIPTextConfig(**text_kwargs))
        # Trained CLIP layer norms have non-trivial scales and biases; left at (1, 0), every token of the final hidden
        # state has mean exactly 0, and A1111's emphasis (which rescales by the chunk's mean) would divide noise by
        # noise.
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                with torch.no_grad():
                    module.weight.add_(0.1 * torch.randn_like(module.weight))
                    module.bias.copy_(0.1 * torch.randn_like(module.bias))
        return model.eval(), tokenizer

    # One seed per component, so changing one component's shape leaves the others' weights alone.
    text_encoder, tokenizer = encoder(arch.text_encoder, arch.tokenizer_pad_token, arch.projected_text_encoder, seed)
    text_encoder_2 = tokenizer_2 = None
    if arch.text_encoder_2:  # SDXL's OpenCLIP bigG pads with "!" (its tokenizer_2)
        text_encoder_2, tokenizer_2 = encoder(arch.text_encoder_2, "!", True, seed + 3)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**arch.unet)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**arch.vae)
    scheduler_config = {"_class_name": arch.scheduler_class, **arch.scheduler}
    scheduler_config = dict(make_scheduler(scheduler_config).config)
    scheduler_config["_class_name"] = arch.scheduler_class
    return LoadedModel(
        family=arch.family, source=arch.name, text_encoder=text_encoder, tokenizer=tokenizer,
        unet=unet.eval(), vae=vae.eval(), scheduler_config=_jsonable(scheduler_config),
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, pipeline_config=dict(arch.pipeline),
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
    encoders = _index_encoders(index, path)
    missing = [c for c in ("unet", "vae", "scheduler") if c not in index or not (path / c).is_dir()]
    if not encoders:
        missing.insert(0, "text_encoder")
    if missing:
        raise ModelSourceError(f"{path} is not a Stable Diffusion diffusers folder: missing {', '.join(missing)}")
    for component in (*encoders, "unet", "vae"):
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


def _index_encoders(index: dict, path: Path) -> list[str]:
    """The text encoders a model_index.json lists with their tokenizers (SDXL: text_encoder and text_encoder_2; its
    refiner: text_encoder_2 alone, text_encoder [null, null])."""
    out = []
    for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        entry = index.get(name)
        if isinstance(entry, list) and entry and entry[0] is not None and (path / name).is_dir():
            if not (path / tok).is_dir():
                raise ModelSourceError(f"{path} has {name} but no {tok} folder")
            out.append(name)
    return out


def load_diffusers_folder(path: Path, allow_pickle: bool = False) -> LoadedModel:
    index = _check_diffusers_folder(path, allow_pickle)
    _offline()
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    _quiet(diffusers, transformers)

    use_safetensors = None if allow_pickle else True

    def load(component: str, loader, config_class=None, **kwargs):
        if config_class is not None:
            _check_config_types(path / component / "config.json", config_class)
        # transformers, diffusers and torch raise whatever type the malformed file provokes (TypeError for a config
        # value of the wrong type, UnpicklingError for a pickle torch refuses, ...): at this boundary any of them
        # means "this component cannot be loaded", said in one line
        try:
            with _library_logs_silenced():
                loaded = loader(path / component, local_files_only=True, **kwargs)
        except Exception as ex:  # noqa: BLE001
            mismatches = _SIZE_MISMATCH.findall(str(ex)) or [
                (k, w, c) for k, c, w in _SIZE_MISMATCH_LOW_MEM.findall(str(ex))]
            if mismatches:  # the line that says what is wrong, not the summary above it
                raise _mismatch_error(component, path, mismatches) from None
            first = str(ex).strip().splitlines()[0] if str(ex).strip() else ""
            raise ModelSourceError(f"cannot load {component} from {path}: {type(ex).__name__}"
                                   f"{': ' + first[:300] if first else ''}") from None
        if not kwargs.get("output_loading_info"):
            return loaded
        model, info = loaded
        mismatches = sorted((key, str(list(weights)), str(list(config)))
                            for key, weights, config in info.get("mismatched_keys") or ())
        if mismatches:
            raise _mismatch_error(component, path, mismatches)
        return model

    loaded = []
    for name in _index_encoders(index, path):
        tok_name = name.replace("text_encoder", "tokenizer")
        tokenizer = load(tok_name, CLIPTokenizer.from_pretrained)
        # transformers puts a size mismatch in a logged report, not in its error: with ignore_mismatched_sizes it
        # returns it instead, and load() refuses it
        cls = CLIPTextModelWithProjection if index[name][1] == "CLIPTextModelWithProjection" else CLIPTextModel
        text_encoder = load(name, cls.from_pretrained, CLIPTextConfig, use_safetensors=use_safetensors,
                            output_loading_info=True, ignore_mismatched_sizes=True)
        positions = int(text_encoder.config.max_position_embeddings)
        if len(tokenizer) < 3 or tokenizer.eos_token_id is None or not 3 <= tokenizer.model_max_length <= positions:
            # transformers builds an empty tokenizer from a folder without vocabulary files, with no length limit
            raise ModelSourceError(f"{path / tok_name} holds no usable CLIP tokenizer: {len(tokenizer)} tokens, "
                                   f"model_max_length {tokenizer.model_max_length} (the text encoder has {positions} "
                                   "positions); vocab.json, merges.txt and tokenizer_config.json are needed")
        loaded.append((text_encoder.float().eval(), tokenizer))
    unet = load("unet", UNet2DConditionModel.from_pretrained, UNet2DConditionModel, use_safetensors=use_safetensors)
    vae = load("vae", AutoencoderKL.from_pretrained, AutoencoderKL, use_safetensors=use_safetensors)
    added = getattr(unet.config, "addition_embed_type", None)
    if added not in (None, "text_time"):
        raise ModelSourceError(f"{path}: U-Nets with added conditioning {added!r} are not supported (SDXL's "
                               "text_time is)")
    if added == "text_time" and not isinstance(loaded[-1][0], CLIPTextModelWithProjection):
        raise ModelSourceError(f"{path}: an SDXL U-Net needs a CLIPTextModelWithProjection text encoder for its "
                               "pooled text embedding")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(scheduler_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as ex:
        raise ModelSourceError(f"cannot read {scheduler_file}: {ex}") from None
    if not isinstance(scheduler_config, dict):
        raise ModelSourceError(f"{scheduler_file} does not hold a JSON object")
    cross_dim = unet.config.cross_attention_dim
    family = {768: "sd1", 1024: "sd2"}.get(cross_dim, "custom")
    if added:
        family = "sdxl" if len(loaded) == 2 else "sdxl-refiner"
    pipeline_config = {k: index[k] for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
                       if isinstance(index.get(k), bool)}
    (text_encoder, tokenizer), (text_encoder_2, tokenizer_2) = loaded[0], (loaded[1:] or [(None, None)])[0]
    return LoadedModel(
        family=family, source=str(path), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=unet.float().eval(), vae=vae.float().eval(), scheduler_config=scheduler_config,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, pipeline_config=pipeline_config,
    )


def resolve_source(source: str, allow_pickle: bool = False) -> Architecture | Path:
    """Check ``source`` without loading weights: a supported built-in, or a loadable diffusers folder."""
    known = ", ".join(n for n, a in BUILTIN_ARCHITECTURES.items() if a.supported)
    if not source.strip():  # Path("") is ".", which is not what anyone means
        raise ModelSourceError(f"the model path is empty: give a diffusers folder or one of the built-ins ({known})")
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
        raise ModelSourceError(f"unknown model {source!r}: give a diffusers folder or one of the built-ins ({known})")
    if path.is_file():
        if path.suffix.lower() == ".ckpt" and allow_pickle:
            return path  # a pickled single-file checkpoint, allowed
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeCheckpointError(
                f"{path} is a pickled checkpoint ({path.suffix}); pickles can run arbitrary code when loaded, "
                "so only safetensors are read: use a .safetensors file, or pass --allow-pickle for a .ckpt you trust"
            )
        if path.suffix.lower() == ".safetensors":
            return path  # a single-file checkpoint (export/single_file.py)
        raise ModelSourceError(f"{path} is a file, not a diffusers model folder or a .safetensors checkpoint")
    _check_diffusers_folder(path, allow_pickle)
    return path


def with_prediction_type(scheduler_config: dict, prediction_type: str) -> dict:
    """The config with ``prediction_type`` set, and no longer listed in ``_use_default_values`` (which would make
    diffusers, and our samplers, ignore it)."""
    unset = [k for k in scheduler_config.get("_use_default_values") or () if k != "prediction_type"]
    out = {**scheduler_config, "prediction_type": prediction_type}
    if "_use_default_values" in scheduler_config:
        out["_use_default_values"] = unset
    return out


@lru_cache(maxsize=2)
def load_model(source: str, allow_pickle: bool = False, seed: int = 0, config: str | None = None,
               prediction_type: str | None = None, tokenizer: str | None = None) -> LoadedModel:
    """Load a built-in architecture (seeded random weights), a diffusers folder or a single-file checkpoint
    (``config``, ``prediction_type``, ``tokenizer``: see ``single_file.load_single_file``).

    Cached by (source, options): exporting the same model twice in one process (fp16 then fp32)
    builds or reads it once. Callers must not modify the returned modules.
    """
    resolved = resolve_source(source, allow_pickle)
    if isinstance(resolved, Architecture):
        model = build_builtin(resolved, seed=seed)
    elif resolved.is_file():
        from sdtrt.export.single_file import load_single_file

        return load_single_file(resolved, config, prediction_type, allow_pickle, tokenizer)
    else:
        model = load_diffusers_folder(resolved, allow_pickle=allow_pickle)
    if config or tokenizer:
        raise UsageError("--config and --tokenizer are for single-file checkpoints (.safetensors)")
    if prediction_type:
        from dataclasses import replace

        model = replace(model, scheduler_config=with_prediction_type(model.scheduler_config, prediction_type))
    return model
