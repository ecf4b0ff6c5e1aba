"""Images from the runtime against diffusers' StableDiffusionPipeline with the same weights, scheduler and
initial latents (fp32 engines, ONNX Runtime CPU)."""

import contextlib
from unittest import mock

import numpy as np
import pytest
import torch

from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from sdtrt.runtime.samplers import DEFAULT_ETA, DIFFUSERS_EQUIVALENT, SAMPLERS
from tests.runtime.sampler_parity import NOISE_DRAWING



def diffusers_images(folder, sampler, prompts, negatives, steps, guidance, height, width, latents, noises=()):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    cls, extra = DIFFUSERS_EQUIVALENT[sampler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    noise_iter = iter(noises)
    # Ancestral noise: the same arrays our runtime drew, in the same order.
    draw = lambda *a, **k: torch.from_numpy(next(noise_iter))  # noqa: E731
    with contextlib.ExitStack() as stack:
        for module in NOISE_DRAWING:
            stack.enter_context(mock.patch(f"diffusers.schedulers.{module}.randn_tensor", side_effect=draw))
        # diffusers' pipelines pass eta=0.0 to the scheduler; sdtrt's TCD default is TCDScheduler.step's own 0.3
        return pipe(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance,
                    height=height, width=width, latents=torch.from_numpy(latents), output_type="np",
                    eta=DEFAULT_ETA.get(sampler, 0.0)).images


def per_image_draws(seed, batch, per_image, count):
    """``count`` arrays (batch, *per_image) of the seed contract: row k from image k's own generator, PCG64(seed + k),
    as image k alone would draw them."""
    generators = [np.random.Generator(np.random.PCG64(seed + k)) for k in range(batch)]
    return [np.stack([g.standard_normal(per_image, dtype=np.float32) for g in generators]) for _ in range(count)]


def compare_with_diffusers(engine_dir, diffusers_dir, sampler, height, width, prompts, steps=12, guidance=7.5, seed=7,
                           pipe=None):
    """PSNR of our images against diffusers' for the same request (``pipe``: ours, already loaded)."""
    pipe = pipe or Pipeline.from_dir(engine_dir, backend="onnxruntime-cpu")
    negatives = ["blurry"] * len(prompts)
    ours = pipe(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance, height=height,
                width=width, seed=seed, scheduler=sampler, output_type="np")
    # Replay our generators, one per image (seed + i, as A1111): initial latents first, then one draw per
    # stochastic step, each image from its own
    info = pipe.manifest.model
    per_image = (info.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)
    latents, *noises = per_image_draws(seed, len(prompts), per_image, 1 + pipe.sampler_table(sampler, steps).num_steps)
    noises = noises if pipe.sampler_table(sampler, steps).stochastic else []
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


def test_image_i_of_a_batch_is_the_image_of_seed_plus_i_alone(tiny_fp32):
    # A1111 (modules/processing.py process_images_inner): p.all_seeds = [int(seed) + x for x in range(len(all_prompts))]
    # and one generator per image (rng.ImageRNG(shape, p.seeds)): Euler a draws noise at every step, each image its own
    out, _ = tiny_fp32
    pipe = Pipeline.from_dir(out, backend="onnxruntime-cpu")
    kwargs = dict(num_inference_steps=4, height=64, width=64, scheduler="euler_a", output_type="np")
    batch = pipe("a cat", seed=2**64 - 2, num_images_per_prompt=3, **kwargs)
    seeds = [2**64 - 2, 2**64 - 1, 0]  # seed + i, wrapping past the largest seed PCG64 takes
    assert batch.seed == seeds[0] and batch.seeds == seeds
    for i, seed in enumerate(seeds):
        alone = pipe("a cat", seed=seed, **kwargs)
        # ONNX Runtime may sum a batch in another order than one image: the same image within float rounding
        np.testing.assert_allclose(batch.images[i], alone.images[0], atol=2e-5)
        assert f", Seed: {seed}, " in batch.parameters[i] and "Batch" not in batch.parameters[i]
        assert batch.parameters[i] == alone.parameters[0]


def test_a_random_seed_is_below_2_32_as_a1111s(tiny_fp32):
    out, _ = tiny_fp32
    pipe = Pipeline.from_dir(out, backend="onnxruntime-cpu")
    result = pipe("a cat", num_inference_steps=1, height=64, width=64, num_images_per_prompt=2, scheduler="euler")
    # A1111's get_fixed_seed: int(random.randrange(4294967294)); JavaScript's JSON.parse keeps it exact
    assert 0 <= result.seed < 4294967294 and result.seeds == [result.seed, result.seed + 1]


def test_each_image_of_a_mid_size_batch_is_its_seed_alone_and_matches_diffusers(small_model):
    """Past the tiny model, with a sampler drawing noise at every step: image i of a batch of 2 is image seed + i made
    alone, and diffusers given one generator per image (its arrays: per_image_draws) makes the same batch."""
    out, folder = small_model
    prompt, steps, seed = "a red fox in the snow", 6, 40
    pipe = Pipeline.from_dir(out, backend="onnxruntime-cpu")
    assert compare_with_diffusers(out, folder, "euler_a", 64, 96, [prompt] * 2, steps=steps, seed=seed, pipe=pipe) >= 40
    kwargs = dict(negative_prompt="blurry", num_inference_steps=steps, height=64, width=96, scheduler="euler_a",
                  output_type="np")
    batch = pipe(prompt, seed=seed, num_images_per_prompt=2, **kwargs).images
    for i in range(2):
        alone = pipe(prompt, seed=seed + i, **kwargs).images[0]
        np.testing.assert_allclose(batch[i], alone, atol=1e-4)
    assert psnr(batch[0], batch[1]) < 30  # two images, not one twice
