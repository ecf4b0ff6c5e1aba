"""Samplers as tables of per-step coefficients, computed once in float64 NumPy.

Every sampler here is a linear multistep method, so each step is one linear update

    s_(i+1) = sum_j a[i, j] * s_(i-j) + sum_j b[i, j] * m_(i-j) + c[i] * z_i

of the loop state s (the U-Net's input latents), the current and earlier model outputs m (the U-Net's
guided prediction: epsilon or v) and fresh noise z. The table is data; ``step`` is the one shared
update (k-diffusion style: no hidden step counter, no scheduler object). Because the update is a
fixed linear combination, a GPU backend can run the whole loop without host synchronisation.

Two choices make the table general:
- history of the state as well as of m: DPM-Solver++ keeps data predictions D = p*x + q*m, LMS with
  v-prediction keeps derivatives that involve x, and PLMS's second step restarts from the previous
  sample, so a_(i,j>0) is needed, not only b;
- the input scaling c_in (Euler/LMS: x / sqrt(sigma^2 + 1)) is folded into the coefficients, so the
  state *is* the U-Net input and the loop never rescales: s_i = c_in[i] * x_i, c_in[last] = 1.

Correctness is parity with diffusers' scheduler classes (tests only). The training noise schedule is
computed in float32 exactly as diffusers and the LDM code define it; everything derived from it is
float64.

References: DDIM (Song et al. 2021, arXiv:2010.02502); PNDM/PLMS (Liu et al. 2022, arXiv:2202.09778);
LMS, Euler, Euler ancestral and Karras sigmas (Karras et al. 2022, arXiv:2206.00364; k-diffusion);
DPM-Solver++ 2M (Lu et al. 2022, arXiv:2211.01095); LCM (Luo et al. 2023, arXiv:2310.04378);
UniPC (Zhao et al. 2023, arXiv:2302.04867).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from sdtrt.errors import UsageError

# Deepest history any table here uses (LMS: 4 states, PLMS: 5 model outputs); the sampler-update
# graph holds this many of each.
STATE_DEPTH = 4
OUTPUT_DEPTH = 5

SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "unipc")

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
}
# Keys read into SamplerConfig (validated there); every other key is inert for the table (_INERT) or must keep the
# one value a linear table expresses (_FIXED): anything else is refused, never ignored.
_MODELED = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "timestep_spacing", "steps_offset", "set_alpha_to_one", "use_karras_sigmas", "use_exponential_sigmas",
            "solver_order", "solver_type",
            "lower_order_final", "euler_at_final", "disable_corrector", "original_inference_steps", "timestep_scaling"}
_INERT = {"dynamic_thresholding_ratio", "sample_max_value", "clip_sample_range", "flow_shift", "time_shift_type"}
_INERT_FOR = {"LCMScheduler": {"set_alpha_to_one", "steps_offset", "timestep_spacing"}}  # LCM's own grid ignores them
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
    eta: float = 0.0  # DDIM: 0 deterministic, 1 DDPM-like
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
            prediction_type=_choice("prediction_type", eff["prediction_type"], ("epsilon", "v_prediction")),
        )
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
        if class_name == "LCMScheduler":
            kwargs["original_inference_steps"] = _number("original_inference_steps", eff["original_inference_steps"],
                                                         1, T, integer=True)
            kwargs["timestep_scaling"] = float(_number("timestep_scaling", eff["timestep_scaling"], 1e-6, 1e6))
        kwargs.update(overrides)
        return cls(**kwargs)




@dataclass(frozen=True, eq=False)
class SamplerTable:
    """Per-step coefficients. Row i maps history (s_i, s_(i-1), ...), (m_i, m_(i-1), ...), z_i to s_(i+1)."""

    name: str
    timesteps: np.ndarray  # (S,) float64: the timestep fed to the U-Net at step i
    state_coef: np.ndarray  # (S, Ks) a[i, j]
    model_coef: np.ndarray  # (S, Km) b[i, j]
    noise_coef: np.ndarray  # (S,) c[i]
    init_scale: float  # s_0 = init_image_scale * x0 + init_scale * z_0 (z_0 the initial noise, or the latents given)
    init_image_scale: float = 0.0  # img2img: the image latents' share of the first state (diffusers' add_noise)
    # Inpainting with an ordinary U-Net (diffusers' 4-channel rule): after row i the known part is the image latents
    # re-noised to the next state's level, s' = m * s' + (1 - m) * (blend_image[i] * x0 + blend_noise[i] * z_0)
    blend_image: np.ndarray | None = None  # (S,)
    blend_noise: np.ndarray | None = None  # (S,)
    start: int = 0  # rows of the full schedule skipped (img2img and inpainting with strength < 1)
    # ControlNets: the conditioning scale of ControlNet j at step i (0 outside its start/end range)
    control_scale: np.ndarray | None = None  # (S, N)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def stochastic(self) -> bool:
        return bool(np.any(self.noise_coef != 0))


def with_control(table: SamplerTable, settings: list[tuple[float, float, float]]) -> SamplerTable:
    """``table`` with the per-step scales of ControlNets given as (scale, start, end): step i of S runs ControlNet j
    at scale_j unless i / S < start_j or (i + 1) / S > end_j, where it runs at 0 (diffusers'
    ``controlnet_keep``, StableDiffusionControlNetPipeline; S counts the U-Net calls actually made, after img2img's
    strength)."""
    i = np.arange(table.num_steps, dtype=np.float64)[:, None]  # (S, 1)
    n = float(table.num_steps)
    scale, start, end = (np.array([s[k] for s in settings], np.float64)[None, :] for k in range(3))  # (1, N)
    keep = ~((i / n < start) | ((i + 1) / n > end))  # (S, N)
    return replace(table, control_scale=keep * scale)


COEFS = STATE_DEPTH + OUTPUT_DEPTH + 3  # [a_0..a_3, b_0..b_4, c, blend_image, blend_noise]


def coefficient_row(table: SamplerTable, i: int) -> np.ndarray:
    """Row i as the sampler-update graph's ``coefs`` input: [a_0..a_3, b_0..b_4, c, p, q], float32, zero-padded."""
    row = np.zeros(COEFS, np.float32)
    ks, km = table.state_coef.shape[1], table.model_coef.shape[1]
    row[:ks] = table.state_coef[i]
    row[STATE_DEPTH:STATE_DEPTH + km] = table.model_coef[i]
    row[STATE_DEPTH + OUTPUT_DEPTH] = table.noise_coef[i]
    if table.blend_image is not None:
        row[-2], row[-1] = table.blend_image[i], table.blend_noise[i]
    return row


