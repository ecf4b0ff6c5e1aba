"""Images from the runtime against diffusers' StableDiffusionPipeline with the same weights, scheduler and
initial latents (fp32 engines, ONNX Runtime CPU)."""

from unittest import mock

import numpy as np
import pytest
import torch

from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from sdtrt.runtime.samplers import DIFFUSERS_EQUIVALENT, SAMPLERS



def diffusers_images(folder, sampler, prompts, negatives, steps, guidance, height, width, latents, noises=()):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    cls, extra = DIFFUSERS_EQUIVALENT[sampler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    noise_iter = iter(noises)
    # Ancestral noise: the same arrays our runtime drew, in the same order.
    draw = lambda *a, **k: torch.from_numpy(next(noise_iter))  # noqa: E731
    with mock.patch("diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor", side_effect=draw), \
            mock.patch("diffusers.schedulers.scheduling_lcm.randn_tensor", side_effect=draw):
        return pipe(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance,
                    height=height, width=width, latents=torch.from_numpy(latents), output_type="np").images


def compare_with_diffusers(engine_dir, diffusers_dir, sampler, height, width, prompts, steps=12, guidance=7.5, seed=7):
    pipe = Pipeline.from_dir(engine_dir, backend="onnxruntime-cpu")
    negatives = ["blurry"] * len(prompts)
    ours = pipe(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance, height=height,
                width=width, seed=seed, scheduler=sampler, output_type="np")
    # Replay our generator: initial latents first, then one draw per stochastic step.
    rng = np.random.Generator(np.random.PCG64(seed))
    info = pipe.manifest.model
    shape = (len(prompts), info.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)
    latents = rng.standard_normal(shape, dtype=np.float32)
    table = pipe.sampler_table(sampler, steps)
    noises = [rng.standard_normal(shape, dtype=np.float32) for _ in range(table.num_steps)] if table.stochastic else []
    want = diffusers_images(diffusers_dir, sampler, prompts, negatives, steps, guidance, height, width, latents, noises)
    assert ours.images.shape == want.shape
    return psnr(ours.images, want)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_tiny_image_matches_diffusers(tiny_fp32, tiny_diffusers_dir, sampler):
    out, _ = tiny_fp32
    value = compare_with_diffusers(out, tiny_diffusers_dir, sampler, 96, 128, ["a photo of a cat", "a castle, oil on canvas"])
    assert value >= 40, f"{sampler}: PSNR {value:.1f} dB"


def test_tiny_image_without_guidance_matches_diffusers(tiny_fp32, tiny_diffusers_dir):
    out, _ = tiny_fp32
    value = compare_with_diffusers(out, tiny_diffusers_dir, "euler", 64, 64, ["a dog"], guidance=1.0)
    assert value >= 40


@pytest.mark.parametrize("sampler", ["pndm", "dpmpp_2m_karras", "euler_a"])
def test_mid_size_image_matches_diffusers(small_model, sampler):
    out, folder = small_model
    value = compare_with_diffusers(out, folder, sampler, 128, 96, ["a red fox in the snow"], steps=10)
    assert value >= 40, f"{sampler}: PSNR {value:.1f} dB"


def test_same_seed_gives_the_same_image_and_another_seed_does_not(tiny_fp32):
    out, _ = tiny_fp32
    pipe = Pipeline.from_dir(out)
    a, b, c = (pipe("a cat", num_inference_steps=3, height=64, width=64, seed=s, output_type="np").images for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert psnr(a, c) < 40


def test_fp16_engines_give_nearly_the_fp32_image(tiny_fp16, tiny_fp32):
    kwargs = dict(num_inference_steps=8, height=64, width=96, seed=3, output_type="np", scheduler="dpmpp_2m")
    fp16 = Pipeline.from_dir(tiny_fp16[0])("a cat", **kwargs).images
    fp32 = Pipeline.from_dir(tiny_fp32[0])("a cat", **kwargs).images
    assert np.isfinite(fp16).all()
    assert psnr(fp16, fp32) >= 30


@pytest.fixture(scope="session")
def unusual_model(tmp_path_factory):
    """Unlike SD in every shape knob: 16 latent channels, VAE factor 4 without fp32 upcast, 48-d text,
    linear-projection attention, v-prediction with trailing DDIM timesteps."""
    from sdtrt.export import ExportConfig, export
    from sdtrt.export.architectures import Architecture
    from sdtrt.export.loaders import build_builtin

    arch = Architecture(
        name="unusual", family="unusual", description="test-only",
        text_encoder=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=77, hidden_act="gelu", projection_dim=48),
        unet=dict(sample_size=16, in_channels=16, out_channels=16, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=48, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True),
        vae=dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
                 norm_num_groups=8, sample_size=64, scaling_factor=0.5, force_upcast=False),
        scheduler_class="DDIMScheduler",
        scheduler=dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=False,
                       steps_offset=0, clip_sample=False),
        tokenizer_merges=300,
    )
    folder = tmp_path_factory.mktemp("unusual") / "diffusers"
    build_builtin(arch, seed=3).save_pretrained(folder)
    engines = {}
    for precision in ("fp32", "fp16"):
        engines[precision] = folder.parent / precision
        export(ExportConfig(model=str(folder), out=str(engines[precision]), precision=precision, size_min=64,
                            size_max=128, batch_max=3), log=lambda s: None)
    return engines, folder


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m_karras"])
def test_unusual_model_odd_batch_non_square_matches_diffusers(unusual_model, sampler):
    engines, folder = unusual_model
    value = compare_with_diffusers(engines["fp32"], folder, sampler, 96, 64, ["a", "b c", "d, e"], steps=8)
    assert value >= 40, f"{sampler}: PSNR {value:.1f} dB"


def test_unusual_model_fp16_export_passes_its_gate_and_runs(unusual_model):
    from sdtrt.manifest import Manifest

    engines, _ = unusual_model
    manifest = Manifest.load(engines["fp16"])
    assert manifest.model.latent_channels == 16 and manifest.model.vae_scale_factor == 4
    assert manifest.components["vae_decoder"].precision == "fp16"  # no force_upcast: the VAE computes in fp16
    image = Pipeline.from_dir(engines["fp16"])(["x", "y", "z"], num_inference_steps=4, height=64, width=128, seed=1,
                                              output_type="np").images
    assert image.shape == (3, 64, 128, 3) and np.isfinite(image).all()
