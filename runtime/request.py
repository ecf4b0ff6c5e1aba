"""What a generation asks for, as one frozen, JSON-round-trippable value, checked once with clear messages.

``GenerationRequest.create`` takes what users pass (diffusers' argument names; a string or a list of
prompts, NumPy integers, ...) and either returns a normalised request or raises ``UsageError`` naming the
argument and what it must be. The pipeline, the CLI and (later) the server all go through it, so the
same bad value gets the same message everywhere.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdtrt.errors import UsageError
from sdtrt.runtime.hires import Hires

MAX_GUIDANCE = 100.0  # classifier-free guidance far beyond what any model is used with (A1111's UI stops at 30)
MAX_SEED = 2**64 - 1  # PCG64 takes any 64-bit seed (a random one is below 2**32: seeds.random_seed)
RANDOM_SEED = -1  # A1111's convention: -1 asks for a random seed


def _text(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{label} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{label} is not valid UTF-8 text") from None
    return value


def _texts(value: Any, label: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_text(value, label),)
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"{label} must be a string or a list of strings, got {type(value).__name__}")
    if len(value) == 1:
        return (_text(value[0], label),)
    return tuple(_text(v, f"{label} {i + 1}") for i, v in enumerate(value))


def integer(value: Any, label: str, lo: int | None = None, hi: int | None = None) -> int:
    """An int (NumPy integers too; not bool, not float) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise UsageError(f"{label} must be an integer, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = f"at least {lo}" if hi is None else f"between {lo} and {hi}" if lo is not None else f"at most {hi}"
        raise UsageError(f"{label} must be {bound}, got {value}")
    return value


def real(value: Any, label: str, lo: float, hi: float) -> float:
    """A finite real number (NumPy scalars too; not bool, not str) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise UsageError(f"{label} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise UsageError(f"{label} must be finite, got {value}")
    if not lo <= value <= hi:
        # %g rounds to 6 digits (100.0001 -> "100", the limit itself): where it does not read back as the value,
        # repr, the shortest text that does
        text = f"{value:g}" if float(f"{value:g}") == value else repr(value)
        raise UsageError(f"{label} must be between {lo:g} and {hi:g}, got {text}")
    return value


@dataclass(frozen=True)
class GenerationRequest:
    """One txt2img call. Lists hold one entry per prompt; ``negative_prompt`` is as long as ``prompt``."""

    prompt: tuple[str, ...]
    negative_prompt: tuple[str, ...]
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None  # None: the model's default size
    width: int | None = None
    seed: int | None = None  # None: random (the result says which)
    num_images_per_prompt: int = 1
    scheduler: str | None = None  # None: the model's own scheduler
    output_type: str = "pil"  # "pil", "np" or "latent" (the denoised latents (B, C, h, w), not decoded)
    clip_skip: int | None = None  # diffusers' meaning: text-encoder layers skipped at the end (A1111's "Clip skip" - 1)
    # img2img / inpainting / outpainting (the images themselves are passed beside the request)
    strength: float | None = None  # in (0, 1]; None: the task's default (diffusers: 0.8 img2img, 1.0 inpainting)
    mask_blur: float = 0.0  # Gaussian blur radius of the mask, pixels (A1111's "Mask blur")
    padding_mask_crop: int | None = None  # inpaint the box around the mask grown by this many pixels, then paste back
    outpaint: tuple[int, int, int, int] | None = None  # pixels added (left, top, right, bottom)
    outpaint_fill: str = "edge"  # how the new area starts: "edge", "reflect", "gray"
    mask_invert: bool = False  # repaint the mask's black area, keep its white (A1111's "Inpaint not masked")
    inpainting_fill: str = "original"  # what the masked area starts as: one of INPAINTING_FILLS (A1111's)
    overlay: bool = True  # paste the original back outside the mask (A1111); False: diffusers' raw output
    # ControlNets (the control images are passed beside the request, the i-th to the folder's i-th ControlNet): one
    # value per control image, or one for all (diffusers' controlnet_conditioning_scale, control_guidance_start/end)
    controlnet_conditioning_scale: tuple[float, ...] = (1.0,)
    control_guidance_start: tuple[float, ...] = (0.0,)  # fraction of the steps before a ControlNet starts
    control_guidance_end: tuple[float, ...] = (1.0,)  # fraction of the steps after which it stops
    control_preprocessors: tuple[str, ...] = ("none",)  # what makes the control map from the image: none, canny
    canny_thresholds: tuple[int, int] = (100, 200)  # cv2.Canny's low and high thresholds
    hires: Hires | None = None  # the hires fix (runtime.hires): a second pass at a larger size, from the first
    # SDXL's micro-conditioning (diffusers' names; Podell et al. 2023 section 2.2), (height, width) / (top, left):
    # None: diffusers' defaults (the generation's size, (0, 0)); refused for a model without such conditioning
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0  # the SDXL refiner's (diffusers' requires_aesthetics_score)
    negative_aesthetic_score: float = 2.5
    # the ensemble of experts (diffusers' SDXL pipelines): stop at / start from this fraction of the schedule
    denoising_end: float | None = None
    denoising_start: float | None = None
    timesteps: tuple[int, ...] | None = None  # diffusers' custom timesteps (few-step models), descending
    scheduler_config: str | None = None  # a few-step preset (runtime.sampler_presets: turbo, lightning, lcm, ...)

    @property
    def batch(self) -> int:
        return len(self.prompt) * self.num_images_per_prompt

    @classmethod
    def create(cls, prompt: Any, negative_prompt: Any = None, num_inference_steps: Any = 50, guidance_scale: Any = 7.5,
               height: Any = None, width: Any = None, seed: Any = None, num_images_per_prompt: Any = 1,
               scheduler: Any = None, output_type: Any = "pil", clip_skip: Any = None, strength: Any = None,
               mask_blur: Any = 0, padding_mask_crop: Any = None, outpaint: Any = None,
               outpaint_fill: Any = "edge", controlnet_conditioning_scale: Any = 1.0, control_guidance_start: Any = 0.0,
               control_guidance_end: Any = 1.0, control_preprocessors: Any = "none",
               canny_thresholds: Any = (100, 200), hires: Any = None, mask_invert: Any = False,
               inpainting_fill: Any = "original", overlay: Any = True, **conditioning: Any) -> "GenerationRequest":
        """``conditioning``: SDXL's micro-conditioning and the ensemble of experts (``original_size``,
        ``crops_coords_top_left``, ``target_size``, their ``negative_*``, ``aesthetic_score``,
        ``negative_aesthetic_score``, ``denoising_start``, ``denoising_end``), custom ``timesteps`` and a few-step
        ``scheduler_config`` preset name."""
        if prompt is None:
            raise UsageError("prompt must be a string or a list of strings, got None")
        prompts = _texts(prompt, "prompt")
        if not prompts:
            raise UsageError("no prompt given")
        if negative_prompt is None:
            negatives = ("",) * len(prompts)
        else:
            negatives = _texts(negative_prompt, "negative prompt")
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise UsageError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if seed is not None:
            seed = integer(seed, "seed", None, MAX_SEED)
            if seed < 0 and seed != RANDOM_SEED:
                raise UsageError(f"seed must be a non-negative integer (or -1 for a random one), got {seed}")
            seed = None if seed == RANDOM_SEED else seed
        if scheduler is not None and not isinstance(scheduler, str):
            raise UsageError(f"scheduler must be a sampler name, got {scheduler!r}")
        if not isinstance(output_type, str) or output_type not in ("pil", "np", "latent"):  # `in` compares arrays
            raise UsageError(f"output_type must be 'pil', 'np' or 'latent', not {output_type!r}")
        hires = None if hires is None else Hires.of(hires)
        return cls(
            prompt=prompts, negative_prompt=negatives,
            num_inference_steps=integer(num_inference_steps, "steps", 1),
            guidance_scale=real(guidance_scale, "guidance scale", 0.0, MAX_GUIDANCE),
            height=None if height is None else integer(height, "height", 1),
            width=None if width is None else integer(width, "width", 1),
            seed=seed, num_images_per_prompt=integer(num_images_per_prompt, "num_images_per_prompt", 1),
            scheduler=scheduler, output_type=output_type,
            clip_skip=None if clip_skip is None else integer(clip_skip, "clip_skip", 0),
            **_image_task(strength, mask_blur, padding_mask_crop, outpaint, outpaint_fill),
            **inpainting_options(mask_invert, inpainting_fill, overlay),
            **_control(controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                       control_preprocessors, canny_thresholds),
            hires=hires, **conditioning_options(**conditioning),
        )

    def control_settings(self, n: int) -> list[tuple[float, float, float, str]]:
        """(scale, start, end, preprocessor) of each of ``n`` control images: one value stands for all; a list of
        another length is a UsageError."""
        out = []
        fields = (("controlnet_conditioning_scale", self.controlnet_conditioning_scale),
                  ("control_guidance_start", self.control_guidance_start),
                  ("control_guidance_end", self.control_guidance_end),
                  ("control_preprocessors", self.control_preprocessors))
        for label, values in fields:
            if len(values) not in (1, n):
                raise UsageError(f"{label} has {len(values)} values for {n} control image{'s' * (n != 1)}: give one, "
                                 "or one per control image")
            out.append(values * n if len(values) == 1 else values)
        settings = list(zip(*out))
        for i, (_, start, end, _) in enumerate(settings):
            if start >= end:
                which = f" {i + 1}" if n > 1 else ""
                raise UsageError(f"control guidance{which}: start {start:g} must be before end {end:g} (fractions of "
                                 "the steps)")
        return settings


PREPROCESSORS = ("none", "canny")  # control map from the image: as given, or OpenCV's Canny edges
MAX_CONTROL_SCALE = 10.0  # far beyond use (A1111's ControlNet UI stops at 2)


def _reals(value: Any, label: str, lo: float, hi: float) -> tuple[float, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise UsageError(f"{label} is an empty list")
    return tuple(real(v, label if len(values) == 1 else f"{label} {i + 1}", lo, hi) for i, v in enumerate(values))


def _control(scale, start, end, preprocessors, thresholds) -> dict:
    """The ControlNet fields, checked (their count against the control images: ``control_settings``)."""
    names = preprocessors if isinstance(preprocessors, (list, tuple)) else [preprocessors]
    for name in names:
        if not isinstance(name, str) or name not in PREPROCESSORS:
            raise UsageError(f"control preprocessor must be one of {', '.join(PREPROCESSORS)}, got {name!r}")
    if not names:
        raise UsageError("control_preprocessors is an empty list")
    if isinstance(thresholds, str) or not isinstance(thresholds, (list, tuple)) or len(thresholds) != 2:
        raise UsageError(f"canny thresholds must be two integers (low, high), got {thresholds!r}")
    low, high = (integer(v, f"canny {w} threshold", 0, 10000) for v, w in zip(thresholds, ("low", "high")))
    if low > high:
        raise UsageError(f"canny low threshold {low} is above the high one {high}")
    return dict(controlnet_conditioning_scale=_reals(scale, "controlnet_conditioning_scale", 0.0, MAX_CONTROL_SCALE),
                control_guidance_start=_reals(start, "control_guidance_start", 0.0, 1.0),
                control_guidance_end=_reals(end, "control_guidance_end", 0.0, 1.0),
                control_preprocessors=tuple(names), canny_thresholds=(low, high))


OUTPAINT_FILLS = ("edge", "reflect", "gray")  # how outpainting's new area starts (images.outpaint_canvas)
MAX_MASK_BLUR = 256.0  # pixels; beyond it a mask is a uniform gray


def _image_task(strength, mask_blur, padding_mask_crop, outpaint, outpaint_fill) -> dict:
    """The img2img/inpainting fields, checked."""
    if strength is not None:
        if isinstance(strength, bool) or not isinstance(strength, (numbers.Real, np.integer, np.floating)):
            raise UsageError(f"strength must be a number in (0, 1], got {strength!r}")
        strength = float(strength)
        if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
            raise UsageError(f"strength must be in (0, 1] (0 would keep the image unchanged), got {strength!r}")
    if outpaint is not None:
        if isinstance(outpaint, str) or not isinstance(outpaint, (list, tuple)) or len(outpaint) != 4:
            raise UsageError(f"outpaint must be 4 integers (left, top, right, bottom pixels), got {outpaint!r}")
        outpaint = tuple(integer(v, f"outpaint {side}", 0) for v, side in zip(outpaint, ("left", "top", "right",
                                                                                           "bottom")))
        if not any(outpaint):
            raise UsageError("outpaint adds nothing (all four sides are 0)")
    if not isinstance(outpaint_fill, str) or outpaint_fill not in OUTPAINT_FILLS:
        raise UsageError(f"outpaint fill must be one of {', '.join(OUTPAINT_FILLS)}, got {outpaint_fill!r}")
    return dict(strength=strength, mask_blur=real(mask_blur, "mask_blur", 0.0, MAX_MASK_BLUR),
                padding_mask_crop=None if padding_mask_crop is None else integer(padding_mask_crop,
                                                                                 "padding_mask_crop", 0),
                outpaint=outpaint, outpaint_fill=outpaint_fill)


def check_variation_seed(subseed: Any = -1, subseed_strength: Any = 0.0, seed_resize_from_h: Any = 0,
                         seed_resize_from_w: Any = 0, height: int | None = None, width: int | None = None) -> None:
    """A1111's variation seeds (``subseed``, ``subseed_strength``: the noise slerped towards the subseed's) and seed
    resize (``seed_resize_from_h/w``: the noise of another size, A1111's ``rng.ImageRNG``): accepted as its clients
    send them when they change nothing (strength 0; a resize size of 0 or -1, or the generation's own), refused by
    name otherwise. sdtrt has neither: an image made without them would be a silently different one."""
    integer(subseed, "subseed", RANDOM_SEED, MAX_SEED)
    strength = real(subseed_strength, "subseed_strength", 0.0, 1.0)
    if strength > 0:
        raise UsageError(f"subseed_strength {strength:g}: variation seeds (A1111's subseed/subseed_strength) are not "
                         "supported; send subseed_strength 0")
    h = integer(seed_resize_from_h, "seed_resize_from_h")
    w = integer(seed_resize_from_w, "seed_resize_from_w")
    if h > 0 and w > 0 and (h, w) != (height, width):  # A1111 resizes only when both are positive
        raise UsageError(f"seed_resize_from {w}x{h}: resizing the seed's noise (A1111's seed_resize_from_w/h) is not "
                         "supported; send 0 (or -1)")


# A1111's "Masked content" (inpainting_fill 0..3): what the masked area starts as. fill: the image's surrounding
# colours (images.fill_masked, before the VAE encodes it); original: the image as it is (diffusers); latent noise:
# the initial noise in the masked latent pixels; latent nothing: zeros there (images.latent_fill)
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")


def _flag(value: Any, label: str) -> bool:
    """A bool, or A1111's 0/1."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (numbers.Integral, np.integer)) and int(value) in (0, 1):
        return bool(value)
    raise UsageError(f"{label} must be true or false (or 1 or 0), got {value!r}")


def inpainting_fill(value: Any) -> str:
    """One of INPAINTING_FILLS, from its name (any case; '-' or '_' for the space) or A1111's index 0..3."""
    if isinstance(value, str):
        name = " ".join(value.strip().lower().replace("-", " ").replace("_", " ").split())
        if name in INPAINTING_FILLS:
            return name
    elif not isinstance(value, bool) and isinstance(value, (numbers.Integral, np.integer)) \
            and 0 <= int(value) < len(INPAINTING_FILLS):
        return INPAINTING_FILLS[int(value)]
    choices = ", ".join(f"{i} {n}" for i, n in enumerate(INPAINTING_FILLS))
    raise UsageError(f"inpainting_fill (masked content) must be one of {choices} (the number or the name), "
                     f"got {value!r}")


def inpainting_options(mask_invert: Any = False, fill: Any = "original", overlay: Any = True) -> dict:
    """The inpainting fields of a request (A1111's names: inpainting_mask_invert, inpainting_fill), checked."""
    return dict(mask_invert=_flag(mask_invert, "mask_invert"), inpainting_fill=inpainting_fill(fill),
                overlay=_flag(overlay, "overlay"))


_PAIRS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
          "negative_crops_coords_top_left", "negative_target_size")


def conditioning_options(**given: Any) -> dict:
    """The checked SDXL micro-conditioning, ensemble-of-experts and custom-timestep options (``GenerationRequest``'s
    fields of those names); an unknown name is an error, not ignored."""
    known = set(_PAIRS) | {"aesthetic_score", "negative_aesthetic_score", "denoising_start", "denoising_end",
                           "timesteps", "scheduler_config"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise UsageError(f"unknown generation option {unknown[0]!r}")
    out: dict[str, Any] = {}
    for name in _PAIRS:
        value = given.get(name)
        if value is None:
            continue
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
            raise UsageError(f"{name} must be two integers ({'top, left' if 'crops' in name else 'height, width'}), "
                             f"got {value!r}")
        out[name] = tuple(integer(v, name, 0, 1 << 20) for v in value)
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        if given.get(name) is not None:
            out[name] = real(given[name], name, -1000.0, 1000.0)
    for name in ("denoising_start", "denoising_end"):
        if given.get(name) is not None:
            v = real(given[name], name, 0.0, 1.0)
            if not 0.0 < v < 1.0:
                raise UsageError(f"{name} must be strictly between 0 and 1 (a fraction of the schedule), got {v:g}")
            out[name] = v
    if given.get("scheduler_config") is not None:
        from sdtrt.runtime.sampler_presets import few_step_preset

        out["scheduler_config"] = few_step_preset(given["scheduler_config"]).name
    if given.get("timesteps") is not None:
        ts = given["timesteps"]
        if isinstance(ts, (str, bytes)) or not hasattr(ts, "__len__") or not len(ts):
            raise UsageError(f"timesteps must be a non-empty list of integers, got {ts!r}")
        out["timesteps"] = tuple(integer(t, "timesteps", 0) for t in ts)
    return out