@dataclass
class Blend:
    """What 4-channel inpainting mixes in after every step: the latent mask (B, 1, h, w) in {0, 1} (1: repaint), its
    complement, the image latents x0 and the initial noise z_0 (B, C, h, w), and a scratch buffer of that shape."""

    mask: np.ndarray
    keep: np.ndarray  # 1 - mask, computed once per generation
    image: np.ndarray
    noise: np.ndarray
    scratch: np.ndarray


def step(table: SamplerTable, i: int, states: list[np.ndarray], outputs: list[np.ndarray],
         noise: np.ndarray | None = None, out: np.ndarray | None = None,
         scratch: np.ndarray | None = None, blend: Blend | None = None) -> np.ndarray:
    """The one shared update. ``states[j]`` is s_(i-j), ``outputs[j]`` is m_(i-j); history the table does not
    reach is ignored (its coefficient is 0 by construction). With ``blend`` (4-channel inpainting) the known part
    is put back as diffusers' StableDiffusionInpaintPipeline does after every step:
    s' = (1 - m) * (p_i x0 + q_i z_0) + m * s'. With ``out`` and ``scratch`` it allocates nothing."""
    acc = out if out is not None else np.empty_like(states[0])
    tmp = scratch if scratch is not None else np.empty_like(acc)
    np.multiply(states[0], float(table.state_coef[i, 0]), out=acc)
    for coefs, history, start in ((table.state_coef[i], states, 1), (table.model_coef[i], outputs, 0)):
        for j in range(start, min(len(history), len(coefs))):
            if coefs[j] != 0.0:
                np.multiply(history[j], float(coefs[j]), out=tmp)
                acc += tmp
    if table.noise_coef[i] != 0.0:
        np.multiply(noise, float(table.noise_coef[i]), out=tmp)
        acc += tmp
    if blend is not None:
        np.multiply(blend.image, float(table.blend_image[i]), out=tmp)
        np.multiply(blend.noise, float(table.blend_noise[i]), out=blend.scratch)
        tmp += blend.scratch  # the known part at the next state's noise level
        tmp *= blend.keep
        acc *= blend.mask
        acc += tmp
    return acc


# ---- training schedule (float32, as diffusers computes it) ----------------------------------------------

def alphas_cumprod(cfg: SamplerConfig) -> np.ndarray:
    """float64 view of the float32 cumulative product of (1 - beta) over the training steps."""
    T = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, dtype=np.float32)
    elif cfg.beta_schedule == "linear":
        betas = np.linspace(cfg.beta_start, cfg.beta_end, T, dtype=np.float64).astype(np.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=np.float64).astype(np.float32) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=np.float32)
    else:
        raise SamplerError(f"beta_schedule {cfg.beta_schedule!r} is not supported")
    # torch's CPU cumprod accumulates float32 in double; rounding once at the end matches it.
    return np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32).astype(np.float64)


def _train_sigmas(acp: np.ndarray) -> np.ndarray:
    a = acp.astype(np.float32)
    return (((1 - a) / a) ** 0.5).astype(np.float64)


