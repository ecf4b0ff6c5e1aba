"""Generation parameters in AUTOMATIC1111's ``parameters`` text (PNG text chunk), written and read back.

Format (A1111 ``modules/processing.py create_infotext``, parsed by ``modules/infotext_utils.py``)::

    prompt (may span lines)
    Negative prompt: ...            (omitted when empty)
    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: ...

Values holding ``,``, ``:`` or a newline are JSON-quoted. A1111 writes "Clip skip" only above 1, and reads a
missing one as 1. "Seed" is the image's own seed (image i of a batch: seed + i, ``seeds.py``), so it regenerates
that image alone; like A1111 (since 1.6) no "Batch size"/"Batch pos" is written. Older sdtrt images carry them: their
batch shared one generator, which is no longer reproduced (``replay`` says so).

LoRAs and embeddings are recorded as A1111 records them: ``Lora hashes: "name: hash, ..."`` (A1111's short hash of
each LoRA file) and ``TI hashes: "name: hash, ..."`` (of each embedding the prompts use); a LoRA's weight is in its
``<lora:name:weight>`` prompt tag, and for LoRAs applied without a tag (``--lora FILE:W``) in sdtrt's
``Lora weights: "name: W, ..."``. ``replay.py`` finds and checks them when an image is replayed.

A1111's reader has no escape: a prompt line starting with ``Negative prompt:`` would be read as the negative prompt's
start. Such a line is written with a backslash before it, which A1111's prompt parser drops (a backslash escapes only
brackets and backslashes, a lone one vanishes), so A1111 encodes the prompt unchanged, and ``parse_infotext`` removes
it again.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from sdtrt.errors import UsageError

# sdtrt sampler -> (A1111 sampler name, A1111 schedule type or None for "Automatic")
A1111_SAMPLERS = {
    "ddim": ("DDIM", None), "pndm": ("PLMS", None), "lms": ("LMS", None), "euler": ("Euler", None),
    "euler_a": ("Euler a", None), "dpmpp_2m": ("DPM++ 2M", None), "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "lcm": ("LCM", None), "unipc": ("UniPC", None),
    "tcd": ("TCD", None),  # not an A1111 sampler (ComfyUI and Forge call it TCD)
}
# A1111's other names of its samplers (modules/sd_samplers_kdiffusion.py samplers_k_diffusion, sd_samplers_timesteps)
A1111_ALIASES = {"dpmpp_2m": ["k_dpmpp_2m"], "euler_a": ["k_euler_a", "k_euler_ancestral"], "euler": ["k_euler"],
                 "lms": ["k_lms"], "ddim": ["ddim"], "pndm": ["plms"], "unipc": ["unipc"], "lcm": ["k_lcm"]}
# A1111's schedule types (modules/sd_schedulers.py, v1.10): name -> (label, aliases, default_rho, need_inner_model,
# sdtrt's schedule: samplers.SCHEDULES, None for the sampler's own). Uniform and Normal space the timesteps evenly
# over the whole range (diffusers' "linspace"), SGM Uniform and Simple drop the last one ("trailing", as diffusers'
# scheduler docs map them), DDIM's is "leading"; Karras and Exponential re-space the sigmas.
A1111_SCHEDULERS = {
    "automatic": ("Automatic", None, -1.0, False, None),
    "uniform": ("Uniform", None, -1.0, True, "linspace"),
    "karras": ("Karras", None, 7.0, False, "karras"),
    "exponential": ("Exponential", None, -1.0, False, "exponential"),
    "sgm_uniform": ("SGM Uniform", ["SGMUniform"], -1.0, True, "trailing"),
    "simple": ("Simple", None, -1.0, True, "trailing"),
    "normal": ("Normal", None, -1.0, True, "linspace"),
    "ddim": ("DDIM", None, -1.0, True, "leading"),
}
# A1111's schedule types sdtrt has no table for (refused by name rather than run as another)
A1111_MISSING_SCHEDULERS = {"polyexponential": "Polyexponential", "kl_optimal": "KL Optimal",
                            "align_your_steps": "Align Your Steps", "beta": "Beta"}
SCHEDULE_LABELS = {"karras": "Karras", "exponential": "Exponential", "trailing": "SGM Uniform", "linspace": "Normal",
                   "leading": "DDIM"}  # what the infotext's "Schedule type" says for each of sdtrt's schedules
_LEGACY = {"DPM++ 2M Karras": ("DPM++ 2M", "Karras"), "LMS Karras": ("LMS", "Karras")}  # A1111 before 1.9


def _key(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").split())


def a1111_schedule(text: str | None) -> tuple[str | None, bool]:
    """(sdtrt schedule or None for Automatic, known) of an A1111 schedule type given by name, label or alias in any
    case; unknown (or empty) text is Automatic with known=False. One sdtrt lacks is a UsageError naming those it
    has."""
    if not text:
        return None, text is None or text == ""
    key = _key(text)
    for name, (label, aliases, *_, schedule) in A1111_SCHEDULERS.items():
        if key in {_key(name), _key(label), *(_key(a) for a in aliases or ())}:
            return schedule, True
    if key in {_key(k) for k in A1111_MISSING_SCHEDULERS} | {_key(v) for v in A1111_MISSING_SCHEDULERS.values()}:
        raise UsageError(f"schedule type {text!r} is not available in sdtrt; it has: "
                         f"{', '.join(label for label, *_ in A1111_SCHEDULERS.values())}")
    return None, False


def a1111_sampler(text: str) -> tuple[str | None, str | None]:
    """(sdtrt sampler, sdtrt schedule named in it) of an A1111 sampler name ("DPM++ 2M Karras" is "DPM++ 2M" with the
    Karras schedule, as A1111's get_sampler_and_scheduler splits it), an alias or sdtrt's own name, in any case;
    (None, None) when unknown."""
    from sdtrt.runtime.samplers import SAMPLERS, split_schedule

    key = _key(text)
    for ours, (name, schedule) in A1111_SAMPLERS.items():
        if key in {_key(ours), _key(name + (f" {schedule}" if schedule else "")),
                   *(_key(a) for a in A1111_ALIASES.get(ours, ()))} and (schedule is None or key != _key(name)):
            return ours, None
    base, schedule = split_schedule(text.strip().lower())
    if base in SAMPLERS:
        return base, schedule
    for name, (label, aliases, *_, sched) in A1111_SCHEDULERS.items():
        for option in (label, name, *(aliases or ())):
            if sched is not None and key.endswith(" " + _key(option)):
                ours, inner = a1111_sampler(key[:-len(_key(option)) - 1])
                if ours is not None and inner is None:
                    return ours, sched
    return None, None


def sdtrt_scheduler(sampler: str, schedule: str | None) -> str:
    """sdtrt's sampler name of ``sampler`` run on ``schedule`` (e.g. "euler_karras"; "dpmpp_2m_karras")."""
    if schedule is None:
        return sampler
    if sampler.endswith("_karras") and schedule == "karras":
        return sampler
    base = "dpmpp_2m" if sampler == "dpmpp_2m_karras" else sampler
    return f"{base}_{schedule}"


def a1111_names(sampler) -> tuple[str, str | None]:
    """(A1111 sampler name, schedule type or None for Automatic) of a SamplerConfig, for the infotext."""
    name, schedule = A1111_SAMPLERS[sampler.name]
    if sampler.schedule is not None:
        return name, SCHEDULE_LABELS[sampler.schedule]
    if schedule is None and sampler.use_karras_sigmas:
        return name, "Karras"
    if schedule is None and sampler.use_exponential_sigmas:
        return name, "Exponential"
    return name, schedule
_NEGATIVE = "Negative prompt:"
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if ("," in text or ":" in text or "\n" in text) else text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _escape(text: str) -> str:
    """A backslash before each line A1111's reader would take for the start of the negative prompt."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.lstrip().startswith(_NEGATIVE):
            cut = len(line) - len(line.lstrip())
            lines[i] = f"{line[:cut]}\\{line[cut:]}"
    return "\n".join(lines)


def _unescape(line: str) -> str:
    return line[1:] if line.startswith("\\" + _NEGATIVE) else line


def create_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """The text A1111 writes: ``params`` in order, None values left out; prompt lines that start as the negative
    prompt's marker does are escaped (module docstring)."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\n{_NEGATIVE} {_escape(negative_prompt)}" if negative_prompt else ""
    return f"{_escape(prompt)}{negative}\n{line}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's ``parse_generation_parameters``: "Prompt", "Negative prompt" and every ``Key: value``;
    ``Size`` is split into ``Size-1`` (width) and ``Size-2`` (height). A prompt line escaped by ``create_infotext``
    reads back without its backslash."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative, line = True, line[len(_NEGATIVE):].strip()
        (negative if in_negative else prompt).append(_unescape(line))
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = unquote(value)
        m = _SIZE.match(value)
        if m:
            out[f"{key}-1"], out[f"{key}-2"] = m.group(1), m.group(2)
        else:
            out[key] = value
    out.setdefault("Clip skip", "1")
    return out


@dataclass(frozen=True)
class Replay:
    """What a ``parameters`` text asks for, in sdtrt's terms (None: not in the text)."""

    prompt: str
    negative_prompt: str
    steps: int | None
    scheduler: str | None
    karras: bool  # "Schedule type: Karras" on a sampler whose name does not say it
    cfg: float | None
    seed: int | None
    width: int | None
    height: int | None
    clip_skip: int  # A1111's: 1 = the last layer
    shared_batch: str | None  # an image of an older sdtrt's batch, whose images shared one generator: its place
    model_hash: str | None
    # made from an image (A1111's img2img keys; "Outpaint" and "Outpaint fill" are sdtrt's)
    strength: float | None = None
    mask_blur: float | None = None
    padding_mask_crop: int | None = None
    outpaint: tuple[int, int, int, int] | None = None
    outpaint_fill: str | None = None
    # inpainting as A1111 writes it: "Mask mode: Inpaint not masked", "Masked content" (absent: original); sdtrt's
    # "Inpaint overlay: off" (diffusers' raw output)
    mask_invert: bool | None = None
    inpainting_fill: str | None = None
    overlay: bool | None = None
    # ControlNets, in order: A1111's ControlNet extension's fields ("Module", "Model", "Weight", "Guidance Start", ...)
    controls: tuple[dict, ...] = ()
    # what the image was made with besides the model, as (name, short hash) in the text's order: A1111's "Lora hashes"
    # (tagged, fused and --lora LoRAs) and "TI hashes" (embeddings); sdtrt's "Lora weights": LoRAs without a tag
    lora_hashes: tuple[tuple[str, str], ...] = ()
    lora_weights: tuple[tuple[str, float], ...] = ()
    ti_hashes: tuple[tuple[str, str], ...] = ()
    # the hires fix (A1111's "Hires upscale"/"Hires resize", "Hires upscaler", "Hires steps", "Denoising strength",
    # "Hires prompt", "Hires negative prompt", "Hires sampler"): the fields of runtime.hires.Hires; None: none
    hires: dict | None = None
    # sdtrt's keys of SDXL's micro-conditioning, a few-step preset, custom timesteps (GenerationRequest fields) and
    # A1111's "Refiner" (the refiner's name [hash]) and "Refiner switch at"
    conditioning: dict | None = None
    refiner: str | None = None
    refiner_switch_at: float | None = None

    @property
    def from_image(self) -> bool:
        return self.strength is not None or self.outpaint is not None


def replay(text: str) -> Replay:
    """Read a ``parameters`` text (sdtrt's or A1111's) into settings; unsupported samplers are refused by name."""
    p = parse_infotext(text)
    if "Steps" not in p:  # A1111 and sdtrt always write it; without it the text is a caption, not settings
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        raise UsageError(f"the image's parameters text ({first!r}...) holds no generation settings (no 'Steps: ...' "
                         "in a last line of at least 3 'Key: value' settings, which A1111 and sdtrt write): give the "
                         "prompt and settings instead")

    def number(key, kind):
        if key not in p:
            return None
        try:
            if kind is int and re.fullmatch(r"\s*-?\d+\s*", p[key]):
                return int(p[key])  # exactly: a seed near 2^63 does not survive a float
            value = kind(float(p[key])) if kind is int else kind(p[key])
        except (ValueError, OverflowError):
            raise UsageError(f"the image's parameters hold {key}: {p[key]!r}, not a number") from None
        if not math.isfinite(value):
            raise UsageError(f"the image's parameters hold {key}: {p[key]!r}, not a finite number")
        return value

    scheduler, karras = None, False
    if "Sampler" in p:
        scheduler = _scheduler_of(p["Sampler"], p.get("Schedule type"), "the image was made with")

    def count(key, lo):  # a whole number, not number()'s int(float(...)): "2.5" images is not 2
        if key not in p:
            return None
        if not re.fullmatch(r"\s*\d+\s*", p[key]) or int(p[key]) < lo:
            raise UsageError(f"the image's parameters hold {key}: {p[key]!r}, not a "
                             f"{'positive' if lo else 'non-negative'} integer")
        return int(p[key])

    if "Size" in p:  # parse_infotext splits a WIDTHxHEIGHT of digits into Size-1 and Size-2
        raise UsageError(f"the image's parameters hold Size: {p['Size']!r}, not WIDTHxHEIGHT in pixels")
    width, height = number("Size-1", int), number("Size-2", int)
    if width is not None and (width < 1 or height < 1):
        raise UsageError(f"the image's parameters hold Size: {width}x{height}: width and height must be positive")
    # A1111 before 1.6 wrote "Batch size"/"Batch pos" beside each image's own seed: nothing to do. An sdtrt image
    # with them shared its batch's one generator (before seed + i): its seed no longer regenerates it.
    shared_batch = None
    if "Batch pos" in p and p.get("Version", "").startswith("sdtrt"):
        shared_batch = f"Batch pos: {p['Batch pos']} of Batch size: {p.get('Batch size', '?')}"
    clip = number("Clip skip", int)
    outpaint = None
    if "Outpaint" in p:
        if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*){3}", p["Outpaint"]):
            raise UsageError(f"the image's parameters hold Outpaint: {p['Outpaint']!r}, not 4 pixel counts L,T,R,B")
        outpaint = tuple(int(v) for v in p["Outpaint"].split(","))
    return Replay(prompt=p["Prompt"], negative_prompt=p["Negative prompt"], steps=number("Steps", int),
                  scheduler=scheduler, karras=karras, cfg=number("CFG scale", float), seed=number("Seed", int),
                  width=width, height=height, clip_skip=clip or 1,
                  shared_batch=shared_batch, model_hash=p.get("Model hash"),
                  # A1111's txt2img writes Denoising strength for its hires. fix pass too: not an input image
                  strength=None if any(k.startswith("Hires") for k in p) else number("Denoising strength", float),
                  mask_blur=number("Mask blur", float),
                  padding_mask_crop=count("Masked area padding", 0) if p.get("Inpaint area") == "Only masked" else None,
                  outpaint=outpaint, outpaint_fill=p.get("Outpaint fill"), **_inpainting(p), controls=_controls(p),
                  lora_hashes=_pairs(p, "Lora hashes", _hash), lora_weights=_pairs(p, "Lora weights", _weight),
                  ti_hashes=_pairs(p, "TI hashes", _hash), hires=_hires(p, number),
                  conditioning=_conditioning(p, number), refiner=p.get("Refiner"),
                  refiner_switch_at=number("Refiner switch at", float))


