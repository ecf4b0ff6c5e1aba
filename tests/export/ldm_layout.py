"""A diffusers model's weights in the original (CompVis / A1111 / Stability) single-file layout, for tests: the
inverse of diffusers' single-file conversion, written from the layout (LDM's ``openaimodel.UNetModel`` block
numbering with SDXL's ``label_emb``, ``autoencoder`` encoder/decoder, OpenAI CLIP or OpenCLIP text towers, SD's
``cond_stage_model`` or SDXL's ``conditioner.embedders``). Checked by converting back with diffusers' own converter
(``test_single_file.py``)."""

from __future__ import annotations

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


_LABEL_EMB = {"linear_1": 0, "linear_2": 2}  # LDM's label_emb = Sequential(Sequential(linear, SiLU, linear))


def _sub(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    cfg = unet.config
    n, layers = len(cfg.block_out_channels), cfg.layers_per_block
    up_attention = ["CrossAttn" in t for t in cfg.up_block_types]
    out = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        if parts[0] == "add_embedding":  # SDXL's added (text_time) conditioning MLP
            new = f"label_emb.0.{_LABEL_EMB[parts[1]]}.{parts[2]}"
        elif parts[0] in ("conv_in", "conv_norm_out", "conv_out", "time_embedding"):
            name = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}.get(parts[0])
            if parts[0] == "time_embedding":
                name = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]]
                new = f"{name}.{parts[2]}"
            else:
                new = f"{name}.{parts[1]}"
        elif parts[0] == "down_blocks":
            b, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + b * (layers + 1) + i}.0.{_sub(rest, _RESNET)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + b * (layers + 1) + i}.1.{rest}"
            else:  # downsamplers.0.conv
                new = f"input_blocks.{(b + 1) * (layers + 1)}.0.op.{rest.partition('.')[2]}"
        elif parts[0] == "mid_block":
            kind, i, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * i}.{_sub(rest, _RESNET)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            u, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            block = u * (layers + 1)
            if kind == "resnets":
                new = f"output_blocks.{block + i}.0.{_sub(rest, _RESNET)}"
            elif kind == "attentions":
                new = f"output_blocks.{block + i}.1.{rest}"
            else:  # upsamplers.0.conv
                new = f"output_blocks.{block + layers}.{2 if up_attention[u] else 1}.{rest}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    assert n == len(cfg.down_block_types)
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            new = key
        elif parts[1] in ("conv_in", "conv_out"):
            new = key
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[2]}"
        elif parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2]) if side == "encoder" else n - 1 - int(parts[2])
            stage = "down" if side == "encoder" else "up"
            kind, rest = parts[3], parts[4:]
            if kind == "resnets":
                sub = "nin_shortcut" if rest[1] == "conv_shortcut" else rest[1]
                new = f"{side}.{stage}.{i}.block.{rest[0]}.{sub}.{rest[-1]}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{side}.{stage}.{i}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{rest[-1]}"
        elif parts[1] == "mid_block":
            kind, i = parts[2], int(parts[3])
            if kind == "resnets":
                sub = "nin_shortcut" if parts[4] == "conv_shortcut" else parts[4]
                new = f"{side}.mid.block_{i + 1}.{sub}.{parts[-1]}"
            else:
                new = f"{side}.mid.attn_1.{_VAE_ATTN[parts[4]]}.{parts[-1]}"
                if value.ndim == 2:  # diffusers' linear is LDM's 1x1 convolution
                    value = value[:, :, None, None]
        else:
            raise KeyError(key)
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(text_encoder, prefix: str = "cond_stage_model.transformer.") -> dict[str, torch.Tensor]:
    """OpenAI CLIP's transformers layout under ``prefix`` + text_model (SD 1.x; SDXL's conditioner.embedders.0)."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value
    return out


_OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}


def openclip_to_ldm(text_encoder, prefix: str = "cond_stage_model.model.") -> dict[str, torch.Tensor]:
    """OpenCLIP's layout under ``prefix`` (SD 2.x; SDXL's conditioner.embedders.1, the refiner's .0): q, k, v stacked
    into in_proj; a projected encoder's ``text_projection`` is OpenCLIP's (width, embed) matrix, x @ P: the transpose
    of the linear layer's weight."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    p = prefix
    out = {p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           p + "positional_embedding": sd["embeddings.position_embedding.weight"],
           p + "ln_final.weight": sd["final_layer_norm.weight"], p + "ln_final.bias": sd["final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out[p + "text_projection"] = sd["text_projection.weight"].T
    for i in range(text_encoder.config.num_hidden_layers):
        pre = f"encoder.layers.{i}."
        block = f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[block + f"attn.in_proj_{kind}"] = torch.cat([sd[pre + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for ours, theirs in _OPENCLIP.items():
                out[block + f"{theirs}.{kind}"] = sd[pre + f"{ours}.{kind}"]
    return out


def to_ldm(model, openclip: bool = False) -> dict[str, torch.Tensor]:
    """A ``loaders.LoadedModel`` as one original-layout state dict (contiguous tensors, ready for safetensors).
    ``openclip``: SD 2.x's text encoder layout. SDXL (a U-Net with added conditioning) is read from the model: base
    = CLIP ViT-L at conditioner.embedders.0.transformer + OpenCLIP at .1.model; refiner = OpenCLIP at .0.model."""
    if model.added_conditioning:
        if model.text_encoder_2 is not None:
            text = {**clip_to_ldm(model.text_encoder, "conditioner.embedders.0.transformer."),
                    **openclip_to_ldm(model.text_encoder_2, "conditioner.embedders.1.model.")}
        else:
            text = openclip_to_ldm(model.text_encoder, "conditioner.embedders.0.model.")
    else:
        text = openclip_to_ldm(model.text_encoder) if openclip else clip_to_ldm(model.text_encoder)
    merged = {**unet_to_ldm(model.unet), **vae_to_ldm(model.vae), **text}
    return {k: v.detach().contiguous().clone() for k, v in merged.items()}
