"""Base + refiner (runtime/refiner.py): the ensemble of experts against diffusers' two SDXL pipelines, through the
library, the CLI and the A1111 server's refiner_checkpoint (the SDXL-shaped built-ins, fp32, ONNX Runtime CPU)."""

import json
import os

import numpy as np
import pytest
import requests
import torch

from sdtrt.errors import UsageError
from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from sdtrt.runtime import refiner as ensemble
from sdtrt.runtime.request import GenerationRequest
from tests.runtime.test_sdxl import HEIGHT, WIDTH, _latents, _xl


@pytest.mark.parametrize("sampler", ["dpmpp_2m", pytest.param("euler", marks=pytest.mark.slow)])
def test_base_and_refiner_match_diffusers_ensemble_of_experts(tiny_xl_model, tiny_xl_refiner_model, sampler):
    """The base to denoising_end, its latents handed over undecoded, the refiner from denoising_start: diffusers'
    StableDiffusionXLPipeline(output_type="latent") then StableDiffusionXLImg2ImgPipeline(image=latents)."""
    import diffusers

    from sdtrt.runtime import refiner as ensemble
    from sdtrt.runtime.request import GenerationRequest
    from sdtrt.runtime.samplers import DIFFUSERS_EQUIVALENT

    (base_out, base_dir), (ref_out, ref_dir) = tiny_xl_model, tiny_xl_refiner_model
    base, refiner = Pipeline.from_dir(base_out), Pipeline.from_dir(ref_out)
    prompts, negatives = ["a photo of a cat", "a castle, oil on canvas"], ["blurry", "lowres"]
    req = GenerationRequest.create(prompts, negatives, 10, 5.0, HEIGHT, WIDTH, seed=3, scheduler=sampler,
                                   output_type="np", aesthetic_score=7.0, negative_aesthetic_score=2.0)
    ours = ensemble.generate(base, refiner, req, switch_at=0.7)
    assert "Refiner switch at: 0.7" in ours.parameters[0]
    cls, extra = DIFFUSERS_EQUIVALENT[sampler]
    pipes = [_xl(base_dir), _xl(ref_dir, "StableDiffusionXLImg2ImgPipeline")]
    for p in pipes:
        p.scheduler = getattr(diffusers, cls).from_config(p.scheduler.config, **extra)
    latents = pipes[0](prompt=prompts, negative_prompt=negatives, num_inference_steps=10, guidance_scale=5.0,
                       height=HEIGHT, width=WIDTH, latents=torch.from_numpy(_latents(base, 3, 2)),
                       denoising_end=0.7, output_type="latent").images
    want = pipes[1](prompt=prompts, negative_prompt=negatives, num_inference_steps=10, guidance_scale=5.0,
                    image=latents, denoising_start=0.7, aesthetic_score=7.0, negative_aesthetic_score=2.0,
                    output_type="np").images
    assert psnr(ours.images, want) >= 60, psnr(ours.images, want)
    # the hand-over is the library's too: output_type="latent" then image= latents with denoising_start
    handed = base(prompts, negative_prompt=negatives, num_inference_steps=10, guidance_scale=5.0, height=HEIGHT,
                  width=WIDTH, seed=3, scheduler=sampler, denoising_end=0.7, output_type="latent")
    want_latents = latents.numpy()
    assert np.abs(np.asarray(handed.images) - want_latents).max() <= 1e-4 * np.abs(want_latents).max()




def test_a_refiner_of_another_latent_space_is_refused(tiny_xl_model, tiny_fp32):
    base, other = Pipeline.from_dir(tiny_xl_model[0]), Pipeline.from_dir(tiny_fp32[0])
    req = GenerationRequest.create("a cat", None, 4, 5.0, 64, 64)
    with pytest.raises(UsageError, match="VAE scaling factor .* latents are in another space"):
        ensemble.generate(base, other, req)
    for switch in (0, 1, 1.5):
        with pytest.raises(UsageError, match="refiner switch"):
            ensemble.generate(base, base, req, switch_at=switch)


def test_an_interrupted_base_skips_the_refiner(tiny_xl_model, tiny_xl_refiner_model):
    base, refiner = Pipeline.from_dir(tiny_xl_model[0]), Pipeline.from_dir(tiny_xl_refiner_model[0])
    req = GenerationRequest.create("a cat", None, 8, 5.0, 64, 64, seed=2, output_type="np")
    calls = []
    out = ensemble.generate(base, refiner, req, 0.5, callback=lambda done, total: calls.append(done) or done < 2)
    assert calls == [1, 2] and out.images.shape == (1, 64, 64, 3)  # the refiner never ran: no step 3


