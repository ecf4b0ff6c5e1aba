"""The Python API takes what users pass and refuses the rest with the CLI's messages (typed errors, no traceback
from deep inside), and a NaN result is an error, never a black image."""

import json
import re

import numpy as np
import pytest

from sdtrt.config import from_dict, to_dict
from sdtrt.errors import NumericalError, SdtrtError, UsageError
from sdtrt.runtime import Pipeline
from sdtrt.runtime.request import GenerationRequest


@pytest.fixture(scope="module")
def pipe(tiny_fp32):
    with Pipeline.from_dir(tiny_fp32[0]) as p:
        yield p


SMALL = dict(num_inference_steps=2, height=64, width=64, scheduler="euler", output_type="np")


@pytest.mark.parametrize("kwargs, needle", [
    (dict(prompt=None), "prompt must be a string or a list of strings, got None"),
    (dict(prompt=["a", 3]), "prompt 2 must be a string, got int"),
    (dict(prompt=[]), "no prompt given"),
    (dict(prompt="a", negative_prompt=["x", "y"]), "2 negative prompts for 1 prompts"),
    (dict(prompt="a", guidance_scale="7"), "guidance scale must be a number, got '7'"),
    (dict(prompt="a", guidance_scale=float("nan")), "guidance scale must be finite"),
    (dict(prompt="a", guidance_scale=True), "guidance scale must be a number"),
    (dict(prompt="a", seed=1.5), "seed must be an integer, got 1.5"),
    (dict(prompt="a", seed=-7), "seed must be a non-negative integer (or -1 for a random one)"),
    (dict(prompt="a", num_inference_steps=2.0), "steps must be an integer, got 2.0"),
    (dict(prompt="a", num_images_per_prompt=0), "num_images_per_prompt must be at least 1"),
    (dict(prompt="a", height=70), "height 70 is not a multiple of 8"),
    (dict(prompt="a", output_type="pt"), "output_type must be 'pil', 'np' or 'latent', not 'pt'"),
    (dict(prompt="a", output_type=np.array(["np", "pil"])), "output_type must be 'pil', 'np' or 'latent', not array("),
    (dict(prompt="a", output_type=["np"]), "output_type must be 'pil', 'np' or 'latent', not ['np']"),
    (dict(prompt="a", guidance_scale=100.0001), "guidance scale must be between 0 and 100, got 100.0001"),
    (dict(prompt="a", guidance_scale=-1e-9), "guidance scale must be between 0 and 100, got -1e-09"),
    (dict(prompt="a", scheduler=3), "scheduler must be a sampler name"),
    (dict(prompt="a\udcff"), "prompt is not valid UTF-8 text"),
    (dict(prompt="a", callback=5), "callback must be callable"),
    (dict(prompt="a", latents=np.full((1, 4, 8, 8), np.nan, np.float32)), "latents must be finite"),
])
def test_bad_arguments_raise_usage_errors(pipe, kwargs, needle):
    with pytest.raises(UsageError) as info:
        pipe(**{**SMALL, **kwargs})
    assert needle in str(info.value)


def test_numpy_scalars_are_accepted(pipe):
    result = pipe("a cat", **{**SMALL, "num_inference_steps": np.int64(2), "seed": np.uint64(3),
                              "guidance_scale": np.float32(5.0), "height": np.int32(64)})
    again = pipe("a cat", **{**SMALL, "seed": 3, "guidance_scale": 5.0})
    np.testing.assert_array_equal(result.images, again.images)


def test_request_round_trips_through_json():
    req = GenerationRequest.create(["a cat", "a dog"], "blurry", 12, 6.5, 96, 64, 7, 2, "dpmpp_2m", "np")
    assert from_dict(GenerationRequest, json.loads(json.dumps(to_dict(req)))) == req
    assert req.negative_prompt == ("blurry", "blurry") and req.batch == 4
    controlled = GenerationRequest.create("a cat", controlnet_conditioning_scale=[0.5, np.float32(1.25)],
                                          control_guidance_start=0.1, control_guidance_end=[0.9, 1],
                                          control_preprocessors=["canny", "none"], canny_thresholds=(50, 150),
                                          strength=0.6, outpaint=(8, 0, 8, 0))
    assert from_dict(GenerationRequest, json.loads(json.dumps(to_dict(controlled)))) == controlled
    assert controlled.control_settings(2) == [(0.5, 0.1, 0.9, "canny"), (1.25, 0.1, 1.0, "none")]
    hires = GenerationRequest.create("a cat", hires={"resize": (128, 0), "upscaler": "Lanczos", "steps": 3,
                                                     "prompt": "a lion", "sampler": "ddim"})
    assert from_dict(GenerationRequest, json.loads(json.dumps(to_dict(hires)))) == hires