def _spaced(cfg: SamplerConfig, n: int, integer: bool) -> np.ndarray:
    """Descending timesteps for 'linspace' / 'leading' / 'trailing' spacing (Lin et al. 2023, table 2)."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, n)[::-1]
        return t.round() if integer else t.astype(np.float32).astype(np.float64)
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + cfg.steps_offset
    return np.round(np.arange(T, 0, -T / n)) - 1.0


def _karras(sigmas_desc: np.ndarray, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    lo, hi = float(sigmas_desc[-1]), float(sigmas_desc[0])
    ramp = np.linspace(0, 1, n)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _exponential(sigmas_desc: np.ndarray, n: int) -> np.ndarray:
    """Sigmas uniform in log sigma between the schedule's ends (diffusers' _convert_to_exponential)."""
    return np.exp(np.linspace(math.log(float(sigmas_desc[0])), math.log(float(sigmas_desc[-1])), n))


def _sigma_kind(cfg: SamplerConfig):
    """The sigma re-spacing the config asks for (Karras or exponential), or None."""
    return _karras if cfg.use_karras_sigmas else _exponential if cfg.use_exponential_sigmas else None


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, by linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _x0_coefs(pred: str, sigma_or_acp: float, space: str) -> tuple[float, float]:
    """(p, q) with x0 = p*x + q*m for the model output m."""
    if space == "sigma":  # x = x0 + sigma * eps  (Karras parameterisation)
        s = sigma_or_acp
        if pred == "epsilon":
            return 1.0, -s
        return 1.0 / (s * s + 1), -s / math.sqrt(s * s + 1)
    a = sigma_or_acp  # x = sqrt(a) x0 + sqrt(1 - a) eps  (DDPM parameterisation)
    if pred == "epsilon":
        return 1 / math.sqrt(a), -math.sqrt(1 - a) / math.sqrt(a)
    return math.sqrt(a), -math.sqrt(1 - a)


# ---- the samplers: each returns raw coefficients in its own space plus c_in ------------------------------

@dataclass
class _Raw:
    """The rows that run (from ``start`` on), in the sampler's own space x; the U-Net input is c_in * x."""

    timesteps: np.ndarray
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    c_in: np.ndarray  # (S,)
    init_noise_sigma: float
    levels: np.ndarray  # (S + 1, 2): x_i = alpha_i x0 + sigma_i z at state i (diffusers' add_noise); last (1, 0)
    extras: dict[str, Any] = field(default_factory=dict)


def _ddpm_levels(acp: np.ndarray, ts) -> np.ndarray:
    """(sqrt(a_t), sqrt(1 - a_t)) per timestep, then the clean end (1, 0): add_noise of DDIM/PNDM/LCM."""
    a = np.array([acp[int(t)] for t in ts])
    return np.concatenate([np.stack([np.sqrt(a), np.sqrt(1 - a)], axis=1), [[1.0, 0.0]]])


def _sigma_levels(sig: np.ndarray) -> np.ndarray:
    """(1, sigma) per step, x = x0 + sigma z (Euler/LMS add_noise); sig ends with its final 0."""
    return np.stack([np.ones_like(sig), sig], axis=1)


def _vp_levels(sig: np.ndarray) -> np.ndarray:
    """(alpha_t, sigma_t) from Karras sigmas (DPM-Solver/UniPC add_noise); sig ends with its final 0."""
    alpha = 1 / np.sqrt(sig ** 2 + 1)
    return np.stack([alpha, sig * alpha], axis=1)


def _alloc(S: int, Ks: int, Km: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros((S, Ks)), np.zeros((S, Km)), np.zeros(S)


def _ddim(cfg: SamplerConfig, n: int, start: int = 0) -> _Raw:
    acp = alphas_cumprod(cfg)
    final = 1.0 if cfg.set_alpha_to_one else acp[0]
    ts = _spaced(cfg, n, integer=True)[start:]
    A, B, C = _alloc(len(ts), 1, 1)
    ratio = cfg.num_train_timesteps // n
    for i, t in enumerate(ts.astype(int)):
        prev = t - ratio
        a_t, a_p = acp[t], (acp[prev] if prev >= 0 else final)
        px, pm = _x0_coefs(cfg.prediction_type, a_t, "ddpm")
        # eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t)
        ex, em = (1 - math.sqrt(a_t) * px) / math.sqrt(1 - a_t), -math.sqrt(a_t) * pm / math.sqrt(1 - a_t)
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        std = cfg.eta * math.sqrt(var)
        d = math.sqrt(1 - a_p - std * std)
        A[i, 0] = math.sqrt(a_p) * px + d * ex
        B[i, 0] = math.sqrt(a_p) * pm + d * em
        C[i] = std
    return _Raw(ts, A, B, C, np.ones(len(ts)), 1.0, _ddpm_levels(acp, ts))


def _pndm_timesteps(cfg: SamplerConfig, n: int) -> np.ndarray:
    """PLMS's timesteps: the second-to-last base timestep repeats (its warm-up evaluates it twice)."""
    T, r = cfg.num_train_timesteps, cfg.num_train_timesteps // n
    if cfg.timestep_spacing == "linspace":
        base = np.linspace(0, T - 1, n).round()
    elif cfg.timestep_spacing == "leading":
        base = (np.arange(0, n) * r).round() + cfg.steps_offset
    else:
        base = np.round(np.arange(T, 0, -T / n))[::-1] - 1
    return np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int64)


