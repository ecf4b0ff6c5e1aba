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

MAX_GUIDANCE = 100.0  # classifier-free guidance far beyond what any model is used with (A1111's UI stops at 30)
MAX_SEED = 2**64 - 1  # PCG64 takes any 64-bit seed
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
        raise UsageError(f"{label} must be between {lo:g} and {hi:g}, got {value:g}")
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
    output_type: str = "pil"  # "pil" or "np"
    clip_skip: int | None = None  # diffusers' meaning: text-encoder layers skipped at the end (A1111's "Clip skip" - 1)

    @property
    def batch(self) -> int:
        return len(self.prompt) * self.num_images_per_prompt

    @classmethod
    def create(cls, prompt: Any, negative_prompt: Any = None, num_inference_steps: Any = 50, guidance_scale: Any = 7.5,
               height: Any = None, width: Any = None, seed: Any = None, num_images_per_prompt: Any = 1,
               scheduler: Any = None, output_type: Any = "pil", clip_skip: Any = None) -> "GenerationRequest":
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
        if output_type not in ("pil", "np"):
            raise UsageError(f"output_type must be 'pil' or 'np', not {output_type!r}")
        return cls(
            prompt=prompts, negative_prompt=negatives,
            num_inference_steps=integer(num_inference_steps, "steps", 1),
            guidance_scale=real(guidance_scale, "guidance scale", 0.0, MAX_GUIDANCE),
            height=None if height is None else integer(height, "height", 1),
            width=None if width is None else integer(width, "width", 1),
            seed=seed, num_images_per_prompt=integer(num_images_per_prompt, "num_images_per_prompt", 1),
            scheduler=scheduler, output_type=output_type,
            clip_skip=None if clip_skip is None else integer(clip_skip, "clip_skip", 0),
        )
