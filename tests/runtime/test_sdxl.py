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


@pytest.mark.parametrize("sampler", ["euler", pytest.param("euler_a", marks=pytest.mark.slow)])
def test_sdxl_img2img_matches_diffusers(tiny_xl_model, sampler):
    from tests.runtime.test_tasks import Draws, each, generators, one_by_one, picture, with_sampler

    out, folder = tiny_xl_model
    ours = Pipeline.from_dir(out)
    prompts, image, steps, seed = ["a red fox in the snow", "a castle"], picture(128, 96), 10, 4
    got = ours(prompts, negative_prompt="blurry", image=image, strength=0.6, num_inference_steps=steps, seed=seed,
               scheduler=sampler, output_type="np", crops_coords_top_left=(8, 0), guidance_scale=6.0)
    table = ours.sampler_table(sampler, steps)
    draws = Draws(seed, (4, 12, 16), one_by_one(2) + each(2) * (1 + table.num_steps))
    with _patched(draws):
        want = with_sampler(_xl(folder, "StableDiffusionXLImg2ImgPipeline"), sampler)(
            prompts, negative_prompt=["blurry"] * 2, image=image, strength=0.6, num_inference_steps=steps,
            output_type="np", generator=generators(2), crops_coords_top_left=(8, 0), guidance_scale=6.0).images
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
               scheduler="euler", output_type="np", overlay=False, guidance_scale=6.0).images
    table = ours.sampler_table("euler", steps)
    draws = Draws(seed, (4, 12, 16), one_by_one(2) + each(2) + one_by_one(2) + each(2) * table.num_steps)
    with _patched(draws):
        want = with_sampler(_xl(folder, "StableDiffusionXLInpaintPipeline"), "euler")(
            prompts, image=[image] * 2, mask_image=[mask] * 2, strength=strength, generator=generators(2),
            num_inference_steps=steps, height=96, width=128, output_type="np", guidance_scale=6.0).images
    assert got.shape == want.shape == (2, 96, 128, 3)
    assert psnr(got, want) >= 60, psnr(got, want)


def test_sdxl_clip_skip_matches_diffusers(tiny_xl_model):
    """CLIP skip as diffusers defines it for SDXL: hidden_states[-(clip_skip + 2)], not normalised. (diffusers skips
    only in the prompt, its negative prompt always takes hidden_states[-2]; sdtrt skips in both, as A1111 and
    diffusers' SD 1.x pipeline do: compared without a negative prompt, whose embeddings are zeros.)"""
    out, folder = tiny_xl_model
    pipe = Pipeline.from_dir(out)
    ours = pipe("a photo of a cat", num_inference_steps=6, guidance_scale=5.0, height=64,
                width=96, seed=2, output_type="np", clip_skip=1)
    want = _xl(folder)(prompt="a photo of a cat", num_inference_steps=6, guidance_scale=5.0,
                       height=64, width=96, latents=torch.from_numpy(_latents(pipe, 2, 1, 64, 96)), output_type="np",
                       clip_skip=1).images
    assert psnr(ours.images, want) >= 60, psnr(ours.images, want)


def test_sdxl_long_prompts_chunk_each_encoder_and_pool_the_first_chunk(tiny_xl_model):
    """A1111's long prompts on both encoders: 2 chunks of 77 each, joined on the feature axis; the pooled embedding
    is the first chunk's text_embeds; emphasis weights each encoder's hidden states (and restores each one's mean)."""
    from sdtrt.runtime.prompts import join_chunks
    from sdtrt.runtime.request import GenerationRequest

    out, _ = tiny_xl_model
    pipe = Pipeline.from_dir(out)
    text = ", ".join(["a (red:1.4) fox in the snow"] * 14)
    req = GenerationRequest.create(text, None, 2, 5.0, 64, 64)
    plan = pipe.plan(req)
    k = plan.text.count
    assert k >= 2 and len(plan.text.chunks) == 2
    feeds = pipe._encode(req, plan)
    assert feeds["encoder_hidden_states"].shape == (2, 77 * k, pipe.manifest.model.text_hidden_size)
    assert not feeds["encoder_hidden_states"][0].any() and not feeds["text_embeds"][0].any()  # force zeros
    parts = []
    for e, chunks in zip(pipe.manifest.model.encoders, plan.text.chunks):
        c = chunks[text]
        o = pipe.engines[e.component].run({"input_ids": c.ids})
        parts.append(join_chunks(o[f"hidden_state_skip{e.skip_offset}"], [c], None)[0])
        if e.pooled:
            np.testing.assert_array_equal(feeds["text_embeds"][1], o[e.pooled][0])
    np.testing.assert_allclose(feeds["encoder_hidden_states"][1], np.concatenate(parts, -1), rtol=1e-6, atol=1e-6)
    assert len(set(np.round(c.weights.ravel(), 3))) > 1  # the emphasis is there


def test_sdxl_device_loop_gives_the_host_loops_image(tiny_xl_model):
    """The added conditions reach the device loop as constant inputs (IO binding, the sampler-update graph)."""
    out, _ = tiny_xl_model
    args = dict(num_inference_steps=4, height=64, width=96, seed=1, output_type="np", scheduler="euler_a",
                num_images_per_prompt=2, original_size=(256, 256))
    with Pipeline.from_dir(out, backend="onnxruntime-cpu", device_loop=True) as device, \
            Pipeline.from_dir(out, backend="onnxruntime-cpu") as host:
        assert psnr(device("a cat", **args).images, host("a cat", **args).images) >= 60
