"""img2img, inpainting and outpainting against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline: same weights, same input images, and the random arrays our seed contract draws
injected into diffusers in its own order of draws (fp32 engines, ONNX Runtime CPU, the mid-size built-ins).
Whole-picture inpainting is compared with ``overlay=False``: diffusers returns the VAE's output everywhere, where
A1111 (and sdtrt by default) pastes the original back outside the mask (test_inpaint_modes.py)."""

from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from sdtrt.runtime.images import blur_mask, outpaint_canvas
from sdtrt.runtime.samplers import DEFAULT_ETA, DIFFUSERS_EQUIVALENT, SAMPLERS

# every module of the two pipelines that draws from the generator: the pipeline (forward noise), the VAE
# posterior, the stochastic schedulers
_DRAWERS = ("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img.randn_tensor",
            "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint.randn_tensor",
            "diffusers.models.autoencoders.vae.randn_tensor",
            "diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor",
            "diffusers.schedulers.scheduling_lcm.randn_tensor",
            "diffusers.schedulers.scheduling_tcd.randn_tensor",
            "diffusers.schedulers.scheduling_ddim.randn_tensor")


def picture(width, height, seed=0):
    """A smooth RGB test image (an image, not noise: the VAE posterior matters) with some texture."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rng = np.random.default_rng(seed)
    rgb = np.stack([np.sin(6 * x + 1) * 0.5 + 0.5, np.cos(5 * y) * 0.4 + 0.5, (x + y) / 2], -1)
    rgb += 0.05 * rng.standard_normal(rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def box_mask(width, height, box):
    m = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m)


class Draws:
    """Our seed contract's arrays, handed to diffusers one per randn_tensor call. Image k of the batch draws from its
    own generator, PCG64(seed + k) (A1111's seeds; diffusers with ``generator=[one per image]``): each call of
    ``calls`` lists the images that draw an array of ``per_image`` then, stacked in that order. Each call must ask for
    the shape the contract drew next, so a different order of draws fails instead of passing by luck."""

    def __init__(self, seed, per_image, calls):
        generators = {}
        self.arrays = []
        for images in calls:
            for k in images:
                generators.setdefault(k, np.random.Generator(np.random.PCG64(seed + k)))
            self.arrays.append(np.stack([generators[k].standard_normal(per_image, dtype=np.float32) for k in images]))
        self.used = 0

    def __call__(self, shape, *args, **kwargs):
        want = self.arrays[self.used]
        assert tuple(shape) == want.shape, f"draw {self.used}: diffusers asks for {tuple(shape)}, we drew {want.shape}"
        self.used += 1
        return torch.from_numpy(want.copy())

    def patch(self):
        from contextlib import ExitStack

        stack = ExitStack()
        for target in _DRAWERS:
            stack.enter_context(mock.patch(target, side_effect=self))
        return stack


def each(batch):
    """One call drawing an array for every image of the batch (the noise, a step's noise)."""
    return [list(range(batch))]


def one_by_one(batch):
    """One call per image (diffusers encodes image i alone with generator i: its VAE posterior sample)."""
    return [[k] for k in range(batch)]


def generators(batch):
    """diffusers' one generator per image (what they would draw is replaced by ``Draws``)."""
    return [torch.Generator() for _ in range(batch)]


def diffusers_pipe(cls_name, folder):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def small_pipes(small_model):
    """sdtrt, and diffusers' img2img and inpainting pipelines, on the mid-size model (4-channel U-Net)."""
    import diffusers

    out, folder = small_model
    img2img = diffusers_pipe("StableDiffusionImg2ImgPipeline", folder)
    inpaint = diffusers.StableDiffusionInpaintPipeline(**img2img.components)
    inpaint.set_progress_bar_config(disable=True)
    return Pipeline.from_dir(out, backend="onnxruntime-cpu"), img2img, inpaint


@pytest.fixture(scope="module")
def inpaint_pipes(small_inpaint_model):
    """sdtrt and diffusers on the mid-size inpainting model (9-channel U-Net)."""
    out, folder = small_inpaint_model
    return Pipeline.from_dir(out, backend="onnxruntime-cpu"), diffusers_pipe("StableDiffusionInpaintPipeline", folder)


def with_sampler(pipe, sampler):
    """The pipeline with ``sampler``, configured from the model's own scheduler config (not from the sampler a
    previous test set: a config read by another class carries that class's settings)."""
    import diffusers

    if not hasattr(pipe, "model_scheduler_config"):
        pipe.model_scheduler_config = pipe.scheduler.config
    cls, extra = DIFFUSERS_EQUIVALENT[sampler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.model_scheduler_config, **extra)
    return pipe


def latent_shape(ours, batch, height, width):
    info = ours.manifest.model
    return (batch, info.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)


PROMPTS = ["a red fox in the snow", "a castle, oil on canvas"]


def _grid(samplers, keep, *rest):
    """Every sampler; those not in ``keep`` only in ``-m slow`` (the full grid). ``keep`` covers each kind of update
    (multistep, ancestral, the Karras schedule, PNDM's warm-up, LCM's own); test_samplers.py checks every table."""
    return [pytest.param(s, *rest, marks=() if s in keep else pytest.mark.slow) for s in samplers]


@pytest.mark.parametrize("sampler,strength", _grid(SAMPLERS, SAMPLERS, 0.3)
                         + _grid(SAMPLERS, ("euler_a", "dpmpp_2m_karras", "lcm"), 0.8))
def test_img2img_matches_diffusers(small_pipes, sampler, strength):
    ours, img2img, _ = small_pipes
    image = picture(100, 70)  # diffusers and sdtrt both round it down to 96x64
    steps, seed = 10, 5
    got = ours(PROMPTS, negative_prompt="blurry", image=image, strength=strength, num_inference_steps=steps, seed=seed,
               scheduler=sampler, output_type="np")
    shape = latent_shape(ours, 2, 64, 96)
    table = ours.sampler_table(sampler, steps)
    # seed contract for img2img, each image from its own generator: the posterior of its copy of the image, the
    # forward noise, per-step noise
    draws = Draws(seed, shape[1:], one_by_one(2) + each(2) * (1 + table.num_steps))
    with draws.patch():
        want = with_sampler(img2img, sampler)(PROMPTS, negative_prompt=["blurry"] * 2, image=image, strength=strength,
                                             num_inference_steps=steps, output_type="np", generator=generators(2),
                                             eta=DEFAULT_ETA.get(sampler, 0.0)).images
    assert got.images.shape == want.shape == (2, 64, 96, 3)
    value = psnr(got.images, want)
    assert value >= 40, f"{sampler} strength {strength}: PSNR {value:.1f} dB"


def inpaint_case(ours, theirs, sampler, strength, nine_channel, mask_blur=0, padding_mask_crop=None, steps=8,
                 width=96, height=64, image_size=(96, 64), prompts=PROMPTS, seed=11, box=(30, 12, 70, 44)):
    """(ours, diffusers') images for one inpainting request."""
    image = picture(*image_size, seed=1)
    mask = box_mask(*image_size, box)
    got = ours(prompts, image=image, mask_image=mask, strength=strength, num_inference_steps=steps, seed=seed,
               scheduler=sampler, height=height, width=width, mask_blur=mask_blur,
               padding_mask_crop=padding_mask_crop, output_type="np", overlay=False).images
    b = len(prompts)
    shape = latent_shape(ours, b, height, width)
    table = ours.sampler_table(sampler, steps)
    # seed contract for inpainting, each image from its own generator: its image's posterior where needed, the noise,
    # its masked image's posterior, per-step noise. diffusers encodes the images it is given one by one, so it gets
    # one copy per image of the batch.
    first = one_by_one(b) if (not nine_channel or strength < 1) else []
    draws = Draws(seed, shape[1:], first + each(b) + one_by_one(b) + each(b) * table.num_steps)
    their_mask = theirs.mask_processor.blur(mask, blur_factor=mask_blur) if mask_blur else mask
    crop = padding_mask_crop is not None
    if b > 1:
        image, their_mask = [image] * b, [their_mask] * b
    with draws.patch():
        want = with_sampler(theirs, sampler)(prompts, image=image, mask_image=their_mask, strength=strength,
                                            generator=generators(b), eta=DEFAULT_ETA.get(sampler, 0.0),
                                            num_inference_steps=steps, height=height, width=width,
                                            padding_mask_crop=padding_mask_crop,
                                            output_type="pil" if crop else "np").images
    if crop:  # diffusers pastes the crop back onto the original in PIL
        want = np.stack([np.asarray(im, np.float32) / 255 for im in want])
    return got, want


@pytest.mark.parametrize("sampler", _grid(SAMPLERS, ("pndm", "dpmpp_2m", "euler_a", "lcm")))
def test_inpainting_with_an_ordinary_model_matches_diffusers(small_pipes, sampler):
    ours, _, inpaint = small_pipes
    got, want = inpaint_case(ours, inpaint, sampler, 0.7, nine_channel=False)
    assert got.shape == want.shape == (2, 64, 96, 3)
    value = psnr(got, want)
    assert value >= 40, f"{sampler}: PSNR {value:.1f} dB"


@pytest.mark.parametrize("sampler,strength", [("pndm", 1.0), ("euler_a", 1.0), ("dpmpp_2m", 0.6), ("lms", 0.6)])
def test_inpainting_model_matches_diffusers(inpaint_pipes, sampler, strength):
    ours, theirs = inpaint_pipes
    got, want = inpaint_case(ours, theirs, sampler, strength, nine_channel=True)
    assert got.shape == want.shape == (2, 64, 96, 3)
    value = psnr(got, want)
    assert value >= 40, f"{sampler} strength {strength}: PSNR {value:.1f} dB"


@pytest.mark.parametrize("nine_channel", [False, True])
def test_mask_blur_and_padding_mask_crop_match_diffusers(small_pipes, inpaint_pipes, nine_channel):
    ours, theirs = inpaint_pipes if nine_channel else small_pipes[::2]
    # a 160x120 picture, a mask in one corner: the 96x64 crop around it is worked at full size and pasted back
    got, want = inpaint_case(ours, theirs, "euler", 1.0 if nine_channel else 0.75, nine_channel, mask_blur=4,
                             padding_mask_crop=12, image_size=(160, 120), box=(100, 70, 140, 100),
                             prompts=PROMPTS[:1])
    assert got.shape == want.shape == (1, 120, 160, 3)
    value = psnr(got, want)
    assert value >= 40, f"PSNR {value:.1f} dB"
    # outside the blurred mask the original pixels come back unchanged
    keep = np.asarray(blur_mask(box_mask(160, 120, (100, 70, 140, 100)), 4)) == 0
    original = np.asarray(picture(160, 120, seed=1), np.float32) / 255
    np.testing.assert_allclose(got[0][keep], original[keep], atol=1 / 255)


def test_mask_blur_changes_the_mask_diffusers_sees(small_pipes):
    ours, _, inpaint = small_pipes
    got, want = inpaint_case(ours, inpaint, "ddim", 0.75, False, mask_blur=6, prompts=PROMPTS[:1])
    assert psnr(got, want) >= 40
    sharp, _ = inpaint_case(ours, inpaint, "ddim", 0.75, False, prompts=PROMPTS[:1])
    assert psnr(got, sharp) < 60  # the blur is not ignored


@pytest.mark.parametrize("fill,strength", [("edge", 1.0), ("reflect", 0.85), ("gray", 0.85)])
def test_outpainting_is_inpainting_on_the_documented_canvas(inpaint_pipes, fill, strength):
    ours, theirs = inpaint_pipes
    image = picture(64, 48, seed=2)
    kwargs = dict(num_inference_steps=6, seed=4, output_type="np", scheduler="dpmpp_2m", strength=strength,
                  overlay=False)
    got = ours("a lighthouse", image=image, outpaint=(16, 8, 16, 8), outpaint_fill=fill, **kwargs).images
    canvas, mask = outpaint_canvas(image, 16, 8, 16, 8, fill=fill)
    assert canvas.size == mask.size == (96, 64)
    same = ours("a lighthouse", image=canvas, mask_image=mask, **kwargs).images
    np.testing.assert_array_equal(got, same)
    # and that canvas through diffusers' inpainting pipeline gives the same image
    shape = latent_shape(ours, 1, 64, 96)
    table = ours.sampler_table("dpmpp_2m", 6)
    draws = Draws(4, shape[1:], (one_by_one(1) if strength < 1 else []) + each(1) * 2 + each(1) * table.num_steps)
    with draws.patch():
        want = with_sampler(theirs, "dpmpp_2m")("a lighthouse", image=canvas, mask_image=mask, height=64, width=96,
                                                num_inference_steps=6, strength=strength, output_type="np").images
    assert psnr(got, want) >= 40


def test_the_outpaint_fill_is_where_a_partial_strength_starts(inpaint_pipes):
    # at strength 1 the new area starts from pure noise and the masked image hides it, so any fill gives the same
    # image (as in diffusers); below 1 the noised canvas is the start, and the fill shows
    ours, _ = inpaint_pipes
    image = picture(64, 48, seed=2)
    kwargs = dict(image=image, outpaint=(16, 8, 16, 8), num_inference_steps=6, seed=4, output_type="np")
    full = [ours("a lighthouse", outpaint_fill=f, **kwargs).images for f in ("edge", "gray")]
    part = [ours("a lighthouse", outpaint_fill=f, strength=0.7, **kwargs).images for f in ("edge", "gray")]
    np.testing.assert_array_equal(*full)
    assert psnr(*part) < 80  # (identical inputs give identical images: inf)


def test_outpaint_canvas_mask_and_fill():
    image = picture(40, 24)
    canvas, mask = outpaint_canvas(image, 8, 0, 16, 8, fill="edge", overlap=4)
    c, m, src = np.asarray(canvas), np.asarray(mask), np.asarray(image)
    assert canvas.size == (64, 32) and mask.mode == "L"
    np.testing.assert_array_equal(c[0:24, 8:48], src)  # the original, in place
    np.testing.assert_array_equal(c[5, 0:8], np.repeat(src[5, :1], 8, axis=0))  # edge pixels repeated
    assert (m[:, :12] == 255).all() and (m[:, 44:] == 255).all() and (m[24:] == 255).all()  # new area + 4 px band
    assert (m[0:20, 12:44] == 0).all()  # the top was not extended: no band there
