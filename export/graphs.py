"""The three exported graphs as PyTorch modules, with their I/O contracts.

Each ``GraphSpec`` says what the graph takes and returns (names, dtypes, symbolic dims), how to make
inputs for a given (batch, height, width), and what its fp16 version must keep in FP32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from sdtrt.errors import ModelSourceError
from sdtrt.export.loaders import LoadedModel
from sdtrt.manifest import Ranges, TensorSpec, dim_value, level_dim


CLIP_SKIPS = 2  # hidden states before the last 1 and 2 layers are exported too (diffusers' clip_skip 1 and 2)
# Spare rows of the token-embedding table, zero in the graph: textual-inversion vectors are written there at generation
# time (the runtime replaces the table initializer; ONNX Runtime refuses a table of another shape)
EMBEDDING_SLOTS = 64


class TextEncoderGraph(torch.nn.Module):
    """input_ids (R, 77) int32, one prompt chunk per row -> hidden states (R, 77, D), what the U-Net attends to:
    the last layer's, and with CLIP skip s = 1..CLIP_SKIPS the one s layers before it with the final layer norm
    applied (diffusers' ``clip_skip``; A1111's "Clip skip: s + 1", ``sd_hijack_clip.encode_with_transformers``).

    ``raw_skips`` (SDXL): the skipped hidden states without the final layer norm, as diffusers'
    StableDiffusionXLPipeline.encode_prompt takes ``hidden_states[-(clip_skip + 2)]``; ``pooled`` (a
    CLIPTextModelWithProjection): also ``text_embeds`` (R, P), the projected EOS token, SDXL's pooled embedding."""

    def __init__(self, text_encoder, slots: int = 0, raw_skips: bool = False, pooled: bool = False):
        super().__init__()
        if slots:  # a copy (the loaded model is shared) whose token table has ``slots`` zero rows more
            import copy

            text_encoder = copy.deepcopy(text_encoder)
            model = getattr(text_encoder, "text_model", text_encoder)
            table = model.embeddings.token_embedding.weight.detach()
            padded = torch.nn.Embedding(table.shape[0] + slots, table.shape[1])
            with torch.no_grad():
                padded.weight.copy_(torch.cat([table, torch.zeros(slots, table.shape[1], dtype=table.dtype)]))
            model.embeddings.token_embedding = padded
        self.text_encoder = text_encoder
        self.raw_skips = raw_skips
        self.pooled = pooled

    def forward(self, input_ids):
        # int32 in the graph (TensorRT has no int64 bindings to speak of); CLIP's embedding takes int64.
        out = self.text_encoder(input_ids.long(), output_hidden_states=True, return_dict=True)
        if self.raw_skips:
            skipped = [out.hidden_states[-(s + 1)] for s in range(1, CLIP_SKIPS + 1)]
        else:
            # transformers 5 dropped CLIPTextModel's text_model wrapper; 4.x has it
            norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
            skipped = [norm(out.hidden_states[-(s + 1)]) for s in range(1, CLIP_SKIPS + 1)]
        return (out.last_hidden_state, *skipped, *((out.text_embeds,) if self.pooled else ()))


