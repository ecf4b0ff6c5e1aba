"""Sampler tables against diffusers' scheduler classes: whole trajectories driven by the same random
model outputs and noise must agree within relative error 1e-5."""

import contextlib
import json
import re
from unittest import mock

import numpy as np
import pytest
import torch

from sdtrt.config import from_dict, to_dict
from sdtrt.runtime.samplers import (CLASS_DEFAULTS, DIFFUSERS_EQUIVALENT, SAMPLERS, SCHEDULES, SamplerConfig,
                                    SamplerError, build_table, schedules_for, step)
from tests.runtime.sampler_parity import NOISE_DRAWING, rel, run_scheduler, run_table

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
            prediction_type="epsilon", timestep_spacing="leading")


CONFIGS = {
    "sd15": SD15,
    "v-trailing": dict(SD15, prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0),
    "linspace-linear-alpha1": dict(SD15, timestep_spacing="linspace", beta_schedule="linear", beta_start=0.0001,
                                   beta_end=0.02, set_alpha_to_one=True, steps_offset=0),
    "cosine-v-leading": dict(SD15, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
}


def diffusers_trajectory(name, config, steps, z0, outputs, noises, eta=0.0, settings=None):
    """Run diffusers' scheduler (``settings``: config keys set on top, e.g. a schedule's); return the timesteps, the
    U-Net inputs it asks for at each step and the final sample."""
    import diffusers

    cls_name, extra = DIFFUSERS_EQUIVALENT[name]
    sched = getattr(diffusers, cls_name).from_config({**config, **extra, **(settings or {})})
    sched.set_timesteps(steps)
    # float64 tensors: the reference then carries less rounding of its own (Euler and DPM cast to float32 inside)
    kwargs = None
    if name == "ddim" and eta:
        kwargs = lambda i: {"eta": eta, "variance_noise": torch.from_numpy(noises[i].astype(np.float64))}  # noqa: E731
    return run_scheduler(sched, outputs, noises, z0=z0, step_kwargs=kwargs)


def our_trajectory(table, z0, outputs, noises):
    return run_table(table, outputs, noises, z0=z0)


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [4, 20, 50])
def test_trajectory_matches_diffusers(name, config_name, steps):
    config = CONFIGS[config_name]
    table = build_table(SamplerConfig.from_scheduler_config(config, name), steps)
    rng = np.random.default_rng(steps)
    shape = (2, 4, 8, 8)
    z0 = rng.standard_normal(shape).astype(np.float32)
    outputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(table.num_steps)]
    noises = [rng.standard_normal(shape).astype(np.float32) for _ in range(table.num_steps)]
    try:
        timesteps, want_inputs, want = diffusers_trajectory(name, config, steps, z0, outputs, noises)
    except IndexError:  # DPM++ Karras + cosine: diffusers' int64 timesteps collide and it steps past its end
        pytest.skip("diffusers' own scheduler fails on this config, so there is no reference")
    np.testing.assert_allclose(table.timesteps, timesteps, rtol=1e-6, atol=1e-4)
    got_inputs, got = our_trajectory(table, z0, outputs, noises)
    for i, (g, w) in enumerate(zip(got_inputs, want_inputs)):
        assert rel(g, w) <= 1e-5, f"U-Net input at step {i}: {rel(g, w):.2e}"
    assert rel(got, want) <= 1e-5


# every sampler with every schedule it takes (dpmpp_2m + karras is dpmpp_2m_karras, a sampler of its own, above)
SCHEDULED = [(n, s) for n in SAMPLERS if n != "dpmpp_2m_karras" for s in schedules_for(n) if f"{n}_{s}" not in SAMPLERS]


@pytest.mark.parametrize("name, schedule", SCHEDULED, ids=[f"{n}_{s}" for n, s in SCHEDULED])
@pytest.mark.parametrize("config_name", ["sd15", "v-trailing"])
def test_every_schedule_a_sampler_takes_matches_diffusers_with_that_setting(name, schedule, config_name):
    # "euler_karras" is EulerDiscreteScheduler(use_karras_sigmas=True), "ddim_trailing" DDIMScheduler(
    # timestep_spacing="trailing"), ...: every setting its diffusers class has, and only those
    config, steps = CONFIGS[config_name], 9
    cfg = SamplerConfig.from_scheduler_config(config, f"{name}_{schedule}")
    assert (cfg.name, cfg.schedule) == (name, schedule)
    table = build_table(cfg, steps)
    rng = np.random.default_rng(5)
    z0, *rest = (rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(1 + 2 * table.num_steps))
    outputs, noises = rest[:table.num_steps], rest[table.num_steps:]
    timesteps, want_inputs, want = diffusers_trajectory(name, config, steps, z0, outputs, noises,
                                                        settings=SCHEDULES[schedule])
    np.testing.assert_allclose(table.timesteps, timesteps, rtol=1e-6, atol=1e-4)
    got_inputs, got = our_trajectory(table, z0, outputs, noises)
    for i, (g, w) in enumerate(zip(got_inputs, want_inputs)):
        assert rel(g, w) <= 1e-5, f"U-Net input at step {i}: {rel(g, w):.2e}"
    assert rel(got, want) <= 1e-5