def _pndm(cfg: SamplerConfig, n: int, start: int = 0) -> _Raw:
    """PLMS (skip_prk_steps): the first two evaluations form a 2nd-order warm-up from the same sample. From
    ``start`` (img2img) diffusers slices its timestep list and its step counter starts again at 0, warm-up too."""
    acp = alphas_cumprod(cfg)
    final = 1.0 if cfg.set_alpha_to_one else acp[0]
    r = cfg.num_train_timesteps // n
    ts = _pndm_timesteps(cfg, n)[start:]
    S = len(ts)
    A, B, C = _alloc(S, 2, 5)
    plms = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for i in range(S):
        if i == 1:  # evaluation at the next timestep, averaged with the first, applied to s_0 again
            t, prev = int(ts[i]) + r, int(ts[i])
            lags, weights, sample_lag = [0, 1], [0.5, 0.5], 1
        else:
            t, prev = int(ts[i]), int(ts[i]) - r
            history = ([0] + list(range(2, i + 1)))[-4:]  # model outputs PLMS keeps (m_1 is never stored)
            lags = [i - k for k in reversed(history)]
            weights, sample_lag = plms[len(history)], 0
        a_t, a_p = acp[t], (acp[prev] if prev >= 0 else final)
        coeff = math.sqrt(a_p / a_t)
        k = (a_p - a_t) / (a_t * math.sqrt(1 - a_p) + math.sqrt(a_t * (1 - a_t) * a_p))
        # x' = coeff * x - k * eps, with eps = m (epsilon) or sqrt(a_t) m + sqrt(1 - a_t) x (v)
        if cfg.prediction_type == "epsilon":
            A[i, sample_lag] = coeff
            scale = k
        else:
            A[i, sample_lag] = coeff - k * math.sqrt(1 - a_t)
            scale = k * math.sqrt(a_t)
        for lag, w in zip(lags, weights):
            B[i, lag] -= scale * w
    return _Raw(ts.astype(np.float64), A, B, C, np.ones(S), 1.0, _ddpm_levels(acp, ts))


def _sigma_schedule(cfg: SamplerConfig, n: int, respace: bool) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps and sigmas (with the final 0) of the Euler/LMS family; ``respace``: Karras or exponential sigmas
    between the spaced schedule's ends, as the config says."""
    train = _train_sigmas(alphas_cumprod(cfg))
    ts = _spaced(cfg, n, integer=False).astype(np.float32).astype(np.float64)
    sigmas = np.interp(ts, np.arange(len(train)), train)
    kind = _sigma_kind(cfg) if respace else None
    if kind is not None:
        sigmas = kind(sigmas, n)
        ts = _sigma_to_t(sigmas, np.log(train.astype(np.float32)).astype(np.float64))
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)
    return ts.astype(np.float32).astype(np.float64), sigmas


def _init_sigma(cfg: SamplerConfig, sigmas: np.ndarray) -> float:
    top = float(sigmas.max())
    return top if cfg.timestep_spacing in ("linspace", "trailing") else math.sqrt(top * top + 1)


def _euler(cfg: SamplerConfig, n: int, start: int = 0, ancestral: bool = False) -> _Raw:
    ts, sig = _sigma_schedule(cfg, n, respace=not ancestral)
    A, B, C = _alloc(n, 1, 1)
    for i in range(start, n):
        s, s_next = sig[i], sig[i + 1]
        px, pm = _x0_coefs(cfg.prediction_type, s, "sigma")
        if ancestral:  # Karras et al. 2022 / k-diffusion sample_euler_ancestral, eta = 1
            up = math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
            down = math.sqrt(s_next ** 2 - up ** 2)
            dt, C[i] = down - s, up
        else:
            dt = s_next - s
        # d = (x - x0) / s ; x' = x + d * dt
        A[i, 0] = 1 + (1 - px) * dt / s
        B[i, 0] = -pm * dt / s
    return _Raw(ts[start:], A[start:], B[start:], C[start:], 1 / np.sqrt(sig[start:n] ** 2 + 1), _init_sigma(cfg, sig),
                _sigma_levels(sig[start:]))