class UNetGraph(torch.nn.Module):
    """One denoising model call with classifier-free guidance folded in (Ho & Salimans 2022).

    latents (B, C, h, w), timestep (1,), encoder_hidden_states (k*B, 77, D), guidance_scale (1,)
    [, mask (B, 1, h, w), masked_image_latents (B, C, h, w): an inpainting U-Net]
    [, text_embeds (k*B, P), time_ids (k*B, n): SDXL's added conditioning, diffusers' ``added_cond_kwargs``, rows
    [negative; positive] as the embeddings'], down_residual_0..n-1
    (k*B, c_i, h / f_i, w / f_i), mid_residual (k*B, c, h / f, w / f): ControlNet residuals, added to the skip
    connections as diffusers' ``down_block_additional_residuals`` (zeros without a ControlNet: x + 0 = x exactly)
    -> guided prediction (B, C, h, w).

    k = 2: embeddings are [negative; positive]; the U-Net runs once on the doubled batch and returns
        uncond + g * (cond - uncond).
    k = 1: embeddings are the positive prompt only; the U-Net runs on B and guidance_scale is unused
        (guidance <= 1, or guidance-distilled models).
    Both cases are one graph: k is read from the shapes, and cond + (g - 1)(cond - out[0]) reduces to
    the plain prediction when k = 1 because then out[0] is cond.
    """

    def __init__(self, unet, inpainting: bool = False, added: bool = False):
        super().__init__()
        self.unet = unet
        self.inpainting = inpainting
        self.added = added

    def forward(self, latents, timestep, encoder_hidden_states, guidance_scale, *extra):
        batch = latents.shape[0]
        k = encoder_hidden_states.shape[0] // batch
        x = rows(latents, k)  # (kB, C, h, w)
        if self.inpainting:  # diffusers' 9-channel layout: [latents, mask, masked image]
            mask, masked_image_latents, *extra = extra
            x = torch.cat([x, rows(mask, k), rows(masked_image_latents, k)], dim=1)  # (kB, 2C + 1, h, w)
        added, extra = added_kwargs(self.added, extra)
        *down, mid = extra
        t = timestep.expand(x.shape[0])  # (kB,)
        out = self.unet(x, t, encoder_hidden_states, added_cond_kwargs=added, down_block_additional_residuals=tuple(down),
                        mid_block_additional_residual=mid, return_dict=False)[0]  # (kB, C, h, w)
        out = out.reshape(k, batch, *out.shape[1:])  # (k, B, C, h, w)
        cond, uncond = out[-1], out[0]
        return cond + (guidance_scale - 1.0) * (cond - uncond)


def rows(v, k: int):
    """(B, ...) -> (kB, ...): the same rows for the negative and the positive half of a guided batch."""
    return v.unsqueeze(0).expand(k, *([-1] * v.dim())).reshape(-1, *v.shape[1:])


def added_kwargs(added: bool, extra):
    """Split a graph's trailing inputs: SDXL's added conditioning first when the model takes it (diffusers'
    ``added_cond_kwargs``: text_embeds (kB, P), time_ids (kB, n), rows [negative; positive] as the embeddings'), then
    the rest. -> (added_cond_kwargs or None, the rest)."""
    if not added:
        return None, list(extra)
    text_embeds, time_ids, *rest = extra
    return {"text_embeds": text_embeds, "time_ids": time_ids}, rest