def test_a_schedule_the_samplers_diffusers_class_lacks_is_refused_by_name():
    import diffusers

    assert "use_karras_sigmas" not in diffusers.EulerAncestralDiscreteScheduler.__init__.__code__.co_varnames
    with pytest.raises(SamplerError, match=r"euler_a has no karras schedule .*EulerAncestralDiscreteScheduler.*"
                                           r"takes: trailing, linspace, leading"):
        SamplerConfig.from_scheduler_config(SD15, "euler_a_karras")
    with pytest.raises(SamplerError, match="lcm has no trailing schedule"):
        SamplerConfig.from_scheduler_config(SD15, "lcm_trailing")
    assert schedules_for("euler") == ("karras", "exponential", "trailing", "linspace", "leading")
    assert schedules_for("ddim") == ("trailing", "linspace", "leading")


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_matches_diffusers_given_the_same_noise(eta):
    table = build_table(SamplerConfig.from_scheduler_config(SD15, "ddim", eta=eta), 10)
    assert table.stochastic
    rng = np.random.default_rng(0)
    z0, *rest = (rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(21))
    outputs, noises = rest[:10], rest[10:]
    _, _, want = diffusers_trajectory("ddim", SD15, 10, z0, outputs, noises, eta=eta)
    _, got = our_trajectory(table, z0, outputs, noises)
    assert rel(got, want) <= 1e-5


def test_only_ancestral_samplers_draw_noise():
    for name in SAMPLERS:
        table = build_table(SamplerConfig.from_scheduler_config(SD15, name), 10)
        assert table.stochastic == (name in ("euler_a", "lcm", "tcd")), name


def test_sampler_config_round_trips_through_json():
    cfg = SamplerConfig.from_scheduler_config(CONFIGS["cosine-v-leading"], "dpmpp_2m_karras", eta=0.3)
    assert from_dict(SamplerConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


@pytest.mark.parametrize(
    "config, name, steps, needle",
    [
        (SD15, "heun", 10, "unknown sampler 'heun'"),
        (SD15, "ddim", 0, "positive integer"),
        (SD15, "ddim", 1001, "cannot exceed"),
        (dict(SD15, prediction_type="x0"), "ddim", 10, "prediction_type must be one of 'epsilon', 'v_prediction', 'sample', got 'x0'"),
        (dict(SD15, prediction_type="sample"), "pndm", 10, r"pndm \(PNDMScheduler\) with prediction_type='sample' is not supported"),
        (dict(SD15, timestep_spacing="karras"), "ddim", 10, "timestep_spacing"),
        (dict(SD15, thresholding=True), "ddim", 10, "thresholding"),
        (dict(SD15, skip_prk_steps=False), "pndm", 10, "Runge-Kutta"),
        (dict(SD15, _class_name="UniPCMultistepScheduler", lower_order_final=False), "unipc", 10, "diverges"),
        (dict(SD15, _class_name="UniPCMultistepScheduler", solver_type="bh1"), "unipc", 10, "bh2"),
        (SD15, "lcm", 60, "at most original_inference_steps = 50"),
    ],
)
def test_bad_sampler_requests_raise_a_clear_error(config, name, steps, needle):
    with pytest.raises(SamplerError, match=needle):
        build_table(SamplerConfig.from_scheduler_config(config, name), steps)


@pytest.mark.parametrize("variant", [{"solver_order": 3}, {"disable_corrector": [0, 3]}, {"use_karras_sigmas": True},
                                     {"prediction_type": "v_prediction", "solver_order": 1}],
                         ids=lambda v: ",".join(f"{k}={v[k]}" for k in v))
def test_unipc_options_from_its_scheduler_config_match_diffusers(variant):
    config = dict(SD15, _class_name="UniPCMultistepScheduler", **variant)
    table = build_table(SamplerConfig.from_scheduler_config(config), 12)
    rng = np.random.default_rng(1)
    z0, *rest = (rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(1 + table.num_steps))
    _, want_inputs, want = diffusers_trajectory("unipc", config, 12, z0, rest, rest)
    got_inputs, got = our_trajectory(table, z0, rest, rest)
    assert all(rel(g, w) <= 1e-5 for g, w in zip(got_inputs, want_inputs))
    assert rel(got, want) <= 1e-5


# ---- the scheduler config as diffusers reads it ---------------------------------------------------------

def test_class_defaults_are_diffusers_own():
    import inspect

    import diffusers

    for cls_name, defaults in CLASS_DEFAULTS.items():
        params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
        theirs = {k: p.default for k, p in params.items() if k != "self"}
        assert defaults == theirs, cls_name


def test_every_diffusers_setting_is_modelled_inert_or_refused():
    # a key diffusers adds must be decided on: read, ignored because it cannot change the table, or refused
    from sdtrt.runtime.samplers import _FIXED, _INERT, _INERT_FOR, _MODELED

    for cls_name, defaults in CLASS_DEFAULTS.items():
        unknown = set(defaults) - _MODELED - _INERT - _INERT_FOR.get(cls_name, set()) - set(_FIXED)
        assert not unknown, (cls_name, unknown)


SPARSE = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "skip_prk_steps": True,
          "steps_offset": 1}  # no beta_schedule, clip_sample, spacing, ...: each class fills in its own defaults


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n not in ("ddim", "lcm")])
def test_keys_the_config_does_not_set_take_the_samplers_class_defaults(name):
    steps = 12
    table = build_table(SamplerConfig.from_scheduler_config(SPARSE, name), steps)
    rng = np.random.default_rng(3)
    z0, *rest = (rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(1 + 2 * table.num_steps))
    outputs, noises = rest[:table.num_steps], rest[table.num_steps:]
    timesteps, want_inputs, want = diffusers_trajectory(name, SPARSE, steps, z0, outputs, noises)
    np.testing.assert_allclose(table.timesteps, timesteps, rtol=1e-6, atol=1e-4)
    _, got = our_trajectory(table, z0, outputs, noises)
    assert rel(got, want) <= 1e-5