# sdtrt's infotext keys of GenerationRequest fields A1111 does not write: key -> (field, kind) ("pair": a (height,
# width) size written WxH as A1111's Size, or a (top, left) crop written TOPxLEFT; "ints": space-separated timesteps)
CONDITIONING_KEYS = {"Original size": ("original_size", "pair"), "Crop top left": ("crops_coords_top_left", "pair"),
                     "Target size": ("target_size", "pair"),
                     "Negative original size": ("negative_original_size", "pair"),
                     "Negative crop top left": ("negative_crops_coords_top_left", "pair"),
                     "Negative target size": ("negative_target_size", "pair"),
                     "Aesthetic score": ("aesthetic_score", float),
                     "Negative aesthetic score": ("negative_aesthetic_score", float),
                     "Scheduler config": ("scheduler_config", str), "Timesteps": ("timesteps", "ints")}


def conditioning_infotext(req) -> dict:
    """The infotext keys of ``req``'s micro-conditioning, preset and timesteps that differ from the defaults."""
    out = {}
    for key, (field, kind) in CONDITIONING_KEYS.items():
        value = getattr(req, field)
        if value is None or (field, value) in (("aesthetic_score", 6.0), ("negative_aesthetic_score", 2.5)):
            continue
        size = kind == "pair" and "crop" not in key.lower()
        out[key] = (f"{value[1]}x{value[0]}" if size else f"{value[0]}x{value[1]}" if kind == "pair" else " ".join(map(str, value)) if kind == "ints"
                    else f"{value:g}" if kind is float else value)
    return out