@dataclass(frozen=True)
class AddedInputs:
    """SDXL's added conditioning as graph inputs, the same for the U-Net and its ControlNets (names, [negative;
    positive] rows, FP32 time ids): the pooled text embedding (kB, pooled_width) and the time ids (kB,
    time_ids_width). diffusers' StableDiffusionXLControlNetPipeline hands both models the same ``added_cond_kwargs``."""

    pooled_width: int
    time_ids_width: int

    def specs(self) -> tuple["InputSpec", ...]:
        return (InputSpec("text_embeds", "float32", ("text_batch", self.pooled_width)),
                # sizes near 1024 in fp16 are exact, but their sinusoidal embedding is not: kept FP32 with it
                InputSpec("time_ids", "float32", ("text_batch", self.time_ids_width), keep_fp32=True))

    def feeds(self, rows_: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Pooled embeddings (kB, P) and time ids (kB, n) as SDXL's: sizes ~1024, crops, scores."""
        return {"text_embeds": rng.standard_normal((rows_, self.pooled_width)).astype(np.float32),
                "time_ids": rng.uniform(0, 1100, (rows_, self.time_ids_width)).round().astype(np.float32)}

    @staticmethod
    def of_manifest(manifest) -> "AddedInputs | None":
        """The added inputs of an exported folder's U-Net (None for a model without added conditions)."""
        added = manifest.model.added_conditions
        if added is None:
            return None
        return AddedInputs(int(manifest.components["unet"].input(added.pooled_input).shape[-1]),
                           added.time_ids_width)


def time_embedding_fp32(module: str, added: "AddedInputs | None") -> tuple[tuple[str, ...], str]:
    """The node prefixes an fp16 graph of a U-Net-like ``module`` keeps in FP32, and why: the timestep's (and SDXL's
    time ids') sinusoidal embeddings; in fp16, t = 999 is only resolved to 0.5, so the embedding is wrong."""
    prefixes = (f"/{module}/time_proj/",) + ((f"/{module}/add_time_proj/",) if added is not None else ())
    return prefixes, ("timestep (and SDXL time-id) sinusoidal embeddings" if added is not None else
                      "timestep sinusoidal embedding") + " (fp16 resolves t near 1000 only to 0.5)"


class ControlNetGraph(torch.nn.Module):
    """One ControlNet call, guidance folded in as the U-Net's (diffusers' StableDiffusionControlNetPipeline feeds it
    the doubled latents, the [negative; positive] embeddings and the control image twice).

    latents (B, C, h, w), timestep (1,), encoder_hidden_states (kB, 77c, D), control_image (B, 3, H, W) in [0, 1],
    conditioning_scale (1,) [, text_embeds (kB, P), time_ids (kB, n): SDXL's added conditioning, the U-Net's own
    inputs (diffusers' StableDiffusionXLControlNetPipeline)], down_residual_i_in / mid_residual_in (kB, c_i, h / f_i, w / f_i)
    -> down_residual_i / mid_residual = the input + conditioning_scale * this ControlNet's residual.

    The inputs are what the ControlNets before it in the same step added up (zeros for the first), so several
    ControlNets sum as diffusers' MultiControlNetModel does, with no extra graph between them."""

    def __init__(self, controlnet, added: bool = False):
        super().__init__()
        self.controlnet = controlnet
        self.added = added

    def forward(self, latents, timestep, encoder_hidden_states, control_image, conditioning_scale, *extra):
        k = encoder_hidden_states.shape[0] // latents.shape[0]
        x = rows(latents, k)  # (kB, C, h, w)
        t = timestep.expand(x.shape[0])  # (kB,)
        added, accumulated = added_kwargs(self.added, extra)
        down, mid = self.controlnet(x, t, encoder_hidden_states, controlnet_cond=rows(control_image, k),
                                    conditioning_scale=conditioning_scale, added_cond_kwargs=added, return_dict=False)
        return tuple(a + r for a, r in zip(accumulated, (*down, mid)))


class VaeEncoderGraph(torch.nn.Module):
    """image (B, 3, H, W) in [-1, 1] -> the latent distribution's mean and standard deviation (B, C, h, w), scaling
    factor folded in: a posterior sample is mean + std * N(0, 1) (diffusers' DiagonalGaussianDistribution.sample
    times vae.config.scaling_factor)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling = float(vae.config.scaling_factor)

    def forward(self, image):
        dist = self.vae.encode(image, return_dict=False)[0]
        return dist.mean * self.scaling, dist.std * self.scaling


class VaeDecoderGraph(torch.nn.Module):
    """latents (B, C, h, w) -> image (B, 3, 8h, 8w) in [-1, 1] (unclamped), scaling factor folded in."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.inv_scaling = 1.0 / float(vae.config.scaling_factor)

    def forward(self, latents):
        return self.vae.decode(latents * self.inv_scaling, return_dict=False)[0]


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str  # "float32" or "int32" in the fp32 graph; floats become float16 in an fp16 graph
    dims: tuple[str | int, ...]
    keep_fp32: bool = False  # stays float32 in an fp16 graph (scalars whose precision matters)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    module: torch.nn.Module
    inputs: tuple[InputSpec, ...]
    outputs: tuple[InputSpec, ...]
    make_inputs: Callable[[int, int, int, np.random.Generator, dict[str, Any]], dict[str, np.ndarray]]
    fp32_node_prefixes: tuple[str, ...] = ()  # node-name prefixes kept in FP32 in an fp16 graph
    fp32_all: bool = False  # the whole graph computes in FP32 (fp16 I/O only)
    fp32_reason: str = ""

    def tensor_specs(self, ranges: Ranges, vae_scale: int, precision: str, text_length: int = 77,
                     max_chunks: int = 1) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        def spec(s: InputSpec) -> TensorSpec:
            dtype = "float16" if precision == "fp16" and s.dtype == "float32" and not s.keep_fp32 else s.dtype
            return tensor_spec(s.name, dtype, s.dims, ranges, vae_scale, text_length, max_chunks)

        return tuple(spec(s) for s in self.inputs), tuple(spec(s) for s in self.outputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            s.name: {i: d for i, d in enumerate(s.dims) if isinstance(d, str)}
            for s in self.inputs + self.outputs
            if any(isinstance(d, str) for d in s.dims)
        }


def dim_bounds(ranges: Ranges, vae_scale: int, text_length: int = 77, max_chunks: int = 1) -> dict[str, tuple[int, int]]:
    """Inclusive bounds of every named dimension, from the export's pixel, batch and prompt-chunk ranges."""
    return {
        "batch": (ranges.batch_min, ranges.batch_max),
        "text_batch": (ranges.batch_min, 2 * ranges.batch_max),  # [negative; positive] with guidance
        "text_rows": (1, 2 * ranges.batch_max * max_chunks),  # every chunk of every prompt and negative prompt
        "text_length": (text_length, text_length * max_chunks),  # 77 tokens per chunk, chunks concatenated
        "height": (ranges.size_min, ranges.size_max),
        "width": (ranges.size_min, ranges.size_max),
        "latent_height": (ranges.size_min // vae_scale, ranges.size_max // vae_scale),
        "latent_width": (ranges.size_min // vae_scale, ranges.size_max // vae_scale),
    }


def tensor_spec(name: str, dtype: str, dims: tuple, ranges: Ranges, vae_scale: int, text_length: int = 77,
                max_chunks: int = 1) -> TensorSpec:
    bounds = dim_bounds(ranges, vae_scale, text_length, max_chunks)
    # a derived dim (latent_height_4 = ceil(latent_height / 4)) is monotone in its base: bounds map to bounds
    lo = tuple(d if isinstance(d, int) else dim_value(d, {n: b[0] for n, b in bounds.items()}) for d in dims)
    hi = tuple(d if isinstance(d, int) else dim_value(d, {n: b[1] for n, b in bounds.items()}) for d in dims)
    return TensorSpec(name=name, dtype=dtype, shape=tuple(dims), min_shape=lo, max_shape=hi)


def added_time_ids(unet_config, pooled_width: int) -> tuple[str, ...] | None:
    """SDXL's micro-conditioning items of a U-Net config (``addition_embed_type="text_time"``): six time ids (sizes,
    crop, target) for the base, five (sizes, crop, aesthetic score) for the refiner; None without added
    conditioning. diffusers checks the same count in ``_get_add_time_ids``."""
    if getattr(unet_config, "addition_embed_type", None) != "text_time":
        return None
    n, rest = divmod(int(unet_config.projection_class_embeddings_input_dim) - pooled_width,
                     int(unet_config.addition_time_embed_dim))
    items = {6: ("original_size", "crops_coords_top_left", "target_size"),
             5: ("original_size", "crops_coords_top_left", "aesthetic_score")}.get(n)
    if rest or items is None:
        raise ModelSourceError(f"the U-Net's added conditioning takes {unet_config.projection_class_embeddings_input_dim}"
                               f" values: not a {pooled_width}-wide pooled embedding with 5 or 6 time ids")
    return items


def added_inputs(model: LoadedModel) -> AddedInputs | None:
    """The U-Net's added-conditioning inputs of a loaded model (None without: SD 1.x/2.x)."""
    if not model.added_conditioning:
        return None
    pooled_width = int(model.encoders[-1][1].config.projection_dim)
    items = added_time_ids(model.unet.config, pooled_width)
    return AddedInputs(pooled_width, sum(1 if t == "aesthetic_score" else 2 for t in items))


def encoder_layout(model: LoadedModel) -> list[dict[str, Any]]:
    """Each text encoder as the manifest describes it (``manifest.TextEncoderInfo``'s fields): SD's one encoder
    gives its last hidden state; an SDXL U-Net's encoders give their penultimate one, un-normalised, and the last
    (projected) encoder the pooled ``text_embeds``."""
    sdxl = model.added_conditioning
    out = []
    for i, ((component, encoder, _), name) in enumerate(zip(model.encoders, model.diffusers_names)):
        out.append(dict(component=component, tokenizer=component.replace("text_encoder", "tokenizer"),
                        hidden_size=int(encoder.config.hidden_size), skip_offset=1 if sdxl else 0,
                        pooled="text_embeds" if sdxl and i == len(model.encoders) - 1 else "",
                        diffusers_name="" if name == component else name))  # the refiner's is text_encoder_2
    return out


def graph_specs(model: LoadedModel) -> dict[str, GraphSpec]:
    seq = int(model.tokenizer.model_max_length)
    layout = encoder_layout(model)
    hidden = sum(e["hidden_size"] for e in layout)  # the U-Net's encoder_hidden_states width
    latent_channels = int(model.vae.config.latent_channels)
    channels = latent_channels
    unet_channels = int(model.unet.config.in_channels)
    out_channels = int(model.unet.config.out_channels)
    inpainting = unet_channels == 2 * latent_channels + 1
    if unet_channels != latent_channels and not inpainting:
        raise ModelSourceError(f"a U-Net with {unet_channels} input channels for {latent_channels} latent channels is "
                               f"not supported ({latent_channels}, or {2 * latent_channels + 1} for inpainting)")
    vae_scale = vae_scale_factor(model)
    added = added_inputs(model)
    pooled_width = added.pooled_width if added is not None else 0
    if int(model.unet.config.cross_attention_dim) != hidden:
        raise ModelSourceError(f"the U-Net attends to {model.unet.config.cross_attention_dim}-wide text, the text "
                               f"encoders give {hidden}")

    def text_graph(component: str, encoder, info: dict) -> GraphSpec:
        vocab, width = int(encoder.config.vocab_size), info["hidden_size"]

        def text_inputs(batch, height, width_, rng, opts):
            return {"input_ids": rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)}  # (R, 77)

        pooled = (InputSpec("text_embeds", "float32", ("text_rows", pooled_width)),) if info["pooled"] else ()
        return GraphSpec(
            name=component,
            module=TextEncoderGraph(encoder, EMBEDDING_SLOTS,  # each encoder: its rows of an embedding's vectors
                                    raw_skips=info["skip_offset"] > 0, pooled=bool(info["pooled"])).eval(),
            # text_rows: every 77-token chunk of every prompt and negative prompt, encoded in one call
            inputs=(InputSpec("input_ids", "int32", ("text_rows", seq)),),
            outputs=(InputSpec("last_hidden_state", "float32", ("text_rows", seq, width)),
                     *(InputSpec(f"hidden_state_skip{s}", "float32", ("text_rows", seq, width))
                       for s in range(1, CLIP_SKIPS + 1)), *pooled),
            make_inputs=text_inputs,
        )

    def unet_inputs(batch, height, width, rng, opts):
        h, w = height // vae_scale, width // vae_scale
        k = 2 if opts.get("cfg", True) else 1
        length = seq * opts.get("chunks", 1)
        feeds = {
            "latents": rng.standard_normal((batch, channels, h, w)).astype(np.float32),  # (B, C, h, w)
            "timestep": np.array([opts.get("timestep", 981.0)], dtype=np.float32),  # (1,)
            "encoder_hidden_states": rng.standard_normal((k * batch, length, hidden)).astype(np.float32),  # (kB, 77c, D)
            "guidance_scale": np.array([opts.get("guidance_scale", 7.5)], dtype=np.float32),  # (1,)
        }
        if inpainting:
            feeds["mask"] = (rng.random((batch, 1, h, w)) < 0.5).astype(np.float32)  # (B, 1, h, w) in {0, 1}
            feeds["masked_image_latents"] = rng.standard_normal((batch, channels, h, w)).astype(np.float32)
        if added is not None:
            feeds |= added.feeds(k * batch, rng)
        # ControlNet residuals: small random values, as a ControlNet gives (zeros would not test the adds)
        feeds |= residual_feeds(residual_specs(model.unet.config), k * batch, h, w, rng, opts.get("residuals", 0.1))
        return feeds

    def encoder_inputs(batch, height, width, rng, opts):
        return {"image": rng.uniform(-1, 1, (batch, 3, height, width)).astype(np.float32)}  # (B, 3, H, W)

    def vae_inputs(batch, height, width, rng, opts):
        h, w = height // vae_scale, width // vae_scale
        scale = opts.get("magnitude", 1.0)
        return {"latents": (scale * rng.standard_normal((batch, latent_channels, h, w))).astype(np.float32)}

    vae_fp32 = bool(getattr(model.vae.config, "force_upcast", False))
    texts = {c: text_graph(c, enc, info) for (c, enc, _), info in zip(model.encoders, layout)}
    return {
        **texts,
        "unet": GraphSpec(
            name="unet",
            module=UNetGraph(model.unet, inpainting, added=added is not None).eval(),
            inputs=(
                InputSpec("latents", "float32", ("batch", channels, "latent_height", "latent_width")),
                InputSpec("timestep", "float32", (1,), keep_fp32=True),
                InputSpec("encoder_hidden_states", "float32", ("text_batch", "text_length", hidden)),
                InputSpec("guidance_scale", "float32", (1,), keep_fp32=True),
                *((InputSpec("mask", "float32", ("batch", 1, "latent_height", "latent_width")),
                   InputSpec("masked_image_latents", "float32", ("batch", channels, "latent_height", "latent_width")))
                  if inpainting else ()),
                *(added.specs() if added is not None else ()),
                *residual_specs(model.unet.config),
            ),
            outputs=(InputSpec("noise_pred", "float32", ("batch", out_channels, "latent_height", "latent_width")),),
            make_inputs=unet_inputs,
            fp32_node_prefixes=time_embedding_fp32("unet", added)[0],
            fp32_reason=time_embedding_fp32("unet", added)[1],
        ),
        "vae_encoder": GraphSpec(
            name="vae_encoder",
            module=VaeEncoderGraph(model.vae).eval(),
            inputs=(InputSpec("image", "float32", ("batch", 3, "height", "width")),),
            outputs=(InputSpec("latent_mean", "float32", ("batch", latent_channels, "latent_height", "latent_width")),
                     InputSpec("latent_std", "float32", ("batch", latent_channels, "latent_height", "latent_width"))),
            make_inputs=encoder_inputs,
            fp32_all=vae_fp32,
            fp32_reason="VAE encoder activations overflow fp16 (the VAE config sets force_upcast, as diffusers does)"
            if vae_fp32 else "",
        ),
        "vae_decoder": GraphSpec(
            name="vae_decoder",
            module=VaeDecoderGraph(model.vae).eval(),
            inputs=(InputSpec("latents", "float32", ("batch", latent_channels, "latent_height", "latent_width")),),
            outputs=(InputSpec("image", "float32", ("batch", 3, "height", "width")),),
            make_inputs=vae_inputs,
            fp32_all=vae_fp32,
            fp32_reason="VAE decoder activations overflow fp16 (the VAE config sets force_upcast, as diffusers does)"
            if vae_fp32 else "",
        ),
    }


def residual_specs(config, suffix: str = "") -> tuple[InputSpec, ...]:
    """The ControlNet residuals a U-Net of ``config`` adds to its skip connections: down_residual_i, mid_residual
    (kB, channels, latent_height_f, latent_width_f), f the level's downsampling factor (``controlnet.residual_levels``)."""
    from sdtrt.export.controlnet import mid_level, residual_levels

    levels = [(f"down_residual_{i}", ch, f) for i, (ch, f) in enumerate(residual_levels(config))]
    levels.append(("mid_residual", *mid_level(config)))
    return tuple(InputSpec(name + suffix, "float32", ("text_batch", ch, level_dim("latent_height", f),
                                                      level_dim("latent_width", f))) for name, ch, f in levels)


def residual_feeds(specs, rows_: int, h: int, w: int, rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    values = {"text_batch": rows_, "latent_height": h, "latent_width": w}
    return {s.name: (scale * rng.standard_normal(tuple(d if isinstance(d, int) else dim_value(d, values)
                                                        for d in s.dims))).astype(np.float32) for s in specs}


def controlnet_spec(controlnet, latent_channels: int, text_hidden: int, text_length: int, vae_scale: int,
                    added: AddedInputs | None = None) -> GraphSpec:
    """The graph of one ControlNet (``ControlNetGraph``) for a base model of these dimensions; ``added``: the base
    U-Net's added-conditioning inputs (SDXL), which the ControlNet takes too."""
    outputs = residual_specs(controlnet.config)
    accumulated = residual_specs(controlnet.config, "_in")

    def make_inputs(batch, height, width, rng, opts):
        h, w = height // vae_scale, width // vae_scale
        k = 2 if opts.get("cfg", True) else 1
        feeds = {
            "latents": rng.standard_normal((batch, latent_channels, h, w)).astype(np.float32),  # (B, C, h, w)
            "timestep": np.array([opts.get("timestep", 981.0)], dtype=np.float32),  # (1,)
            "encoder_hidden_states": rng.standard_normal(
                (k * batch, text_length * opts.get("chunks", 1), text_hidden)).astype(np.float32),  # (kB, 77c, D)
            "control_image": rng.random((batch, 3, height, width)).astype(np.float32),  # (B, 3, H, W) in [0, 1]
            "conditioning_scale": np.array([opts.get("conditioning_scale", 0.8)], dtype=np.float32),  # (1,)
        }
        if added is not None:
            feeds |= added.feeds(k * batch, rng)
        return feeds | residual_feeds(accumulated, k * batch, h, w, rng, 0.1)

    fp32_prefixes, fp32_reason = time_embedding_fp32("controlnet", added)
    return GraphSpec(
        name="controlnet",
        module=ControlNetGraph(controlnet, added=added is not None).eval(),
        inputs=(
            InputSpec("latents", "float32", ("batch", latent_channels, "latent_height", "latent_width")),
            InputSpec("timestep", "float32", (1,), keep_fp32=True),
            InputSpec("encoder_hidden_states", "float32", ("text_batch", "text_length", text_hidden)),
            InputSpec("control_image", "float32", ("batch", 3, "height", "width")),
            InputSpec("conditioning_scale", "float32", (1,), keep_fp32=True),
            *(added.specs() if added is not None else ()),
            *accumulated,
        ),
        outputs=outputs,
        make_inputs=make_inputs,
        fp32_node_prefixes=fp32_prefixes,
        fp32_reason=fp32_reason,
    )


def vae_scale_factor(model: LoadedModel) -> int:
    return 2 ** (len(model.vae.config.block_out_channels) - 1)
