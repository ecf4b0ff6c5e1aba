"""ControlNets against diffusers' StableDiffusionControlNetPipeline, ...Img2ImgPipeline and ...InpaintPipeline (one
ControlNet, and two as MultiControlNetModel, with control_guidance_start/end): the mid-size built-ins, two ControlNets
saved as diffusers folders and added with `sdtrt export-controlnet`, fp32 engines on ONNX Runtime CPU, the random
arrays of our seed contract injected into diffusers in its order of draws."""

import shutil
from unittest import mock

import numpy as np
import pytest

from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from tests.runtime.test_tasks import (_DRAWERS, Draws, box_mask, each, generators, latent_shape, one_by_one, picture,
                                      with_sampler)

# the ControlNet pipelines draw their noise through their own modules' randn_tensor
_CONTROL_DRAWERS = _DRAWERS + tuple(f"diffusers.pipelines.controlnet.{m}.randn_tensor" for m in (
    "pipeline_controlnet", "pipeline_controlnet_img2img", "pipeline_controlnet_inpaint", "pipeline_controlnet_sd_xl",
    "pipeline_controlnet_sd_xl_img2img", "pipeline_controlnet_inpaint_sd_xl"))


class ControlDraws(Draws):
    def patch(self):
        from contextlib import ExitStack

        stack = ExitStack()
        for target in _CONTROL_DRAWERS:
            stack.enter_context(mock.patch(target, side_effect=self))
        return stack


def _with_controlnets(tmp_path_factory, engine, folder, names, seed, changes=()):
    """A copy of ``engine`` with built-in-shaped ControlNets (diffusers folders) added, the i-th with ``changes[i]``
    to its config; -> (engine, [ControlNetModel])."""
    from diffusers import UNet2DConditionModel

    from sdtrt.export.controlnet import builtin_controlnet
    from sdtrt.export.controlnet_export import add_controlnet
    from sdtrt.manifest import Manifest

    base = tmp_path_factory.mktemp("controlnets")
    out = base / "engine"
    shutil.copytree(engine, out)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    info = Manifest.load(out).model
    models = []
    for i, name in enumerate(names):
        model = builtin_controlnet(unet, info.latent_channels, info.vae_scale_factor, seed + i,
                                   **(changes[i] if i < len(changes) else {}))
        model.save_pretrained(base / name)
        add_controlnet(out, str(base / name), log=lambda s: None)
        models.append(model)
    return out, models


@pytest.fixture(scope="module")
def control_pipes(tmp_path_factory, small_model):
    engine, folder = small_model
    out, models = _with_controlnets(tmp_path_factory, engine, folder, ["edges", "depth"], 100)
    pipes = _pipelines(folder, models, {"txt2img": "StableDiffusionControlNetPipeline",
                                        "img2img": "StableDiffusionControlNetImg2ImgPipeline",
                                        "inpaint": "StableDiffusionControlNetInpaintPipeline"},
                       safety_checker=None, requires_safety_checker=False)
    return Pipeline.from_dir(out, backend="onnxruntime-cpu"), pipes


def _pipelines(folder, models, classes, **kwargs):
    """(task, k) -> the diffusers pipeline ``classes[task]`` of ``folder`` with its first k ControlNets of ``models``."""
    import diffusers

    pipes = {}
    for task, cls in classes.items():
        for k in (1, 2):
            pipe = getattr(diffusers, cls).from_pretrained(folder, controlnet=models[0] if k == 1 else models[:k],
                                                           **kwargs)
            pipe.set_progress_bar_config(disable=True)
            pipes[task, k] = pipe
    return pipes


@pytest.fixture(scope="module")
def xl_control_pipes(tmp_path_factory, tiny_xl_model):
    """The SDXL-shaped built-in with two ControlNets added by `sdtrt export-controlnet`: "edges" shaped like its
    U-Net (diffusers' from_unet), "depth" with fewer transformer layers (as diffusers' "small"/"mid" SDXL
    ControlNets); diffusers' StableDiffusionXLControlNet{,Img2Img}Pipeline over the same modules."""
    engine, folder = tiny_xl_model
    out, models = _with_controlnets(tmp_path_factory, engine, folder, ["edges", "depth"], 300,
                                    [{}, {"transformer_layers_per_block": [1, 1, 1]}])
    pipes = _pipelines(folder, models, {"txt2img": "StableDiffusionXLControlNetPipeline",
                                        "img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
                                        "inpaint": "StableDiffusionXLControlNetInpaintPipeline"})
    return Pipeline.from_dir(out, backend="onnxruntime-cpu"), pipes


@pytest.fixture(scope="module")
def xl_inpaint_control_pipes(tmp_path_factory, tiny_xl_inpaint_model):
    import diffusers

    engine, folder = tiny_xl_inpaint_model
    out, models = _with_controlnets(tmp_path_factory, engine, folder, ["edges"], 400)
    pipe = diffusers.StableDiffusionXLControlNetInpaintPipeline.from_pretrained(folder, controlnet=models[0])
    pipe.set_progress_bar_config(disable=True)
    return Pipeline.from_dir(out, backend="onnxruntime-cpu"), pipe