def test_ddim_on_a_config_without_clip_sample_is_refused_as_diffusers_would_clip():
    # DDIMScheduler's own default is clip_sample=True; running the table anyway would silently differ
    with pytest.raises(SamplerError, match=r"ddim \(DDIMScheduler\) with clip_sample=True is not supported: it clamps"):
        SamplerConfig.from_scheduler_config(SPARSE, "ddim")
    assert SamplerConfig.from_scheduler_config(dict(SPARSE, clip_sample=False), "ddim").beta_schedule == "linear"


def test_use_default_values_are_not_read_from_the_config():
    config = dict(SD15, _use_default_values=["beta_schedule"])  # saved by diffusers for keys it defaulted
    assert SamplerConfig.from_scheduler_config(config, "euler").beta_schedule == "linear"


def test_the_models_own_dpm_solver_keeps_its_karras_setting():
    config = dict(SD15, _class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True)
    assert SamplerConfig.from_scheduler_config(config).name == "dpmpp_2m_karras"
    assert SamplerConfig.from_scheduler_config(config, "dpmpp_2m").use_karras_sigmas is False  # named: no Karras
    assert SamplerConfig.from_scheduler_config(config, "euler").use_karras_sigmas is True  # as diffusers' from_config


@pytest.mark.parametrize("name, key, value", [
    ("euler", "interpolation_type", "log_linear"), ("euler", "timestep_type", "continuous"),
    ("euler", "final_sigmas_type", "sigma_min"), ("lms", "use_beta_sigmas", True),
    ("dpmpp_2m", "algorithm_type", "sde-dpmsolver++"), ("dpmpp_2m", "lambda_min_clipped", -5.1),
    ("dpmpp_2m", "use_lu_lambdas", True), ("dpmpp_2m", "variance_type", "learned_range"),
    ("unipc", "predict_x0", False), ("euler_a", "rescale_betas_zero_snr", True), ("lcm", "thresholding", True),
])
def test_settings_a_table_cannot_express_are_refused_by_name(name, key, value):
    with pytest.raises(SamplerError, match=re.escape(f"{name} (") + r"\w+\) with " + re.escape(f"{key}={value!r} is not supported")):
        SamplerConfig.from_scheduler_config(dict(SD15, **{key: value}), name)


def test_settings_that_cannot_change_the_table_are_ignored():
    cfg = SamplerConfig.from_scheduler_config(dict(SD15, sample_max_value=3.0, dynamic_thresholding_ratio=0.5), "ddim")
    assert cfg.name == "ddim"


