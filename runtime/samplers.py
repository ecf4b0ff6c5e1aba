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
float64. The modules: sampler_config (names, diffusers classes, the validated SamplerConfig),
sampler_methods (each sampler's coefficients), this one (the table, the update, build_table) and
sampler_presets (named few-step settings: SDXL-Turbo, Lightning, LCM, Hyper-SD, DMD2).

References: DDIM (Song et al. 2021, arXiv:2010.02502); PNDM/PLMS (Liu et al. 2022, arXiv:2202.09778);
LMS, Euler, Euler ancestral and Karras sigmas (Karras et al. 2022, arXiv:2206.00364; k-diffusion);
DPM-Solver++ 2M (Lu et al. 2022, arXiv:2211.01095); LCM (Luo et al. 2023, arXiv:2310.04378);
UniPC (Zhao et al. 2023, arXiv:2302.04867); TCD (Zheng et al. 2024, arXiv:2402.19159).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

# every name other modules import from here (the config and the methods live in sibling modules)
from sdtrt.runtime.sampler_config import (  # noqa: F401
    _FIXED, _INERT, _INERT_FOR, _MODELED, CLASS_DEFAULTS, CUSTOM_TIMESTEPS, DEFAULT_ETA, DIFFUSERS_EQUIVALENT,
    NO_SAMPLE_PREDICTION, OUTPUT_DEPTH, PREDICTION_TYPES, SAMPLER_NAMES, SAMPLERS, SCHEDULER_CLASSES, SCHEDULES,
    STATE_DEPTH, SamplerConfig, SamplerError, diffusers_config, schedules_for, split_schedule)
from sdtrt.runtime.sampler_methods import (  # noqa: F401
    _BUILDERS, _TIMESTEPS, _Raw, _lcm_timesteps, _nearest_fitting, _sigma_kind, _timesteps_fit, acp_from_sigma,
    alphas_cumprod)


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


def _table(cfg: SamplerConfig, raw: _Raw, start: int, init: str) -> SamplerTable:
    """Fold c_in into the raw coefficients, so the state is the U-Net input; the initial-state rule and the
    4-channel inpainting blend come from the noise levels. ``init``: "noise" (pure noise times init_noise_sigma),
    "image" (the image latents noised to the first timestep, diffusers' add_noise) or "latents" (latents handed
    over as they are: SDXL's refiner with denoising_start, add_noise=False)."""
    S = len(raw.timesteps)
    c_in = np.concatenate([raw.c_in, [1.0]])  # the state after the last step is the plain sample
    A = np.zeros_like(raw.A)
    for j in range(raw.A.shape[1]):
        src = np.array([c_in[i - j] if i - j >= 0 else 1.0 for i in range(S)])
        A[:, j] = c_in[1:] * raw.A[:, j] / src
    alpha, sigma = raw.levels[:, 0], raw.levels[:, 1]
    if init == "image":  # diffusers' add_noise(image_latents, noise, timesteps[start])
        init_image, init_noise = c_in[0] * alpha[0], c_in[0] * sigma[0]
    elif init == "latents":  # the scheduler's state is the latents given; the U-Net sees them through c_in
        init_image, init_noise = c_in[0], 0.0
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


def _custom_timesteps(cfg: SamplerConfig, timesteps: Any) -> np.ndarray:
    """The caller's timesteps, checked as diffusers' set_timesteps(timesteps=...) would need them."""
    T = cfg.num_train_timesteps
    if cfg.name not in CUSTOM_TIMESTEPS:
        raise SamplerError(f"{cfg.name} does not take custom timesteps (diffusers' "
                           f"{DIFFUSERS_EQUIVALENT[cfg.name][0]}.set_timesteps has no timesteps argument); samplers "
                           f"that do: {', '.join(CUSTOM_TIMESTEPS)}")
    if _sigma_kind(cfg) is not None:
        raise SamplerError(f"{cfg.name} cannot take custom timesteps with {'Karras' if cfg.use_karras_sigmas else 'exponential'}"
                           " sigmas (diffusers refuses the combination); drop the schedule or the timesteps")
    ok = isinstance(timesteps, (list, tuple, np.ndarray)) and len(timesteps) > 0 and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in timesteps)
    if not ok:
        raise SamplerError(f"timesteps must be a non-empty list of integers, got {timesteps!r}")
    ts = np.array([int(t) for t in timesteps], dtype=np.int64)
    if ts.min() < 0 or ts.max() > T - 1:
        raise SamplerError(f"timesteps must lie in 0..{T - 1} (the model's training timesteps), got {ts.tolist()}")
    if np.any(np.diff(ts) >= 0):
        raise SamplerError(f"timesteps must be strictly descending, got {ts.tolist()}")
    return ts


