"""Single-file checkpoints in the original layout: ``model.safetensors`` holding ``model.diffusion_model.*`` (U-Net),
``first_stage_model.*`` (VAE) and the text encoders: ``cond_stage_model.*`` (CompVis / A1111, SD 1.x/2.x) or
``conditioner.embedders.N.*`` (Stability's SDXL: 0.transformer = CLIP ViT-L, 1.model = OpenCLIP bigG; the refiner's
OpenCLIP alone at 0.model; the U-Net's added conditioning at ``label_emb.*``).

The weights are converted by diffusers' own single-file loading (``StableDiffusionPipeline`` /
``StableDiffusionXL*Pipeline.from_single_file``) with every config supplied locally from a built-in architecture
(``config=`` a folder of configs, never a hub download). The family is read from the keys — OpenAI CLIP
(``cond_stage_model.transformer.*``: SD 1.x), OpenCLIP (``cond_stage_model.model.*``: SD 2.x), SDXL's embedders, a
9-channel first U-Net convolution (inpainting) — and ``--config NAME`` forces one. SD 2.x defaults to v-prediction
(the 768-v models people run); ``--prediction-type`` says otherwise; SDXL fine-tunes' ``v_pred`` / ``ztsnr`` marker
keys are read.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdtrt.errors import ModelSourceError, UnsafeCheckpointError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_LABEL_EMB = "model.diffusion_model.label_emb."  # SDXL's added-conditioning MLP (diffusers' add_embedding)
_EMBEDDERS = "conditioner.embedders."  # SDXL's text encoders (SD 1.x/2.x: cond_stage_model)


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
    if _UNET_IN not in keys:
        raise ModelSourceError(f"not a Stable Diffusion checkpoint in the original layout: no {_UNET_IN} (a diffusers "
                               "folder is exported as a folder)")
    channels = keys[_UNET_IN][1]
    embedders = _embedders(keys)
    if embedders:
        layout = ", ".join(f"{index}.{kind}" for index, kind in embedders.items())
        family, why = {"0.transformer, 1.model": ("sdxl", "CLIP ViT-L + OpenCLIP text encoders (SDXL)"),
                       "0.model": ("sdxl-refiner", "one OpenCLIP text encoder (SDXL refiner)")}.get(layout, ("", ""))
        if not family:
            raise ModelSourceError(f"SDXL-layout text encoders sdtrt does not know: conditioner.embedders {layout} "
                                   "(SDXL has 0.transformer and 1.model, its refiner 0.model)")
        if not any(k.startswith(_LABEL_EMB) for k in keys):
            raise ModelSourceError(f"{why}, but the U-Net has no {_LABEL_EMB}* (SDXL's size and pooled-text "
                                   "conditioning): not an SDXL U-Net; pass --config NAME if it is one of the built-ins")
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        family, why = "sd21", "OpenCLIP text encoder (SD 2.x)"
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
        family, why = "sd15", "CLIP text encoder (SD 1.x)"
    else:
        raise ModelSourceError("the checkpoint has no text encoder this sdtrt knows (cond_stage_model.transformer.* "
                               "for SD 1.x, cond_stage_model.model.* for SD 2.x, conditioner.embedders.* for SDXL)")
    if channels == 9:
        from sdtrt.export.architectures import BUILTIN_ARCHITECTURES

        if f"{family}-inpaint" not in BUILTIN_ARCHITECTURES:
            raise ModelSourceError(f"{why} with a 9-channel (inpainting) U-Net: sdtrt has no {family}-inpaint "
                                   "configuration; pass --config NAME if it is one of the built-ins' shapes")
        return f"{family}-inpaint", f"{why}, 9-channel U-Net (inpainting)"
    if channels != 4:
        raise ModelSourceError(f"the U-Net's first convolution takes {channels} channels: not a {family} model "
                               "(4, or 9 for inpainting); pass --config NAME if it is one of the built-ins' shapes")
    return family, why


def _embedders(keys) -> dict[str, str]:
    """SDXL's text encoders: {N: layout} for each conditioner.embedders.N, layout "transformer" (OpenAI CLIP in
    transformers' layout) or "model" (OpenCLIP), several joined by "+"; {} for SD 1.x/2.x."""
    kinds: dict[str, set[str]] = {}
    for key in keys:
        if key.startswith(_EMBEDDERS):
            index, _, rest = key[len(_EMBEDDERS):].partition(".")
            kinds.setdefault(index, set()).add(rest.partition(".")[0])
    return {index: "+".join(sorted(found)) for index, found in sorted(kinds.items())}