def _lms_coefficient(sig: np.ndarray, order: int, i: int, k: int) -> float:
    """Integral over [sigma_i, sigma_(i+1)] of the Lagrange basis polynomial of node sigma_(i-k)."""
    poly = np.polynomial.Polynomial([1.0])
    for l in range(order):
        if l != k:
            poly *= np.polynomial.Polynomial([-sig[i - l], 1.0]) / (sig[i - k] - sig[i - l])
    antiderivative = poly.integ()
    return float(antiderivative(sig[i + 1]) - antiderivative(sig[i]))


def _lms(cfg: SamplerConfig, n: int, start: int = 0, order: int = 4) -> _Raw:
    ts, sig = _sigma_schedule(cfg, n, respace=True)
    A, B, C = _alloc(n, order, order)
    A[:, 0] = 1.0
    for i in range(start, n):
        # diffusers: the polynomial's order follows the global step index, the terms summed only the derivatives
        # kept since the first step that ran (img2img starts part-way with one), zip() dropping the rest
        current = min(i + 1, order)
        for k in range(min(i - start + 1, current)):
            coef = _lms_coefficient(sig, current, i, k)
            px, pm = _x0_coefs(cfg.prediction_type, sig[i - k], "sigma")
            # derivative d_(i-k) = (x_(i-k) - x0_(i-k)) / sigma_(i-k)
            A[i, k] += coef * (1 - px) / sig[i - k]
            B[i, k] += -coef * pm / sig[i - k]
    return _Raw(ts[start:], A[start:], B[start:], C[start:], 1 / np.sqrt(sig[start:n] ** 2 + 1), _init_sigma(cfg, sig),
                _sigma_levels(sig[start:]))


def _dpm_schedule(cfg: SamplerConfig, n: int, floor_cosine: bool) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps and sigmas (final 0 appended) of DPM-Solver and UniPC in diffusers."""
    train = _train_sigmas(alphas_cumprod(cfg))
    T = cfg.num_train_timesteps
    kind = _sigma_kind(cfg)
    if kind is not None:
        sigmas = kind(train[::-1], n)
        ts = _sigma_to_t(sigmas, np.log(train.astype(np.float32)).astype(np.float64))
        # Karras: diffusers rounds, but DPM-Solver truncates (int64 cast) for the cosine schedule; exponential: both
        # truncate (the int64 cast alone)
        floor = kind is _exponential or (floor_cosine and cfg.beta_schedule == "squaredcos_cap_v2")
        ts = np.floor(ts) if floor else np.round(ts)
    else:
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif cfg.timestep_spacing == "leading":
            ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + cfg.steps_offset
        else:
            ts = np.arange(T, 0, -T / n).round() - 1
        sigmas = np.interp(ts, np.arange(len(train)), train)
    return ts, np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)


def _dpmpp_2m(cfg: SamplerConfig, n: int, start: int = 0) -> _Raw:
    """DPM-Solver++(2M) in data prediction, Lu et al. 2022, algorithm 2. The first step that runs is first order;
    the last one's order depends on the full schedule's length, as in diffusers."""
    ts, sig = _dpm_schedule(cfg, n, floor_cosine=True)
    S = len(ts)
    alpha = 1 / np.sqrt(sig ** 2 + 1)
    sigma_t = sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma_t)  # +inf at the final sigma 0
    A, B, C = _alloc(S, 2, 2)
    for i in range(start, S):
        last = i == S - 1
        first_order = i == start or (last and (cfg.euler_at_final or (cfg.lower_order_final and S < 15) or sig[-1] == 0))
        h = lam[i + 1] - lam[i]
        em1 = math.exp(-h) - 1.0  # exp(-inf) - 1 = -1 at the end
        ratio = sigma_t[i + 1] / sigma_t[i]
        # D_j = px_j x_j + pm_j m_j
        px0, pm0 = _x0_coefs(cfg.prediction_type, acp_from_sigma(sig[i]), "ddpm")
        if first_order:
            w0, w1 = -alpha[i + 1] * em1, 0.0
        else:
            r0 = (lam[i] - lam[i - 1]) / h
            if cfg.solver_type == "midpoint":
                c_d0, c_d1 = -alpha[i + 1] * em1, -0.5 * alpha[i + 1] * em1
            else:
                c_d0, c_d1 = -alpha[i + 1] * em1, alpha[i + 1] * (em1 / h + 1.0)
            # D0 = D_i, D1 = (D_i - D_(i-1)) / r0
            w0, w1 = c_d0 + c_d1 / r0, -c_d1 / r0
        A[i, 0] = ratio + w0 * px0
        B[i, 0] = w0 * pm0
        if w1:
            px1, pm1 = _x0_coefs(cfg.prediction_type, acp_from_sigma(sig[i - 1]), "ddpm")
            A[i, 1] = w1 * px1
            B[i, 1] = w1 * pm1
    return _Raw(ts[start:].astype(np.float64), A[start:], B[start:], C[start:], np.ones(S - start), 1.0,
                _vp_levels(sig[start:]))


def _lcm_timesteps(cfg: SamplerConfig, n: int) -> np.ndarray:
    T, orig = cfg.num_train_timesteps, cfg.original_inference_steps
    if n > orig:
        raise SamplerError(f"lcm supports at most original_inference_steps = {orig} steps, got {n}")
    origin = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
    return origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]


def _lcm(cfg: SamplerConfig, n: int, start: int = 0) -> _Raw:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, arXiv:2310.04378, algorithm 1):
    x0 from the consistency function, re-noised to the next timestep; the last step returns x0."""
    acp = alphas_cumprod(cfg)
    ts = _lcm_timesteps(cfg, n)
    A, B, C = _alloc(n, 1, 1)
    for i, t in enumerate(ts.astype(int)):
        a_t = acp[t]
        st = t * cfg.timestep_scaling
        c_skip, c_out = 0.25 / (st * st + 0.25), st / math.sqrt(st * st + 0.25)  # sigma_data = 0.5
        px, pm = _x0_coefs(cfg.prediction_type, a_t, "ddpm")
        dx, dm = c_out * px + c_skip, c_out * pm  # denoised = dx * x + dm * m
        if i == n - 1:
            A[i, 0], B[i, 0] = dx, dm
        else:
            a_p = acp[int(ts[i + 1])]
            A[i, 0], B[i, 0], C[i] = math.sqrt(a_p) * dx, math.sqrt(a_p) * dm, math.sqrt(1 - a_p)
    return _Raw(ts[start:].astype(np.float64), A[start:], B[start:], C[start:], np.ones(n - start), 1.0,
                _ddpm_levels(acp, ts[start:]))


