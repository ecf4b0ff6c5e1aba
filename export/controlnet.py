"""ControlNets (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): loading a
diffusers ``ControlNetModel`` folder, the built-in random-weight one shaped like a base U-Net (diffusers'
``ControlNetModel.from_unet``), and the check that a ControlNet fits the U-Net it is meant for.

A ControlNet is a copy of the U-Net's encoder that reads a control image; its outputs, one residual per skip
connection of the U-Net's down path plus one for the mid block, are added to the U-Net's (diffusers'
``down_block_additional_residuals`` / ``mid_block_additional_residual``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from sdtrt.errors import ModelSourceError, UsageError

BUILTIN_CONTROLNET = "random"  # `--controlnet random`: seeded random weights shaped like the base U-Net
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def residual_levels(config: Any) -> list[tuple[int, int]]:
    """(channels, downsampling factor) of every down-path residual of a U-Net or ControlNet config, in diffusers'
    order: conv_in's output, then each resnet of each down block, then its downsampler (all but the last block)."""
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    out, factor = [(channels[0], 1)], 1
    for i, ch in enumerate(channels):
        out += [(ch, factor)] * layers[i]
        if i < len(channels) - 1:
            factor *= 2
            out.append((ch, factor))
    return out


def mid_level(config: Any) -> tuple[int, int]:
    return int(config.block_out_channels[-1]), 2 ** (len(config.block_out_channels) - 1)


def parse_spec(spec: str) -> tuple[str, str]:
    """``[NAME=]PATH`` -> (name, source): the name defaults to the folder's name (``random`` for the built-in)."""
    name, sep, source = spec.partition("=")
    if not sep:
        name, source = "", spec
    source = source.strip()
    if not source:
        raise UsageError(f"--controlnet {spec!r}: give a ControlNet folder, or {BUILTIN_CONTROLNET!r}")
    name = name.strip() or (BUILTIN_CONTROLNET if source == BUILTIN_CONTROLNET else Path(source.rstrip("/")).name)
    if len(name) > 64:
        raise UsageError(f"ControlNet name {name[:20]!r}... is {len(name)} characters; at most 64 (it names the graph "
                         "file; give NAME=PATH to choose a shorter one)")
    if not _NAME.match(name):
        raise UsageError(f"ControlNet name {name!r}: use letters, digits, '_', '-' and '.' (give NAME=PATH to choose "
                         "one)")
    return name, source


def builtin_controlnet(unet, latent_channels: int, vae_scale: int, seed: int, **config_changes):
    """A ControlNet with diffusers' ``from_unet`` shape for ``unet``, seeded random weights.

    Its input takes the latents only (``latent_channels``, also for a 9-channel inpainting U-Net, as
    ``StableDiffusionControlNetInpaintPipeline`` feeds it); the conditioning embedding downsamples the control image by
    the VAE factor; ``config_changes`` change its config (tests: fewer transformer layers, as diffusers' "small"
    and "mid" SDXL ControlNets have). The zero convolutions (and the embedding's last conv), zero at initialisation
    in diffusers, get random weights too: with zeros every residual would be 0 and no parity test could fail."""
    import torch
    from diffusers import ControlNetModel

    levels = int(math.log2(vae_scale))
    embedding = (16, 32, 96, 256)[:levels] + (256,) * (levels + 1 - min(levels, 4))  # diffusers' (16, 32, 96, 256) at f = 8
    torch.manual_seed(seed % 2**64)
    shaped = ControlNetModel.from_unet(unet, load_weights_from_unet=False, conditioning_embedding_out_channels=embedding)
    config = dict(shaped.config)
    config.update(in_channels=latent_channels, **config_changes)
    torch.manual_seed(seed % 2**64)
    controlnet = ControlNetModel.from_config(config)
    with torch.no_grad():
        zero = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero:
            conv.weight.copy_(0.05 * torch.randn_like(conv.weight))
            conv.bias.copy_(0.05 * torch.randn_like(conv.bias))
    return controlnet.eval()


def check_controlnet_folder(path: Path, allow_pickle: bool = False) -> None:
    """What can be said of a ControlNet folder without loading it (before the slow model load, issue 22)."""
    from sdtrt.export.loaders import PICKLE_SUFFIXES

    if not path.exists():
        raise ModelSourceError(f"ControlNet path {path} does not exist")
    if path.is_file():
        raise ModelSourceError(f"ControlNet {path} is a file: give a diffusers ControlNetModel folder (config.json "
                               "and diffusion_pytorch_model.safetensors)")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} has no config.json: not a diffusers ControlNetModel folder")
    files = [f.name for f in path.iterdir()]
    if not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if Path(f).suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not allow_pickle:
            raise ModelSourceError(f"{path} has only pickled weights ({pickles[0]}); pass --allow-pickle to load them "
                                   "(pickles can run arbitrary code)")
        if not pickles:
            raise ModelSourceError(f"{path} has no weights (diffusion_pytorch_model.safetensors)")


