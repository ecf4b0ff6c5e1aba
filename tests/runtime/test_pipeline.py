"""Images from the runtime against diffusers' StableDiffusionPipeline with the same weights, scheduler and
initial latents (fp32 engines, ONNX Runtime CPU)."""

from unittest import mock

import numpy as np
import pytest
import torch

from sdtrt.runtime import Pipeline
from sdtrt.runtime.samplers import DIFFUSERS_EQUIVALENT, SAMPLERS



def psnr(a, b):
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def diffusers_images(folder, sampler, prompts, negatives, steps, guidance, height, width, latents, noises=()):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    cls, extra = DIFFUSERS_EQUIVALENT[sampler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    noise_iter = iter(noises)
    # Ancestral noise: the same arrays our runtime drew, in the same order.
    with mock.patch("diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor",
                    side_effect=lambda *a, **k: torch.from_numpy(next(noise_iter))):
        return pipe(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance,
                    height=height, width=width, latents=torch.from_numpy(latents), output_type="np").images


def compare_with_diffusers(engine_dir, diffusers_dir, sampler, height, width, prompts, steps=12, guidance=7.5, seed=7):
    pipe = Pipeline.from_dir(engine_dir, backend="onnxruntime-cpu")
    negatives = ["blurry"] * len(prompts)
    ours = pipe(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance, height=height,
                width=width, seed=seed, scheduler=sampler, output_type="np")
    # Replay our generator: initial latents first, then one draw per stochastic step.
    rng = np.random.Generator(np.random.PCG64(seed))
    shape = (len(prompts), 4, height // 8, width // 8)
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


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    from sdtrt.export import ExportConfig, export
    from sdtrt.export.loaders import load_model

    folder = tmp_path_factory.mktemp("small") / "diffusers"
    load_model("small").save_pretrained(folder)
    out = folder.parent / "engine"
    export(ExportConfig(model=str(folder), out=str(out), precision="fp32", size_min=64, size_max=256, batch_max=2),
           log=lambda s: None)
    return out, folder


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
