"""Single-file checkpoints in the original (CompVis / A1111) layout: ``model.safetensors`` holding
``model.diffusion_model.*`` (U-Net), ``first_stage_model.*`` (VAE) and ``cond_stage_model.*`` (text encoder).

The weights are converted by diffusers' own single-file loading (``StableDiffusionPipeline.from_single_file``)
with every config supplied locally from a built-in architecture (``config=`` a folder of configs, never a hub
download). The family is read from the keys — OpenAI CLIP (``cond_stage_model.transformer.*``: SD 1.x) or OpenCLIP
(``cond_stage_model.model.*``: SD 2.x), a 9-channel first U-Net convolution (inpainting) — and ``--config NAME``
forces one. SD 2.x defaults to v-prediction (the 768-v models people run); ``--prediction-type`` says otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdtrt.errors import ModelSourceError, UnsafeCheckpointError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


def read_header(path: Path, allow_pickle: bool) -> dict[str, tuple[int, ...]]:
    """key -> shape of every tensor of the checkpoint, without loading the weights where the format allows it."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "np") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except Exception as ex:  # noqa: BLE001  (safetensors raises its own untyped errors for broken files)
            raise ModelSourceError(f"{path} is not a readable safetensors file "
                                   f"({str(ex).strip().splitlines()[0][:200] if str(ex).strip() else ''})") from None
    if not allow_pickle:
        raise UnsafeCheckpointError(f"{path} is a pickled checkpoint ({path.suffix}); pickles can run arbitrary code "
                                    "when loaded: use a .safetensors file, or pass --allow-pickle for a file you trust")
    import torch

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as ex:  # noqa: BLE001
        raise ModelSourceError(f"cannot read {path}: {type(ex).__name__}: {str(ex).splitlines()[0][:200]}") from None
    data = data.get("state_dict", data) if isinstance(data, dict) else {}
    return {k: tuple(v.shape) for k, v in data.items() if hasattr(v, "shape")}


def detect(keys: dict[str, tuple[int, ...]]) -> tuple[str, str]:
    """(built-in configuration name, what it was read from) for a checkpoint's keys."""
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelSourceError("this is an SDXL checkpoint (conditioner.embedders.*): SDXL is not supported yet")
    if _UNET_IN not in keys:
        raise ModelSourceError(f"not a Stable Diffusion checkpoint in the original layout: no {_UNET_IN} (a diffusers "
                               "folder is exported as a folder)")
    channels = keys[_UNET_IN][1]
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        family, why = "sd21", "OpenCLIP text encoder (SD 2.x)"
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
        family, why = "sd15", "CLIP text encoder (SD 1.x)"
    else:
        raise ModelSourceError("the checkpoint has no text encoder this sdtrt knows (cond_stage_model.transformer.* "
                               "for SD 1.x, cond_stage_model.model.* for SD 2.x)")
    if channels == 9:
        return f"{family}-inpaint", f"{why}, 9-channel U-Net (inpainting)"
    if channels != 4:
        raise ModelSourceError(f"the U-Net's first convolution takes {channels} channels: not an SD 1.x/2.x model "
                               "(4, or 9 for inpainting); pass --config NAME if it is one of the built-ins' shapes")
    return family, why


def write_configs(arch, folder: Path) -> None:
    """A diffusers folder of configs only (no weights) for ``arch``: what from_single_file reads offline."""
    from diffusers import __version__ as diffusers_version
    from transformers import CLIPTextConfig

    from sdtrt.export.tokenizer import build_clip_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers_version,
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", arch.scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    for name, cls, config in (("unet", "UNet2DConditionModel", arch.unet), ("vae", "AutoencoderKL", arch.vae)):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps({"_class_name": cls, **config}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": arch.scheduler_class, **arch.scheduler}))
    tokenizer = build_clip_tokenizer(arch.tokenizer_merges, pad_token=arch.tokenizer_pad_token)
    tokenizer.save_pretrained(folder / "tokenizer")
    text = dict(arch.text_encoder)
    text.setdefault("vocab_size", len(tokenizer))
    CLIPTextConfig(**text, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id).save_pretrained(folder / "text_encoder")


def load_single_file(path: Path, config: str | None = None, prediction_type: str | None = None,
                     allow_pickle: bool = False, tokenizer: str | None = None):
    """A ``loaders.LoadedModel`` from a single-file checkpoint (see the module docstring)."""
    import tempfile

    from sdtrt.export.architectures import BUILTIN_ARCHITECTURES
    from sdtrt.export.loaders import LoadedModel, _jsonable, _library_logs_silenced, _offline, make_scheduler

    keys = read_header(path, allow_pickle)
    name, why = (config, "--config") if config else detect(keys)
    arch = BUILTIN_ARCHITECTURES.get(name)
    if arch is None or not arch.supported:
        known = ", ".join(n for n, a in BUILTIN_ARCHITECTURES.items() if a.supported)
        raise ModelSourceError(f"--config {name!r}: not a built-in configuration ({known})")
    _offline()
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="sdtrt-config-") as tmp:
        write_configs(arch, Path(tmp))
        extra = {}
        if tokenizer:
            extra["tokenizer"] = CLIPTokenizer.from_pretrained(tokenizer, local_files_only=True)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" on stderr
        try:
            with _library_logs_silenced():
                pipe = StableDiffusionPipeline.from_single_file(
                    str(path), config=tmp, local_files_only=True, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False, **extra)
        except Exception as ex:  # noqa: BLE001  (diffusers/torch raise what the mismatched file provokes)
            first = str(ex).strip().splitlines()[0][:300] if str(ex).strip() else ""
            raise ModelSourceError(f"cannot load {path} as {name} ({why}): {type(ex).__name__}: {first} (is it "
                                   f"another architecture? pass --config NAME)") from None
        finally:
            diffusers_logging.enable_progress_bar()
    vocab = int(pipe.text_encoder.config.vocab_size)
    if len(pipe.tokenizer) != vocab:
        raise ModelSourceError(
            f"{path}'s text encoder has a {vocab}-token vocabulary, the {name} configuration's tokenizer "
            f"{len(pipe.tokenizer)}: give the model's own tokenizer with --tokenizer DIR (the tokenizer/ folder of any "
            "diffusers model of this family; OpenAI's CLIP vocabulary cannot be downloaded here)")
    scheduler_config = dict(make_scheduler({"_class_name": arch.scheduler_class, **arch.scheduler}).config)
    scheduler_config["_class_name"] = arch.scheduler_class
    if prediction_type:
        from sdtrt.export.loaders import with_prediction_type

        scheduler_config = with_prediction_type(scheduler_config, prediction_type)
    return LoadedModel(family=arch.family, source=str(path), text_encoder=pipe.text_encoder.float().eval(),
                       tokenizer=pipe.tokenizer, unet=pipe.unet.float().eval(), vae=pipe.vae.float().eval(),
                       scheduler_config=_jsonable(scheduler_config))
