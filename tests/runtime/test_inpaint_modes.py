"""Inpainting and outpainting as A1111 does them: the inverted mask, the four kinds of masked content
(``inpainting_fill``) and the original pasted back outside the mask (A1111's overlay), each against A1111's own
algorithm re-implemented here from its code (AUTOMATIC1111/stable-diffusion-webui, v1.10):

- ``modules/processing.py StableDiffusionProcessingImg2Img.init``: the mask is inverted (``ImageOps.invert``) when
  ``inpainting_mask_invert``, then blurred; in whole-picture mode ``mask_for_overlay`` is the blurred mask doubled
  (``np.clip(mask * 2, 0, 255)``) and the overlay is the resized init image with alpha ``255 - mask_for_overlay``;
  for ``inpainting_fill != 1`` the resized image is ``masking.fill``-ed with the blurred mask before it is encoded;
  then, on the latents, ``2`` (latent noise): ``init_latent * mask + noise * nmask`` and ``3`` (latent nothing):
  ``init_latent * mask`` (``mask`` = 1 - the latent mask, ``nmask`` = the latent mask; the noise is drawn from the
  image's seed, as its initial noise). Extra infotext: "Mask mode: Inpaint not masked", "Masked content: fill" /
  "latent noise" / "latent nothing" (nothing for original).
- ``modules/masking.py fill``: the image pasted premultiplied (RGBa) under the inverted mask, then blurred with PIL's
  GaussianBlur at radii 256, 64, 16, 4, 2, 0, composited (``alpha_composite``) 1, 1, 2, 4, 2, 1 times, coarse first.
- ``modules/processing.py apply_overlay``: the generated image converted to RGBA, the overlay ``alpha_composite``-d
  over it, back to RGB.

The parity of the runtime with diffusers where it changed (the filled image through the loop) is on the mid-size
model (``small_model``); the rest runs on tiny."""

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from sdtrt.errors import UsageError
from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from sdtrt.runtime.images import blur_mask, fill_masked, outpaint_canvas
from sdtrt.runtime.infotext import parse_infotext, replay
from sdtrt.runtime.request import GenerationRequest
from tests.runtime.test_tasks import Draws, box_mask, latent_shape, picture, with_sampler

BOX = (20, 12, 60, 48)


def a1111_fill(image, mask):
    """A1111's masking.fill re-implemented: the same PIL blurs of the premultiplied image, composited in float
    (Porter-Duff over) rather than by PIL's alpha_composite."""
    alpha = 255 - np.asarray(mask.convert("L"), np.float64)  # (H, W): the kept area
    rgb = np.asarray(image.convert("RGB"), np.float64)
    premultiplied = Image.merge("RGBa", [Image.fromarray(np.round(c * alpha / 255).astype(np.uint8))
                                         for c in rgb.transpose(2, 0, 1)] + [Image.fromarray(alpha.astype(np.uint8))])
    out_rgb, out_a = np.zeros_like(rgb), np.zeros(alpha.shape)
    for radius, times in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = np.asarray(premultiplied.filter(ImageFilter.GaussianBlur(radius)), np.float64)  # premultiplied
        a = layer[..., 3:] / 255
        for _ in range(times):
            out_rgb = layer[..., :3] + out_rgb * (1 - a)  # premultiplied over
            out_a = a[..., 0] + out_a * (1 - a[..., 0])
    return out_rgb / np.maximum(out_a, 1e-9)[..., None]  # (H, W, 3), straight colours


@pytest.fixture(scope="module")
def tiny(tiny_fp32):
    with Pipeline.from_dir(tiny_fp32[0], backend="onnxruntime-cpu") as pipe:
        yield pipe


def run(pipe, **kwargs):
    args = dict(prompt="a red fox", image=picture(80, 64, seed=3), mask_image=box_mask(80, 64, BOX),
                num_inference_steps=3, seed=5, scheduler="euler", strength=0.7, output_type="np")
    return pipe(**{**args, **kwargs})