@pytest.mark.parametrize("key, value, needle", [
    ("beta_start", "abc", "beta_start must be a finite number in"),
    ("beta_end", float("nan"), "beta_end must be a finite number"),
    ("num_train_timesteps", 1000.5, "num_train_timesteps must be an integer"),
    ("steps_offset", -1, "steps_offset must be an integer in"),
    ("beta_schedule", "cosine", "beta_schedule must be one of"),
    ("set_alpha_to_one", "no", "set_alpha_to_one must be true or false"),
    ("trained_betas", [0.1, 0.2], "trained_betas must be a list of num_train_timesteps = 1000 numbers"),
])
def test_malformed_scheduler_settings_get_one_clear_message(key, value, needle):
    with pytest.raises(SamplerError, match=needle):
        SamplerConfig.from_scheduler_config(dict(SD15, **{key: value}), "ddim")


# ---- every step count the CLI accepts gives a finite table or a clear refusal ----------------------------

@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_step_counts_near_the_training_length_are_finite_or_refused(name, config_name):
    for steps in (1, 2, 61, 499, 998, 999, 1000):
        try:
            table = build_table(SamplerConfig.from_scheduler_config(CONFIGS[config_name], name), steps)
        except SamplerError as ex:
            assert ("steps work" in str(ex) or "at most original_inference_steps" in str(ex)
                    or "at least 2 steps" in str(ex)), str(ex)
            continue
        assert all(np.isfinite(a).all() for a in (table.timesteps, table.state_coef, table.model_coef, table.noise_coef))
        assert 0 <= table.timesteps.min() and table.timesteps.max() <= 999


def test_a_refused_step_count_names_the_nearest_that_work():
    with pytest.raises(SamplerError, match=r"ddim cannot run 1000 steps .* outside 0..999 or repeat; 999 steps work"):
        build_table(SamplerConfig.from_scheduler_config(SD15, "ddim"), 1000)
    trailing = CONFIGS["v-trailing"]
    with pytest.raises(SamplerError, match=r"cannot run 61 steps .*; 60 or 62 steps work"):
        build_table(SamplerConfig.from_scheduler_config(trailing, "euler"), 61)


def test_numpy_integer_steps_are_accepted():
    assert build_table(SamplerConfig.from_scheduler_config(SD15, "euler"), np.int64(7)).num_steps == 7


# ---- img2img and 4-channel inpainting: the initial-state rule and the per-step blend -----------------------

def diffusers_from_image(name, config, steps, strength, x0, z0, outputs, noises, mask=None, pure_noise=False):
    """diffusers' img2img / 4-channel inpainting loop reduced to the scheduler: get_timesteps, set_begin_index,
    add_noise at the first timestep (or noise * init_noise_sigma), and for inpainting the blend after each step."""
    import diffusers

    cls_name, extra = DIFFUSERS_EQUIVALENT[name]
    sched = getattr(diffusers, cls_name).from_config({**config, **extra})
    sched.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    x0_t, z0_t = (torch.from_numpy(a.astype(np.float64)) for a in (x0, z0))
    x = z0_t * sched.init_noise_sigma if pure_noise else sched.add_noise(x0_t, z0_t, timesteps[:1].repeat(x0.shape[0]))
    noise_iter = iter(noises)
    draw = lambda *a, **k: torch.from_numpy(next(noise_iter).astype(np.float64))  # noqa: E731
    inputs = []
    with contextlib.ExitStack() as stack:
        for module in NOISE_DRAWING:
            stack.enter_context(mock.patch(f"diffusers.schedulers.{module}.randn_tensor", side_effect=draw))
        for i, t in enumerate(timesteps):
            inputs.append(sched.scale_model_input(x, t).numpy().copy())
            x = sched.step(torch.from_numpy(outputs[i].astype(np.float64)), t, x).prev_sample
            if mask is not None:
                proper = x0_t
                if i < len(timesteps) - 1:
                    proper = sched.add_noise(x0_t, z0_t, torch.tensor([timesteps[i + 1]]))
                m = torch.from_numpy(mask.astype(np.float64))
                x = (1 - m) * proper + m * x
    return inputs, x.numpy()


