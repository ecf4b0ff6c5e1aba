"""The hires fix (runtime/hires.py) against what A1111 and diffusers do: the latent upscale modes against
torch.nn.functional.interpolate; the two passes against diffusers by hand (txt2img to latents, torch's interpolate,
img2img from those latents); A1111's target sizes and infotext keys; the CLI (with a replay from the PNG) and the
server; the refusals."""

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt.errors import UsageError
from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from sdtrt.runtime.hires import LATENT_MODES, UPSCALERS, Hires, interpolate, resize_image, second_pass_steps, target_size
from sdtrt.runtime.infotext import parse_infotext
from tests.runtime.test_tasks import Draws, diffusers_pipe, with_sampler

# (input h, w) -> (output h, w): up by 2 (hires' common case), by odd factors, down, and the same size
SIZES = [((8, 8), (16, 16)), ((8, 12), (12, 18)), ((7, 9), (20, 13)), ((16, 12), (5, 7)), ((8, 8), (8, 8)),
         ((10, 6), (13, 9))]


@pytest.mark.parametrize("name", LATENT_MODES)
def test_latent_upscale_modes_match_torch_interpolate(name):
    # A1111 modules/shared.py latent_upscale_modes, used by processing.py sample_hr_pass as
    #   torch.nn.functional.interpolate(samples, size=(target_height // opt_f, target_width // opt_f),
    #                                   mode=self.latent_scale_mode["mode"], antialias=self.latent_scale_mode["antialias"])
    mode, antialias = LATENT_MODES[name]
    rng = np.random.default_rng(3)
    for (h, w), size in SIZES:
        x = rng.standard_normal((2, 4, h, w)).astype(np.float32)
        want = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode=mode, antialias=antialias).numpy()
        got = interpolate(x, size, mode, antialias)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"{name} {(h, w)} -> {size}")


def test_target_size_follows_a1111():
    # A1111 processing.py StableDiffusionProcessingTxt2Img.calculate_target_resolution (opt_f = 8):
    #   scale: int(width * hr_scale); one side: the other from the aspect (//); both: cover, then truncate = (to - r) // 8
    assert target_size(512, 512, Hires(scale=1.5)) == (768, 768, 0, 0)
    assert target_size(520, 384, Hires(scale=1.55)) == (806, 595, 0, 0)  # int() truncates, no rounding to 8
    assert target_size(512, 384, Hires(resize=(1024, 0))) == (1024, 768, 0, 0)
    assert target_size(512, 384, Hires(resize=(0, 600))) == (800, 600, 0, 0)
    assert target_size(512, 512, Hires(resize=(1024, 768))) == (1024, 1024, 0, 32)
    assert target_size(384, 512, Hires(resize=(1024, 1024))) == (1024, 1365, 0, 42)
    assert target_size(512, 384, Hires(resize=(640, 640))) == (853, 640, 26, 0)


def test_second_pass_steps_are_a1111s():
    # A1111 sd_samplers_common.setup_img2img_steps with steps given (the hires pass always gives them):
    #   steps = int(requested_steps / min(p.denoising_strength, 0.999)); t_enc = requested_steps - 1
    # and sample_img2img runs sigmas[steps - t_enc - 1:], i.e. requested_steps steps; as diffusers' get_timesteps:
    from sdtrt.runtime.samplers import start_step

    for steps in (1, 2, 4, 20, 37):
        for d in (0.05, 0.3, 0.5, 0.7, 0.75, 0.999, 1.0):
            total, strength = second_pass_steps(steps, d)
            assert total == int(steps / min(d, 0.999))
            assert total - start_step(total, strength) == steps