def _conditioning(p: dict[str, str], number) -> dict | None:
    """``CONDITIONING_KEYS`` of a text as GenerationRequest fields; None: none. (parse_infotext splits an AxB of
    digits into KEY-1 and KEY-2.)"""
    out = {}
    for key, (field, kind) in CONDITIONING_KEYS.items():
        if kind == "pair" and f"{key}-1" in p:
            a, b = number(f"{key}-1", int), number(f"{key}-2", int)
            out[field] = (a, b) if "crop" in key.lower() else (b, a)  # sizes: WxH in the text, (height, width)
        elif kind == "pair" and key in p:
            raise UsageError(f"the image's parameters hold {key}: {p[key]!r}, not AxB in pixels")
        elif key in p and kind == "ints":
            if not re.fullmatch(r"\s*\d+(\s+\d+)*\s*", p[key]):
                raise UsageError(f"the image's parameters hold {key}: {p[key]!r}, not timesteps")
            out[field] = tuple(int(v) for v in p[key].split())
        elif key in p:
            out[field] = number(key, float) if kind is float else p[key]
    return out or None


def _hires(p: dict[str, str], number) -> dict | None:
    """The hires fix of a text (A1111's keys, as its ``StableDiffusionProcessingTxt2Img.init`` and
    ``calculate_target_resolution`` write them) as ``runtime.hires.Hires`` fields; None: the text has none."""
    if not any(k.startswith("Hires") for k in p):
        return None
    spec: dict = {"upscaler": p.get("Hires upscaler", "Latent"), "steps": number("Hires steps", int) or 0}
    if "Hires resize-1" in p:
        spec["resize"] = (number("Hires resize-1", int), number("Hires resize-2", int))
    elif "Hires upscale" in p:
        spec["scale"] = number("Hires upscale", float)
    if "Denoising strength" in p:
        spec["strength"] = number("Denoising strength", float)
    for key, field in (("Hires prompt", "prompt"), ("Hires negative prompt", "negative_prompt")):
        if key in p:
            spec[field] = p[key]
    if "Hires sampler" in p:
        spec["sampler"] = _scheduler_of(p["Hires sampler"], p.get("Hires schedule type"),
                                        "the image's hires fix used")
    return spec


