"""AUTOMATIC1111's ``/sdapi/v1`` API over the server, in the shapes A1111's ``modules/api/models.py`` defines and
its clients (Open WebUI, SillyTavern, webuiapi) send and parse."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request  # FastAPI reads the handlers' annotations from the module's names
from pydantic import BaseModel, ConfigDict, Field

from sdtrt.errors import UsageError
from sdtrt.serve.images import decode_image, png_b64

A1111_DEFAULTS = {"steps": 20, "cfg_scale": 7.0, "width": 512, "height": 512}  # A1111's API defaults


class Txt2Img(BaseModel):
    model_config = ConfigDict(extra="ignore")  # A1111 ignores fields it does not use; so do we
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = A1111_DEFAULTS["steps"]
    cfg_scale: float = A1111_DEFAULTS["cfg_scale"]
    width: int = A1111_DEFAULTS["width"]
    height: int = A1111_DEFAULTS["height"]
    seed: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None  # A1111 1.9+: "Karras", "Automatic"
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    clip_skip: int | None = None
    override_settings: dict = Field(default_factory=dict)


class Img2Img(Txt2Img):
    init_images: list[str] = Field(default_factory=list)
    mask: str | None = None
    denoising_strength: float = 0.75
    mask_blur: float = 0
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32


def first_seed(infos: list[str]) -> int | None:
    """The seed of the first image, from its metadata (the request may not have named one)."""
    from sdtrt.runtime.infotext import parse_infotext

    value = parse_infotext(infos[0]).get("Seed") if infos else None
    return int(value) if value is not None and value.isdigit() else None


def model_of(infos: list[str]) -> str | None:
    """The name of the model that made the images, from their metadata (a request may name its own model)."""
    from sdtrt.runtime.infotext import parse_infotext

    return parse_infotext(infos[0]).get("Model") if infos else None


def router(server) -> APIRouter:
    from sdtrt.runtime.infotext import A1111_SAMPLERS
    from sdtrt.runtime.request import GenerationRequest

    config = server.config
    names = {a1111: ours for ours, (a1111, schedule) in A1111_SAMPLERS.items() if schedule is None}
    names |= {f"{a1111} {schedule}": ours for ours, (a1111, schedule) in A1111_SAMPLERS.items() if schedule}
    api = APIRouter()

    def sampler(name: str | None, schedule: str | None) -> str | None:
        if name is None:
            return None
        key = f"{name} {schedule}" if schedule and schedule not in ("Automatic",) else name
        if key not in names:
            raise UsageError(f"sampler {key!r} is not available; GET /sdapi/v1/samplers lists them")
        return names[key]

    def response(body: BaseModel, images, infos, seed: int | None) -> dict:
        encoded = [png_b64(im, info) for im, info in zip(images, infos)]
        info = {"prompt": getattr(body, "prompt", ""), "all_prompts": [getattr(body, "prompt", "")] * len(encoded),
                "seed": seed, "infotexts": infos, "sd_model_name": model_of(infos),
                "sampler_name": getattr(body, "sampler_name", None)}
        return {"images": encoded, "parameters": body.model_dump(), "info": json.dumps(info)}

    def to_request(body: Txt2Img, strength: float | None = None, mask_blur: float = 0,
                   padding: int | None = None) -> GenerationRequest:
        server.check_limits(body.width, body.height, body.steps, body.batch_size * body.n_iter)
        return GenerationRequest.create(body.prompt, body.negative_prompt or None, body.steps, body.cfg_scale,
                                        body.height, body.width, body.seed, body.batch_size,
                                        sampler(body.sampler_name, body.scheduler),
                                        clip_skip=None if not body.clip_skip or body.clip_skip <= 1 else body.clip_skip - 1,
                                        strength=strength, mask_blur=mask_blur, padding_mask_crop=padding)

    @api.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2Img, request: Request):
        images, infos = await server.submit("txt2img", request, to_request(body), body.n_iter,
                                            model=body.override_settings.get("sd_model_checkpoint"))
        return response(body, images, infos, first_seed(infos))

    @api.post("/sdapi/v1/img2img")
    async def img2img(body: Img2Img, request: Request):
        if not body.init_images:
            raise UsageError("init_images needs one base64 image")
        image = decode_image(body.init_images[0], "init_images[0]", config.max_input_pixels)
        mask = decode_image(body.mask, "mask", config.max_input_pixels) if body.mask else None
        req = to_request(body, body.denoising_strength, body.mask_blur if mask else 0,
                         body.inpaint_full_res_padding if (mask and body.inpaint_full_res) else None)
        images, infos = await server.submit("img2img", request, req, body.n_iter, image, mask,
                                            model=body.override_settings.get("sd_model_checkpoint"))
        return response(body, images, infos, first_seed(infos))

    @api.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": a1111 + (f" {schedule}" if schedule else ""), "aliases": [ours], "options": {}}
                for ours, (a1111, schedule) in A1111_SAMPLERS.items()]

    @api.get("/sdapi/v1/sd-models")
    async def models():
        return server.model_entries()

    @api.get("/sdapi/v1/progress")
    async def progress():
        state = server.state
        return {"progress": state["progress"], "eta_relative": 0.0,
                "state": {"job_count": state["waiting"], "interrupted": False}, "current_image": None}

    return api