def test_fill_is_a1111s_masking_fill():
    image, mask = picture(80, 64, seed=3), blur_mask(box_mask(80, 64, BOX), 3)
    got = np.asarray(fill_masked(image, mask), np.float64)
    want = a1111_fill(image, mask)
    # PIL composites in 8 bits, rounding at each of 11 layers (max 3.8 here); a missing layer shows (5.3 without the
    # radius-256 one, 28 with one radius-4 layer for four)
    assert np.abs(got - want).max() <= 4.5 and np.abs(got - want).mean() < 0.4
    kept = np.asarray(mask) == 0
    np.testing.assert_array_equal(got[kept], np.asarray(image, np.float64)[kept])  # untouched outside the mask
    inside = np.asarray(mask) == 255
    assert np.abs(got[inside] - np.asarray(image, np.float64)[inside]).mean() > 10  # the masked area was painted


def test_fill_mode_matches_diffusers_on_the_filled_image(small_model):
    """Masked content "fill": the image A1111 fills, through the one loop, is diffusers' inpainting of that image."""
    import diffusers

    from tests.runtime.test_tasks import diffusers_pipe

    out, folder = small_model
    ours = Pipeline.from_dir(out, backend="onnxruntime-cpu")
    theirs = diffusers.StableDiffusionInpaintPipeline(
        **diffusers_pipe("StableDiffusionImg2ImgPipeline", folder).components)
    theirs.set_progress_bar_config(disable=True)
    image, mask = picture(96, 64, seed=1), box_mask(96, 64, (30, 12, 70, 44))
    kwargs = dict(num_inference_steps=6, strength=0.7, height=64, width=96, output_type="np")
    got = ours("a castle", image=image, mask_image=mask, mask_blur=4, seed=9, scheduler="dpmpp_2m", overlay=False,
               inpainting_fill="fill", **kwargs).images
    plain = ours("a castle", image=image, mask_image=mask, mask_blur=4, seed=9, scheduler="dpmpp_2m", overlay=False,
                 **kwargs).images
    blurred = theirs.mask_processor.blur(mask, blur_factor=4)
    filled = fill_masked(image, blurred)  # A1111's fill (test_fill_is_a1111s_masking_fill)
    shape = latent_shape(ours, 1, 64, 96)
    # one image: its posterior sample, its noise, its masked-image sample, then one draw per step (tests/runtime/
    # test_tasks.py Draws: image k from PCG64(seed + k))
    draws = Draws(9, shape[1:], [[0]] * (3 + ours.sampler_table("dpmpp_2m", 6).num_steps))
    with draws.patch():
        want = with_sampler(theirs, "dpmpp_2m")("a castle", image=filled, mask_image=blurred, **kwargs).images
    value, unfilled = psnr(got, want), psnr(got, plain)
    print(f"fill vs diffusers on the filled image: {value:.1f} dB; vs no fill: {unfilled:.1f} dB")
    assert value >= 40 and unfilled < 60 and value > unfilled + 20, (value, unfilled)  # the fill shows (strength < 1)


def _start_of(pipe, **kwargs):
    """The Start (first state, blend) the loop gets for a request; the loop itself is not run."""
    from unittest import mock

    from sdtrt.runtime.pipeline import Start

    class Got(Exception):
        pass

    seen = []

    def capture(*args, **kw):
        seen.extend(a for a in list(args) + list(kw.values()) if isinstance(a, Start))
        raise Got

    with mock.patch.object(pipe, "_denoise", side_effect=capture), pytest.raises(Got):
        run(pipe, **kwargs)
    return seen[0]


