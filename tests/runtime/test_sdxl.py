"""SDXL through the one pipeline: images against diffusers' StableDiffusionXL pipelines with the same weights,
scheduler and initial latents (the SDXL-shaped built-ins, fp32 engines, ONNX Runtime CPU), non-square sizes and
batch > 1."""

import numpy as np
import pytest
import torch

from sdtrt.errors import UsageError
from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from tests.runtime.test_pipeline import per_image_draws

HEIGHT, WIDTH = 96, 128


def _xl(folder, cls="StableDiffusionXLPipeline"):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, seed, batch, height=HEIGHT, width=WIDTH):
    info = pipe.manifest.model
    shape = (info.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)
    return per_image_draws(seed, batch, shape, 1)[0]


@pytest.mark.parametrize("negative", ["given", "omitted"])
def test_sdxl_txt2img_matches_diffusers(tiny_xl_model, negative):
    """Two prompts, micro-conditioning off its defaults; the negative prompt given, and omitted (diffusers'
    force_zeros_for_empty_prompt: zero embeddings, not the encoding of "")."""
    out, folder = tiny_xl_model
    pipe = Pipeline.from_dir(out, backend="onnxruntime-cpu")
    assert pipe.manifest.model.force_zeros_for_empty_prompt
    prompts = ["a photo of a cat", "a castle, oil on canvas"]
    negatives = ["blurry", "lowres"] if negative == "given" else None
    micro = dict(original_size=(512, 384), crops_coords_top_left=(16, 8), target_size=(96, 128))
    ours = pipe(prompts, negative_prompt=negatives, num_inference_steps=8, guidance_scale=6.0, height=HEIGHT,
                width=WIDTH, seed=5, output_type="np", **micro)
    want = _xl(folder)(prompt=prompts, negative_prompt=negatives, num_inference_steps=8, guidance_scale=6.0,
                       height=HEIGHT, width=WIDTH, latents=torch.from_numpy(_latents(pipe, 5, 2)), output_type="np",
                       **micro).images
    assert psnr(ours.images, want) >= 60, psnr(ours.images, want)


def test_sdxl_micro_conditioning_changes_the_image(tiny_xl_model):
    """The time ids reach the U-Net: another original size is another image (a dropped input would not be)."""
    out, _ = tiny_xl_model
    pipe = Pipeline.from_dir(out)
    a, b = (pipe("a cat", num_inference_steps=3, height=64, width=64, seed=1, output_type="np",
                 original_size=size).images for size in ((64, 64), (1024, 1024)))
    assert np.abs(a - b).max() > 1e-3


def test_sd_options_of_another_family_are_refused(tiny_fp32, tiny_xl_refiner_model):
    out, _ = tiny_fp32
    with pytest.raises(UsageError, match="original_size is micro-conditioning this model does not take"):
        Pipeline.from_dir(out)("a cat", num_inference_steps=2, height=64, width=64, original_size=(512, 512))
    refiner = Pipeline.from_dir(tiny_xl_refiner_model[0])
    with pytest.raises(UsageError, match="target_size"):
        refiner("a cat", num_inference_steps=1, height=64, width=64, target_size=(512, 512))


_XL_DRAWERS = ("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img.randn_tensor",
               "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint.randn_tensor")


def _patched(draws):
    from contextlib import ExitStack
    from unittest import mock

    stack = draws.patch()
    for target in _XL_DRAWERS:
        stack.enter_context(mock.patch(target, side_effect=draws))
    return stack


@pytest.mark.parametrize("sampler", ["euler", "euler_a"])
def test_sdxl_img2img_matches_diffusers(tiny_xl_model, sampler):
    from tests.runtime.test_tasks import Draws, each, generators, one_by_one, picture, with_sampler

    out, folder = tiny_xl_model
    ours = Pipeline.from_dir(out)
    prompts, image, steps, seed = ["a red fox in the snow", "a castle"], picture(128, 96), 10, 4
    got = ours(prompts, negative_prompt="blurry", image=image, strength=0.6, num_inference_steps=steps, seed=seed,
               scheduler=sampler, output_type="np", crops_coords_top_left=(8, 0))
    table = ours.sampler_table(sampler, steps)
    draws = Draws(seed, (4, 12, 16), one_by_one(2) + each(2) * (1 + table.num_steps))
    with _patched(draws):
        want = with_sampler(_xl(folder, "StableDiffusionXLImg2ImgPipeline"), sampler)(
            prompts, negative_prompt=["blurry"] * 2, image=image, strength=0.6, num_inference_steps=steps,
            output_type="np", generator=generators(2), crops_coords_top_left=(8, 0)).images
    assert got.images.shape == want.shape == (2, 96, 128, 3)
    assert psnr(got.images, want) >= 60, psnr(got.images, want)


@pytest.mark.parametrize("nine_channel", [False, True])
def test_sdxl_inpainting_matches_diffusers(tiny_xl_model, tiny_xl_inpaint_model, nine_channel):
    from tests.runtime.test_tasks import Draws, box_mask, each, generators, one_by_one, picture, with_sampler

    out, folder = tiny_xl_inpaint_model if nine_channel else tiny_xl_model
    ours = Pipeline.from_dir(out)
    prompts, steps, seed, strength = ["a red fox in the snow", "a castle"], 8, 11, 0.7
    image, mask = picture(128, 96, seed=1), box_mask(128, 96, (30, 12, 90, 60))
    got = ours(prompts, image=image, mask_image=mask, strength=strength, num_inference_steps=steps, seed=seed,
               scheduler="euler", output_type="np", overlay=False).images
    table = ours.sampler_table("euler", steps)
    draws = Draws(seed, (4, 12, 16), one_by_one(2) + each(2) + one_by_one(2) + each(2) * table.num_steps)
    with _patched(draws):
        want = with_sampler(_xl(folder, "StableDiffusionXLInpaintPipeline"), "euler")(
            prompts, image=[image] * 2, mask_image=[mask] * 2, strength=strength, generator=generators(2),
            num_inference_steps=steps, height=96, width=128, output_type="np").images
    assert got.shape == want.shape == (2, 96, 128, 3)
    assert psnr(got, want) >= 60, psnr(got, want)
