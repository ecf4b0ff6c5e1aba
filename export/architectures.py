"""Built-in Stable Diffusion architectures, instantiated with seeded random weights.

No weights can be downloaded here, so each architecture is pure configuration: the diffusers/
transformers constructor arguments of every component plus the scheduler config. ``tiny`` keeps
every structural feature of SD (4-level VAE with f=8, cross-attention U-Net, CLIP text encoder)
at a few MB; ``sd15`` and ``sd21`` are the real shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# SD 1.x / 2.x share the training noise schedule (Rombach et al. 2022, LDM configs).
_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str
    description: str
    text_encoder: dict[str, Any]  # transformers.CLIPTextConfig kwargs (vocab_size filled from the tokenizer if absent)
    unet: dict[str, Any]  # diffusers.UNet2DConditionModel kwargs
    vae: dict[str, Any]  # diffusers.AutoencoderKL kwargs
    scheduler_class: str
    scheduler: dict[str, Any]
    tokenizer_merges: int = 2000
    tokenizer_pad_token: str = "<|endoftext|>"
    supported: bool = True
    unsupported_reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # SDXL's second text encoder (transformers.CLIPTextModelWithProjection kwargs): its penultimate hidden state is
    # concatenated to the first's, its projected pooled output is the U-Net's ``text_embeds``. Empty: one encoder.
    text_encoder_2: dict[str, Any] = field(default_factory=dict)
    # the text_encoder kwargs are a CLIPTextModelWithProjection (the SDXL refiner's only encoder, OpenCLIP bigG)
    projected_text_encoder: bool = False
    # diffusers' pipeline config (model_index.json): force_zeros_for_empty_prompt, requires_aesthetics_score
    pipeline: dict[str, Any] = field(default_factory=dict)


_SD15_SCHEDULER = dict(
    _SD_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
    prediction_type="epsilon", timestep_spacing="leading",
)

_SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215, force_upcast=True,
)

TINY = Architecture(
    name="tiny",
    family="tiny",
    description="SD-shaped toy (f=8 VAE, 3-level cross-attention U-Net, 2-layer CLIP), random weights",
    text_encoder=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
    ),
    unet=dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ),
    vae=dict(_SD_VAE, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=256),
    scheduler_class="PNDMScheduler",
    scheduler=_SD15_SCHEDULER,
    tokenizer_merges=400,
)

SMALL = Architecture(
    name="small",
    family="small",
    description="mid-size SD-shaped model (~25M parameters: 4-layer 128-d CLIP, 64/128/256 U-Net), random weights",
    text_encoder=dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=128,
    ),
    unet=dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
    ),
    vae=dict(_SD_VAE, block_out_channels=(32, 64, 128, 128), layers_per_block=1, sample_size=256),
    scheduler_class="PNDMScheduler",
    scheduler=_SD15_SCHEDULER,
    tokenizer_merges=1000,
)

SD15 = Architecture(
    name="sd15",
    family="sd1",
    description="Stable Diffusion 1.5 shapes (U-Net ~860M, CLIP ViT-L/14 text encoder), random weights",
    text_encoder=dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ),
    unet=dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ),
    vae=_SD_VAE,
    scheduler_class="PNDMScheduler",
    scheduler=_SD15_SCHEDULER,
)

SD21 = Architecture(
    name="sd21",
    family="sd2",
    description="Stable Diffusion 2.1 (768-v) shapes: v-prediction, OpenCLIP-H text encoder, random weights",
    text_encoder=dict(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024,
    ),
    unet=dict(
        SD15.unet, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True, upcast_attention=True, sample_size=96,
    ),
    vae=dict(_SD_VAE, sample_size=768),
    scheduler_class="DDIMScheduler",
    scheduler=dict(
        _SD_BETAS, set_alpha_to_one=False, steps_offset=1, clip_sample=False,
        prediction_type="v_prediction", timestep_spacing="leading",
    ),
    tokenizer_pad_token="!",
)

SMALL_V = Architecture(
    name="small-v",
    family="sd2",
    description="mid-size SD 2.x-shaped model: v-prediction, GELU text encoder, linear-projection attention, DDIM; "
                "random weights",
    text_encoder=dict(SMALL.text_encoder, hidden_act="gelu"),
    unet=dict(SMALL.unet, use_linear_projection=True, attention_head_dim=(2, 4, 8)),
    vae=SMALL.vae,
    scheduler_class="DDIMScheduler",
    scheduler=SD21.scheduler,
    tokenizer_merges=1000,
    tokenizer_pad_token="!",
)

# SDXL (Podell et al. 2023, arXiv:2307.01952): diffusers' stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0
# configs. The VAE is SD's with scaling factor 0.13025; it overflows in fp16 (force_upcast: its graphs stay FP32).
_SDXL_SCHEDULER = dict(
    _SD_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False, sample_max_value=1.0,
    prediction_type="epsilon", timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
)
_SDXL_VAE = dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
_CLIP_L = dict(SD15.text_encoder)
_CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
_SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=1280 + 6 * 256,  # pooled text_embeds + 6 time ids x 256
)
_SDXL_REFINER_UNET = dict(
    _SDXL_UNET, block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
    projection_class_embeddings_input_dim=1280 + 5 * 256,  # pooled + original size, crop, aesthetic score
)

SDXL = Architecture(
    name="sdxl", family="sdxl",
    description="Stable Diffusion XL base 1.0 shapes (U-Net 2.6B, CLIP ViT-L + OpenCLIP ViT-bigG), random weights",
    text_encoder=_CLIP_L, text_encoder_2=_CLIP_BIGG, unet=_SDXL_UNET, vae=_SDXL_VAE,
    scheduler_class="EulerDiscreteScheduler", scheduler=_SDXL_SCHEDULER,
    pipeline=dict(force_zeros_for_empty_prompt=True),
)
SDXL_REFINER = Architecture(
    name="sdxl-refiner", family="sdxl-refiner",
    description="Stable Diffusion XL refiner 1.0 shapes (U-Net 2.3B, OpenCLIP ViT-bigG only, aesthetic-score "
                "conditioning), random weights",
    text_encoder=_CLIP_BIGG, projected_text_encoder=True, unet=_SDXL_REFINER_UNET, vae=_SDXL_VAE,
    scheduler_class="EulerDiscreteScheduler", scheduler=_SDXL_SCHEDULER, tokenizer_pad_token="!",
    pipeline=dict(force_zeros_for_empty_prompt=False, requires_aesthetics_score=True),
)
# SDXL-shaped toys for tests: two encoders (the second projected, "!" padding), 3-level U-Net whose first level has
# no attention, transformer depth per level, text_time added conditioning; the refiner's with aesthetic scores
_TINY_CLIP_2 = dict(TINY.text_encoder, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                    hidden_act="gelu", projection_dim=40)
_TINY_XL_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=32 + 48,
    use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=40 + 6 * 8,
)
_TINY_XL_VAE = dict(TINY.vae, scaling_factor=0.13025)
TINY_XL = Architecture(
    name="tiny-xl", family="sdxl",
    description="SDXL-shaped toy (two text encoders, pooled + size conditioning, 3-level U-Net), random weights",
    text_encoder=TINY.text_encoder, text_encoder_2=_TINY_CLIP_2, unet=_TINY_XL_UNET, vae=_TINY_XL_VAE,
    scheduler_class="EulerDiscreteScheduler", scheduler=_SDXL_SCHEDULER, tokenizer_merges=400,
    pipeline=dict(force_zeros_for_empty_prompt=True),
)
TINY_XL_REFINER = Architecture(
    name="tiny-xl-refiner", family="sdxl-refiner",
    description="SDXL-refiner-shaped toy (one projected text encoder, aesthetic-score conditioning), random weights",
    text_encoder=_TINY_CLIP_2, projected_text_encoder=True,
    unet=dict(_TINY_XL_UNET, cross_attention_dim=48, projection_class_embeddings_input_dim=40 + 5 * 8),
    vae=_TINY_XL_VAE, scheduler_class="EulerDiscreteScheduler", scheduler=_SDXL_SCHEDULER, tokenizer_merges=400,
    tokenizer_pad_token="!", pipeline=dict(force_zeros_for_empty_prompt=False, requires_aesthetics_score=True),
)


def _inpainting(arch: Architecture) -> Architecture:
    """The inpainting variant of ``arch``: a U-Net with 2C + 1 input channels (latents, mask, masked-image latents),
    as runwayml's stable-diffusion-inpainting is to SD 1.5."""
    latent = arch.vae["latent_channels"]
    return Architecture(name=f"{arch.name}-inpaint", family=arch.family,
                        description=f"{arch.description}; inpainting U-Net ({2 * latent + 1} input channels)",
                        text_encoder=arch.text_encoder, unet=dict(arch.unet, in_channels=2 * latent + 1), vae=arch.vae,
                        scheduler_class=arch.scheduler_class, scheduler=arch.scheduler,
                        tokenizer_merges=arch.tokenizer_merges, tokenizer_pad_token=arch.tokenizer_pad_token,
                        text_encoder_2=arch.text_encoder_2, projected_text_encoder=arch.projected_text_encoder,
                        pipeline=arch.pipeline)


BUILTIN_ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (TINY, SMALL, SMALL_V, SD15, SD21, SDXL, SDXL_REFINER, TINY_XL, TINY_XL_REFINER,
                        *map(_inpainting, (TINY, SMALL, SD15, SD21, SDXL, TINY_XL)))}