class _Lin(dict):
    """A linear combination of loop quantities, {("s" | "m", step): coefficient}, for deriving table rows."""

    def __add__(self, other: "_Lin") -> "_Lin":
        out = _Lin(self)
        for k, v in other.items():
            out[k] = out.get(k, 0.0) + v
        return out

    def __sub__(self, other: "_Lin") -> "_Lin":
        return self + other * -1.0

    def __mul__(self, c: float) -> "_Lin":
        return _Lin({k: v * float(c) for k, v in self.items()})

    __rmul__ = __mul__


def _unipc(cfg: SamplerConfig, n: int, start: int = 0) -> _Raw:
    """UniPC with the B(h) = e^h - 1 variant ('bh2'), data prediction (Zhao et al. 2023, arXiv:2302.04867).

    The corrector refines the sample the model was just evaluated at, so the chain's sample is not the
    U-Net input. Both are linear in the U-Net inputs s_j and outputs m_j, so the recurrences are run once on
    symbolic combinations (``_Lin``) and each step's next U-Net input is read off as a table row.
    """
    ts, sig = _dpm_schedule(cfg, n, floor_cosine=False)
    S, order_max = len(ts), cfg.solver_order
    alpha = 1 / np.sqrt(sig ** 2 + 1)
    sigma_t = sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma_t)

    def data(j: int) -> _Lin:  # D_j = x0 prediction at step j, from U-Net input s_j and output m_j
        px, pm = _x0_coefs(cfg.prediction_type, acp_from_sigma(sig[j]), "ddpm")
        return _Lin({("s", j): px, ("m", j): pm})

    def coefficients(h: float, rks: list[float], order: int):
        hh = -h
        with np.errstate(invalid="ignore", divide="ignore"):
            h_phi_1 = np.expm1(hh)
            h_phi_k, B_h = h_phi_1 / hh - 1, np.expm1(hh)
            R, b, fact = [], [], 1
            for k in range(1, order + 1):
                R.append(np.power(np.array(rks + [1.0]), k - 1))
                b.append(h_phi_k * fact / B_h)
                fact *= k + 1
                h_phi_k = h_phi_k / hh - 1 / fact
        return h_phi_1, B_h, np.array(R), np.array(b)

    def residual(t: int, s0: int, history: list[int], order: int, model_t: _Lin | None) -> tuple[_Lin, _Lin]:
        """(x_t_ - x_t, the base term's model part) of the predictor (model_t None) or corrector, from s0 to t.

        x_t = (sigma_t / sigma_s0) * x - alpha_t * h_phi_1 * D_s0 - residual: the first two terms depend only
        on the chain sample x, which is why the corrector can start from the predictor's result.
        """
        h = lam[t] - lam[s0]
        m0 = data(history[-1])
        rks, d1s = [], []
        for k in range(1, order):
            rk = (lam[s0 - k] - lam[s0]) / h
            rks.append(rk)
            d1s.append((data(history[-(k + 1)]) - m0) * (1 / rk))
        h_phi_1, B_h, R, b = coefficients(h, rks, order)
        if model_t is None:
            rhos = [0.5] if order == 2 else (list(np.linalg.solve(R[:-1, :-1], b[:-1])) if d1s else [])
            res = _Lin()
        else:
            rhos = [0.5] if order == 1 else list(np.linalg.solve(R, b))
            res, rhos = (model_t - m0) * rhos[-1], rhos[:-1]
        for r, d in zip(rhos, d1s):
            res = res + d * r
        return res * (alpha[t] * B_h), m0 * (alpha[t] * h_phi_1)

    rows: list[_Lin] = []
    history: list[int] = []  # steps whose data prediction is kept (diffusers' model_outputs)
    previous_residual, this_order, warm = None, 1, 0
    for i in range(start, S):
        x = _Lin({("s", i): 1.0})  # the U-Net input s_i: the predictor's result x_t_ - residual
        if previous_residual is not None and (i - 1) not in cfg.disable_corrector:
            corr, _ = residual(i, i - 1, history, this_order, data(i))
            x = x + previous_residual - corr  # corrected: x_t_ - corrector residual
        history = (history + [i])[-order_max:]
        this_order = min(order_max, S - i) if cfg.lower_order_final else order_max
        this_order = min(this_order, warm + 1)
        pred, base = residual(i + 1, i, history, this_order, None)
        rows.append(x * (sigma_t[i + 1] / sigma_t[i]) - base - pred)
        previous_residual = pred
        warm = min(warm + 1, order_max)
    depth = 1 + max(start + i - j for i, row in enumerate(rows) for (_, j) in row)
    if depth > min(STATE_DEPTH, OUTPUT_DEPTH):
        raise SamplerError(f"unipc with solver_order {order_max} needs history {depth}, more than the update holds")
    A, B, C = _alloc(S - start, depth, depth)
    for i, row in enumerate(rows):
        for (kind, j), v in row.items():
            (A if kind == "s" else B)[i, start + i - j] += v
    return _Raw(ts[start:].astype(np.float64), A, B, C, np.ones(S - start), 1.0, _vp_levels(sig[start:]))