def test_lanczos_resize_is_a1111s_pil_chain():
    # A1111 images.resize_image(0, im, w, h, upscaler_name) -> Upscaler.upscale (UpscalerLanczos.do_upscale:
    # im.resize((int(w * scale), int(h * scale)), LANCZOS)), to a multiple of 8, then LANCZOS to (w, h)
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), np.uint8))
    assert np.array_equal(np.asarray(resize_image(im, 80, 48, "Lanczos")),
                          np.asarray(im.resize((80, 48), Image.Resampling.LANCZOS)))
    odd = resize_image(im, 100, 60, "Lanczos")  # 2.5x: 100x60, then 96x56 (multiples of 8), then 100x60
    step = im.resize((100, 60), Image.Resampling.LANCZOS).resize((96, 56), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(odd), np.asarray(step.resize((100, 60), Image.Resampling.LANCZOS)))


@pytest.fixture(scope="module")
def tiny(tiny_fp32):
    return Pipeline.from_dir(tiny_fp32[0], backend="onnxruntime-cpu")


@pytest.fixture(scope="module")
def small(small_model):
    """sdtrt and diffusers' txt2img and img2img pipelines (one set of weights) on the mid-size model, Euler."""
    import diffusers

    out, folder = small_model
    txt2img = with_sampler(diffusers_pipe("StableDiffusionPipeline", folder), "euler")
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**txt2img.components)
    img2img.set_progress_bar_config(disable=True)
    return Pipeline.from_dir(out, backend="onnxruntime-cpu"), txt2img, img2img