def sampling_markers(keys) -> dict:
    """Scheduler settings the checkpoint's marker keys give (ComfyUI's convention, used by v-prediction SDXL fine-tunes:
    an empty ``v_pred`` tensor, and ``ztsnr`` for zero-terminal-SNR training). EDM
    models (``edm_vpred.*``, Playground's ``edm_mean``) are refused: their sigmas are not the DDPM schedule's.
    ``--prediction-type`` still overrides."""
    edm = sorted(k for k in keys if k.startswith(("edm_vpred.", "edm_mean", "edm_std")))
    if edm:
        raise ModelSourceError(f"the checkpoint is an EDM model ({edm[0]}): its continuous noise schedule is not "
                               "supported")
    out = {}
    if "v_pred" in keys:
        out["prediction_type"] = "v_prediction"
    if "ztsnr" in keys:  # the runtime's samplers refuse it by name (not implemented) rather than sample it wrong
        out["rescale_betas_zero_snr"] = True
    return out


def _pipeline_class(arch) -> str:
    """The diffusers pipeline whose from_single_file converts ``arch``'s checkpoints (as LoadedModel.save_pretrained
    picks it for a folder)."""
    if arch.unet.get("addition_embed_type") != "text_time":
        return "StableDiffusionPipeline"  # SD 1.x/2.x and their inpainting U-Nets: the same components
    if arch.unet["in_channels"] != arch.unet["out_channels"]:
        return "StableDiffusionXLInpaintPipeline"
    return "StableDiffusionXLPipeline" if arch.text_encoder_2 else "StableDiffusionXLImg2ImgPipeline"


def _encoders(arch) -> list[tuple[str, str, dict, str, bool]]:
    """(diffusers text-encoder component, its tokenizer's, CLIPTextConfig kwargs, pad token, projected) of each of
    ``arch``'s text encoders, in sdtrt's order. The SDXL refiner's one encoder is diffusers' text_encoder_2 (its
    text_encoder is null); SDXL's second, OpenCLIP bigG, pads with "!" (as build_builtin makes it)."""
    if arch.projected_text_encoder and not arch.text_encoder_2:
        return [("text_encoder_2", "tokenizer_2", arch.text_encoder, arch.tokenizer_pad_token, True)]
    out = [("text_encoder", "tokenizer", arch.text_encoder, arch.tokenizer_pad_token, arch.projected_text_encoder)]
    if arch.text_encoder_2:
        out.append(("text_encoder_2", "tokenizer_2", arch.text_encoder_2, "!", True))
    return out


