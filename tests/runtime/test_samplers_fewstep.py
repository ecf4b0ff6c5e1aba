"""Few-step settings against diffusers: custom timesteps (set_timesteps(timesteps=...)), x0 prediction
(prediction_type="sample"), the TCD sampler, and the named presets run as their model cards configure diffusers."""

import inspect

import numpy as np
import pytest

from sdtrt.runtime.sampler_presets import FEW_STEP_PRESETS, few_step_preset
from sdtrt.runtime.samplers import (CUSTOM_TIMESTEPS, DIFFUSERS_EQUIVALENT, NO_SAMPLE_PREDICTION, SAMPLERS,
                                    SamplerConfig, SamplerError, build_table)
from tests.runtime.sampler_parity import SDXL, arrays, assert_same_run, run_scheduler, run_table

V_TRAILING = dict(SDXL, prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0)


def _scheduler(name, config, **settings):
    import diffusers

    cls_name, extra = DIFFUSERS_EQUIVALENT[name]
    return getattr(diffusers, cls_name).from_config({**config, **extra, **settings})


def test_custom_timesteps_go_to_the_samplers_whose_diffusers_class_takes_them():
    for name in SAMPLERS:
        cls_name = DIFFUSERS_EQUIVALENT[name][0]
        takes = "timesteps" in inspect.signature(_scheduler(name, SDXL).set_timesteps).parameters
        if name == "dpmpp_2m_karras":
            takes = False  # DPMSolverMultistepScheduler refuses timesteps with use_karras_sigmas
        assert (name in CUSTOM_TIMESTEPS) == takes, (name, cls_name)


@pytest.mark.parametrize("timesteps", [[999, 749, 499, 249], [800], [961, 700, 500, 301, 105, 20]])
@pytest.mark.parametrize("config", [SDXL, V_TRAILING], ids=["sdxl", "v-trailing"])
@pytest.mark.parametrize("name", CUSTOM_TIMESTEPS)
def test_custom_timesteps_match_diffusers(name, config, timesteps):
    table = build_table(SamplerConfig.from_scheduler_config(config, name), None, timesteps=timesteps)
    z0, outputs, noises = arrays(len(timesteps), table.num_steps)
    sched = _scheduler(name, config)
    sched.set_timesteps(timesteps=timesteps)
    want_ts, want_inputs, want = run_scheduler(sched, outputs, noises, z0=z0)
    np.testing.assert_allclose(table.timesteps, want_ts, rtol=1e-6)
    assert_same_run(*run_table(table, outputs, noises, z0=z0), want_inputs, want)


@pytest.mark.parametrize("name, timesteps, steps, needle", [
    ("ddim", [999, 499], None, r"ddim does not take custom timesteps \(diffusers' DDIMScheduler.set_timesteps has no "
                               r"timesteps argument\); samplers that do: euler, dpmpp_2m, lcm, tcd"),
    ("unipc", [999, 499], None, "unipc does not take custom timesteps"),
    ("euler_karras", [999, 499], None, "euler cannot take custom timesteps with Karras sigmas"),
    ("dpmpp_2m_karras", [999, 499], None, "does not take custom timesteps"),
    ("euler", [499, 999], None, r"timesteps must be strictly descending, got \[499, 999\]"),
    ("euler", [999, 999], None, "strictly descending"),
    ("lcm", [1000, 500], None, r"timesteps must lie in 0..999"),
    ("lcm", [500, -1], None, r"timesteps must lie in 0..999"),
    ("euler", [999.0, 499.0], None, "timesteps must be a non-empty list of integers"),
    ("euler", [True], None, "non-empty list of integers"),
    ("euler", [], None, "non-empty list of integers"),
    ("euler", "999", None, "non-empty list of integers"),
    ("lcm", [999, 749, 499, 249], 8, r"steps \(8\) and the 4 custom timesteps disagree"),
])
def test_bad_custom_timesteps_get_one_clear_line(name, timesteps, steps, needle):
    with pytest.raises(SamplerError, match=needle):
        build_table(SamplerConfig.from_scheduler_config(SDXL, name), steps, timesteps=timesteps)


# ---- prediction_type "sample" (x0 prediction) ------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in SAMPLERS if n not in NO_SAMPLE_PREDICTION])
def test_x0_prediction_matches_diffusers(name):
    config, steps = dict(SDXL, prediction_type="sample"), 6
    table = build_table(SamplerConfig.from_scheduler_config(config, name), steps)
    z0, outputs, noises = arrays(11, table.num_steps)
    sched = _scheduler(name, config)
    sched.set_timesteps(steps)
    _, want_inputs, want = run_scheduler(sched, outputs, noises, z0=z0)
    assert_same_run(*run_table(table, outputs, noises, z0=z0), want_inputs, want)


@pytest.mark.parametrize("name", NO_SAMPLE_PREDICTION)
def test_x0_prediction_is_refused_where_diffusers_refuses_it(name):
    sched = _scheduler(name, dict(SDXL, prediction_type="sample"))
    sched.set_timesteps(4)
    z0, outputs, noises = arrays(0, 5)
    with pytest.raises((ValueError, NotImplementedError), match="sample|epsilon"):
        run_scheduler(sched, outputs, noises, z0=z0)
    with pytest.raises(SamplerError, match=rf"{name} \(\w+\) with prediction_type='sample' is not supported"):
        SamplerConfig.from_scheduler_config(dict(SDXL, prediction_type="sample"), name)