@pytest.mark.parametrize("upscaler", ["Latent (bicubic antialiased)", "Lanczos"])
def test_two_passes_match_diffusers_by_hand(small, upscaler):
    """sdtrt's hires fix == diffusers' txt2img to latents, the upscale, diffusers' img2img from the latents with the
    strength and steps A1111's second pass runs, the noise of the same seed at the new shape."""
    ours, txt2img, img2img = small
    prompt, negative, seed, steps, hr_steps, d = "a lighthouse at dusk", "blurry", 9, 3, 2, 0.6
    got = ours(prompt, negative_prompt=negative, height=64, width=64, num_inference_steps=steps, seed=seed,
               scheduler="euler", output_type="np",
               hires={"scale": 2, "upscaler": upscaler, "steps": hr_steps, "strength": d})
    assert got.images.shape == (1, 128, 128, 3)

    first_noise = np.random.Generator(np.random.PCG64(seed)).standard_normal((1, 4, 8, 8), dtype=np.float32)
    latents = txt2img(prompt, negative_prompt=negative, height=64, width=64, num_inference_steps=steps,
                      latents=torch.from_numpy(first_noise), output_type="latent").images  # (1, 4, 8, 8)
    if upscaler == "Lanczos":  # decode, 8 bits, PIL, encode (the posterior's mean)
        vae = txt2img.vae
        with torch.no_grad():
            x = vae.decode(latents / vae.config.scaling_factor).sample
        pixels = (255.0 * ((x + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()).astype(np.uint8)
        big = np.asarray(resize_image(Image.fromarray(pixels), 128, 128, "Lanczos"), np.float32) / 255
        with torch.no_grad():
            up = vae.encode(torch.from_numpy(big).permute(2, 0, 1)[None] * 2 - 1).latent_dist.mean
        up = up * vae.config.scaling_factor
    else:
        up = torch.nn.functional.interpolate(latents, size=(16, 16), mode="bicubic", antialias=True)
    total, strength = second_pass_steps(hr_steps, d)
    draws = Draws(seed, (4, 16, 16), [[0]])  # A1111: a fresh ImageRNG of the same seeds at the new shape
    with draws.patch():
        want = img2img(prompt, negative_prompt=negative, image=up, strength=strength, num_inference_steps=total,
                       output_type="np").images
    assert draws.used == 1
    value = psnr(got.images, want)
    assert value >= 40, f"{upscaler}: PSNR {value:.1f} dB"
    info = parse_infotext(got.parameters[0])
    assert (info["Size-1"], info["Steps"], info["Hires upscale"], info["Hires steps"], info["Hires upscaler"],
            info["Denoising strength"]) == ("64", "3", "2", "2", upscaler, "0.6")


def test_hires_prompt_sampler_and_resize_reach_the_second_pass_and_the_text(tiny):
    pipe = tiny
    common = dict(negative_prompt="dull", height=64, width=96, num_inference_steps=2, seed=4, scheduler="euler",
                  output_type="np")
    base = pipe("a fox", hires={"resize": (128, 128), "strength": 0.5}, **common)
    assert base.images.shape == (1, 128, 128, 3)  # cover 192x128, crop the middle 128 wide
    info = parse_infotext(base.parameters[0])
    assert (info["Hires resize-1"], info["Hires resize-2"], info["Size-1"]) == ("128", "128", "96")
    assert not any(k in info for k in ("Hires upscale", "Hires prompt", "Hires sampler", "Hires steps"))
    other = pipe("a fox", hires={"resize": (128, 128), "strength": 0.5, "prompt": "a wolf", "sampler": "ddim",
                                 "negative_prompt": "flat"}, **common)
    info = parse_infotext(other.parameters[0])
    assert (info["Hires prompt"], info["Hires negative prompt"], info["Hires sampler"]) == ("a wolf", "flat", "DDIM")
    assert not np.array_equal(base.images, other.images)
    # the first pass alone is the same: the same request without hires, its latents
    first = pipe("a fox", **{**common, "output_type": "latent"})
    assert first.images.shape == (1, 4, 8, 12)


@pytest.mark.parametrize("size,hires,needle", [
    (128, {"scale": 8}, "hires fix x8 of 128x128 is 1024x1024, outside this folder's exported range 64..512"),
    (64, {"scale": 1.1}, "hires fix x1.1 of 64x64 is 70x70, not a multiple of 8"),
    (64, {"resize": (100, 0)}, "hires fix 100x0 of 64x64 is 100x100, not a multiple of 8"),
    (64, {"resize": (1024, 0)}, "is 1024x1024, outside this folder's exported range 64..512"),
    (64, {"upscaler": "R-ESRGAN 4x+"}, "'R-ESRGAN 4x+' is not available; sdtrt has: Latent, Latent (antialiased)"),
    (64, {"strength": 0}, "hires denoising strength must be above 0"),
    (64, {"strength": 1.5}, "hires denoising strength must be between 0 and 1"),
    (64, {"sampler": "heun"}, "hires sampler must be one of"),
    (64, {"steps": -1}, "hires steps must be at least 0"),
    (64, {"scale": float("nan")}, "hires scale must be finite"),
    (64, {"scal": 2}, "hires has no field 'scal'; its fields: scale, resize, upscaler"),
    (64, 2, "hires must be a runtime.hires.Hires or a dict of its fields, got int"),
])
def test_refusals_before_any_work(tiny, size, hires, needle, monkeypatch):
    pipe = tiny
    monkeypatch.setattr(pipe, "_denoise", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(UsageError) as err:
        pipe("a cat", height=size, width=size, hires=hires)
    assert needle in str(err.value)
    if size == 128:  # x8 of 64 is 512, the range's end: the limit is the range, not the scale
        from sdtrt.runtime.request import GenerationRequest

        assert pipe.plan(GenerationRequest.create("a cat", height=64, width=64, hires=hires)).hires.plan.width == 512


def test_hires_takes_no_input_image(tiny):
    with pytest.raises(UsageError, match="the hires fix is a txt2img option"):
        tiny("a cat", image=Image.new("RGB", (64, 64)), hires={"scale": 2})


def test_cli_hires_writes_a_png_that_replays(cli, engine, tmp_path):
    out = tmp_path / "h.png"
    code, _, err = cli("generate", engine, "a red boat", "--size", "64x64", "--steps", "2", "--seed", "5",
                       "--hires", "2", "--hires-steps", "2", "--hires-upscaler", "Latent (nearest)",
                       "--hires-strength", "0.5", "--backend", "onnxruntime-cpu", "-o", out)
    assert code == 0, err
    image = Image.open(out)
    assert image.size == (128, 128)
    info = parse_infotext(image.text["parameters"])
    assert (info["Size-1"], info["Hires upscale"], info["Hires steps"], info["Hires upscaler"],
            info["Denoising strength"]) == ("64", "2", "2", "Latent (nearest)", "0.5")
    again = tmp_path / "again.png"
    code, _, err = cli("generate", engine, "--from-png", out, "--backend", "onnxruntime-cpu", "-o", again)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(image))
    code, _, err = cli("generate", engine, "a boat", "--hires-steps", "3", "-o", tmp_path / "x.png")
    assert code == 2 and err.count("\n") == 0 and "--hires-steps needs --hires" in err
    code, _, err = cli("generate", engine, "a boat", "--hires", "2x", "-o", tmp_path / "x.png")
    assert code == 2 and "expected a scale (2, 1.5) or WxH" in err


def test_server_txt2img_with_enable_hr_returns_the_upscaled_image(tiny, tiny_fp32):
    import base64
    import io

    from tests.serve.test_app import start

    proc, url = start(tiny_fp32[0], "--backend", "onnxruntime-cpu", "--max-pixels", str(128 * 128))
    try:
        body = {"prompt": "a kite", "steps": 2, "seed": 3, "width": 64, "height": 64, "enable_hr": True,
                "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 2, "denoising_strength": 0.5,
                "hr_sampler_name": "Use same sampler", "hr_scheduler": None, "hr_prompt": ""}
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert image.size == (128, 128)
        want = tiny(
            "a kite", num_inference_steps=2, seed=3, height=64, width=64, guidance_scale=7.0,
            hires={"scale": 2, "steps": 2, "strength": 0.5}).images[0]
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(want))
        # over --max-pixels after the upscale; an upscaler sdtrt lacks: 4xx naming the ones it has
        for extra, needle in (({"hr_scale": 3}, "192x192 is over this server's limit"),
                              ({"hr_upscaler": "ESRGAN_4x"}, ", ".join(UPSCALERS))):
            r = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, **extra}, timeout=60)
            assert 400 <= r.status_code < 500 and needle in r.text, r.text
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_hires_batch_gives_each_image_its_own_seed_and_text(tiny):
    """Image i of a hires batch is the image of seed + i alone, both passes drawing from its own generator, and its
    text says its seed (A1111: one PNG regenerates that image alone); the second pass's schedule type is written and
    read back (A1111's "Hires sampler" and "Hires schedule type")."""
    from sdtrt.runtime.infotext import replay

    common = dict(height=64, width=64, num_inference_steps=2, scheduler="euler", output_type="np",
                  hires={"scale": 2, "strength": 0.5, "sampler": "euler_karras"})
    both = tiny("a fox", seed=20, num_images_per_prompt=2, **common)
    assert both.seeds == [20, 21] and both.images.shape == (2, 128, 128, 3)
    alone = tiny("a fox", seed=21, **common)
    assert np.array_equal(both.images[1], alone.images[0])
    info = parse_infotext(both.parameters[1])
    assert (info["Seed"], info["Hires sampler"], info["Hires schedule type"]) == ("21", "Euler", "Karras")
    assert replay(both.parameters[1]).hires["sampler"] == "euler_karras"


def test_a_stopped_first_pass_skips_the_second(tiny):
    """A1111's sample_hr_pass: `if shared.state.interrupted: return samples` — an interrupt in the first pass answers
    the first pass's image, at its own size, not a one-step second pass."""
    calls = []

    def stop(done, total):
        calls.append(done)
        return False if done == 1 else None

    out = tiny("a fox", height=64, width=64, num_inference_steps=3, seed=1, output_type="np",
               hires={"scale": 2, "strength": 0.5}, callback=stop)
    assert out.images.shape == (1, 64, 64, 3) and calls == [1]