def acp_from_sigma(sigma: float) -> float:
    """alpha_bar for the Karras sigma: sigma^2 = (1 - a) / a."""
    return 1.0 / (sigma * sigma + 1.0)


_BUILDERS = {
    "ddim": _ddim,
    "pndm": _pndm,
    "lms": _lms,
    "euler": _euler,
    "euler_a": lambda cfg, n, start=0: _euler(cfg, n, start, ancestral=True),
    "dpmpp_2m": _dpmpp_2m,
    "dpmpp_2m_karras": _dpmpp_2m,
    "lcm": _lcm,
    "unipc": _unipc,
}


_TIMESTEPS = {  # each sampler's timesteps alone (cheap), to check a step count before building its table
    "ddim": lambda cfg, n: _spaced(cfg, n, integer=True),
    "pndm": _pndm_timesteps,
    "lms": lambda cfg, n: _sigma_schedule(cfg, n, respace=True)[0],
    "euler": lambda cfg, n: _sigma_schedule(cfg, n, respace=True)[0],
    "euler_a": lambda cfg, n: _sigma_schedule(cfg, n, respace=False)[0],
    "dpmpp_2m": lambda cfg, n: _dpm_schedule(cfg, n, floor_cosine=True)[0],
    "dpmpp_2m_karras": lambda cfg, n: _dpm_schedule(cfg, n, floor_cosine=True)[0],
    "lcm": _lcm_timesteps,
    "unipc": lambda cfg, n: _dpm_schedule(cfg, n, floor_cosine=False)[0],
}


def _timesteps_fit(cfg: SamplerConfig, n: int) -> bool:
    """Whether every timestep of ``n`` steps lies in the training range (diffusers indexes past its schedule, or
    wraps around to the end, when one does not: leading spacing with steps_offset at n = T, trailing at some n)."""
    try:
        ts = _TIMESTEPS[cfg.name](cfg, n)
    except (IndexError, ValueError, ZeroDivisionError, SamplerError):
        return False
    if not (len(ts) and np.isfinite(ts).all() and ts.min() >= 0 and ts.max() <= cfg.num_train_timesteps - 1):
        return False
    # multistep solvers divide by the step between sigmas: a repeated timestep (rounding at n near T) is a 0
    repeats_matter = cfg.name in ("dpmpp_2m", "unipc", "lms") and _sigma_kind(cfg) is None
    return not (repeats_matter and np.any(np.diff(ts) >= 0))


def _nearest_fitting(cfg: SamplerConfig, n: int, reach: int = 64) -> str:
    lo = next((m for m in range(n - 1, max(n - reach, 0), -1) if _timesteps_fit(cfg, m)), None)
    hi = next((m for m in range(n + 1, min(n + reach, cfg.num_train_timesteps) + 1) if _timesteps_fit(cfg, m)), None)
    near = [str(m) for m in (lo, hi) if m is not None]
    return f"; {' or '.join(near)} steps work" if near else ""