def test_generate_with_refiner_on_the_command_line(tiny_xl_model, tiny_xl_refiner_model, cli, tmp_path):
    from PIL import Image

    (base_out, _), (ref_out, _) = tiny_xl_model, tiny_xl_refiner_model
    code, out, err = cli("generate", base_out, "a cat", "--refiner", ref_out, "--refiner-start", "0.7", "--steps", 6,
                         "--size", "128x96", "--seed", 4, "--aesthetic-score", 7, "-o", tmp_path / "r.png")
    assert code == 0, err
    png = Image.open(tmp_path / "r.png")
    text = png.text["parameters"]
    assert "Refiner: diffusers [" in text and "Refiner switch at: 0.7" in text and "Aesthetic score: 7" in text
    code, _, err = cli("generate", base_out, "--from-png", tmp_path / "r.png", "-o", tmp_path / "again.png")
    assert code == 2 and "made with the refiner diffusers [" in err, err
    code, _, err = cli("generate", base_out, "--from-png", tmp_path / "r.png", "--refiner", ref_out,
                       "-o", tmp_path / "again.png")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(png))
    req = GenerationRequest.create("a cat", None, 6, 7.5, 96, 128, seed=4, output_type="np", aesthetic_score=7)
    lib = ensemble.generate(Pipeline.from_dir(base_out), Pipeline.from_dir(ref_out), req, 0.7)
    assert psnr(np.asarray(png.convert("RGB"), np.float32)[None] / 255, lib.images) > 40
    for argv, needle in ((["--refiner-start", "0.5"], "--refiner-start needs --refiner DIR"),
                         (["--refiner", ref_out, "--refiner-start", "1.5"], "refiner switch"),
                         (["--original-size", "64x64", "--refiner", ref_out, "--mask", tmp_path / "r.png",
                           "--image", tmp_path / "r.png"], "--refiner is for text-to-image and img2img")):
        code, _, err = cli("generate", base_out, "a cat", "--steps", 2, "-o", tmp_path / "x.png", *argv)
        assert code == 2 and needle in err and "Traceback" not in err, err


def test_sdxl_folders_served_a1111_refiner_checkpoint_and_openai(tiny_xl_model, tiny_xl_refiner_model, tmp_path):
    from tests.serve.test_models import image_of, start_models

    models = tmp_path / "models"
    models.mkdir()
    os.symlink(tiny_xl_model[0], models / "base")
    os.symlink(tiny_xl_refiner_model[0], models / "refiner")
    proc, url, _ = start_models(models, "--batch-window", "0")
    try:
        body = {"prompt": "a cat", "steps": 6, "width": 128, "height": 96, "seed": 4, "cfg_scale": 5,
                "sampler_name": "Euler", "refiner_checkpoint": "refiner", "refiner_switch_at": 0.7,
                "override_settings": {"sd_model_checkpoint": "base"}}
        r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert "Refiner: refiner [" in info["infotexts"][0] and "Refiner switch at: 0.7" in info["infotexts"][0]
        req = GenerationRequest.create("a cat", None, 6, 5.0, 96, 128, seed=4, scheduler="euler", output_type="np")
        lib = ensemble.generate(Pipeline.from_dir(models / "base"), Pipeline.from_dir(models / "refiner"), req, 0.7)
        got = image_of(r.json()["images"][0])[0].astype(np.float32)[None] / 255
        assert psnr(got, lib.images) > 40
        bad = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "nope"}, timeout=60)
        assert bad.status_code in (400, 404, 422) and "nope" in bad.text
        # the same SDXL folders behind OpenAI's images API: the library's image, the model's own default size
        r = requests.post(f"{url}/v1/images/generations", json={"prompt": "a cat", "model": "base", "size": "128x96"},
                          timeout=300)
        assert r.status_code == 200, r.text
        got, info = image_of(r.json()["data"][0]["b64_json"])
        from sdtrt.runtime.infotext import parse_infotext
        from sdtrt.serve.openai import GUIDANCE, STEPS
        with Pipeline.from_dir(models / "base") as base:
            want = base("a cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=128, height=96,
                        seed=int(parse_infotext(info)["Seed"]), output_type="np")
            side = base.manifest.model.default_size
        assert psnr(got.astype(np.float32)[None] / 255, want.images) > 40
        r = requests.post(f"{url}/v1/images/generations", json={"prompt": "a cat", "model": "base"}, timeout=300)
        assert r.status_code == 200 and image_of(r.json()["data"][0]["b64_json"])[0].shape == (side, side, 3)
    finally:
        proc.terminate()
        proc.wait(30)