@pytest.fixture(scope="module")
def inpaint_control_pipes(tmp_path_factory, small_inpaint_model):
    import diffusers

    engine, folder = small_inpaint_model
    out, models = _with_controlnets(tmp_path_factory, engine, folder, ["edges"], 200)
    pipe = diffusers.StableDiffusionControlNetInpaintPipeline.from_pretrained(
        folder, controlnet=models[0], safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return Pipeline.from_dir(out, backend="onnxruntime-cpu"), pipe


PROMPTS = ["a red fox in the snow", "a castle, oil on canvas"]
RANGES = dict(controlnet_conditioning_scale=[0.6, 1.2], control_guidance_start=[0.0, 0.3],
              control_guidance_end=[0.7, 1.0])  # two ControlNets, each sitting out some steps
MAPS = [picture(100, 70, seed=7), picture(70, 100, seed=8)]  # not the generation's size: both resize them


def run_both(ours, theirs, sampler, k, steps=8, seed=3, task="txt2img", nine_channel=False, **control):
    """(ours, diffusers') images at 96x64, batch 2, with ``k`` ControlNets; ``control``: their settings (and SDXL's
    micro-conditioning), given to both."""
    height, width = 64, 96
    shape = latent_shape(ours, 2, height, width)
    task_args, their_args, first = {}, {}, []
    if task == "img2img":
        task_args = their_args = dict(image=picture(100, 70), strength=0.6)
        first = one_by_one(2)  # each image's posterior sample, from its own generator
    elif task == "inpaint":
        strength = 1.0 if nine_channel else 0.75
        task_args = dict(image=picture(96, 64, seed=1), mask_image=box_mask(96, 64, (30, 12, 70, 44)),
                         strength=strength, overlay=False)  # diffusers' raw output: no original pasted back
        # diffusers encodes the images it is given one by one: one copy per image of the batch
        their_args = dict(image=[task_args["image"]] * 2, mask_image=[task_args["mask_image"]] * 2, strength=strength)
        first = one_by_one(2) if (not nine_channel or strength < 1) else []
    scales = control.get("controlnet_conditioning_scale", 1.0)
    got = ours(PROMPTS, negative_prompt="blurry", num_inference_steps=steps, seed=seed, scheduler=sampler,
               height=height, width=width, output_type="np", control_images=MAPS[:k], **task_args, **control).images
    table = ours.plan(_request(PROMPTS, steps, sampler, task_args, control), task_args.get("image"),
                      task_args.get("mask_image"), MAPS[:k]).table
    rest = one_by_one(2) if task == "inpaint" else []  # the masked image's posterior
    draws = ControlDraws(seed, shape[1:], first + each(2) + rest + each(2) * table.num_steps)
    image_key = "control_image" if task != "txt2img" else "image"
    with draws.patch():
        want = with_sampler(theirs, sampler)(
            PROMPTS, negative_prompt=["blurry"] * 2, num_inference_steps=steps, height=height, width=width,
            output_type="np", guidance_scale=7.5,  # ours (and SD's) default; SDXL pipelines' is 5
            **{image_key: MAPS[0] if k == 1 else MAPS[:k]}, **their_args, generator=generators(2),
            **{key: v for key, v in control.items() if key != "controlnet_conditioning_scale"},
            controlnet_conditioning_scale=scales).images
    return got, want, table


def _request(prompts, steps, sampler, task_args, control):
    from sdtrt.runtime.request import GenerationRequest

    return GenerationRequest.create(prompts, "blurry", steps, 7.5, 64, 96, 3, 1, sampler,
                                    strength=task_args.get("strength"), **control)


@pytest.mark.parametrize("sampler", ["pndm", "euler_a", "dpmpp_2m", "ddim"])
def test_one_controlnet_matches_diffusers(control_pipes, sampler):
    ours, pipes = control_pipes
    got, want, _ = run_both(ours, pipes["txt2img", 1], sampler, 1, controlnet_conditioning_scale=0.8)
    assert got.shape == want.shape == (2, 64, 96, 3)
    value = psnr(got, want)
    assert value >= 40, f"{sampler}: PSNR {value:.1f} dB"


@pytest.mark.parametrize("sampler", ["pndm", "euler_a", "unipc"])
def test_two_controlnets_with_ranges_match_multicontrolnet(control_pipes, sampler):
    ours, pipes = control_pipes
    got, want, table = run_both(ours, pipes["txt2img", 2], sampler, 2, **RANGES)
    assert (table.control_scale == 0).any(axis=0).all()  # each ControlNet sits out some steps
    value = psnr(got, want)
    assert value >= 40, f"{sampler}: PSNR {value:.1f} dB"


def test_controlnets_change_the_image(control_pipes):
    # the residuals reach the U-Net: without them, or with the other ControlNet, the image is another
    ours, pipes = control_pipes
    kwargs = dict(num_inference_steps=6, seed=3, height=64, width=96, output_type="np", scheduler="euler")
    plain = ours(PROMPTS[0], **kwargs).images
    one = ours(PROMPTS[0], control_images=MAPS[:1], **kwargs).images
    other = ours(PROMPTS[0], control_images=[None, MAPS[0]], **kwargs).images
    assert psnr(plain, one) < 40 and psnr(one, other) < 40


@pytest.mark.parametrize("k", [1, 2])
def test_controlnet_img2img_matches_diffusers(control_pipes, k):
    ours, pipes = control_pipes
    got, want, _ = run_both(ours, pipes["img2img", k], "euler", k, task="img2img",
                            controlnet_conditioning_scale=0.9 if k == 1 else [0.9, 0.5])
    value = psnr(got, want)
    assert value >= 40, f"PSNR {value:.1f} dB"


@pytest.mark.parametrize("k", [1, 2])
def test_controlnet_inpainting_matches_diffusers(control_pipes, k):
    ours, pipes = control_pipes
    got, want, _ = run_both(ours, pipes["inpaint", k], "ddim", k, task="inpaint", control_guidance_end=0.8)
    value = psnr(got, want)
    assert value >= 40, f"PSNR {value:.1f} dB"


def test_controlnet_with_an_inpainting_model_matches_diffusers(inpaint_control_pipes):
    ours, theirs = inpaint_control_pipes
    got, want, _ = run_both(ours, theirs, "dpmpp_2m", 1, task="inpaint", nine_channel=True,
                            controlnet_conditioning_scale=1.1)
    value = psnr(got, want)
    assert value >= 40, f"PSNR {value:.1f} dB"


def test_canny_preprocessor_is_opencv_canny(control_pipes):
    import cv2
    from PIL import Image

    ours, _ = control_pipes
    photo = picture(96, 64, seed=9)
    edges = cv2.Canny(np.asarray(photo), 50, 150)
    ready = Image.fromarray(np.stack([edges] * 3, -1))
    assert 0 < (edges > 0).mean() < 0.5  # a real edge map, not empty or full
    kwargs = dict(num_inference_steps=4, seed=1, height=64, width=96, output_type="np")
    a = ours("a fox", control_images=[photo], control_preprocessors="canny", canny_thresholds=(50, 150), **kwargs)
    b = ours("a fox", control_images=[ready], **kwargs)
    np.testing.assert_array_equal(a.images, b.images)
    assert 'ControlNet 0: "Module: canny, Model: edges, Weight: 1, Guidance Start: 0, Guidance End: 1, ' \
           'Threshold A: 50, Threshold B: 150"' in a.parameters[0]


@pytest.mark.parametrize("k, sampler, control", [
    (1, "euler", dict(controlnet_conditioning_scale=0.8, control_guidance_end=0.8)),
    (2, "euler_a", dict(RANGES, original_size=(512, 384), crops_coords_top_left=(16, 8))),
])
def test_sdxl_controlnets_match_diffusers(xl_control_pipes, k, sampler, control):
    """One ControlNet, and two (MultiControlNetModel, one of them "small") with ranges: diffusers'
    StableDiffusionXLControlNetPipeline, negative prompt, batch 2, 96x64."""
    ours, pipes = xl_control_pipes
    got, want, table = run_both(ours, pipes["txt2img", k], sampler, k, **control)
    assert got.shape == want.shape == (2, 64, 96, 3)
    assert (table.control_scale == 0).any(axis=0).all()  # each ControlNet sits out some steps
    value = psnr(got, want)
    assert value >= 60, f"PSNR {value:.1f} dB"


def test_sdxl_controlnet_img2img_matches_diffusers(xl_control_pipes):
    ours, pipes = xl_control_pipes
    got, want, _ = run_both(ours, pipes["img2img", 2], "euler", 2, task="img2img",
                            controlnet_conditioning_scale=[0.9, 0.5])
    value = psnr(got, want)
    assert value >= 60, f"PSNR {value:.1f} dB"


@pytest.mark.parametrize("nine_channel", [False, True])
def test_sdxl_controlnet_inpainting_matches_diffusers(xl_control_pipes, xl_inpaint_control_pipes, nine_channel):
    """StableDiffusionXLControlNetInpaintPipeline: the blend of a 4-channel model, and an SDXL inpainting U-Net."""
    ours, theirs = xl_inpaint_control_pipes if nine_channel else (xl_control_pipes[0], xl_control_pipes[1]["inpaint", 1])
    got, want, _ = run_both(ours, theirs, "euler", 1, task="inpaint", nine_channel=nine_channel,
                            controlnet_conditioning_scale=1.1)
    value = psnr(got, want)
    assert value >= 60, f"PSNR {value:.1f} dB"


def test_sdxl_controlnets_on_the_device_loop(xl_control_pipes):
    """The added conditions reach the ControlNets on the device loop too (the U-Net's bound buffers)."""
    ours, _ = xl_control_pipes
    args = dict(num_inference_steps=4, height=64, width=96, seed=1, output_type="np", scheduler="euler",
                control_images=MAPS, original_size=(256, 256), **RANGES)
    with Pipeline.from_dir(ours.folder, backend="onnxruntime-cpu", device_loop=True) as device:
        value = psnr(device(PROMPTS, **args).images, ours(PROMPTS, **args).images)
    assert value >= 60, f"PSNR {value:.1f} dB"
