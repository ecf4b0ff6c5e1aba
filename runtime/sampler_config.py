"""What a sampler needs from a model's diffusers scheduler config: the sampler names, the diffusers class each
reproduces with that class's defaults, and the validated ``SamplerConfig`` (every config key is read, ignored
because it cannot change the table, or refused by name; see samplers.py for the tables themselves)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sdtrt.errors import UsageError

STATE_DEPTH = 4
OUTPUT_DEPTH = 5

SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "unipc", "tcd")

# The diffusers scheduler each sampler reproduces: class name and config overrides (parity tests and the
# benchmark baseline use it; the runtime only reads the class name of a model's own scheduler).
DIFFUSERS_EQUIVALENT: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
# diffusers scheduler class -> our sampler name (a model's default sampler; DPM-Solver++ keeps its config's own
# Karras setting, as diffusers would)
SCHEDULER_CLASSES = {cls: name for name, (cls, extra) in DIFFUSERS_EQUIVALENT.items() if name != "dpmpp_2m_karras"}

_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
               prediction_type="epsilon", steps_offset=0)
_THRESHOLD = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
_SIGMAS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_FLOW = dict(use_flow_sigmas=False, flow_shift=1.0, use_dynamic_shifting=False, time_shift_type="exponential")
# Each diffusers scheduler class's __init__ defaults (tests compare them with the installed diffusers). A key a
# model's config does not set takes its class default, as diffusers' ``from_config`` does; so does every key of a
# sampler picked on another class's config (a PNDM config without clip_sample means clip_sample=True to DDIM).
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": dict(_COMMON, **_THRESHOLD, clip_sample=True, set_alpha_to_one=True, clip_sample_range=1.0,
                          timestep_spacing="leading", rescale_betas_zero_snr=False),
    "PNDMScheduler": dict(_COMMON, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading"),
    "LMSDiscreteScheduler": dict(_COMMON, **_SIGMAS, timestep_spacing="linspace"),
    "EulerDiscreteScheduler": dict(_COMMON, **_SIGMAS, interpolation_type="linear", sigma_min=None, sigma_max=None,
                                   timestep_spacing="linspace", timestep_type="discrete", rescale_betas_zero_snr=False,
                                   final_sigmas_type="zero"),
    "EulerAncestralDiscreteScheduler": dict(_COMMON, timestep_spacing="linspace", rescale_betas_zero_snr=False),
    "DPMSolverMultistepScheduler": dict(_COMMON, **_THRESHOLD, **_SIGMAS, **_FLOW, solver_order=2,
                                        algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                                        euler_at_final=False, use_lu_lambdas=False, final_sigmas_type="zero",
                                        lambda_min_clipped=-math.inf, variance_type=None, timestep_spacing="linspace",
                                        rescale_betas_zero_snr=False),
    "LCMScheduler": dict(_COMMON, **_THRESHOLD, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         original_inference_steps=50, clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True,
                         timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False),
    "UniPCMultistepScheduler": dict(_COMMON, **_THRESHOLD, **_SIGMAS, **_FLOW, solver_order=2, predict_x0=True,
                                    solver_type="bh2", lower_order_final=True, disable_corrector=[], solver_p=None,
                                    timestep_spacing="linspace", final_sigmas_type="zero", rescale_betas_zero_snr=False,
                                    sigma_min=None, sigma_max=None, shift_terminal=None),
    "TCDScheduler": dict(_COMMON, **_THRESHOLD, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         original_inference_steps=50, clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True,
                         timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False),
}
# Keys read into SamplerConfig (validated there); every other key is inert for the table (_INERT) or must keep the
# one value a linear table expresses (_FIXED): anything else is refused, never ignored.
_MODELED = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "timestep_spacing", "steps_offset", "set_alpha_to_one", "use_karras_sigmas", "use_exponential_sigmas",
            "solver_order", "solver_type",
            "lower_order_final", "euler_at_final", "disable_corrector", "original_inference_steps", "timestep_scaling"}
_INERT = {"dynamic_thresholding_ratio", "sample_max_value", "clip_sample_range", "flow_shift", "time_shift_type"}
# LCM's and TCD's own grid ignores them (TCD's last step goes to timestep 0, so its final alpha is never read)
_INERT_FOR = {"LCMScheduler": {"set_alpha_to_one", "steps_offset", "timestep_spacing"},
              "TCDScheduler": {"set_alpha_to_one", "steps_offset", "timestep_spacing"}}
_FIXED: dict[str, tuple[Any, str]] = {
    "clip_sample": (False, "it clamps the predicted sample, which no linear update can do (SD models set it false)"),
    "thresholding": (False, "dynamic thresholding is not linear"),
    "rescale_betas_zero_snr": (False, "zero-terminal-SNR rescaling is not implemented"),
    "skip_prk_steps": (True, "PNDM's Runge-Kutta warm-up is not implemented; PLMS (skip_prk_steps=true) is"),
    "use_beta_sigmas": (False, "beta sigmas are not implemented"),
    "use_lu_lambdas": (False, "Lu lambdas are not implemented"),
    "use_flow_sigmas": (False, "flow-matching sigmas are not implemented"),
    "use_dynamic_shifting": (False, "dynamic shifting is not implemented"),
    "interpolation_type": ("linear", "only linear sigma interpolation is implemented"),
    "timestep_type": ("discrete", "continuous timesteps are not implemented"),
    "sigma_min": (None, "custom sigma ranges are not implemented"),
    "sigma_max": (None, "custom sigma ranges are not implemented"),
    "shift_terminal": (None, "terminal shifting is not implemented"),
    "final_sigmas_type": ("zero", "only a final sigma of zero is implemented"),
    "algorithm_type": ("dpmsolver++", "only the deterministic DPM-Solver++ is implemented"),
    "variance_type": (None, "learned variances are not implemented"),
    "lambda_min_clipped": (-math.inf, "lambda clipping is not implemented"),
    "predict_x0": (True, "only UniPC's data prediction is implemented"),
    "solver_p": (None, "a custom UniPC solver is not implemented"),
}


class SamplerError(UsageError):
    """Unknown sampler, or a scheduler config a linear table cannot express."""


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # "sample": the model predicts x0 (SDXL-Lightning 1-step)
# The samplers whose diffusers class refuses "sample" in step() (PNDMScheduler: ValueError;
# EulerAncestralDiscreteScheduler: NotImplementedError); every other one takes it
NO_SAMPLE_PREDICTION = ("pndm", "euler_a")
# The samplers whose diffusers class takes set_timesteps(timesteps=[...]) (diffusers 0.42; UniPC takes sigmas only)
CUSTOM_TIMESTEPS = ("euler", "dpmpp_2m", "lcm", "tcd")
# eta when none is asked for: DDIM's deterministic 0 (the pipelines' default), TCD's gamma 0.3 (TCDScheduler.step's
# default and the TCD model card's)
DEFAULT_ETA = {"ddim": 0.0, "tcd": 0.3}


# Noise schedules a sampler can be asked for by a suffix of its name ("euler_karras", "unipc_exponential",
# "ddim_trailing"): the diffusers config setting each one is, on the classes that have that setting (the combinations
# diffusers supports; A1111's schedule types map onto them in infotext.A1111_SCHEDULERS).
SCHEDULES: dict[str, dict[str, Any]] = {
    "karras": {"use_karras_sigmas": True, "use_exponential_sigmas": False},  # Karras et al. 2022, rho 7
    "exponential": {"use_exponential_sigmas": True, "use_karras_sigmas": False},  # log-uniform sigmas
    "trailing": {"timestep_spacing": "trailing"},  # Lin et al. 2023, table 2 (A1111's "SGM Uniform", "Simple")
    "linspace": {"timestep_spacing": "linspace"},  # A1111's "Normal", "Uniform"
    "leading": {"timestep_spacing": "leading"},  # A1111's "DDIM"
}


def split_schedule(name: str) -> tuple[str, str | None]:
    """(sampler, schedule) of a sampler name with an optional schedule suffix; ``dpmpp_2m_karras`` is a sampler of
    its own (the model's DPM-Solver++ config names it). Unknown names come back whole (refused by the caller)."""
    if name in SAMPLERS:
        return name, None
    for schedule in SCHEDULES:
        base = name[:-len(schedule) - 1]
        if name.endswith("_" + schedule) and base in SAMPLERS:
            return base, schedule
    return name, None


def schedules_for(name: str) -> tuple[str, ...]:
    """The schedules sampler ``name`` takes: those whose settings its diffusers class has (and reads)."""
    class_name = DIFFUSERS_EQUIVALENT[name][0]
    defaults, inert = CLASS_DEFAULTS[class_name], _INERT_FOR.get(class_name, set())
    return tuple(s for s, keys in SCHEDULES.items() if all(k in defaults and k not in inert for k in keys))


# every name a sampler can be asked for by: the samplers, and each with each schedule it takes
SAMPLER_NAMES = SAMPLERS + tuple(f"{n}_{s}" for n in SAMPLERS if n != "dpmpp_2m_karras" for s in schedules_for(n)
                                 if f"{n}_{s}" not in SAMPLERS)


def diffusers_config(config: dict[str, Any], class_name: str) -> dict[str, Any]:
    """What ``getattr(diffusers, class_name).from_config(config)`` runs with: every __init__ key of the class,
    from the config where it sets it (and does not list it in ``_use_default_values``), else the class default."""
    defaults = CLASS_DEFAULTS[class_name]
    unset = set(config.get("_use_default_values") or ())
    return {k: (config[k] if k in config and k not in unset else v) for k, v in defaults.items()}


def _check(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise SamplerError(f"scheduler config: {key} must be {what}, got {value!r}")


def _number(key: str, value: Any, lo: float, hi: float, integer: bool = False):
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and lo <= value <= hi
    _check(ok, key, value, f"{'an integer' if integer else 'a finite number'} in [{lo:g}, {hi:g}]")
    return value


def _choice(key: str, value: Any, choices: tuple) -> Any:
    _check(isinstance(value, str) and value in choices, key, value, "one of " + ", ".join(map(repr, choices)))
    return value


def _flag(key: str, value: Any) -> bool:
    _check(isinstance(value, bool), key, value, "true or false")
    return value


@dataclass(frozen=True)
class SamplerConfig:
    """What a sampler needs from the model's scheduler config (diffusers' keys and defaults)."""

    name: str = "pndm"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    schedule: str | None = None  # the schedule asked for by name (SCHEDULES), None: the config's own
    eta: float | None = None  # DDIM: 0 deterministic, 1 DDPM-like; TCD: gamma; None: DEFAULT_ETA
    solver_type: str = "midpoint"  # DPM-Solver++: "midpoint" or "heun"
    lower_order_final: bool = True
    euler_at_final: bool = False
    solver_order: int = 2  # UniPC
    disable_corrector: tuple[int, ...] = ()  # UniPC: steps whose corrector is skipped
    original_inference_steps: int = 50  # LCM: the distillation's step grid
    timestep_scaling: float = 10.0  # LCM: boundary-condition scalings

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any], name: str | None = None, **overrides) -> "SamplerConfig":
        """Read a diffusers ``scheduler_config.json`` as diffusers reads it for the sampler asked (that class's
        defaults for what the config does not set); ``name`` picks another sampler on the same schedule.
        ``overrides``: SamplerConfig fields (e.g. ``eta``)."""
        if not isinstance(config, dict):
            raise SamplerError("scheduler config must be a JSON object")
        if name is None:
            class_name = config.get("_class_name", "")
            name = SCHEDULER_CLASSES.get(class_name) if isinstance(class_name, str) else None
            if name is None:
                raise SamplerError(f"the model's scheduler {class_name!r} has no built-in sampler; pick one with "
                                   f"--scheduler ({', '.join(SAMPLERS)})")
            if name == "dpmpp_2m" and config.get("use_karras_sigmas") is True:
                name = "dpmpp_2m_karras"  # the model's own DPM-Solver++, Karras or not as its config says
        name, schedule = split_schedule(name) if isinstance(name, str) else (name, None)
        if name not in SAMPLERS:
            raise SamplerError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}, optionally with a "
                               f"schedule suffix (_{', _'.join(SCHEDULES)}), e.g. euler_karras")
        class_name, named = DIFFUSERS_EQUIVALENT[name]
        if schedule is not None and schedule not in schedules_for(name):
            raise SamplerError(f"{name} has no {schedule} schedule (diffusers' {class_name} has no such setting); it "
                               f"takes: {', '.join(schedules_for(name)) or 'only its own schedule'}")
        eff = {**diffusers_config(config, class_name), **named, **(SCHEDULES[schedule] if schedule else {})}
        inert = _INERT | _INERT_FOR.get(class_name, set())
        for key, value in eff.items():
            if key in _FIXED and key not in inert and value != _FIXED[key][0]:
                raise SamplerError(f"{name} ({class_name}) with {key}={value!r} is not supported: {_FIXED[key][1]}")
        T = _number("num_train_timesteps", eff["num_train_timesteps"], 2, 100_000, integer=True)
        kwargs: dict[str, Any] = dict(
            name=name, num_train_timesteps=T,
            beta_start=float(_number("beta_start", eff["beta_start"], 1e-8, 0.999)),
            beta_end=float(_number("beta_end", eff["beta_end"], 1e-8, 0.999)),
            beta_schedule=_choice("beta_schedule", eff["beta_schedule"], ("linear", "scaled_linear", "squaredcos_cap_v2")),
            prediction_type=_choice("prediction_type", eff["prediction_type"], PREDICTION_TYPES),
        )
        if kwargs["prediction_type"] == "sample" and name in NO_SAMPLE_PREDICTION:
            raise SamplerError(f"{name} ({class_name}) with prediction_type='sample' is not supported: diffusers' "
                               f"{class_name} takes only 'epsilon' or 'v_prediction' (samplers that take x0 "
                               f"prediction: {', '.join(n for n in SAMPLERS if n not in NO_SAMPLE_PREDICTION)})")
        betas = eff["trained_betas"]
        if betas is not None:
            if not (isinstance(betas, (list, tuple)) and len(betas) == T):
                got = f"a list of {len(betas)} numbers" if isinstance(betas, (list, tuple)) else repr(betas)
                raise SamplerError(f"scheduler config: trained_betas must be a list of num_train_timesteps = {T} "
                                   f"numbers, got {got}")
            kwargs["trained_betas"] = tuple(float(_number("trained_betas[i]", b, 1e-12, 0.999999)) for b in betas)
        if "timestep_spacing" not in inert:
            kwargs["timestep_spacing"] = _choice("timestep_spacing", eff["timestep_spacing"],
                                                 ("leading", "trailing", "linspace"))
            kwargs["steps_offset"] = _number("steps_offset", eff["steps_offset"], 0, T - 1, integer=True)
        if "set_alpha_to_one" in eff and "set_alpha_to_one" not in inert:
            kwargs["set_alpha_to_one"] = _flag("set_alpha_to_one", eff["set_alpha_to_one"])
        for key in ("use_karras_sigmas", "use_exponential_sigmas"):
            if key in eff:
                kwargs[key] = _flag(key, eff[key])
        if kwargs.get("use_karras_sigmas") and kwargs.get("use_exponential_sigmas"):
            raise SamplerError("scheduler config: use_karras_sigmas and use_exponential_sigmas are both set; diffusers "
                               "takes only one")
        kwargs["schedule"] = schedule
        if class_name == "DPMSolverMultistepScheduler":
            _number("solver_order", eff["solver_order"], 2, 2, integer=True)  # dpmpp_2m: second-order multistep only
            kwargs["solver_type"] = _choice("solver_type", eff["solver_type"], ("midpoint", "heun"))
            kwargs["lower_order_final"] = _flag("lower_order_final", eff["lower_order_final"])
            kwargs["euler_at_final"] = _flag("euler_at_final", eff["euler_at_final"])
        if class_name == "UniPCMultistepScheduler":
            kwargs["solver_order"] = _number("solver_order", eff["solver_order"], 1, 3, integer=True)
            _choice("solver_type", eff["solver_type"], ("bh2",))
            kwargs["lower_order_final"] = _flag("lower_order_final", eff["lower_order_final"])
            corrector = eff["disable_corrector"]
            _check(isinstance(corrector, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                 for i in corrector),
                   "disable_corrector", corrector, "a list of step indices")
            kwargs["disable_corrector"] = tuple(corrector)
            if not kwargs["lower_order_final"] and kwargs["solver_order"] > 1:
                raise SamplerError("unipc with lower_order_final=False takes a higher-order step into sigma 0 and "
                                   "diverges (diffusers returns inf); set lower_order_final=True")
        if class_name in ("LCMScheduler", "TCDScheduler"):
            kwargs["original_inference_steps"] = _number("original_inference_steps", eff["original_inference_steps"],
                                                         1, T, integer=True)
            kwargs["timestep_scaling"] = float(_number("timestep_scaling", eff["timestep_scaling"], 1e-6, 1e6))
        kwargs.update(overrides)
        cfg = cls(**kwargs)
        cfg.eta_value()  # a bad eta is refused here, not at the first table
        return cfg

    def eta_value(self) -> float:
        """The eta the table uses: the one asked for, else the sampler's default (DEFAULT_ETA)."""
        eta = DEFAULT_ETA.get(self.name, 0.0) if self.eta is None else self.eta
        hi = 1.0 if self.name == "tcd" else math.inf  # TCDScheduler.step asserts 0 <= eta <= 1
        ok = isinstance(eta, (int, float)) and not isinstance(eta, bool) and math.isfinite(eta) and 0 <= eta <= hi
        _check(ok, "eta", eta, f"a number in [0, {hi:g}]")
        return float(eta)