def test_latent_noise_and_latent_nothing_are_a1111s_init_latent(tiny):
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 10)).astype(np.float32)
    plan = tiny.plan(GenerationRequest.create("a red fox", num_inference_steps=3, scheduler="euler", strength=0.7),
                     picture(80, 64, seed=3), box_mask(80, 64, BOX))
    a, b = plan.table.init_scale, plan.table.init_image_scale
    assert a and b  # strength < 1: the first state is the noised image latents
    original = _start_of(tiny, latents=noise)
    filled = _start_of(tiny, latents=noise, inpainting_fill="fill")
    m = original.blend["mask"]  # (1, 1, h, w) in {0, 1}
    assert 0 < m.sum() < m.size
    keep = np.broadcast_to(m == 0, noise.shape)
    assert not np.allclose(filled.state[~keep], original.state[~keep], atol=1e-3)  # the masked area was filled
    # A1111 encodes the filled image for latent noise and latent nothing too, then replaces the masked latents
    init = filled.blend["image_latents"]  # (1, 4, h, w)
    for fill, init_latent in (("latent nothing", init * (1 - m)), ("latent noise", init * (1 - m) + noise * m)):
        start = _start_of(tiny, latents=noise, inpainting_fill=fill)
        np.testing.assert_allclose(start.state, a * noise + b * init_latent, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(start.blend["mask"], m)


def test_inverted_mask_is_the_inverted_mask_image(tiny):
    mask = box_mask(80, 64, BOX)
    got = run(tiny, mask_image=mask, mask_invert=True, mask_blur=2)
    want = run(tiny, mask_image=ImageOps.invert(mask), mask_blur=2)
    np.testing.assert_array_equal(got.images, want.images)
    assert parse_infotext(got.parameters[0])["Mask mode"] == "Inpaint not masked"
    assert "Mask mode" not in parse_infotext(want.parameters[0])
    assert not np.array_equal(got.images, run(tiny, mask_image=mask, mask_blur=2).images)


def test_overlay_keeps_the_original_outside_the_mask_and_blends_as_a1111(tiny):
    image = picture(86, 70, seed=3)  # generated at 80x64: the original is resized as the image is (Lanczos)
    mask = box_mask(86, 70, BOX)
    kwargs = dict(image=image, mask_image=mask, mask_blur=3)
    got = run(tiny, **kwargs)
    raw = run(tiny, overlay=False, **kwargs)
    resized = np.asarray(image.resize((80, 64), Image.Resampling.LANCZOS), np.float64)
    blurred = np.asarray(blur_mask(mask, 3).resize((80, 64), Image.Resampling.LANCZOS), np.float64)
    # A1111: alpha 255 - clip(2 * blurred mask) of the original composited over the generated image
    alpha = (255 - np.clip(blurred * 2, 0, 255))[..., None] / 255
    raw8 = np.round(raw.images[0] * 255)
    want = resized * alpha + raw8 * (1 - alpha)
    assert np.abs(got.images[0] * 255 - want).max() <= 2  # PIL premultiplies in 8 bits
    outside = blurred == 0
    assert outside.mean() > 0.5
    np.testing.assert_array_equal(np.round(got.images[0] * 255)[outside], resized[outside])  # pixel for pixel
    assert np.abs(raw8[outside] - resized[outside]).max() > 8  # the VAE's reconstruction is not the original
    assert "Inpaint overlay: off" in raw.parameters[0] and "Inpaint overlay" not in got.parameters[0]
    pil = run(tiny, output_type="pil", **kwargs).images[0]
    np.testing.assert_array_equal(np.asarray(pil), np.round(got.images[0] * 255).astype(np.uint8))


def test_outpainting_keeps_the_original_area_pixel_for_pixel(tiny):
    image = picture(56, 56, seed=2)
    got = run(tiny, image=image, mask_image=None, outpaint=(8, 0, 16, 8), strength=1.0, output_type="pil")
    canvas, mask = outpaint_canvas(image, 8, 0, 16, 8)
    kept = np.asarray(mask) == 0  # the original's area, less the overlap band repainted with the new area
    assert kept.sum() > 0.6 * 56 * 56
    np.testing.assert_array_equal(np.asarray(got.images[0])[kept], np.asarray(canvas)[kept])


def test_inpainting_options_in_the_infotext_replay_as_a1111_writes_them(tiny):
    got = run(tiny, inpainting_fill=2, mask_invert=True, overlay=False)
    p = parse_infotext(got.parameters[0])
    assert (p["Masked content"], p["Mask mode"], p["Inpaint overlay"]) == ("latent noise", "Inpaint not masked", "off")
    r = replay(got.parameters[0])
    assert (r.inpainting_fill, r.mask_invert, r.overlay) == ("latent noise", True, False)
    assert "Masked content" not in run(tiny).parameters[0]  # original: A1111 writes nothing
    # an A1111 image's text (its img2img infotext keys)
    a1111 = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.75, "
             "Mask blur: 4, Masked content: latent nothing, Mask mode: Inpaint masked")
    r = replay(a1111)
    assert (r.inpainting_fill, r.mask_invert, r.overlay) == ("latent nothing", False, None)
    assert replay(a1111.replace(", Masked content: latent nothing", "")).inpainting_fill is None  # original
    for bad in ("Masked content: latent everything", "Mask mode: Inpaint elsewhere", "Inpaint overlay: maybe"):
        key, value = bad.split(": ")
        with pytest.raises(UsageError, match=f"parameters hold {key}: '{value}', not "):
            replay("a cat\nSteps: 20, Sampler: Euler a, Seed: 1, " + bad)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(inpainting_fill=7), "inpainting_fill .* must be one of 0 fill, 1 original, 2 latent noise, 3 latent nothing"),
    (dict(inpainting_fill="blur"), "got 'blur'"),
    (dict(inpainting_fill=True), "got True"),
    (dict(inpainting_fill=-1), "got -1"),
    (dict(mask_invert=2), "mask_invert must be true or false"),
    (dict(mask_invert="yes"), "mask_invert must be true or false"),
    (dict(overlay=None), "overlay must be true or false"),
])
def test_bad_inpainting_options_are_refused_by_name(kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        GenerationRequest.create("a", **kwargs)


def test_inpainting_options_need_a_mask(tiny):
    assert GenerationRequest.create("a", inpainting_fill="Latent-Noise").inpainting_fill == "latent noise"
    for kwargs in (dict(mask_invert=True), dict(inpainting_fill="fill")):
        with pytest.raises(UsageError, match=f"{next(iter(kwargs))} needs an image and a mask"):
            tiny("a", num_inference_steps=2, **kwargs)  # txt2img
        with pytest.raises(UsageError, match=f"{next(iter(kwargs))} needs a mask"):
            run(tiny, mask_image=None, **kwargs)  # img2img
    with pytest.raises(UsageError, match="mask is all black after mask_invert: nothing would be repainted"):
        run(tiny, mask_image=Image.new("L", (80, 64), 255), mask_invert=True)


def test_cli_flags_write_and_replay_the_inpainting_options(tiny_fp32, tmp_path, cli):
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    picture(80, 64, seed=3).save(image)
    box_mask(80, 64, BOX).save(mask)
    first = tmp_path / "a.png"
    code, out, err = cli("generate", str(tiny_fp32[0]), "a fox", "--steps", "3", "--seed", "4", "--image",
                         str(image), "--mask", str(mask), "--strength", "0.7", "--mask-invert", "--inpainting-fill",
                         "latent-nothing", "--no-overlay", "--backend", "onnxruntime-cpu", "-o", str(first))
    assert code == 0, err
    text = Image.open(first).text["parameters"]
    assert "Masked content: latent nothing" in text and "Mask mode: Inpaint not masked" in text
    assert "Inpaint overlay: off" in text
    again = tmp_path / "b.png"
    code, out, err = cli("generate", str(tiny_fp32[0]), "--from-png", str(first), "--image", str(image), "--mask",
                         str(mask), "--backend", "onnxruntime-cpu", "-o", str(again))
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    code, out, err = cli("generate", str(tiny_fp32[0]), "a", "--image", str(image), "--mask", str(mask),
                         "--inpainting-fill", "latent", "-o", str(tmp_path / "c.png"))
    assert code == 2 and "--inpainting-fill" in err