def load_controlnet_folder(path: Path, allow_pickle: bool = False):
    """A diffusers ``ControlNetModel`` folder (config.json and safetensors weights; pickles only when allowed)."""
    from sdtrt.export.loaders import _library_logs_silenced, _offline

    check_controlnet_folder(path, allow_pickle)
    _offline()
    from diffusers import ControlNetModel

    try:
        with _library_logs_silenced():
            model = ControlNetModel.from_pretrained(path, local_files_only=True,
                                                    use_safetensors=None if allow_pickle else True)
    except Exception as ex:  # noqa: BLE001  (diffusers/torch raise whatever the malformed file provokes)
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else ""
        raise ModelSourceError(f"cannot load the ControlNet {path}: {type(ex).__name__}"
                               f"{': ' + first[:300] if first else ''}") from None
    return model.float().eval()


def check_family(config, name: str, sdxl: bool) -> None:
    """Refuse a ControlNet of another model family, from its config alone (a dict, or a diffusers config): an SDXL
    ControlNet reads SDXL's added conditioning (``addition_embed_type="text_time"``: the pooled text embedding and the
    size time ids), an SD 1.x/2.x one none; ``sdxl``: the base model takes them."""
    kind = _get(config, "addition_embed_type")
    if kind not in (None, "text_time"):
        raise ModelSourceError(f"ControlNet {name} takes {kind!r} added conditioning: only SDXL's 'text_time' (or none, "
                               "SD 1.x/2.x) is supported")
    if kind and not sdxl:
        raise ModelSourceError(f"ControlNet {name} is an SDXL ControlNet (it reads SDXL's pooled text embedding and size "
                               "conditioning); this model is SD 1.x/2.x: use a ControlNet made for it")
    if sdxl and not kind:
        raise ModelSourceError(f"ControlNet {name} is an SD 1.x/2.x ControlNet (no SDXL added conditioning); this model "
                               "is SDXL-family: use an SDXL ControlNet (e.g. diffusers/controlnet-canny-sdxl-1.0)")


def check_added_widths(config, name: str, added) -> None:
    """An SDXL ControlNet's added-conditioning widths against the base's (``added``: its ``graphs.AddedInputs``): its
    projection reads the pooled embedding and each time id's sinusoidal embedding (``addition_time_embed_dim`` wide,
    its own), ``projection_class_embeddings_input_dim`` in all."""
    width, step = int(_get(config, "projection_class_embeddings_input_dim") or 0), \
        int(_get(config, "addition_time_embed_dim") or 0)
    if step > 0 and width == added.pooled_width + added.time_ids_width * step:
        return
    want = f"{added.pooled_width + added.time_ids_width * step}" if step > 0 else "?"
    raise ModelSourceError(
        f"ControlNet {name}'s added conditioning takes {width} values ({step or '?'} per time id); this model gives a "
        f"{added.pooled_width}-wide pooled embedding and {added.time_ids_width} time ids, {added.pooled_width} + "
        f"{added.time_ids_width} x {step or '?'} = {want}: it was made for another base model (SDXL base takes 6 time "
        "ids, the refiner 5)")


def _get(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def read_config(path: Path) -> dict:
    """A ControlNet folder's config.json, before the model is loaded ({} if unreadable: loading then says why)."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def check_compatible(controlnet, name: str, levels: list[tuple[int, int]], latent_channels: int, text_hidden: int,
                     vae_scale: int, added=None) -> None:
    """Refuse a ControlNet made for another base model: it must read the latents, the text embeddings and the added
    conditioning (``added``: the base's ``graphs.AddedInputs``, SDXL; None for SD 1.x/2.x) the U-Net reads, and give
    residuals of the U-Net's channels at the U-Net's levels (``levels``: (channels, factor) of every residual input of
    the U-Net, the mid block's last). Its transformer depth is its own (diffusers' "small"/"mid" SDXL ControlNets have
    fewer layers than the U-Net): only what it reads and gives must fit."""
    cfg = controlnet.config
    check_family(cfg, name, added is not None)
    if added is not None:
        check_added_widths(cfg, name, added)
    if int(cfg.in_channels) != latent_channels:
        raise ModelSourceError(f"ControlNet {name} takes {cfg.in_channels}-channel latents; this model's are "
                               f"{latent_channels}-channel: it was made for another base model")
    if int(cfg.cross_attention_dim) != text_hidden:
        raise ModelSourceError(f"ControlNet {name} reads {cfg.cross_attention_dim}-wide text embeddings; this model's "
                               f"text encoder gives {text_hidden}: it was made for another base model (SD 1.x is 768, "
                               "SD 2.x 1024, SDXL 2048)")
    own = [*residual_levels(cfg), mid_level(cfg)]
    if own != [tuple(v) for v in levels]:
        channels = sorted({c for c, _ in levels})
        raise ModelSourceError(f"ControlNet {name} gives {len(own)} residuals of {sorted({c for c, _ in own})} "
                               f"channels; this model's U-Net takes {len(levels)} of {channels}: it was made for "
                               "another base model")
    embed = len(cfg.conditioning_embedding_out_channels) - 1
    if 2 ** embed != vae_scale:
        raise ModelSourceError(f"ControlNet {name} downsamples its control image {2 ** embed}x; this model's latents "
                               f"are {vae_scale}x smaller than the image")
