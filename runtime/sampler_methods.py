"""The samplers' coefficients in each sampler's own space (before samplers._table folds c_in in): the training
noise schedule computed in float32 exactly as diffusers and the LDM code define it, each diffusers scheduler's
timesteps and sigmas, and one builder per sampler. Everything derived from the schedule is float64.

Each builder takes (cfg, n, start, custom): ``custom`` is a caller's own descending timesteps (diffusers'
``set_timesteps(timesteps=...)``, n = len(custom)) for the samplers in sampler_config.CUSTOM_TIMESTEPS, else None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdtrt.runtime.sampler_config import OUTPUT_DEPTH, STATE_DEPTH, SamplerConfig, SamplerError

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


def _spaced(cfg: SamplerConfig, n: int, integer: bool, custom: np.ndarray | None = None) -> np.ndarray:
    """Descending timesteps for 'linspace' / 'leading' / 'trailing' spacing (Lin et al. 2023, table 2), or the
    caller's own (``custom``)."""
    if custom is not None:
        return custom.astype(np.float64)
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
    if pred == "sample":  # the model predicts x0 itself (x-prediction)
        return 0.0, 1.0
    if space == "sigma":  # x = x0 + sigma * eps  (Karras parameterisation)
        s = sigma_or_acp
        if pred == "epsilon":
            return 1.0, -s
        return 1.0 / (s * s + 1), -s / math.sqrt(s * s + 1)
    a = sigma_or_acp  # x = sqrt(a) x0 + sqrt(1 - a) eps  (DDPM parameterisation)
    if pred == "epsilon":
        return 1 / math.sqrt(a), -math.sqrt(1 - a) / math.sqrt(a)
    return math.sqrt(a), -math.sqrt(1 - a)


def _eps_coefs(px: float, pm: float, a: float) -> tuple[float, float]:
    """(e, f) with eps = e*x + f*m, from x0 = px*x + pm*m in the DDPM parameterisation (DDIM's and TCD's
    pred_epsilon = (x - sqrt(a) x0) / sqrt(1 - a); for epsilon and v it is diffusers' own expression)."""
    return (1 - math.sqrt(a) * px) / math.sqrt(1 - a), -math.sqrt(a) * pm / math.sqrt(1 - a)


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


def _ddim(cfg: SamplerConfig, n: int, start: int = 0, custom: np.ndarray | None = None) -> _Raw:
    acp, eta = alphas_cumprod(cfg), cfg.eta_value()
    final = 1.0 if cfg.set_alpha_to_one else acp[0]
    ts = _spaced(cfg, n, integer=True)[start:]
    A, B, C = _alloc(len(ts), 1, 1)
    ratio = cfg.num_train_timesteps // n
    for i, t in enumerate(ts.astype(int)):
        prev = t - ratio
        a_t, a_p = acp[t], (acp[prev] if prev >= 0 else final)
        px, pm = _x0_coefs(cfg.prediction_type, a_t, "ddpm")
        ex, em = _eps_coefs(px, pm, a_t)
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        std = eta * math.sqrt(var)
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


def _pndm(cfg: SamplerConfig, n: int, start: int = 0, custom: np.ndarray | None = None) -> _Raw:
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