def _fraction(value: Any, label: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value < 1
    if not ok:
        raise SamplerError(f"{label} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _cutoff(cfg: SamplerConfig, fraction: float) -> int:
    """diffusers' discrete_timestep_cutoff: the training timestep that a fraction of the denoising reaches."""
    T = cfg.num_train_timesteps
    return int(round(T - fraction * T))


def build_table(cfg: SamplerConfig, num_inference_steps: int | None, strength: float | None = None,
                from_image: bool | None = None, *, timesteps: Any = None, denoising_start: float | None = None,
                denoising_end: float | None = None) -> SamplerTable:
    """Compute the coefficient table for ``num_inference_steps`` (the loop runs ``table.num_steps`` U-Net calls).

    ``strength`` (img2img and inpainting, in (0, 1]) starts the schedule part-way, as diffusers' get_timesteps does,
    with each sampler's history and warm-up counted from there. ``from_image``: the first state is the image latents
    noised to the first timestep (img2img; inpainting below strength 1) rather than scaled pure noise (default:
    when a strength is given).

    ``timesteps``: the sampler's own descending training timesteps instead of its spacing (diffusers'
    ``set_timesteps(timesteps=...)``; the samplers in CUSTOM_TIMESTEPS); ``num_inference_steps`` is then None or
    their count. SDXL's ensemble of experts: ``denoising_end`` (StableDiffusionXLPipeline) keeps the rows whose
    timestep is at or above the cutoff, and the state after the last kept row is the plain latents diffusers hands
    over (output_type="latent"); ``denoising_start`` (StableDiffusionXLImg2ImgPipeline) starts at the first row
    below the cutoff instead of at ``strength`` (which it overrides), from the latents handed over as they are (no
    noise added: init_image_scale is the row's c_in, init_scale 0). Both take a fraction in (0, 1) of the whole
    denoising, both together a middle part (start < end).

    Every table that comes back is finite: a step count whose timesteps fall outside the model's training range
    is refused (naming the nearest counts that work), and any non-finite coefficient is an error, never an image."""
    custom = None if timesteps is None else _custom_timesteps(cfg, timesteps)
    n = num_inference_steps
    if custom is not None:
        if n is not None and n != len(custom):
            raise SamplerError(f"steps ({n!r}) and the {len(custom)} custom timesteps disagree; give one of them")
        n = len(custom)
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
    cfg.eta_value()
    if custom is None:
        if cfg.name in ("lcm", "tcd"):
            _lcm_timesteps(cfg, n)  # its own limit, with its own message
        if not _timesteps_fit(cfg, n):
            raise SamplerError(f"{cfg.name} cannot run {n} steps on this model's schedule ({cfg.timestep_spacing} "
                               f"spacing, steps_offset {cfg.steps_offset}, {cfg.num_train_timesteps} training steps): a "
                               f"timestep would fall outside 0..{cfg.num_train_timesteps - 1} or repeat"
                               f"{_nearest_fitting(cfg, n)}")
    start_f = None if denoising_start is None else _fraction(denoising_start, "denoising_start")
    end_f = None if denoising_end is None else _fraction(denoising_end, "denoising_end")
    if start_f is not None and end_f is not None and start_f >= end_f:
        raise SamplerError(f"denoising_start ({start_f:g}) must be below denoising_end ({end_f:g})")
    if start_f is not None:  # StableDiffusionXLImg2ImgPipeline.get_timesteps (no sampler here has order 2)
        full = np.asarray(_TIMESTEPS[cfg.name](cfg, n, custom), dtype=np.float64)
        remaining = int(np.sum(full < _cutoff(cfg, start_f)))
        if remaining < 1:
            raise SamplerError(f"denoising_start {start_f:g} leaves no step of {n} to run (every timestep is at or "
                               f"above {_cutoff(cfg, start_f)}); use a smaller denoising_start or more steps")
        start, init = len(full) - remaining, "latents"  # PNDM's list is n + 1 long
    else:
        start = 0 if strength is None else start_step(n, strength)
        from_image = strength is not None if from_image is None else from_image
        init = "image" if from_image else "noise"
    try:
        with np.errstate(all="ignore"):
            raw = _BUILDERS[cfg.name](cfg, n, start, custom)
            if end_f is not None:  # StableDiffusionXLPipeline's "Apply denoising_end"
                keep = int(np.sum(raw.timesteps >= _cutoff(cfg, end_f)))
                if keep < 1:
                    raise SamplerError(f"denoising_end {end_f:g} leaves no step of {n} to run (no timestep reaches "
                                       f"{_cutoff(cfg, end_f)}); use a larger denoising_end or more steps")
                raw = _truncated(raw, keep)
            table = _table(cfg, raw, start, init)
    except (ZeroDivisionError, OverflowError, np.linalg.LinAlgError):
        table = None
    finite = table is not None and math.isfinite(table.init_scale) and all(
        np.isfinite(a).all() for a in (table.timesteps, table.state_coef, table.model_coef, table.noise_coef,
                                       table.blend_image, table.blend_noise))
    if not finite:
        raise SamplerError(f"{cfg.name} with {n} steps gives non-finite coefficients on this model's schedule; "
                           "use fewer steps or another sampler")
    return table


def _truncated(raw: _Raw, keep: int) -> _Raw:
    """The first ``keep`` rows: the loop stops there, its state the plain sample (c_in 1 after the last kept row,
    as _table folds it) and the inpainting blend of that row the clean image (diffusers truncates the timesteps
    before its loop, so its last step blends with the image latents themselves)."""
    if keep >= len(raw.timesteps):
        return raw
    levels = np.concatenate([raw.levels[:keep], [[1.0, 0.0]]])
    return _Raw(raw.timesteps[:keep], raw.A[:keep], raw.B[:keep], raw.C[:keep], raw.c_in[:keep],
                raw.init_noise_sigma, levels, raw.extras)