def _scheduler_of(sampler: str, schedule_type: str | None, made: str) -> str:
    """sdtrt's sampler name of an infotext's A1111 sampler and schedule type ("Sampler"/"Schedule type", or the
    hires fix's "Hires sampler"/"Hires schedule type"), or a UsageError naming what sdtrt lacks."""
    ours, named = a1111_sampler(sampler)
    if ours is None:
        known = sorted({n for n, _ in A1111_SAMPLERS.values()})
        raise UsageError(f"{made} the sampler {sampler!r}, which sdtrt does not have ({', '.join(known)}); pass "
                         "--scheduler to choose one")
    schedule, known = a1111_schedule(schedule_type)
    if not known:
        raise UsageError(f"{made} schedule type {schedule_type!r}, which sdtrt does not know; pass --scheduler to "
                         "choose one")
    scheduler = sdtrt_scheduler(ours, schedule or named)
    check_schedule(scheduler, sampler, schedule_type)
    return scheduler


def check_schedule(scheduler: str, sampler: str, schedule: str | None) -> None:
    """A UsageError in A1111's terms when sdtrt's sampler has no such schedule (its diffusers class lacks it)."""
    from sdtrt.runtime.samplers import schedules_for, split_schedule

    base, sched = split_schedule(scheduler)
    if sched is not None and sched not in schedules_for(base):
        takes = [SCHEDULE_LABELS[s] for s in schedules_for(base)]
        label = schedule or SCHEDULE_LABELS[sched]
        raise UsageError(f"sampler {sampler!r} has no schedule type {label!r} in sdtrt (diffusers' scheduler for it "
                         f"has none); it takes: {', '.join(['Automatic', *takes])}")