def _sigma_schedule(cfg: SamplerConfig, n: int, respace: bool,
                    custom: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps and sigmas (with the final 0) of the Euler/LMS family; ``respace``: Karras or exponential sigmas
    between the spaced schedule's ends, as the config says."""
    train = _train_sigmas(alphas_cumprod(cfg))
    ts = _spaced(cfg, n, integer=False, custom=custom).astype(np.float32).astype(np.float64)
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


def _euler(cfg: SamplerConfig, n: int, start: int = 0, custom: np.ndarray | None = None,
           ancestral: bool = False) -> _Raw:
    ts, sig = _sigma_schedule(cfg, n, respace=not ancestral, custom=custom)
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


def _lms(cfg: SamplerConfig, n: int, start: int = 0, custom: np.ndarray | None = None, order: int = 4) -> _Raw:
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


def _dpm_schedule(cfg: SamplerConfig, n: int, floor_cosine: bool,
                  custom: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps and sigmas (final 0 appended) of DPM-Solver and UniPC in diffusers."""
    train = _train_sigmas(alphas_cumprod(cfg))
    T = cfg.num_train_timesteps
    kind = _sigma_kind(cfg)
    if custom is not None:  # diffusers refuses custom timesteps with Karras/exponential sigmas; so does build_table
        ts = custom.astype(np.float64)
        sigmas = np.interp(ts, np.arange(len(train)), train)
    elif kind is not None:
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


def _dpmpp_2m(cfg: SamplerConfig, n: int, start: int = 0, custom: np.ndarray | None = None) -> _Raw:
    """DPM-Solver++(2M) in data prediction, Lu et al. 2022, algorithm 2. The first step that runs is first order;
    the last one's order depends on the full schedule's length, as in diffusers."""
    ts, sig = _dpm_schedule(cfg, n, floor_cosine=True, custom=custom)
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


def _lcm_timesteps(cfg: SamplerConfig, n: int, custom: np.ndarray | None = None) -> np.ndarray:
    """LCM's and TCD's timesteps: n evenly spaced indices into the distillation's grid of original_inference_steps
    (or the caller's own; diffusers only warns when they are off that grid or more than it holds)."""
    if custom is not None:
        return custom.astype(np.int64)
    T, orig = cfg.num_train_timesteps, cfg.original_inference_steps
    if n > orig:
        raise SamplerError(f"{cfg.name} supports at most original_inference_steps = {orig} steps, got {n}")
    origin = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
    return origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]


def _lcm(cfg: SamplerConfig, n: int, start: int = 0, custom: np.ndarray | None = None) -> _Raw:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, arXiv:2310.04378, algorithm 1):
    x0 from the consistency function, re-noised to the next timestep; the last step returns x0."""
    acp = alphas_cumprod(cfg)
    ts = _lcm_timesteps(cfg, n, custom)
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


def _tcd(cfg: SamplerConfig, n: int, start: int = 0, custom: np.ndarray | None = None) -> _Raw:
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, arXiv:2402.19159,
    diffusers' TCDScheduler): from timestep t the model's x0 and eps are taken to s = floor((1 - gamma) t_prev),
    then, except at the last step, re-noised forward to t_prev with fresh noise; gamma is ``eta``."""
    acp, gamma = alphas_cumprod(cfg), cfg.eta_value()
    ts = _lcm_timesteps(cfg, n, custom)
    A, B, C = _alloc(n, 1, 1)
    for i, t in enumerate(ts.astype(int)):
        prev = int(ts[i + 1]) if i + 1 < n else 0
        s = int(np.floor(np.float32(1 - gamma) * np.float32(prev)))  # torch's float32 product, then floor
        a_t, a_p, a_s = acp[t], acp[prev], acp[s]
        px, pm = _x0_coefs(cfg.prediction_type, a_t, "ddpm")
        ex, em = _eps_coefs(px, pm, a_t)
        # pred_noised = sqrt(a_s) x0 + sqrt(1 - a_s) eps
        nx, nm = math.sqrt(a_s) * px + math.sqrt(1 - a_s) * ex, math.sqrt(a_s) * pm + math.sqrt(1 - a_s) * em
        if gamma > 0 and i != n - 1:
            A[i, 0], B[i, 0], C[i] = math.sqrt(a_p / a_s) * nx, math.sqrt(a_p / a_s) * nm, math.sqrt(1 - a_p / a_s)
        else:
            A[i, 0], B[i, 0] = nx, nm
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


def _unipc(cfg: SamplerConfig, n: int, start: int = 0, custom: np.ndarray | None = None) -> _Raw:
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
    "euler_a": lambda cfg, n, start=0, custom=None: _euler(cfg, n, start, custom, ancestral=True),
    "dpmpp_2m": _dpmpp_2m,
    "dpmpp_2m_karras": _dpmpp_2m,
    "lcm": _lcm,
    "unipc": _unipc,
    "tcd": _tcd,
}


_TIMESTEPS = {  # each sampler's timesteps alone (cheap), to check a step count before building its table
    "ddim": lambda cfg, n, custom=None: _spaced(cfg, n, integer=True),
    "pndm": lambda cfg, n, custom=None: _pndm_timesteps(cfg, n),
    "lms": lambda cfg, n, custom=None: _sigma_schedule(cfg, n, respace=True)[0],
    "euler": lambda cfg, n, custom=None: _sigma_schedule(cfg, n, respace=True, custom=custom)[0],
    "euler_a": lambda cfg, n, custom=None: _sigma_schedule(cfg, n, respace=False)[0],
    "dpmpp_2m": lambda cfg, n, custom=None: _dpm_schedule(cfg, n, floor_cosine=True, custom=custom)[0],
    "dpmpp_2m_karras": lambda cfg, n, custom=None: _dpm_schedule(cfg, n, floor_cosine=True)[0],
    "lcm": _lcm_timesteps,
    "unipc": lambda cfg, n, custom=None: _dpm_schedule(cfg, n, floor_cosine=False)[0],
    "tcd": _lcm_timesteps,
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
