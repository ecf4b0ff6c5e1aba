"""Named scheduler settings for few-step distilled SDXL models and LoRAs, as their model cards configure diffusers
(``--scheduler-config NAME``): the sampler, the scheduler-config keys set on top of the model's own
(``XScheduler.from_config(pipe.scheduler.config, **config)``), and the card's steps, guidance scale, custom
timesteps and eta. Parity with the cards' diffusers snippets: tests/runtime/test_samplers_presets.py.

Sources (model cards on huggingface.co): stabilityai/sdxl-turbo, ByteDance/SDXL-Lightning, latent-consistency/
lcm-lora-sdxl, ByteDance/Hyper-SD, tianweiy/DMD2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdtrt.runtime.sampler_config import SamplerConfig, SamplerError


@dataclass(frozen=True)
class FewStepPreset:
    """One model card's scheduler settings. ``guidance`` 0 (or anything <= 1) means no classifier-free guidance in
    diffusers: one U-Net pass per step, no negative prompt. ``timesteps``: the card's own (then the step count is
    their number)."""

    name: str
    sampler: str  # a name of samplers.SAMPLERS
    config: tuple[tuple[str, Any], ...]  # scheduler-config keys set on top of the model's
    steps: int
    guidance: float
    timesteps: tuple[int, ...] | None = None
    eta: float | None = None  # None: the sampler's default (samplers.DEFAULT_ETA)
    source: str = ""  # the model card the settings come from

    def scheduler_config(self, model_config: dict[str, Any]) -> dict[str, Any]:
        """The model's scheduler config with the preset's keys set, as diffusers' ``from_config(config, **kwargs)``
        reads it (a key given here is used even where the config lists it in ``_use_default_values``)."""
        if not isinstance(model_config, dict):
            raise SamplerError("scheduler config must be a JSON object")
        out = {**model_config, **dict(self.config)}
        unset = model_config.get("_use_default_values")
        if isinstance(unset, list):
            out["_use_default_values"] = [k for k in unset if k not in dict(self.config)]
        return out

    def sampler_config(self, model_config: dict[str, Any]) -> SamplerConfig:
        """The SamplerConfig this preset runs on a model whose scheduler config is ``model_config``."""
        return SamplerConfig.from_scheduler_config(self.scheduler_config(model_config), self.sampler, eta=self.eta)

    def steps_for(self, steps: int | None) -> int:
        """The step count to build the table with: the card's unless ``steps`` is given (refused when the preset's
        own timesteps fix another count)."""
        if steps is None:
            return self.steps
        if self.timesteps is not None and steps != len(self.timesteps):
            raise SamplerError(f"scheduler config {self.name!r} runs its own {len(self.timesteps)} timesteps "
                               f"{list(self.timesteps)}; it cannot run {steps} steps")
        return steps


_TRAILING = (("timestep_spacing", "trailing"),)
FEW_STEP_PRESETS: dict[str, FewStepPreset] = {p.name: p for p in (
    # SDXL-Turbo: EulerAncestral, trailing, 1-4 steps, guidance_scale=0.0 (its own scheduler config is this)
    FewStepPreset("turbo", "euler_a", _TRAILING, 1, 0.0, source="stabilityai/sdxl-turbo"),
    # SDXL-Lightning 2/4/8-step UNet or LoRA: EulerDiscreteScheduler(timestep_spacing="trailing"), guidance 0; the
    # step count must be the checkpoint's
    FewStepPreset("lightning", "euler", _TRAILING, 4, 0.0, source="ByteDance/SDXL-Lightning"),
    # its 1-step UNet predicts x0: prediction_type="sample"
    FewStepPreset("lightning-1step", "euler", _TRAILING + (("prediction_type", "sample"),), 1, 0.0,
                  source="ByteDance/SDXL-Lightning (sdxl_lightning_1step_unet_x0)"),
    # LCM-LoRA: LCMScheduler.from_config, 4 steps (2-8), guidance 1 (1-2)
    FewStepPreset("lcm", "lcm", (), 4, 1.0, source="latent-consistency/lcm-lora-sdxl"),
    # Hyper-SDXL N-step LoRAs (2/4/8): DDIMScheduler(timestep_spacing="trailing"), guidance 0
    FewStepPreset("hyper", "ddim", _TRAILING, 4, 0.0, source="ByteDance/Hyper-SD (Hyper-SDXL-Nsteps-lora)"),
    # Hyper-SDXL 1-step UNet: LCMScheduler with timesteps=[800] ("Use LCM scheduler instead of ddim scheduler to
    # support specific timestep number inputs")
    FewStepPreset("hyper-1step", "lcm", (), 1, 0.0, timesteps=(800,),
                  source="ByteDance/Hyper-SD (Hyper-SDXL-1step-Unet)"),
    # Hyper-SDXL unified 1-step LoRA (1-8 steps): TCDScheduler, eta=1.0 ("lower eta results in more detail for
    # multi-steps inference"), guidance 0
    FewStepPreset("hyper-tcd", "tcd", (), 1, 0.0, eta=1.0, source="ByteDance/Hyper-SD (Hyper-SDXL-1step-lora)"),
    # DMD2 4-step UNet / LoRA: LCMScheduler with the training timesteps [999, 749, 499, 249], guidance 0
    FewStepPreset("dmd2", "lcm", (), 4, 0.0, timesteps=(999, 749, 499, 249), source="tianweiy/DMD2 (4-step)"),
    # DMD2 1-step UNet: LCMScheduler, timesteps=[399]
    FewStepPreset("dmd2-1step", "lcm", (), 1, 0.0, timesteps=(399,), source="tianweiy/DMD2 (1-step)"),
)}


def few_step_preset(name: str) -> FewStepPreset:
    """The preset called ``name`` (case and ``_``/``-`` insensitive); an unknown name is one SamplerError line
    naming those there are."""
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else None
    if key not in FEW_STEP_PRESETS:
        raise SamplerError(f"unknown scheduler config {name!r}; choose one of {', '.join(FEW_STEP_PRESETS)}")
    return FEW_STEP_PRESETS[key]
