"""The hires fix (A1111's ``enable_hr``): one plan of two passes through the one loop, txt2img -> resize -> img2img.

The first pass is the request's txt2img at its size, kept as latents (``output_type="latent"``). They are resized to
the target size, either in latent space (the "Latent" upscalers: ``interpolate``, NumPy ports of the
``torch.nn.functional.interpolate`` modes A1111's ``shared.latent_upscale_modes`` names) or as pictures (decode, PIL
resize as A1111's ``images.resize_image`` with the "Lanczos"/"Nearest"/"None" upscalers, encode: the VAE posterior's
mean, where A1111's ``images_tensor_to_samples`` samples it from torch's unseeded global generator). The second pass is
an img2img start from those latents (no VAE encoding of them: ``GenerationPlan.image_latents``), with fresh noise from
the same seed at the new shape, the hires prompts, sampler and steps. Reference: A1111's ``modules/processing.py``
``StableDiffusionProcessingTxt2Img`` (``calculate_target_resolution``, ``init``, ``sample``, ``sample_hr_pass``) and
``sd_samplers_common.setup_img2img_steps``.

Steps as A1111's second pass counts them: ``hr_second_pass_steps`` (0: the first pass's) U-Net steps, run at the end of
a schedule of ``int(steps / min(denoising_strength, 0.999))`` steps (``setup_img2img_steps`` with steps given), which is
diffusers' img2img with that many ``num_inference_steps`` and a strength that skips all but the last ``steps``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sdtrt.errors import UsageError
from sdtrt.runtime.stages import Stages, summed_timings

# A1111's modules/shared.py latent_upscale_modes: name -> torch.nn.functional.interpolate (mode, antialias)
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111's built-in image upscalers (modules/upscaler.py UpscalerNone, UpscalerLanczos, UpscalerNearest): PIL resizes
IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")
UPSCALERS = tuple(LATENT_MODES) + IMAGE_UPSCALERS
DEFAULT_STRENGTH = 0.7  # A1111's UI default (its API's dataclass default is 0.75: the server uses that)
MAX_SCALE = 8.0


@dataclass(frozen=True)
class Hires:
    """What a hires fix asks for (A1111's field in brackets). ``resize`` (hr_resize_x, hr_resize_y), when not (0, 0),
    replaces ``scale`` (hr_scale); ``steps`` 0 (hr_second_pass_steps): the first pass's; ``prompt`` /
    ``negative_prompt`` None (hr_prompt ""): the first pass's; ``sampler`` None (hr_sampler_name): the first pass's."""

    scale: float = 2.0
    resize: tuple[int, int] = (0, 0)
    upscaler: str = "Latent"
    steps: int = 0
    strength: float = DEFAULT_STRENGTH  # denoising_strength
    prompt: str | None = None
    negative_prompt: str | None = None
    sampler: str | None = None

    @classmethod
    def of(cls, value: Any) -> "Hires":
        """A ``Hires``, or one made from a dict of its fields (checked by ``create``)."""
        if isinstance(value, Hires):
            return value
        if not isinstance(value, dict):
            raise UsageError(f"hires must be a runtime.hires.Hires or a dict of its fields, got {type(value).__name__}")
        unknown = sorted(str(k) for k in set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise UsageError(f"hires has no field {', '.join(map(repr, unknown))}; its fields: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls.create(**value)

    @classmethod
    def create(cls, scale: Any = 2.0, resize: Any = (0, 0), upscaler: Any = "Latent", steps: Any = 0,
               strength: Any = DEFAULT_STRENGTH, prompt: Any = None, negative_prompt: Any = None,
               sampler: Any = None) -> "Hires":
        from sdtrt.runtime.request import integer, real
        from sdtrt.runtime.samplers import SAMPLER_NAMES, SAMPLERS

        scale = real(scale, "hires scale", 0.0, MAX_SCALE)
        if isinstance(resize, str) or not isinstance(resize, (tuple, list)) or len(resize) != 2:
            raise UsageError(f"hires resize must be (width, height) in pixels, 0 for one of them to keep the aspect, "
                             f"got {resize!r}")
        resize = (integer(resize[0], "hires resize width", 0), integer(resize[1], "hires resize height", 0))
        if scale == 0 and resize == (0, 0):
            raise UsageError("hires scale must be above 0 (2 doubles the size)")
        if not isinstance(upscaler, str) or upscaler not in UPSCALERS:
            raise UsageError(f"hires upscaler {upscaler!r} is not available; sdtrt has: {', '.join(UPSCALERS)}")
        strength = real(strength, "hires denoising strength", 0.0, 1.0)
        if strength == 0:
            raise UsageError("hires denoising strength must be above 0 (0 would keep the upscaled first pass as it is)")
        for value, label in ((prompt, "hires prompt"), (negative_prompt, "hires negative prompt")):
            if value is not None and not isinstance(value, str):
                raise UsageError(f"{label} must be a string, got {type(value).__name__}")
        if sampler is not None and (not isinstance(sampler, str) or sampler not in SAMPLER_NAMES):
            raise UsageError(f"hires sampler must be one of {', '.join(SAMPLERS)} (or one with a schedule suffix, "
                             f"e.g. euler_karras), got {sampler!r}")
        return cls(scale, resize, upscaler, integer(steps, "hires steps", 0), strength, prompt or None,
                   negative_prompt or None, sampler)


def target_size(width: int, height: int, h: Hires, factor: int = 8) -> tuple[int, int, int, int]:
    """(to_x, to_y, truncate_x, truncate_y): A1111's ``calculate_target_resolution``. The upscaled size, and the
    latent pixels cropped from it (both sides given with another aspect: cover, then crop the middle)."""
    rx, ry = h.resize
    if rx == 0 and ry == 0:
        return int(width * h.scale), int(height * h.scale), 0, 0
    if ry == 0:
        return rx, rx * height // width, 0, 0
    if rx == 0:
        return ry * width // height, ry, 0, 0
    if width / height < rx / ry:
        to_x, to_y = rx, rx * height // width
    else:
        to_x, to_y = ry * width // height, ry
    return to_x, to_y, (to_x - rx) // factor, (to_y - ry) // factor


def second_pass_steps(steps: int, strength: float) -> tuple[int, float]:
    """(schedule length, strength for ``build_table``) that run ``steps`` U-Net steps at the end of A1111's
    ``int(steps / min(strength, 0.999))``-step schedule (``setup_img2img_steps``)."""
    total = int(steps / min(strength, 0.999))
    return total, min((steps + 0.5) / total, 1.0)  # diffusers' get_timesteps: int(total * s) == steps


# ---- latent resizing: torch.nn.functional.interpolate(x, size, mode, antialias, align_corners=False) in NumPy -------

def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _weights(n_in: int, n_out: int, mode: str, antialias: bool) -> np.ndarray:
    """The (n_out, n_in) matrix of one axis of torch's interpolate (ATen's UpSample*.cpp index and weight rules)."""
    w = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    scale = n_in / n_out
    if mode in ("nearest", "nearest-exact"):
        if n_out == n_in:
            src = rows
        elif mode == "nearest" and n_out == 2 * n_in:
            src = rows >> 1
        else:  # nearest_idx / nearest_neighbor_exact_compute_source_index, in float32 as ATen
            s = np.float32(n_in) / np.float32(n_out)
            pos = rows.astype(np.float32) + (np.float32(0.5) if mode == "nearest-exact" else np.float32(0))
            src = np.minimum(np.floor(pos * s).astype(np.int64), n_in - 1)
        w[rows, src] = 1.0
        return w
    if antialias:  # _compute_weights_aa: a filter stretched by the scale when shrinking, taps normalised
        size = 2 if mode == "bilinear" else 4
        support = size * 0.5 * scale if scale >= 1 else size * 0.5
        invscale = 1 / scale if scale >= 1 else 1.0
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            x = (np.arange(lo, hi) - center + 0.5) * invscale
            f = np.maximum(1 - np.abs(x), 0) if mode == "bilinear" else _cubic(x, -0.5)
            w[i, lo:hi] = f / f.sum() if f.sum() != 0 else f
        return w
    src = scale * (rows + 0.5) - 0.5  # area_pixel_compute_source_index, align_corners=False
    if mode == "bilinear":
        src = np.maximum(src, 0)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        np.add.at(w, (rows, i0), 1 - lam)
        np.add.at(w, (rows, i1), lam)
        return w
    if mode == "bicubic":  # A = -0.75, taps clamped to the edge (upsample_bicubic2d's access_with_bounds)
        i0 = np.floor(src).astype(np.int64)
        t = src - i0
        for k in range(-1, 3):
            np.add.at(w, (rows, np.clip(i0 + k, 0, n_in - 1)), _cubic(t - k, -0.75))
        return w
    raise ValueError(f"unknown interpolation mode {mode!r}")


def interpolate(x: np.ndarray, size: tuple[int, int], mode: str, antialias: bool = False) -> np.ndarray:
    """``torch.nn.functional.interpolate(x, size=(h, w), mode=mode, antialias=antialias)`` for (N, C, H, W) float
    arrays (modes bilinear, bicubic, nearest, nearest-exact; align_corners False), as one matrix per axis."""
    wy = _weights(x.shape[2], size[0], mode, antialias)  # (h, H)
    wx = _weights(x.shape[3], size[1], mode, antialias)  # (w, W)
    return np.einsum("hH,ncHW,wW->nchw", wy, x.astype(np.float64), wx, optimize=True).astype(x.dtype)


def resize_image(image, width: int, height: int, upscaler: str):
    """A1111's ``images.resize_image(0, image, width, height, upscaler_name)`` for its PIL upscalers: "None" is one
    LANCZOS resize; "Lanczos"/"Nearest" (``Upscaler.upscale``) resize by the scale with their filter to whole pixels,
    then to the scale's multiple of 8, then LANCZOS to the exact size, where each differs."""
    from PIL import Image

    lanczos = Image.Resampling.LANCZOS
    if upscaler == "None":
        return image.resize((width, height), resample=lanczos)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
        if image.width < dest[0] or image.height < dest[1]:
            image = image.resize((int(image.width * scale), int(image.height * scale)),
                                 resample=lanczos if upscaler == "Lanczos" else Image.Resampling.NEAREST)
        if image.size != dest:
            image = image.resize(dest, resample=lanczos)
    if image.size != (width, height):
        image = image.resize((width, height), resample=lanczos)
    return image