# ---- TCD -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_tcd_matches_diffusers_for_its_gamma(eta, steps):
    table = build_table(SamplerConfig.from_scheduler_config(SDXL, "tcd", eta=eta), steps)
    assert table.stochastic == (eta > 0 and steps > 1)
    z0, outputs, noises = arrays(steps, table.num_steps)
    sched = _scheduler("tcd", SDXL)
    sched.set_timesteps(steps)
    _, want_inputs, want = run_scheduler(sched, outputs, noises, z0=z0, step_kwargs=lambda i: {"eta": eta})
    assert_same_run(*run_table(table, outputs, noises, z0=z0), want_inputs, want)


def test_tcd_default_gamma_is_diffusers_own():
    import diffusers

    default = inspect.signature(diffusers.TCDScheduler.step).parameters["eta"].default
    assert SamplerConfig.from_scheduler_config(SDXL, "tcd").eta_value() == default == 0.3
    assert SamplerConfig.from_scheduler_config(SDXL, "ddim").eta_value() == 0.0


@pytest.mark.parametrize("eta", [1.5, -0.1, float("nan"), "1"])
def test_a_tcd_gamma_outside_0_1_is_refused(eta):
    with pytest.raises(SamplerError, match=r"eta must be a number in \[0, 1\]"):
        SamplerConfig.from_scheduler_config(SDXL, "tcd", eta=eta)


# ---- few-step presets, each against its model card's diffusers configuration -----------------------------

def _card(preset):
    """(scheduler, set_timesteps kwargs, step kwargs) exactly as the preset's model card writes the diffusers code."""
    import diffusers

    base = dict(SDXL)  # pipe.scheduler.config of stabilityai/stable-diffusion-xl-base-1.0
    steps = {"num_inference_steps": preset.steps}
    cards = {
        "turbo": (diffusers.EulerAncestralDiscreteScheduler.from_config(base, timestep_spacing="trailing"), steps, {}),
        "lightning": (diffusers.EulerDiscreteScheduler.from_config(base, timestep_spacing="trailing"), steps, {}),
        "lightning-1step": (diffusers.EulerDiscreteScheduler.from_config(base, timestep_spacing="trailing",
                                                                         prediction_type="sample"), steps, {}),
        "lcm": (diffusers.LCMScheduler.from_config(base), steps, {}),
        "hyper": (diffusers.DDIMScheduler.from_config(base, timestep_spacing="trailing"), steps, {}),
        "hyper-1step": (diffusers.LCMScheduler.from_config(base), {"timesteps": [800]}, {}),
        "hyper-tcd": (diffusers.TCDScheduler.from_config(base), steps, {"eta": 1.0}),
        "dmd2": (diffusers.LCMScheduler.from_config(base), {"timesteps": [999, 749, 499, 249]}, {}),
        "dmd2-1step": (diffusers.LCMScheduler.from_config(base), {"timesteps": [399]}, {}),
    }
    return cards[preset.name]


@pytest.mark.parametrize("name", FEW_STEP_PRESETS)
def test_each_preset_runs_as_its_model_card_configures_diffusers(name):
    preset = few_step_preset(name)
    table = build_table(preset.sampler_config(SDXL), preset.steps_for(None), timesteps=preset.timesteps)
    sched, set_kwargs, step_kwargs = _card(preset)
    sched.set_timesteps(**set_kwargs)
    z0, outputs, noises = arrays(7, table.num_steps)
    want_ts, want_inputs, want = run_scheduler(sched, outputs, noises, z0=z0, step_kwargs=lambda i: step_kwargs)
    np.testing.assert_allclose(table.timesteps, want_ts, rtol=1e-6)
    assert_same_run(*run_table(table, outputs, noises, z0=z0), want_inputs, want)


@pytest.mark.parametrize("name, steps", [("lightning", 8), ("turbo", 4), ("lcm", 2), ("hyper-tcd", 8)])
def test_presets_without_their_own_timesteps_take_other_step_counts(name, steps):
    preset = few_step_preset(name)
    assert build_table(preset.sampler_config(SDXL), preset.steps_for(steps), timesteps=preset.timesteps).num_steps == steps


def test_preset_names_and_fixed_step_counts_are_refused_clearly():
    assert few_step_preset("DMD2_1step").name == "dmd2-1step"
    with pytest.raises(SamplerError, match=r"unknown scheduler config 'flash'; choose one of turbo, lightning, "):
        few_step_preset("flash")
    with pytest.raises(SamplerError, match=r"'dmd2' runs its own 4 timesteps \[999, 749, 499, 249\]; it cannot run 6"):
        few_step_preset("dmd2").steps_for(6)


def test_a_preset_overrides_keys_the_model_config_left_at_their_defaults():
    # diffusers' from_config(config, timestep_spacing="trailing") uses the keyword even where the saved config lists
    # the key in _use_default_values
    config = dict(SDXL, _use_default_values=["timestep_spacing", "beta_schedule"])
    cfg = few_step_preset("lightning").sampler_config(config)
    assert (cfg.timestep_spacing, cfg.beta_schedule) == ("trailing", "linear")