def our_from_image(table, x0, z0, outputs, noises, mask=None):
    from sdtrt.runtime.samplers import Blend

    blend = None
    if mask is not None:
        m = mask.astype(np.float64)
        blend = Blend(m, 1 - m, x0.astype(np.float64), z0.astype(np.float64), np.zeros(x0.shape))
    states = [table.init_image_scale * x0.astype(np.float64) + table.init_scale * z0.astype(np.float64)]
    history, inputs = [], []
    for i in range(table.num_steps):
        inputs.append(states[0])
        history.insert(0, outputs[i].astype(np.float64))
        states.insert(0, step(table, i, states, history, noises[i].astype(np.float64), blend=blend))
        del states[table.state_coef.shape[1]:], history[table.model_coef.shape[1]:]
    return inputs, states[0]


def _arrays(seed, table, shape=(2, 4, 8, 8)):
    rng = np.random.default_rng(seed)
    x0, z0 = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    outputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(table.num_steps)]
    noises = [rng.standard_normal(shape).astype(np.float32) for _ in range(table.num_steps)]
    mask = (rng.random((shape[0], 1) + shape[2:]) < 0.5).astype(np.float32)
    return x0, z0, outputs, noises, mask


@pytest.mark.parametrize("config_name", ["sd15", "v-trailing"])
@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps, strength", [(10, 0.3), (20, 0.8), (7, 1.0)])
def test_img2img_trajectory_matches_diffusers(name, config_name, steps, strength):
    config = CONFIGS[config_name]
    table = build_table(SamplerConfig.from_scheduler_config(config, name), steps, strength=strength)
    x0, z0, outputs, noises, _ = _arrays(steps, table)
    want_inputs, want = diffusers_from_image(name, config, steps, strength, x0, z0, outputs, noises)
    got_inputs, got = our_from_image(table, x0, z0, outputs, noises)
    assert len(got_inputs) == len(want_inputs)
    for i, (g, w) in enumerate(zip(got_inputs, want_inputs)):
        assert rel(g, w) <= 1e-5, f"U-Net input at step {i}: {rel(g, w):.2e}"
    assert rel(got, want) <= 1e-5


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps, strength, pure_noise", [(12, 1.0, True), (12, 0.6, False)])
def test_four_channel_inpainting_blend_matches_diffusers(name, steps, strength, pure_noise):
    config = CONFIGS["sd15"]
    table = build_table(SamplerConfig.from_scheduler_config(config, name), steps, strength=strength,
                        from_image=not pure_noise)
    x0, z0, outputs, noises, mask = _arrays(steps + 1, table)
    want_inputs, want = diffusers_from_image(name, config, steps, strength, x0, z0, outputs, noises, mask, pure_noise)
    got_inputs, got = our_from_image(table, x0, z0, outputs, noises, mask)
    for i, (g, w) in enumerate(zip(got_inputs, want_inputs)):
        assert rel(g, w) <= 1e-5, f"U-Net input at step {i}: {rel(g, w):.2e}"
    assert rel(got, want) <= 1e-5


def test_a_strength_that_leaves_no_step_is_refused():
    with pytest.raises(SamplerError, match=r"strength 0.05 with 10 steps leaves no step to run .* use strength >= 0.1"):
        build_table(SamplerConfig.from_scheduler_config(SD15, "euler"), 10, strength=0.05)


@pytest.mark.parametrize("steps,strength", [(20, None), (7, None), (30, 0.55), (13, 0.8)])
def test_control_scales_follow_diffusers_controlnet_keep(steps, strength):
    """with_control's (S, N) scales are diffusers' StableDiffusionControlNetPipeline cond_scale per step (its
    controlnet_keep over the timesteps it actually runs), for several ControlNets with ranges."""
    import diffusers

    from sdtrt.runtime.samplers import SamplerConfig, build_table, with_control

    settings = [(0.8, 0.0, 1.0), (1.3, 0.25, 0.7), (0.5, 0.1, 0.35)]
    config = SamplerConfig.from_scheduler_config(dict(SD15, _class_name="PNDMScheduler"))
    table = with_control(build_table(config, steps, strength, from_image=strength is not None), settings)
    scheduler = diffusers.PNDMScheduler.from_config(dict(SD15))
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if strength is not None:  # StableDiffusionImg2ImgPipeline.get_timesteps
        init = min(int(steps * strength), steps)
        timesteps = timesteps[max(steps - init, 0) * scheduler.order:]
    keep = [[1.0 - float(i / len(timesteps) < s or (i + 1) / len(timesteps) > e) for _, s, e in settings]
            for i in range(len(timesteps))]
    want = np.array([[c * k for (c, _, _), k in zip(settings, row)] for row in keep])
    assert table.control_scale.shape == want.shape
    np.testing.assert_array_equal(table.control_scale, want)