def _table(cfg: SamplerConfig, raw: _Raw, start: int, from_image: bool) -> SamplerTable:
    """Fold c_in into the raw coefficients, so the state is the U-Net input; the initial-state rule and the
    4-channel inpainting blend come from the noise levels."""
    S = len(raw.timesteps)
    c_in = np.concatenate([raw.c_in, [1.0]])  # the state after the last step is the plain sample
    A = np.zeros_like(raw.A)
    for j in range(raw.A.shape[1]):
        src = np.array([c_in[i - j] if i - j >= 0 else 1.0 for i in range(S)])
        A[:, j] = c_in[1:] * raw.A[:, j] / src
    alpha, sigma = raw.levels[:, 0], raw.levels[:, 1]
    if from_image:  # diffusers' add_noise(image_latents, noise, timesteps[start])
        init_image, init_noise = c_in[0] * alpha[0], c_in[0] * sigma[0]
    else:  # pure noise, scaled by the scheduler's init_noise_sigma
        init_image, init_noise = 0.0, c_in[0] * raw.init_noise_sigma
    return SamplerTable(
        name=cfg.name, timesteps=raw.timesteps, state_coef=A, model_coef=c_in[1:, None] * raw.B,
        noise_coef=c_in[1:] * raw.C, init_scale=float(init_noise), init_image_scale=float(init_image),
        blend_image=c_in[1:] * alpha[1:], blend_noise=c_in[1:] * sigma[1:], start=start, extras=raw.extras,
    )


def start_step(num_inference_steps: int, strength: float) -> int:
    """Rows of the schedule skipped at ``strength`` (diffusers' get_timesteps; every sampler here has order 1)."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    if init_timestep < 1:
        raise SamplerError(f"strength {strength:g} with {num_inference_steps} steps leaves no step to run "
                           f"(strength x steps must reach 1: use strength >= {1 / num_inference_steps:.3g} or more steps)")
    return num_inference_steps - init_timestep


def build_table(cfg: SamplerConfig, num_inference_steps: int, strength: float | None = None,
                from_image: bool | None = None) -> SamplerTable:
    """Compute the coefficient table for ``num_inference_steps`` (the loop runs ``table.num_steps`` U-Net calls).

    ``strength`` (img2img and inpainting, in (0, 1]) starts the schedule part-way, as diffusers' get_timesteps does,
    with each sampler's history and warm-up counted from there. ``from_image``: the first state is the image latents
    noised to the first timestep (img2img; inpainting below strength 1) rather than scaled pure noise (default:
    when a strength is given).

    Every table that comes back is finite: a step count whose timesteps fall outside the model's training range
    is refused (naming the nearest counts that work), and any non-finite coefficient is an error, never an image."""
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise SamplerError(f"steps must be a positive integer, got {n!r}")
    n = int(n)
    if n > cfg.num_train_timesteps:
        raise SamplerError(f"steps ({n}) cannot exceed the {cfg.num_train_timesteps} training timesteps")
    if cfg.name not in _BUILDERS:
        raise SamplerError(f"unknown sampler {cfg.name!r}; choose one of {', '.join(SAMPLERS)}")
    if cfg.name == "pndm" and n < 2:
        raise SamplerError("pndm needs at least 2 steps")
    if cfg.name == "dpmpp_2m_karras" and not cfg.use_karras_sigmas:
        cfg = replace(cfg, use_karras_sigmas=True)
    if cfg.name == "lcm":
        _lcm_timesteps(cfg, n)  # its own limit, with its own message
    if not _timesteps_fit(cfg, n):
        raise SamplerError(f"{cfg.name} cannot run {n} steps on this model's schedule ({cfg.timestep_spacing} spacing, "
                           f"steps_offset {cfg.steps_offset}, {cfg.num_train_timesteps} training steps): a timestep "
                           f"would fall outside 0..{cfg.num_train_timesteps - 1} or repeat{_nearest_fitting(cfg, n)}")
    start = 0 if strength is None else start_step(n, strength)
    from_image = strength is not None if from_image is None else from_image
    try:
        with np.errstate(all="ignore"):
            table = _table(cfg, _BUILDERS[cfg.name](cfg, n, start), start, from_image)
    except (ZeroDivisionError, OverflowError, np.linalg.LinAlgError):
        table = None
    finite = table is not None and math.isfinite(table.init_scale) and all(
        np.isfinite(a).all() for a in (table.timesteps, table.state_coef, table.model_coef, table.noise_coef,
                                       table.blend_image, table.blend_noise))
    if not finite:
        raise SamplerError(f"{cfg.name} with {n} steps gives non-finite coefficients on this model's schedule; "
                           "use fewer steps or another sampler")
    return table
