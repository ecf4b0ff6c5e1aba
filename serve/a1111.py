"""AUTOMATIC1111's ``/sdapi/v1`` API over the server, in the shapes A1111's ``modules/api/api.py`` and ``models.py``
define and its clients (Open WebUI, SillyTavern, webuiapi) send and parse: txt2img/img2img with A1111's sampler and
schedule names, ``override_settings`` and its ``info`` JSON (``Processed.js()``), the options, interrupt/skip and
progress. The read-only lists are ``a1111_lists``."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request  # FastAPI reads the handlers' annotations from the module's names
from pydantic import BaseModel, ConfigDict, Field

from sdtrt.errors import UsageError
from sdtrt.serve.images import decode_image, png_b64

log = logging.getLogger("sdtrt.serve")

A1111_DEFAULTS = {"steps": 20, "cfg_scale": 7.0, "width": 512, "height": 512}  # A1111's API defaults
SAMPLES_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}  # A1111's samples_format values
VAE_AUTOMATIC = ("Automatic", "None", "")  # sd_vae values meaning the model's own VAE (the only one here)


class Txt2Img(BaseModel):
    model_config = ConfigDict(extra="ignore")  # A1111 ignores fields it does not use; so do we
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    steps: int = A1111_DEFAULTS["steps"]
    cfg_scale: float = A1111_DEFAULTS["cfg_scale"]
    width: int = A1111_DEFAULTS["width"]
    height: int = A1111_DEFAULTS["height"]
    seed: int = -1
    subseed: int = -1  # A1111's variation seed and seed resize: refused unless they change nothing
    subseed_strength: float = 0.0  # (request.check_variation_seed)
    seed_resize_from_h: int = 0
    seed_resize_from_w: int = 0
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111: read when sampler_name is empty
    scheduler: str | None = None  # A1111 1.9+: "Karras", "automatic", ...; unknown: Automatic
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    clip_skip: int | None = None
    restore_faces: bool | None = None  # accepted, never done (info says so: restore_faces false)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    # fields that would change the image in ways sdtrt does not do: refused unless at their defaults (unsupported())
    tiling: bool | None = None
    refiner_checkpoint: str | None = None  # a model of --models-dir (title, name or hash): base + refiner
    refiner_switch_at: float = Field(0.8, gt=0, lt=1)  # where the refiner takes over (runtime.refiner)
    hr_checkpoint_name: str | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    # the hires fix (runtime.hires; A1111's StableDiffusionProcessingTxt2Img fields and API defaults)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_upscaler: str | None = None  # None: "Latent"
    hr_second_pass_steps: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    denoising_strength: float = 0.75


class Img2Img(Txt2Img):
    init_images: list[str] = Field(default_factory=list)
    mask: str | None = None
    denoising_strength: float = 0.75
    mask_blur: float = 0
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    include_init_images: bool = False
    inpainting_mask_invert: int | bool = 0  # A1111: 1 repaints the mask's black area
    inpainting_fill: int = 0  # A1111's Masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing
    initial_noise_multiplier: float | None = None  # A1111's Noise multiplier: only 1 (None) here
    resize_mode: int = 0  # A1111's 0 "Just resize" (the input stretched to width x height), as sdtrt does


def unsupported(body: Txt2Img) -> None:
    """Refuse, naming it, a field that asks for what sdtrt does not do, rather than answer an image made without it
    (A1111 fields that pydantic would otherwise drop as unknown): tiling, a hires checkpoint, a script or
    an always-on script with arguments (ControlNet, ADetailer, ...), img2img's other resize modes, several init
    images (A1111 cycles them over the batch)."""
    problems = []
    if body.tiling:
        problems.append("tiling (seamless tiling)")
    if body.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        problems.append("hr_checkpoint_name (another model for the hires pass)")
    if body.script_name not in (None, "", "None"):
        problems.append(f"script_name {body.script_name!r} (A1111's scripts)")
    used = [name for name, spec in body.alwayson_scripts.items() if not isinstance(spec, dict) or spec.get("args")]
    if used:
        problems.append(f"alwayson_scripts {', '.join(map(repr, used))} (A1111 extensions)")
    if isinstance(body, Img2Img):
        if body.resize_mode != 0:
            problems.append(f"resize_mode {body.resize_mode} (only 0, 'Just resize')")
        if len(body.init_images) > 1:
            problems.append(f"{len(body.init_images)} init_images (one per request)")
    if problems:
        raise UsageError(f"not available in sdtrt: {'; '.join(problems)}")


class Settings:
    """A1111's options (``GET/POST /sdapi/v1/options``) that exist here, and their use by a request: the model, the
    default CLIP skip, the response image format, the VAE (only the model's own). Other keys are accepted and
    ignored."""

    def __init__(self, server):
        self.server = server
        self.values: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "samples_format": "png", "sd_vae": "Automatic"}

    def model_entry(self) -> dict:
        return self.server.current_model()

    def options(self) -> dict:
        """``GET /sdapi/v1/options``: what clients read (the model's title as ``/sd-models`` lists it, its hash) and
        the settings this server applies, with A1111's fixed values for what it does not change."""
        entry = self.model_entry()
        return {"sd_model_checkpoint": entry["title"], "sd_checkpoint_hash": entry["sha256"], **self.values,
                "jpeg_quality": 80, "enable_pnginfo": True, "samples_save": False, "return_grid": False,
                "eta_noise_seed_delta": 0, "img2img_fix_steps": False, "initial_noise_multiplier": 1.0}

    def checked(self, settings: dict) -> dict:
        """The settings of ``settings`` that exist here, checked (A1111's ``Options.set``, which refuses a value of
        the wrong type); unknown keys dropped (A1111 keeps them in its options file; they change nothing here)."""
        if not isinstance(settings, dict):
            raise UsageError("override_settings must be an object of A1111 option names and values")
        out: dict[str, Any] = {}
        clip = settings.get("CLIP_stop_at_last_layers")
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip != int(clip) or not 1 <= clip <= 12:
                raise UsageError(f"CLIP_stop_at_last_layers must be an integer from 1 to 12, got {clip!r}")
            out["CLIP_stop_at_last_layers"] = int(clip)
        fmt = settings.get("samples_format")
        if fmt is not None:
            if not isinstance(fmt, str) or fmt.lower() not in SAMPLES_FORMATS:
                raise UsageError(f"samples_format must be one of {', '.join(SAMPLES_FORMATS)}, got {fmt!r}")
            out["samples_format"] = fmt.lower()
        vae = settings.get("sd_vae")
        if vae is not None:
            if vae not in VAE_AUTOMATIC:
                raise UsageError(f"sd_vae {vae!r} is not available: this server runs the model's own VAE "
                                 "(sd_vae 'Automatic')")
            out["sd_vae"] = "Automatic"
        name = settings.get("sd_model_checkpoint")
        if name is not None:
            if not isinstance(name, str):
                raise UsageError(f"sd_model_checkpoint must be a model title, got {name!r}")
            out["sd_model_checkpoint"] = self.server.find_model(name)["title"]
        return out

    def apply(self, settings: dict) -> None:
        """Keep ``settings`` (checked) for later requests (POST /options; override_settings_restore_afterwards false).
        The model is not kept here: the caller switches it (``Server.select_model``)."""
        checked = self.checked(settings)
        checked.pop("sd_model_checkpoint", None)  # the model is the server's (Server.select_model), not a value here
        self.values.update(checked)

    def merged(self, override: dict) -> dict:
        """The settings one request runs with: the options, with its override_settings on top."""
        return {**self.values, "sd_model_checkpoint": self.model_entry()["title"], **self.checked(override)}


def resolve_sampler(name: str | None, index: str | None, scheduler: str | None) -> tuple[str | None, list]:
    """sdtrt's sampler for A1111's (sampler_name or sampler_index, scheduler), and the notes for ``info``. Names and
    labels in any case; a schedule in the sampler's name ("DPM++ 2M Karras") applies unless ``scheduler`` names
    another (A1111's get_sampler_and_scheduler); an unknown scheduler is Automatic with a note (A1111's
    fix_p_invalid_sampler_and_scheduler). Without a sampler the model's own runs, but a schedule asked without one
    runs on A1111's default sampler (its API's sampler_index default, "Euler")."""
    from sdtrt.runtime.infotext import SCHEDULE_LABELS, a1111_sampler, a1111_schedule, check_schedule, sdtrt_scheduler

    notes = []
    schedule, known = a1111_schedule(scheduler)
    if not known:
        notes.append(f"scheduler {scheduler!r} is unknown: Automatic was used, as A1111 does")
        log.warning("sampler scheduler autocorrection: %r -> 'Automatic'", scheduler)
    text = name or index
    if not text:
        if schedule is None:
            return None, notes
        text = "Euler"
    ours, named = a1111_sampler(text)
    if ours is None:
        raise UsageError(f"sampler {text!r} is not available; GET /sdapi/v1/samplers lists them")
    chosen = sdtrt_scheduler(ours, schedule or named)
    check_schedule(chosen, text, scheduler if schedule else SCHEDULE_LABELS.get(named))
    return chosen, notes


def processed_js(body: Txt2Img, infos: list[str], notes: list, timestamp: str, inpainting_unet: bool) -> dict:
    """A1111's ``info`` (``modules/processing.py Processed.js``), every key, each read from the images' own
    ``parameters`` texts (seeds, sampler, size, model ...) or the request where A1111 echoes it."""
    from sdtrt.runtime.infotext import parse_infotext

    parsed = [parse_infotext(t) for t in infos]
    first = parsed[0] if parsed else {}

    def number(p: dict, key: str, kind, default=None):
        try:
            return kind(p[key]) if key in p else default
        except ValueError:
            return default

    core = {"Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Seed", "Size-1", "Size-2", "Model hash",
            "Model", "Clip skip", "Version", "Batch size", "Batch pos"}
    seeds = [number(p, "Seed", int) for p in parsed]
    subseed = getattr(body, "subseed", None)
    subseed = -1 if subseed is None else subseed
    return {
        "prompt": first.get("Prompt", body.prompt), "all_prompts": [p["Prompt"] for p in parsed],
        "negative_prompt": first.get("Negative prompt", body.negative_prompt),
        "all_negative_prompts": [p["Negative prompt"] for p in parsed],
        "seed": seeds[0] if seeds else None, "all_seeds": seeds,
        "subseed": subseed, "all_subseeds": [subseed + i if subseed >= 0 else -1 for i in range(len(parsed))],
        "subseed_strength": getattr(body, "subseed_strength", 0.0),
        "width": number(first, "Size-1", int, body.width), "height": number(first, "Size-2", int, body.height),
        "sampler_name": first.get("Sampler"), "scheduler": first.get("Schedule type", "Automatic"),
        "cfg_scale": number(first, "CFG scale", float, body.cfg_scale), "steps": number(first, "Steps", int, body.steps),
        "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": first.get("Model"), "sd_model_hash": first.get("Model hash"),
        "sd_vae_name": None, "sd_vae_hash": None,  # A1111's for its Automatic VAE: the model's own
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": number(first, "Denoising strength", float, getattr(body, "denoising_strength", None)),
        "extra_generation_params": {k: v for k, v in first.items() if k not in core},
        "index_of_first_image": 0,  # no grid image first
        "infotexts": infos, "styles": body.styles, "job_timestamp": timestamp,
        "clip_skip": number(first, "Clip skip", int, 1),
        "is_using_inpainting_conditioning": inpainting_unet,  # A1111: the model's, in txt2img too
        "version": first.get("Version"), "notes": notes,
    }


def router(server) -> APIRouter:
    from sdtrt.runtime.request import GenerationRequest
    from sdtrt.serve import a1111_lists
    from sdtrt.runtime.request import check_variation_seed

    config = server.config
    settings = Settings(server)
    api = APIRouter()

    def to_request(body: Txt2Img, run: dict, strength: float | None = None, mask_blur: float = 0,
                   padding: int | None = None) -> tuple[GenerationRequest, list]:
        server.check_limits(body.width, body.height, body.steps, body.batch_size * body.n_iter)
        check_variation_seed(body.subseed, body.subseed_strength, body.seed_resize_from_h, body.seed_resize_from_w,
                             body.height, body.width)
        sampler, notes = resolve_sampler(body.sampler_name, body.sampler_index, body.scheduler)
        # CLIP skip: override_settings' CLIP_stop_at_last_layers, else SD.Next's clip_skip field, else the option
        overridden = body.override_settings.get("CLIP_stop_at_last_layers") is not None
        clip = run["CLIP_stop_at_last_layers"] if overridden or not body.clip_skip else body.clip_skip
        req = GenerationRequest.create(body.prompt, body.negative_prompt or None, body.steps, body.cfg_scale,
                                       body.height, body.width, body.seed, body.batch_size, sampler,
                                       clip_skip=None if clip <= 1 else clip - 1,
                                       strength=strength, mask_blur=mask_blur, padding_mask_crop=padding)
        return req, notes

    def response(body: Txt2Img, images, infos, notes, run: dict, timestamp: str) -> dict:
        fmt = SAMPLES_FORMATS[run["samples_format"]]
        encoded = [png_b64(im, info, fmt) for im, info in zip(images, infos)] if body.send_images else []
        parameters = body.model_dump()
        if isinstance(body, Img2Img) and not body.include_init_images:  # A1111 echoes no images unless asked
            parameters["init_images"], parameters["mask"] = None, None
        unet = server.pipe.manifest.components["unet"]
        info = processed_js(body, infos, notes, timestamp, any(spec.name == "mask" for spec in unet.inputs))
        # A1111 echoes the sampler it resolved (text2imgapi's populate), so a client sees what ran
        parameters["sampler_name"] = info["sampler_name"]
        return {"images": encoded, "parameters": parameters, "info": json.dumps(info)}

    async def generate(endpoint: str, body: Txt2Img, request: Request, image=None, mask=None, **task):
        timestamp = time.strftime("%Y%m%d%H%M%S")  # A1111's state.job_timestamp
        run = settings.merged(body.override_settings)  # the request's settings; the options are not changed
        req, notes = to_request(body, run, **task)
        if endpoint == "txt2img" and body.enable_hr:
            req = hires(body, req)
        if endpoint == "img2img":
            if body.initial_noise_multiplier not in (None, 1):
                raise UsageError(f"initial_noise_multiplier {body.initial_noise_multiplier:g} is not supported: only 1")
            if mask is not None:  # A1111's inpainting fields, checked as the library checks them
                from dataclasses import replace

                from sdtrt.runtime.request import inpainting_options

                req = replace(req, **inpainting_options(body.inpainting_mask_invert, body.inpainting_fill))
        refiner = body.refiner_checkpoint if body.refiner_checkpoint not in (None, "", "None") else None
        images, infos = await server.submit(endpoint, request, req, body.n_iter, image, mask,
                                            model=body.override_settings.get("sd_model_checkpoint"),
                                            refiner=refiner, switch_at=body.refiner_switch_at)
        if not body.override_settings_restore_afterwards:  # A1111 keeps the overrides for later requests
            settings.apply(body.override_settings)
            if body.override_settings.get("sd_model_checkpoint") is not None:  # the model too: the new default
                await server.select_model(body.override_settings["sd_model_checkpoint"])
        return response(body, images, infos, notes, run, timestamp)

    def hires(body: Txt2Img, req: GenerationRequest) -> GenerationRequest:
        """``req`` with A1111's hires fix (``enable_hr``), its upscaled size within the server's limits."""
        from dataclasses import replace

        from sdtrt.runtime.hires import Hires, target_size

        same = (None, "", "Use same sampler", "Use same scheduler")  # A1111's UI's words for "the first pass's"
        sampler = None  # the first pass's
        if body.hr_sampler_name not in same or body.hr_scheduler not in same:
            sampler = resolve_sampler(*((body.sampler_name, body.sampler_index) if body.hr_sampler_name in same
                                        else (body.hr_sampler_name, None)),
                                      body.scheduler if body.hr_scheduler in same else body.hr_scheduler)[0]
            sampler = sampler or req.scheduler  # neither named: the model's own sampler, on the hires schedule
        spec = Hires.create(body.hr_scale, (body.hr_resize_x, body.hr_resize_y), body.hr_upscaler or "Latent",
                            body.hr_second_pass_steps, body.denoising_strength, body.hr_prompt, body.hr_negative_prompt,
                            sampler)
        to_x, to_y, _, _ = target_size(body.width, body.height, spec)
        server.check_limits(to_x, to_y, spec.steps or body.steps, body.batch_size * body.n_iter)
        return replace(req, hires=spec)

    @api.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2Img, request: Request):
        unsupported(body)
        return await generate("txt2img", body, request)

    @api.post("/sdapi/v1/img2img")
    async def img2img(body: Img2Img, request: Request):
        unsupported(body)  # before any image is decoded
        if not body.init_images:
            raise UsageError("init_images needs one base64 image")
        image = decode_image(body.init_images[0], "init_images[0]", config.max_input_pixels)
        mask = decode_image(body.mask, "mask", config.max_input_pixels) if body.mask else None
        return await generate("img2img", body, request, image, mask, strength=body.denoising_strength,
                              mask_blur=body.mask_blur if mask else 0,
                              padding=body.inpaint_full_res_padding if (mask and body.inpaint_full_res) else None)

    @api.get("/sdapi/v1/options")
    async def get_options():
        return settings.options()

    @api.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any]):
        # A1111's set_config: an unknown checkpoint is refused before anything is set; answers null
        settings.apply(body)
        if body.get("sd_model_checkpoint") is not None:
            await server.select_model(body["sd_model_checkpoint"])
        return None

    @api.post("/sdapi/v1/interrupt")
    async def interrupt():
        server.stop("interrupt")  # A1111's shared.state.interrupt(); api.py interruptapi returns {}
        return {}

    @api.post("/sdapi/v1/skip")
    async def skip():
        server.stop("skip")  # A1111's skip returns None
        return None

    @api.get("/sdapi/v1/progress")
    async def progress():
        state = server.state
        stop = state.get("stop")
        return {"progress": state["progress"], "eta_relative": 0.0,
                "state": {"job_count": state["waiting"], "interrupted": bool(stop and stop[0] == "interrupt"),
                          "skipped": bool(stop and stop[0] == "skip"), "job": "", "job_no": 0,
                          "sampling_step": 0, "sampling_steps": 0},
                "current_image": None, "textinfo": None}

    api.include_router(a1111_lists.router(server))
    return api