def write_configs(arch, folder: Path) -> None:
    """A diffusers folder of configs only (no weights) for ``arch``: what from_single_file reads offline."""
    from diffusers import __version__ as diffusers_version
    from transformers import CLIPTextConfig

    from sdtrt.export.tokenizer import build_clip_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    cls = _pipeline_class(arch)
    index = {"_class_name": cls, "_diffusers_version": diffusers_version,
             "scheduler": ["diffusers", arch.scheduler_class], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if cls == "StableDiffusionPipeline":
        index.update(feature_extractor=[None, None], safety_checker=[None, None], requires_safety_checker=False)
    else:
        index.update(image_encoder=[None, None], feature_extractor=[None, None], text_encoder=[None, None],
                     tokenizer=[None, None], text_encoder_2=[None, None], tokenizer_2=[None, None], **arch.pipeline)
    for name, cls_name, config in (("unet", "UNet2DConditionModel", arch.unet), ("vae", "AutoencoderKL", arch.vae)):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps({"_class_name": cls_name, **config}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": arch.scheduler_class, **arch.scheduler}))
    for encoder, tok, kwargs, pad_token, projected in _encoders(arch):
        index[encoder] = ["transformers", "CLIPTextModelWithProjection" if projected else "CLIPTextModel"]
        index[tok] = ["transformers", "CLIPTokenizer"]
        tokenizer = build_clip_tokenizer(arch.tokenizer_merges, pad_token=pad_token)
        tokenizer.save_pretrained(folder / tok)
        text = dict(kwargs)
        text.setdefault("vocab_size", len(tokenizer))
        CLIPTextConfig(**text, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id).save_pretrained(folder / encoder)
    (folder / "model_index.json").write_text(json.dumps(index))


def _user_tokenizer(folder: str, name: str, pad_token: str):
    """The --tokenizer for the encoder whose diffusers tokenizer is ``name``: ``folder`` is a diffusers model folder
    (its ``name``/ is taken, else its tokenizer/) or a tokenizer folder. SDXL's OpenCLIP encoder (tokenizer_2) given
    another folder's tokenizer gets its "!" padding (``pad_token``), which is all SDXL's tokenizer_2 differs by."""
    from transformers import CLIPTokenizer

    root = Path(folder).expanduser()
    source = next((p for p in (root / name, root / "tokenizer") if p.is_dir()), root)
    extra = {"pad_token": pad_token} if name == "tokenizer_2" and source.name != name else {}
    try:
        return CLIPTokenizer.from_pretrained(str(source), local_files_only=True, **extra)
    except Exception as ex:  # noqa: BLE001  (transformers raises OSError, ValueError, ... for a folder it cannot read)
        first = str(ex).strip().splitlines()[0][:200] if str(ex).strip() else ""
        raise ModelSourceError(f"--tokenizer {folder}: not a CLIP tokenizer folder ({type(ex).__name__}: {first})") \
            from None


def _unloaded(module) -> list[str]:
    """Names of the tensors diffusers left on the meta device: weights the checkpoint did not have (it loads with
    accelerate's empty weights and skips what is missing, without a word)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, tensor in tensors if tensor.device.type == "meta"]


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
    markers = sampling_markers(keys)
    _offline()
    import diffusers

    encoders = _encoders(arch)
    pipeline_class = getattr(diffusers, _pipeline_class(arch))
    with tempfile.TemporaryDirectory(prefix="sdtrt-config-") as tmp:
        write_configs(arch, Path(tmp))
        extra = ({"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
                 if pipeline_class is diffusers.StableDiffusionPipeline else {"add_watermarker": False})
        if tokenizer:
            extra.update({tok: _user_tokenizer(tokenizer, tok, pad) for _, tok, _, pad, _ in encoders})
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" on stderr
        try:
            with _library_logs_silenced():
                pipe = pipeline_class.from_single_file(str(path), config=tmp, local_files_only=True, **extra)
        except Exception as ex:  # noqa: BLE001  (diffusers/torch raise what the mismatched file provokes)
            first = str(ex).strip().splitlines()[0][:300] if str(ex).strip() else ""
            raise ModelSourceError(f"cannot load {path} as {name} ({why}): {type(ex).__name__}: {first} (is it "
                                   f"another architecture? pass --config NAME)") from None
        finally:
            diffusers_logging.enable_progress_bar()
    loaded = [(getattr(pipe, encoder), getattr(pipe, tok)) for encoder, tok, _, _, _ in encoders]
    for component, module in (*((e, m) for (e, *_), (m, _) in zip(encoders, loaded)), ("unet", pipe.unet),
                              ("vae", pipe.vae)):
        missing = _unloaded(module)
        if missing:
            raise ModelSourceError(f"{path} has no weights for {len(missing)} of the {name} {component}'s tensors "
                                   f"(e.g. {missing[0]}): is it another architecture? pass --config NAME")
    for (encoder, *_), (text_encoder, tok) in zip(encoders, loaded):
        vocab = int(text_encoder.config.vocab_size)
        if len(tok) != vocab:
            raise ModelSourceError(
                f"{path}'s {encoder} has a {vocab}-token vocabulary, the {name} configuration's tokenizer "
                f"{len(tok)}: give the model's own tokenizer with --tokenizer DIR (the tokenizer/ folder, or the "
                "whole folder, of any diffusers model of this family; OpenAI's CLIP vocabulary cannot be downloaded "
                "here)")
    scheduler_config = dict(make_scheduler({"_class_name": arch.scheduler_class, **arch.scheduler, **markers}).config)
    scheduler_config["_class_name"] = arch.scheduler_class
    if prediction_type:
        from sdtrt.export.loaders import with_prediction_type

        scheduler_config = with_prediction_type(scheduler_config, prediction_type)
    (text_encoder, tok), (text_encoder_2, tok_2) = loaded[0], (loaded[1:] or [(None, None)])[0]
    return LoadedModel(family=arch.family, source=str(path), text_encoder=text_encoder.float().eval(), tokenizer=tok,
                       text_encoder_2=None if text_encoder_2 is None else text_encoder_2.float().eval(),
                       tokenizer_2=tok_2, unet=pipe.unet.float().eval(), vae=pipe.vae.float().eval(),
                       scheduler_config=_jsonable(scheduler_config), pipeline_config=dict(arch.pipeline))