_MASK_MODES = {"Inpaint masked": False, "Inpaint not masked": True}  # A1111's img2img "Mask mode" choices


def _inpainting(p: dict[str, str]) -> dict:
    """The inpainting keys of an image's text (None where absent: the image was not inpainted, or A1111's default)."""
    from sdtrt.runtime.request import inpainting_fill

    out = {}
    if "Mask mode" in p:
        if p["Mask mode"] not in _MASK_MODES:
            raise UsageError(f"the image's parameters hold Mask mode: {p['Mask mode']!r}, not one of "
                             f"{', '.join(_MASK_MODES)}")
        out["mask_invert"] = _MASK_MODES[p["Mask mode"]]
    if "Masked content" in p:
        try:
            out["inpainting_fill"] = inpainting_fill(p["Masked content"])
        except UsageError:
            raise UsageError(f"the image's parameters hold Masked content: {p['Masked content']!r}, not one of fill, "
                             "original, latent noise, latent nothing") from None
    if "Inpaint overlay" in p:
        if p["Inpaint overlay"] not in ("on", "off"):
            raise UsageError(f"the image's parameters hold Inpaint overlay: {p['Inpaint overlay']!r}, not on or off")
        out["overlay"] = p["Inpaint overlay"] == "on"
    return out


def _hash(text: str) -> str | None:
    return text.lower() if re.fullmatch(r"[0-9a-fA-F]{8,64}", text) else None


