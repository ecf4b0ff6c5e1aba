"""The data of one generation (``Pipeline.plan`` makes it, the one loop runs it): a request's images as given
(``TaskInputs``), the checked plan (``GenerationPlan``: sampler table, shapes, texts, images, ControlNets), what the
loop starts from (``Start``), each ControlNet's input (``Control``) and the result (``GenerationResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from sdtrt.runtime.conditioning import TextPlan
from sdtrt.runtime.images import SourceImages, canny, prepare_control_image
from sdtrt.runtime.prompts import PromptChunks
from sdtrt.runtime.samplers import SamplerConfig, SamplerTable

TASKS = ("txt2img", "img2img", "inpaint")
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}  # diffusers' defaults for each pipeline


@dataclass(frozen=True)
class TaskInputs:
    """The images of an img2img/inpainting request as given (PIL), after outpainting's canvas and the mask blur."""

    task: str  # one of TASKS
    images: tuple = ()  # PIL images, 1 or one per image of the batch
    masks: tuple | None = None  # PIL masks (inpainting), as many as images


@dataclass(frozen=True)
class GenerationPlan:
    """A checked request, resolved against the engine folder (``Pipeline.plan``)."""

    table: SamplerTable
    sampler: SamplerConfig
    height: int
    width: int
    cfg: bool  # classifier-free guidance on (guidance > 1)
    shape: tuple[int, ...]  # latents (B, C, h, w)
    shapes: dict[str, dict[str, tuple[int, ...]]]  # engine -> input -> shape
    texts: tuple[str, ...]  # what the text encoder encodes, in row order (negatives first, "" for padding)
    chunks: dict[str, PromptChunks]  # each text as 77-token chunks with emphasis weights (the first encoder's)
    task: str = "txt2img"
    strength: float | None = None  # img2img/inpainting: where the schedule starts
    sources: SourceImages | None = None  # the images (and masks) at the generation's size
    controls: tuple["Control", ...] = ()  # the ControlNets used, in table.control_scale's column order
    prompts: tuple[str, ...] = ()  # the prompts and negative prompts as encoded (A1111's <lora:…> tags taken out)
    negatives: tuple[str, ...] = ()
    loras: tuple[tuple[str, float], ...] = ()  # LoRA files and scales applied for this generation
    lora_names: tuple[str, ...] = ()  # their names in the infotext (a tag's name; a file's stem)
    tagged: int = 0  # how many of them (the last) come from <lora:name:weight> prompt tags
    infotext: tuple[tuple[str, object], ...] = ()  # more keys of the images' text (the hires fix's), before Version
    hires: object | None = None  # the hires fix's second pass (hires.plan); this plan is its first
    image_latents: np.ndarray | None = None  # img2img from latents, not an image (the hires fix's second pass)
    masked_content: str = "original"  # inpainting: what the masked area starts as (request.INPAINTING_FILLS)
    text: TextPlan | None = None  # every encoder's chunks (conditioning.py)
    time_ids: np.ndarray | None = None  # (2, n): negative and positive added time ids (a family with them)

    @property
    def inpainting_unet(self) -> bool:
        return "mask" in self.shapes["unet"]

    @property
    def needs_image_latents(self) -> bool:
        """diffusers encodes the image itself for img2img, and for inpainting when the first state or the blend
        needs it (a 4-channel U-Net, or strength < 1)."""
        return self.image_latents is None and (
            self.task == "img2img" or (self.task == "inpaint" and (not self.inpainting_unet or self.strength < 1)))


@dataclass
class GenerationResult:
    images: list  # PIL images, or one (B, H, W, 3) float array in [0, 1] for output_type="np"
    seed: int  # the request's seed (the first image's)
    parameters: list[str]  # one 'parameters' text per image (PNG metadata)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    seeds: list[int] = field(default_factory=list)  # each image's own seed: seed + i (A1111's all_seeds)


@dataclass
class Start:
    """What the loop starts from: the first state, an inpainting U-Net's constant inputs, 4-channel inpainting's
    blend (``mask``, ``image_latents``, ``init_noise``); the same data for the host loop and the device loop."""

    state: np.ndarray  # (B, C, h, w) float32
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    blend: dict[str, np.ndarray] | None = None
    controls: dict[str, np.ndarray] = field(default_factory=dict)  # ControlNet -> control image (B, 3, H, W)


@dataclass(frozen=True)
class Control:
    """One ControlNet of a generation: its component, the control image as given, then as the ControlNet reads it."""

    key: str  # the component (controlnet_NAME)
    name: str
    image: object  # PIL, as given
    scale: float
    start: float
    end: float
    preprocessor: str = "none"
    array: np.ndarray | None = None  # (1, 3, H, W) float32 in [0, 1]

    def prepared(self, height: int, width: int, crop, thresholds: tuple[int, int]) -> "Control":
        """This control with its map made (the preprocessor) and sized as diffusers' control image processor."""
        image = canny(self.image, *thresholds) if self.preprocessor == "canny" else self.image
        return replace(self, array=prepare_control_image(image, height, width, crop))

    def infotext(self, thresholds: tuple[int, int]) -> str:
        """A1111's ControlNet extension's entry ("ControlNet 0": "Module: canny, Model: ..., Weight: 1, ...")."""
        fields = [f"Module: {self.preprocessor}", f"Model: {self.name}", f"Weight: {self.scale:g}",
                  f"Guidance Start: {self.start:g}", f"Guidance End: {self.end:g}"]
        if self.preprocessor == "canny":
            fields += [f"Threshold A: {thresholds[0]}", f"Threshold B: {thresholds[1]}"]
        return ", ".join(fields)  # create_infotext quotes it (it holds commas)