def _broken(pipe, monkeypatch, name, output):
    engine = pipe.engines[name]
    real = engine.run

    def run(feeds):
        out = real(feeds)
        return {k: np.full_like(v, np.nan) for k, v in out.items()} if output else out

    monkeypatch.setattr(engine, "run", run)


def test_nan_from_the_unet_is_an_error_naming_the_cause(pipe, monkeypatch):
    _broken(pipe, monkeypatch, "unet", True)
    with pytest.raises(NumericalError, match=r"the denoised latents hold NaN/Inf after 2 U-Net calls \(euler, guidance "
                                             r"7.5\): the U-Net overflowed"):
        pipe("a cat", **SMALL)


def test_nan_from_the_vae_is_an_error_naming_the_cause(pipe, monkeypatch):
    _broken(pipe, monkeypatch, "vae_decoder", True)
    with pytest.raises(NumericalError, match="the VAE decoder produced NaN/Inf from finite latents"):
        pipe("a cat", **SMALL)


def test_typed_errors_share_one_base_class():
    assert issubclass(NumericalError, SdtrtError) and issubclass(UsageError, SdtrtError)


@pytest.mark.parametrize("latents, needle", [
    ("abc", "latents must be a real float array, got dtype <U3"),
    (object(), "latents must be a real float array, got dtype object"),
    (np.zeros((1, 4, 8, 8), np.complex64), "latents must be a real float array, got dtype complex64"),
    (np.full((1, 4, 8, 8), 1e30, np.float32), "the U-Net's first input would exceed its float16 range"),
])
def test_bad_latents_are_usage_errors(tiny_fp16, latents, needle):
    pipe = Pipeline.from_dir(tiny_fp16[0])
    with pytest.raises(UsageError, match=re.escape(needle)):
        pipe("a cat", num_inference_steps=2, height=64, width=64, latents=latents)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(folder=None), "the engine folder must be a path, got NoneType"),
    (dict(folder=5), "the engine folder must be a path, got int"),
    (dict(folder=""), "the engine folder path is empty"),
    (dict(threads=-1), "threads must be a non-negative integer"),
    (dict(threads="2"), "threads must be a non-negative integer"),
    (dict(backend=3), "backend must be a name"),
])
def test_bad_pipeline_arguments_are_usage_errors(tiny_fp16, kwargs, needle):
    kwargs = {"folder": tiny_fp16[0], **kwargs}
    with pytest.raises(UsageError, match=re.escape(needle)):
        Pipeline.from_dir(**kwargs)


def test_plan_and_generate_want_a_request(tiny_fp16):
    pipe = Pipeline.from_dir(tiny_fp16[0])
    for call in (pipe.plan, pipe.generate):
        with pytest.raises(UsageError, match="expected a GenerationRequest, got str"):
            call("a cat")


@pytest.mark.parametrize("kwargs, needle", [
    (dict(subseed=5, subseed_strength=0.3), "subseed_strength 0.3: variation seeds (A1111's subseed/subseed_strength) "
                                            "are not supported; send subseed_strength 0"),
    (dict(subseed_strength=1.5), "subseed_strength must be between 0 and 1, got 1.5"),
    (dict(seed_resize_from_h=512, seed_resize_from_w=768), "seed_resize_from 768x512: resizing the seed's noise"),
    (dict(subseed="x"), "subseed must be an integer"),
])
def test_variation_seeds_are_refused_by_name(kwargs, needle):
    from sdtrt.runtime.request import check_variation_seed

    with pytest.raises(UsageError, match=re.escape(needle)):
        check_variation_seed(**{**dict(height=64, width=64), **kwargs})


def test_variation_seed_fields_that_change_nothing_are_accepted():
    from sdtrt.runtime.request import check_variation_seed

    # webuiapi's defaults (subseed -1, strength 0, resize 0); A1111 resizes only when both sides are positive, and
    # the generation's own size is no resize (rng.ImageRNG: noise_shape == shape)
    for kwargs in (dict(), dict(subseed=-1, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0),
                   dict(subseed=123, seed_resize_from_h=-1, seed_resize_from_w=-1), dict(seed_resize_from_h=512),
                   dict(seed_resize_from_h=64, seed_resize_from_w=96)):
        check_variation_seed(height=64, width=96, **kwargs)