def _weight(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _pairs(p: dict[str, str], key: str, read) -> tuple:
    """A1111's "name: value, name: value" lists ("Lora hashes", "TI hashes"; names have no ',' or ':'), read as
    A1111's Lora extension reads them (split at ',' then at the first ':'), each value checked by ``read``."""
    if key not in p:
        return ()
    out = []
    for part in p[key].split(","):
        name, sep, value = part.partition(":")
        checked = read(value.strip()) if sep else None
        if not name.strip() or checked is None:
            raise UsageError(f"the image's parameters hold {key}: {p[key]!r}, not a list of 'name: "
                             f"{'hash' if read is _hash else 'weight'}' (the PNG's parameters were edited or damaged)")
        out.append((name.strip(), checked))
    return tuple(out)


def _controls(p: dict[str, str]) -> tuple[dict, ...]:
    """The "ControlNet N" entries (A1111's ControlNet extension's format: "Module: canny, Model: ..., Weight: 1,
    Guidance Start: 0, Guidance End: 1, Threshold A: 100, Threshold B: 200"), in order of N."""
    found = sorted((int(m.group(1)), v) for k, v in p.items() if (m := re.fullmatch(r"ControlNet (\d+)", k)))
    controls = []
    for n, value in found:
        fields = dict(part.split(":", 1) for part in (x.strip() for x in value.split(",")) if ":" in part)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        for key in ("Weight", "Guidance Start", "Guidance End", "Threshold A", "Threshold B"):
            if key in fields:
                try:
                    fields[key] = float(fields[key])
                except ValueError:
                    raise UsageError(f"the image's parameters hold ControlNet {n} {key}: {fields[key]!r}, not a "
                                     "number") from None
        controls.append(fields)
    return tuple(controls)


# output formats by file suffix, as A1111 saves them (modules/images.py, save_image_with_geninfo)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
JPEG_QUALITY = 80  # A1111's default jpeg_quality (also used for lossy WebP)
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286  # the Exif sub-IFD and its UserComment tag
# EXIF UserComment character codes (EXIF 2.3, 4.6.5): 8 bytes before the text; piexif's "unicode" is UTF-16 BE
_COMMENT_CODES = {b"UNICODE\0": "utf-16-be", b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis"}
_JPEG_EXIF_MAX = 65533  # one APP1 segment


def write_image(image, fp, parameters: str, fmt: str = "PNG") -> None:
    """Save ``image`` with its ``parameters`` text where A1111 puts it, so its PNG Info tab and ``--from-png`` read it:
    PNG: a ``parameters`` text chunk; JPEG and WebP: the EXIF UserComment in piexif's "unicode" encoding
    (``UNICODE\\0`` + UTF-16 BE), quality 80 as A1111's defaults."""
    from PIL import PngImagePlugin

    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        image.save(fp, format="PNG", pnginfo=info)
        return
    data = _exif_user_comment(b"UNICODE\0" + parameters.encode("utf-16-be"))
    if fmt == "JPEG" and len(data) > _JPEG_EXIF_MAX:
        raise UsageError(f"the generation parameters ({len(parameters)} characters) do not fit in a JPEG's EXIF "
                         "block (64 KB): save as .png or .webp")
    image.convert("RGB").save(fp, format=fmt, quality=JPEG_QUALITY, exif=data)


def _exif_user_comment(comment: bytes) -> bytes:
    """An EXIF block holding only the Exif sub-IFD's UserComment, typed UNDEFINED as EXIF 2.3 (4.6.5) requires and as
    piexif (A1111's reader) returns it as bytes. Written here because Pillow's ``Image.Exif`` types bytes as BYTE,
    which piexif reads back as a tuple of ints that A1111 cannot decode. Big-endian TIFF: header, IFD0 with the
    Exif-IFD pointer, the Exif IFD with one entry, then the comment."""
    import struct

    exif_ifd = 8 + 2 + 12 + 4  # header, IFD0's entry count, one entry, next-IFD offset
    value = exif_ifd + 2 + 12 + 4
    return (b"Exif\0\0" + b"MM\0*" + struct.pack(">I", 8)
            + struct.pack(">HHHII", 1, _EXIF_IFD, 4, 1, exif_ifd) + struct.pack(">I", 0)
            + struct.pack(">HHHII", 1, _USER_COMMENT, 7, len(comment), value) + struct.pack(">I", 0) + comment)


def _user_comment(data) -> str | None:
    """An EXIF UserComment as text, read as A1111 reads it (piexif's UserComment.load, else UTF-8)."""
    if isinstance(data, str):
        return data or None
    if not isinstance(data, (bytes, bytearray)) or not data:
        return None
    encoding = _COMMENT_CODES.get(bytes(data[:8]))
    body = bytes(data[8:]) if encoding or bytes(data[:8]) == b"\0" * 8 else bytes(data)
    try:
        text = body.decode(encoding or "utf-8")
    except UnicodeDecodeError:
        text = body.decode("utf-8", errors="ignore")
    return text.rstrip("\0") or None


def read_parameters(path) -> str:
    """The generation parameters of an image (sdtrt's or A1111's), where A1111's ``read_info_from_image`` finds them:
    a PNG's ``parameters`` text chunk (tEXt, zTXt or iTXt); over it, an EXIF UserComment (JPEG, WebP, AVIF, a PNG's
    eXIf); without EXIF, a comment (GIF's comment extension, a JPEG's COM segment). The pixels are not decoded,
    except for a PNG whose text chunks come after its image data (refused over PIL's decompression-bomb limit); text
    chunks beyond PIL's limits are refused in one line. A large image whose text comes first is read like any other."""
    from pathlib import Path

    from sdtrt.runtime.images import _DECODE_ERRORS, _unreadable, open_image

    if not Path(path).exists():
        raise UsageError(f"{path} does not exist")
    if not Path(path).is_file():
        raise UsageError(f"{path} is not a file")
    with open_image(path, str(path), decode=False) as image:
        text = _info_text(image)
        if not text and image.format == "PNG":  # text chunks after the image data are read with the pixels
            from PIL import Image

            w, h = image.size
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                raise UsageError(f"{path} has no parameters before its image data, and at {w}x{h} it is too large "
                                 "to decode safely for text after them")
            try:
                image.load()
            except _DECODE_ERRORS as ex:
                raise UsageError(_unreadable(str(path), ex)) from None
            text = _info_text(image)
    if not text:
        raise UsageError(f"{path} holds no generation parameters (no 'parameters' text chunk, EXIF UserComment or "
                         "comment)")
    return text


def _info_text(image) -> str | None:
    """A1111's ``read_info_from_image`` on an opened image's ``info``."""
    from sdtrt.runtime.images import _DECODE_ERRORS

    info = image.info
    text = info.get("parameters")
    if "exif" in info:
        try:
            comment = _user_comment(image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT))
        except _DECODE_ERRORS:  # damaged EXIF: A1111 reads none either (piexif fails)
            comment = None
        text = comment or text
    elif "comment" in info:
        comment = info["comment"]
        text = comment.decode("utf-8", errors="replace") if isinstance(comment, bytes) else comment
    return text if isinstance(text, str) and text.strip() else None
