"""Base + refiner as SDXL's ensemble of experts (Podell et al. 2023, arXiv:2307.01952, section 2.5; diffusers'
"ensemble of expert denoisers"): the base model runs the first part of the schedule (``denoising_end``) and hands
its latents over, not decoded, to the refiner, which runs the rest (``denoising_start``) and decodes. Both runs are
the one loop (``Pipeline.generate``); the hand-over is data: a table cut at the switch and a first state that is
the base's latents as they are (``samplers.build_table``).

NVIDIA's demo instead runs the whole base, decodes, and runs the refiner as an img2img at strength 0.3. A1111's
``refiner_switch_at`` is the same switch, as a fraction of the steps; here it is diffusers' fraction of the
training timesteps (``denoising_end``), which equals it for the usual spacings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from sdtrt.errors import UsageError
from sdtrt.manifest import Manifest, ModelInfo
from sdtrt.runtime.conditioning import for_model
from sdtrt.runtime.request import GenerationRequest, real
from sdtrt.runtime.stages import Stages, summed_timings

DEFAULT_SWITCH = 0.8  # diffusers' documented high_noise_frac; A1111's default refiner_switch_at


def check_pair(base: Manifest, refiner: Manifest) -> None:
    """Refuse a refiner whose latents are not the base's (another VAE space), with the reason."""
    a, b = base.model, refiner.model
    for what, x, y in (("latent channels", a.latent_channels, b.latent_channels),
                       ("VAE factor", a.vae_scale_factor, b.vae_scale_factor),
                       ("VAE scaling factor", a.vae_scaling_factor, b.vae_scaling_factor)):
        if x != y:
            raise UsageError(f"the refiner's {what} ({y}) is not the base model's ({x}): its latents are in another "
                             "space, so the hand-over would be wrong")
    if any(s.name == "mask" for s in refiner.components["unet"].inputs):
        raise UsageError("the refiner is an inpainting model: use a text-to-image refiner")


def split(req: GenerationRequest, switch_at: float) -> GenerationRequest:
    """``req`` checked for a base + refiner run (the switch strictly inside the schedule, no hires fix, no
    denoising_start/end of its own); each model's request is then ``base_request`` / ``refiner_request``."""
    switch_at = real(switch_at, "refiner switch", 0.0, 1.0)
    if not 0.0 < switch_at < 1.0:
        raise UsageError(f"the refiner switch must be strictly between 0 and 1, got {switch_at:g}")
    if req.hires is not None:
        raise UsageError("the hires fix with a refiner is not supported: use one or the other")
    if req.denoising_start is not None or req.denoising_end is not None:
        raise UsageError("denoising_start/denoising_end are set by the refiner switch; leave them out")
    return replace(req, denoising_end=switch_at)


def base_request(info: ModelInfo, req: GenerationRequest) -> GenerationRequest:
    """The base's part of a ``split`` request: to the switch, latents out; only the conditioning it takes (one
    request for two models: the refiner's aesthetic scores are not the base's)."""
    return replace(for_model(info, req), output_type="latent")


def refiner_request(info: ModelInfo, req: GenerationRequest) -> GenerationRequest:
    """The refiner's part of a ``split`` request: from the switch, the base's latents as its image. LoRAs are the
    base model's (diffusers loads them into the base pipeline; a base LoRA's U-Net layers are not the refiner's):
    the prompts' ``<lora:…>`` tags are taken out; textual-inversion tokens stay (the refiner's encoder reads clip_g)."""
    from sdtrt.runtime.lora import collect_tags

    texts, _ = collect_tags(req.prompt + req.negative_prompt)
    n = len(req.prompt)
    return replace(for_model(info, req), prompt=tuple(texts[:n]), negative_prompt=tuple(texts[n:]),
                   denoising_start=req.denoising_end, denoising_end=None, strength=None)


def refiner_keys(name: str, manifest: Manifest, switch_at: float,
                 req: GenerationRequest | None = None) -> tuple[tuple[str, str], ...]:
    """A1111's infotext keys of a refined image, and sdtrt's of the refiner's own conditioning (its aesthetic
    scores, which the base's request does not carry)."""
    from sdtrt.runtime.infotext import conditioning_infotext

    own = tuple(conditioning_infotext(refiner_request(manifest.model, req)).items()) if req is not None else ()
    return (("Refiner", f"{name} [{manifest.components['unet'].sha256[:10]}]"),
            ("Refiner switch at", f"{switch_at:g}"), *own)


@dataclass(frozen=True)
class RefinerPlan:
    """Both runs of a base + refiner request, checked (``plan``): the base's plan (its images' text carries the
    refiner keys) and request, the refiner's request and step count."""

    base_request: GenerationRequest
    base_plan: object  # GenerationPlan
    refiner_request: GenerationRequest
    refiner_steps: int

    @property
    def total_steps(self) -> int:
        return self.base_plan.table.num_steps + self.refiner_steps


def plan(base, refiner, req: GenerationRequest, switch_at: float = DEFAULT_SWITCH, image=None,
         refiner_name: str | None = None) -> RefinerPlan:
    """Everything about a base + refiner request that can be checked before any work: both models' shapes, the
    switch, the pair's latent space. ``image``: img2img on the base."""
    both = split(req, switch_at)
    check_pair(base.manifest, refiner.manifest)
    first_req = base_request(base.manifest.model, both)
    second_req = refiner_request(refiner.manifest.model, both)
    first = base.plan(first_req, image=image)
    second = refiner.plan(second_req, image=_placeholder(first))  # its shapes and memory, before any work
    keys = refiner_keys(refiner_name or refiner.model_name, refiner.manifest, both.denoising_end, both)
    first = replace(first, infotext=first.infotext + tuple(k for k in keys if k[0] not in dict(first.infotext)))
    return RefinerPlan(first_req, first, second_req, second.table.num_steps)


def run(base, refiner, rp: RefinerPlan, callback=None, seeds=None):
    """Both runs of ``rp``: the base to the switch, the refiner from its latents (the same seeds). Returns the
    refiner's ``GenerationResult`` with the base's images' text (A1111's ``Refiner``, ``Refiner switch at``). A
    callback that stops the base (returns False) skips the refiner: the base's latents decoded by the base."""
    t0 = time.perf_counter()
    stages = Stages(callback, rp.total_steps)

    first = base.generate(rp.base_request, plan=rp.base_plan, callback=stages.at(0), seeds=seeds)
    if stages.stopped:
        out = replace(rp.base_request, output_type=rp.refiner_request.output_type)
        return base.decode(out, rp.base_plan, first.images, first.seeds, dict(first.timings), t0)
    second = refiner.generate(rp.refiner_request, image=first.images, seeds=first.seeds,
                              callback=stages.at(rp.base_plan.table.num_steps))
    timings = summed_timings(first.timings, second.timings, t0)
    return type(second)(second.images, first.seed, first.parameters, timings, first.seeds)


def generate(base, refiner, req: GenerationRequest, switch_at: float = DEFAULT_SWITCH, callback=None, seeds=None,
             image=None, refiner_name: str | None = None):
    """Images of ``req`` made by ``base`` up to ``switch_at`` and by ``refiner`` from there (the same steps, seeds
    and prompts): ``plan`` then ``run``."""
    return run(base, refiner, plan(base, refiner, req, switch_at, image, refiner_name), callback, seeds)


def _placeholder(plan):
    """Zero latents of the hand-over's shape, to plan (check) the refiner's run before the base runs."""
    import numpy as np

    return np.zeros(plan.shape, np.float32)  # (B, C, h, w)