# ---- the plan and the run ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HiresPlan:
    """The second pass of a hires request, checked: its request and plan (an img2img start from latents given at
    run time), the upscaled size and crop, and the U-Net calls of both passes (for progress bars)."""

    spec: Hires
    request: Any  # GenerationRequest of the second pass
    plan: Any  # its GenerationPlan
    upscale_to: tuple[int, int]  # (to_x, to_y) before the crop
    truncate: tuple[int, int]  # latent pixels cropped (x, y)
    first_steps: int  # U-Net calls of each pass
    second_steps: int

    @property
    def total_steps(self) -> int:
        return self.first_steps + self.second_steps


def plan(pipe, req, image=None, mask_image=None, control_images=None):
    """The plan of a hires request (``req.hires``): the first pass's plan with the second pass in its ``hires``.
    Everything is checked here, before any work: the upscaled size against the folder's range, its multiple, the
    engines' shapes and memory of both passes."""
    from sdtrt.runtime.infotext import a1111_names
    from sdtrt.runtime.samplers import build_table

    h: Hires = req.hires
    for given, what in ((image, "input image"), (mask_image, "mask"), (control_images, "control images")):
        if given is not None:
            raise UsageError(f"the hires fix is a txt2img option (A1111's enable_hr): it takes no {what}")
    first_req = replace(req, hires=None)
    first = pipe.plan(first_req)
    factor = pipe.manifest.model.vae_scale_factor
    to_x, to_y, tx, ty = target_size(first.width, first.height, h, factor)
    width, height = (to_x // factor - tx) * factor, (to_y // factor - ty) * factor  # the latents' size after the crop
    asked = f"{h.resize[0]}x{h.resize[1]}" if h.resize != (0, 0) else f"x{h.scale:g}"
    what = f"hires fix {asked} of {first.width}x{first.height}"
    if h.upscaler in LATENT_MODES:
        checked = [(width, height)] if h.resize[0] and h.resize[1] else [(to_x, to_y)]
    else:  # decoded, resized to (to_x, to_y) and encoded whole, then cropped (A1111 crops the latents)
        checked = [(to_x, to_y), (width, height)]
    r = pipe.manifest.ranges
    multiple = max(8, factor)
    for w, hh in dict.fromkeys(checked):
        if w % multiple or hh % multiple:
            raise UsageError(f"{what} is {w}x{hh}, not a multiple of {multiple}: choose a scale or size that gives "
                             "one")
        if not (r.size_min <= w <= r.size_max and r.size_min <= hh <= r.size_max):
            raise UsageError(f"{what} is {w}x{hh}, outside this folder's exported range {r.size_min}..{r.size_max} "
                             "(a smaller hires scale, or re-export with --size)")
    steps = h.steps or req.num_inference_steps
    total, strength = second_pass_steps(steps, h.strength)
    n = len(req.prompt)
    second_req = replace(first_req, width=width, height=height, num_inference_steps=total,
                         prompt=(h.prompt,) * n if h.prompt is not None else req.prompt,
                         negative_prompt=(h.negative_prompt,) * n if h.negative_prompt is not None
                         else req.negative_prompt,
                         scheduler=h.sampler if h.sampler is not None else req.scheduler)
    second = pipe.plan(second_req)  # shapes, memory, prompt chunks at the upscaled size
    if h.upscaler not in LATENT_MODES:
        from sdtrt.runtime.backends import check_shapes

        check_shapes("vae_encoder", pipe.engines["vae_encoder"], {"image": (req.batch, 3, to_y, to_x)})
    table = build_table(second.sampler, total, strength, from_image=True)
    second = replace(second, task="img2img", strength=h.strength, table=table)
    names, hires_names = a1111_names(first.sampler), a1111_names(second.sampler)
    other = h.sampler is not None and hires_names != names  # A1111 writes the second pass's sampler when it differs
    extra = {"Hires upscale": f"{h.scale:g}" if h.resize == (0, 0) else None,
             "Hires resize": f"{h.resize[0]}x{h.resize[1]}" if h.resize != (0, 0) else None,
             "Hires steps": h.steps or None, "Hires upscaler": h.upscaler,
             "Hires sampler": hires_names[0] if other else None,
             "Hires schedule type": (hires_names[1] or "Automatic") if other else None,
             "Hires prompt": h.prompt if h.prompt is not None and set(req.prompt) != {h.prompt} else None,
             "Hires negative prompt": h.negative_prompt if h.negative_prompt is not None
             and set(req.negative_prompt) != {h.negative_prompt} else None}
    info = tuple((k, v) for k, v in extra.items() if v is not None)
    hires = HiresPlan(h, second_req, second, (to_x, to_y), (tx, ty), first.table.num_steps, table.num_steps)
    # the first pass writes the image's text: its size and steps, A1111's Denoising strength and Hires keys
    return replace(first, strength=h.strength, infotext=info, hires=hires)


def run(pipe, req, plan, latents=None, callback=None, seeds=None):
    """Both passes of a hires plan (``plan``), one after the other through ``Pipeline.generate``; ``seeds``: one per
    image, as ``generate`` takes them (both passes use them). A callback that stops the first pass (returns False:
    A1111's interrupt) skips the second, as A1111's ``sample_hr_pass`` does (``if shared.state.interrupted: return
    samples``): the first pass's image is the answer."""
    from sdtrt.errors import NumericalError

    hp: HiresPlan = plan.hires
    t0 = time.perf_counter()
    stages = Stages(callback, hp.total_steps)

    first = pipe.generate(replace(req, hires=None, output_type="latent"), latents=latents,
                          callback=stages.at(0), plan=replace(plan, hires=None), seeds=seeds)
    if stages.stopped:  # interrupted: the first pass's latents decoded, at its own size
        return pipe.decode(replace(req, hires=None), replace(plan, hires=None), first.images, first.seeds,
                           dict(first.timings), t0)
    t = time.perf_counter()
    samples = first.images  # (B, C, h, w)
    factor = pipe.manifest.model.vae_scale_factor
    (to_x, to_y), (tx, ty) = hp.upscale_to, hp.truncate
    spec = hp.spec
    if spec.upscaler in LATENT_MODES:
        mode, antialias = LATENT_MODES[spec.upscaler]
        up = interpolate(samples, (to_y // factor, to_x // factor), mode, antialias)
    else:
        up = _image_upscale(pipe, samples, to_x, to_y, spec.upscaler)
    up = up[:, :, ty // 2:up.shape[2] - (ty + 1) // 2, tx // 2:up.shape[3] - (tx + 1) // 2]
    if not np.isfinite(up).all():
        raise NumericalError("the hires fix's upscaled latents hold NaN/Inf")
    upscale_s = time.perf_counter() - t
    # A1111: a fresh ImageRNG of the same seeds at the new shape; the upscaled latents are the img2img image
    second = pipe.generate(replace(hp.request, seed=first.seed, output_type=req.output_type),
                           callback=stages.at(hp.first_steps), seeds=first.seeds,
                           plan=replace(hp.plan, image_latents=np.ascontiguousarray(up, np.float32)))
    timings = summed_timings(first.timings, second.timings, t0)
    timings["hires_upscale"] = upscale_s
    return type(first)(second.images, first.seed, first.parameters, timings, first.seeds)


def _image_upscale(pipe, samples: np.ndarray, to_x: int, to_y: int, upscaler: str) -> np.ndarray:
    """A1111's image path: decode, clamp to [0, 1], 8 bits (truncated, as its ``astype(np.uint8)``), resize, encode
    (the posterior's mean, where A1111 draws a sample from torch's unseeded generator: module docstring)."""
    from PIL import Image

    vae = pipe.engines["vae_decoder"]
    decoded = vae.run({"latents": samples.astype(vae.input_dtype("latents"))})["image"].astype(np.float32)
    lowres = np.clip((decoded + 1) / 2, 0, 1)  # (B, 3, h, w)
    pictures = [Image.fromarray((255.0 * x.transpose(1, 2, 0)).astype(np.uint8)) for x in lowres]
    resized = np.stack([np.asarray(resize_image(im, to_x, to_y, upscaler), np.float32) / 255 for im in pictures])
    image = resized.transpose(0, 3, 1, 2) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    factor = pipe.manifest.model.vae_scale_factor
    z = np.zeros((len(image), samples.shape[1], to_y // factor, to_x // factor), np.float32)  # the mean: z = 0
    return pipe._posterior(image, z, lambda x: x)  # one input image per image of the batch already
