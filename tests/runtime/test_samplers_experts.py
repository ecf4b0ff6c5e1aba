"""SDXL's ensemble of experts against diffusers: the base pipeline's denoising_end (StableDiffusionXLPipeline,
"Apply denoising_end": the timesteps at or above the cutoff) hands its latents (output_type="latent") to the
refiner's denoising_start (StableDiffusionXLImg2ImgPipeline.get_timesteps: the timesteps below the cutoff,
set_begin_index, add_noise=False), each pipeline with its own scheduler instance."""

import numpy as np
import pytest

from sdtrt.runtime.samplers import DIFFUSERS_EQUIVALENT, SAMPLERS, SamplerConfig, SamplerError, build_table
from tests.runtime.sampler_parity import SDXL, arrays, assert_same_run, run_scheduler, run_table

CONFIGS = {"sdxl": SDXL, "v-trailing": dict(SDXL, prediction_type="v_prediction", timestep_spacing="trailing",
                                            steps_offset=0)}


def _scheduler(name, config):
    import diffusers

    cls_name, extra = DIFFUSERS_EQUIVALENT[name]
    return getattr(diffusers, cls_name).from_config({**config, **extra})


def _diffusers_experts(name, config, steps, split, z0, outputs, noises, end=None, timesteps=None):
    """The base run to ``split`` and the refiner from there (to ``end`` when given): (base, refiner), each as
    (timesteps, U-Net inputs, final latents)."""
    T = config["num_train_timesteps"]
    cutoff = int(round(T - split * T))
    set_kwargs = {"timesteps": timesteps} if timesteps else {"num_inference_steps": steps}
    base = _scheduler(name, config)
    base.set_timesteps(**set_kwargs)
    keep = len([t for t in base.timesteps if t >= cutoff])
    first = run_scheduler(base, outputs, noises, z0=z0, keep=keep)
    refiner = _scheduler(name, config)
    refiner.set_timesteps(**set_kwargs)
    remaining = int((refiner.timesteps < cutoff).sum().item())
    later = None
    if end is not None:
        end_cutoff = int(round(T - end * T))
        later = len([t for t in refiner.timesteps[len(refiner.timesteps) - remaining:] if t >= end_cutoff])
    second = run_scheduler(refiner, outputs[keep:], noises[keep:], latents=first[2],
                           begin=len(refiner.timesteps) - remaining, keep=later)
    return first, second


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps, split", [(10, 0.8), (25, 0.7), (7, 0.5)])
def test_base_then_refiner_matches_diffusers_two_pipelines(name, config_name, steps, split):
    config = CONFIGS[config_name]
    cfg = SamplerConfig.from_scheduler_config(config, name)
    base = build_table(cfg, steps, denoising_end=split)
    refiner = build_table(cfg, steps, denoising_start=split)
    z0, outputs, noises = arrays(steps, base.num_steps + refiner.num_steps)
    (want_ts1, want_in1, want1), (want_ts2, want_in2, want2) = _diffusers_experts(name, config, steps, split, z0,
                                                                                 outputs, noises)
    # the two parts share the steps as diffusers' two pipelines do, and together run the whole schedule
    np.testing.assert_allclose(base.timesteps, want_ts1, rtol=1e-6)
    np.testing.assert_allclose(refiner.timesteps, want_ts2, rtol=1e-6)
    assert base.num_steps + refiner.num_steps == len(want_ts1) + len(want_ts2)
    assert base.num_steps + refiner.num_steps == build_table(cfg, steps).num_steps
    got_in1, got1 = run_table(base, outputs, noises, z0=z0)
    assert_same_run(got_in1, got1, want_in1, want1)  # the base's last state: the plain latents handed over
    assert refiner.init_scale == 0.0
    got_in2, got2 = run_table(refiner, outputs[base.num_steps:], noises[base.num_steps:], x0=want1)
    assert_same_run(got_in2, got2, want_in2, want2)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "lcm", "tcd"])
def test_the_expert_split_works_on_custom_timesteps_and_a_middle_part(name):
    config, timesteps = SDXL, [999, 874, 749, 624, 499, 374, 249, 124]
    cfg = SamplerConfig.from_scheduler_config(config, name)
    base = build_table(cfg, None, timesteps=timesteps, denoising_end=0.4)
    middle = build_table(cfg, None, timesteps=timesteps, denoising_start=0.4, denoising_end=0.75)
    z0, outputs, noises = arrays(3, len(timesteps))
    (_, _, want1), (want_ts2, want_in2, want2) = _diffusers_experts(name, config, None, 0.4, z0, outputs, noises,
                                                                    end=0.75, timesteps=timesteps)
    _, got1 = run_table(base, outputs, noises, z0=z0)
    np.testing.assert_allclose(middle.timesteps, want_ts2, rtol=1e-6)
    got_in2, got2 = run_table(middle, outputs[base.num_steps:], noises[base.num_steps:], x0=want1)
    assert_same_run(got_in2, got2, want_in2, want2)


def test_denoising_start_overrides_strength():
    cfg = SamplerConfig.from_scheduler_config(SDXL, "euler")
    a = build_table(cfg, 20, strength=0.3, denoising_start=0.8)
    b = build_table(cfg, 20, denoising_start=0.8)
    np.testing.assert_array_equal(a.timesteps, b.timesteps)
    assert (a.init_scale, a.init_image_scale) == (b.init_scale, b.init_image_scale)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(denoising_end=1.0), "denoising_end must be a number strictly between 0 and 1, got 1.0"),
    (dict(denoising_start=0), "denoising_start must be a number strictly between 0 and 1, got 0"),
    (dict(denoising_start="0.8"), "denoising_start must be a number strictly between 0 and 1"),
    (dict(denoising_end=float("nan")), "denoising_end must be a number strictly between 0 and 1"),
    (dict(denoising_start=0.8, denoising_end=0.8), r"denoising_start \(0.8\) must be below denoising_end \(0.8\)"),
    (dict(denoising_end=0.001), "denoising_end 0.001 leaves no step of 4 to run"),
    (dict(denoising_start=0.999), "denoising_start 0.999 leaves no step of 4 to run"),
])
def test_bad_expert_fractions_get_one_clear_line(kwargs, needle):
    with pytest.raises(SamplerError, match=needle):
        build_table(SamplerConfig.from_scheduler_config(SDXL, "euler"), 4, **kwargs)
