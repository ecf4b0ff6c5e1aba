"""Shared pieces of the sampler parity tests: diffusers' denoising loop reduced to its scheduler (driven by fake model
outputs and fixed noise), our loop over a SamplerTable, and the error measure."""

from unittest import mock

import numpy as np
import torch

from sdtrt.runtime.samplers import step

# the diffusers modules whose step() draws its own noise (patched to hand out the test's noise in order)
NOISE_DRAWING = ("scheduling_euler_ancestral_discrete", "scheduling_lcm", "scheduling_tcd")

# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json
SDXL = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


def run_scheduler(sched, outputs, noises, *, z0=None, latents=None, begin=0, keep=None, step_kwargs=None):
    """Step a diffusers scheduler (set_timesteps already called) over ``sched.timesteps[begin:]``, the first ``keep``
    of them when given (SDXL's denoising_end), from ``z0 * init_noise_sigma`` or from ``latents`` as they are (SDXL's
    refiner, add_noise=False). ``step_kwargs(i)``: extra step() arguments. Returns (timesteps run, U-Net inputs,
    final sample), in float64."""
    timesteps = sched.timesteps[begin:]
    if keep is not None:
        timesteps = timesteps[:keep]
    if begin and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(begin)
    x = (torch.from_numpy(latents.astype(np.float64)) if latents is not None
         else torch.from_numpy(z0.astype(np.float64)) * sched.init_noise_sigma)
    noise_iter = iter(noises)
    draw = lambda *a, **k: torch.from_numpy(next(noise_iter).astype(np.float64))  # noqa: E731
    patches = [mock.patch(f"diffusers.schedulers.{m}.randn_tensor", side_effect=draw) for m in NOISE_DRAWING]
    inputs = []
    for p in patches:
        p.start()
    try:
        for i, t in enumerate(timesteps):
            inputs.append(sched.scale_model_input(x, t).numpy().copy())
            extra = step_kwargs(i) if step_kwargs else {}
            x = sched.step(torch.from_numpy(outputs[i].astype(np.float64)), t, x, **extra).prev_sample
    finally:
        for p in patches:
            p.stop()
    return np.array(timesteps, dtype=np.float64), inputs, x.numpy()


def run_table(table, outputs, noises, z0=None, x0=None):
    """Our loop: s_0 = init_scale * z0 + init_image_scale * x0, then the shared update. Returns (inputs, final)."""
    first = 0.0
    if z0 is not None:
        first = first + table.init_scale * z0.astype(np.float64)
    if x0 is not None:
        first = first + table.init_image_scale * x0.astype(np.float64)
    states, history, inputs = [first], [], []
    for i in range(table.num_steps):
        inputs.append(states[0])
        history.insert(0, outputs[i].astype(np.float64))
        states.insert(0, step(table, i, states, history, noises[i].astype(np.float64)))
        del states[table.state_coef.shape[1]:], history[table.model_coef.shape[1]:]
    return inputs, states[0]


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def assert_same_run(got_inputs, got, want_inputs, want, tol=1e-5):
    assert len(got_inputs) == len(want_inputs)
    for i, (g, w) in enumerate(zip(got_inputs, want_inputs)):
        assert rel(g, w) <= tol, f"U-Net input at step {i}: {rel(g, w):.2e}"
    assert rel(got, want) <= tol, f"final sample: {rel(got, want):.2e}"


def arrays(seed, count, shape=(1, 4, 8, 8)):
    """z0, then ``count`` model outputs and ``count`` noises (float32, as the runtime draws them)."""
    rng = np.random.default_rng(seed)
    z0 = rng.standard_normal(shape).astype(np.float32)
    outputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]
    noises = [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]
    return z0, outputs, noises
