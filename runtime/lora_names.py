"""How LoRA files name a model's layers, from the manifest alone: which graphs a LoRA changes and the key prefixes
each format gives them (``targets``), and the original (SGM/LDM) U-Net's module paths that kohya's SDXL LoRAs use
(``sgm_names``). Read by ``runtime/lora.py``."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A graph a LoRA may change, and how LoRA files name it."""

    graph: str  # the folder's graph (manifest component)
    name: str  # its name in diffusers' pipeline: the key prefix of diffusers/PEFT files and of their metadata
    kohya: tuple[str, ...]  # kohya/A1111 key prefixes, the one kohya writes for this model first


def targets(model) -> tuple[Target, ...]:
    """The U-Net and every text encoder of ``model`` (``manifest.ModelInfo``), as LoRA files name them: diffusers by
    the encoder's pipeline name (``text_encoder.``, ``text_encoder_2.``), kohya/A1111 ``lora_te1_``/``lora_te2_`` by
    the same number (SDXL), and ``lora_te_`` for text_encoder too (SD 1.x/2.x), as diffusers' converter reads them
    (the SDXL refiner's one encoder is text_encoder_2: ``text_encoder_2.``, ``lora_te2_``)."""
    out = [Target("unet", "unet", ("lora_unet_",))]
    for e in model.encoders:
        number = e.lora_name.removeprefix("text_encoder").removeprefix("_") or "1"
        kohya = (f"lora_te{number}_",) + (("lora_te_",) if number == "1" else ())
        if len(model.encoders) == 1:  # what kohya writes first: lora_te_ for SD 1.x/2.x's one encoder
            kohya = kohya[::-1]
        out.append(Target(e.component, e.lora_name, kohya))
    return tuple(out)



_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_TOP_SGM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}
_BLOCK = re.compile(r"(down|up|mid)_blocks?\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")


def sgm_names(paths) -> dict[str, str]:
    """diffusers U-Net module path -> the same module's path in the original (SGM/LDM) U-Net, which kohya's SDXL
    LoRAs name (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), for the ``paths`` given; the block numbering
    is worked out from the paths themselves (each level's resnets, attentions and resamplers, in order), as
    diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` does from the U-Net's config: input_blocks.0 is conv_in, then
    per down level one block per resnet (its attention at .1) and one for the downsampler (``.0.op``; every level
    but the last has one, as in diffusers' U-Nets, whether or not ``paths`` names it); the middle
    block is resnet, attention, resnet; per up level one block per resnet, the upsampler inside the last (``.2.conv``
    after an attention, else ``.1.conv``)."""
    parts = {}
    for p in paths:
        m = _BLOCK.match(p)
        if m:
            parts[p] = (m[1], int(m[2] or 0), m[3], int(m[4]), m[5])
    layers: dict[tuple[str, int], int] = {}
    attentive, resampled = set(), set()
    for kind, block, what, j, _ in parts.values():
        if what in ("resnets", "attentions"):
            layers[kind, block] = max(layers.get((kind, block), 0), j + 1)
        if what == "attentions":
            attentive.add((kind, block))
        elif what.endswith("samplers"):
            resampled.add((kind, block))
    index: dict[tuple[str, int], int] = {}
    n = 1
    down = sorted(b for k, b in layers if k == "down")
    for block in down:  # diffusers' U-Nets downsample after every level but the last
        index["down", block] = n
        n += layers["down", block] + (("down", block) in resampled or block != down[-1])
    n = 0
    for block in sorted(b for k, b in layers if k == "up"):
        index["up", block] = n
        n += layers["up", block]
    out = {p: sgm for p, sgm in _TOP_SGM.items() if p in set(paths)}
    for p, (kind, block, what, j, rest) in parts.items():
        if kind == "mid":
            name = f"middle_block.{2 * j if what == 'resnets' else 1}"
        elif (kind, block) not in index:
            continue
        elif what in ("downsamplers", "upsamplers"):
            last = index[kind, block] + layers[kind, block] - (kind == "up")
            name = f"input_blocks.{last}.0" if kind == "down" else \
                f"output_blocks.{last}.{2 if (kind, block) in attentive else 1}"
            rest = {"conv": "op" if kind == "down" else "conv"}.get(rest, rest)
        else:
            name = f"{'input' if kind == 'down' else 'output'}_blocks.{index[kind, block] + j}." \
                   f"{0 if what == 'resnets' else 1}"
        if what == "resnets":
            head, _, tail = rest.partition(".")
            rest = ".".join(x for x in (_RESNET_SGM.get(head, head), tail) if x)
        out[p] = f"{name}.{rest}"
    return out
