"""A1111's read-only ``/sdapi/v1`` lists and small endpoints (``modules/api/api.py``), answered with what this server
really has — short lists, never a 404: samplers and schedule types sdtrt runs, the models, the embeddings and LoRAs
the pipeline sees, the upscalers, PNG info, memory, the command-line flags."""

from __future__ import annotations

import base64
import io
import os

from fastapi import APIRouter
from pydantic import BaseModel

from sdtrt.errors import UsageError

# A1111's upscalers that are plain resizes (modules/upscaler.py UpscalerNone/UpscalerLanczos/UpscalerNearest: PIL's
# resize; "None" is a Lanczos resize in images.resize_image), and its latent upscale modes (modules/shared.py)
UPSCALERS = ("None", "Lanczos", "Nearest")
LATENT_UPSCALE_MODES = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                        "Latent (nearest)", "Latent (nearest-exact)")


class PngInfo(BaseModel):
    image: str


def memory() -> dict:
    """A1111's ``/sdapi/v1/memory`` (MemoryResponse): system RAM from /proc/meminfo; ``cuda`` as A1111 answers
    where torch's CUDA is not there (this process has no torch)."""
    ram: dict = {"error": "unavailable"}
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info[key] = int(value.split()[0]) * 1024
        total, free = info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
        ram = {"free": free, "used": total - free, "total": total}
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return {"ram": ram, "cuda": {"error": "unavailable"}}


def router(server) -> APIRouter:
    from sdtrt.runtime.infotext import A1111_ALIASES, A1111_SAMPLERS, A1111_SCHEDULERS
    from sdtrt.runtime.samplers import schedules_for

    api = APIRouter()

    @api.get("/sdapi/v1/samplers")
    async def samplers():
        # A1111's SamplerItem {name, aliases, options}; options["scheduler"]: the schedule a name implies
        return [{"name": a1111 + (f" {schedule}" if schedule else ""), "aliases": [ours, *A1111_ALIASES.get(ours, [])],
                 "options": {"scheduler": schedule.lower()} if schedule else {}}
                for ours, (a1111, schedule) in A1111_SAMPLERS.items()]

    @api.get("/sdapi/v1/schedulers")
    async def schedulers():
        # A1111's sd_schedulers entries sdtrt runs on at least one sampler
        have = {s for name in A1111_SAMPLERS for s in schedules_for(name)}
        return [{"name": name, "label": label, "aliases": aliases, "default_rho": rho, "need_inner_model": inner}
                for name, (label, aliases, rho, inner, schedule) in A1111_SCHEDULERS.items()
                if schedule is None or schedule in have]

    @api.get("/sdapi/v1/sd-models")
    async def models():
        return server.model_entries()

    @api.get("/sdapi/v1/upscalers")
    async def upscalers():
        # A1111's UpscalerItem; None, Lanczos, Nearest come first in A1111's own list
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
                for name in UPSCALERS]

    @api.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    @api.get("/sdapi/v1/sd-vae")
    async def sd_vae():
        return []  # A1111 lists VAE files besides the models' own; here each model has only its own ("Automatic")

    @api.get("/sdapi/v1/sd-modules")
    async def sd_modules():
        return []  # Forge's list (SillyTavern asks); none here

    @api.get("/sdapi/v1/prompt-styles")
    async def prompt_styles():
        return []  # no saved styles: a request's styles are echoed and change nothing, as A1111's unknown ones

    @api.get("/sdapi/v1/embeddings")
    async def embeddings():
        # A1111's shape: the vectors' width, summed over the encoders for an SDXL clip_l + clip_g file (768 + 1280)
        pipe = server.pipe
        return {"loaded": {token: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                   "shape": sum(int(v.shape[-1]) for v in per_encoder.values()),
                                   "vectors": int(next(iter(per_encoder.values())).shape[0])}
                           for token, per_encoder in pipe.embeddings.items()},
                "skipped": {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                   "vectors": None} for name in getattr(pipe, "skipped_embeddings", {})}}

    @api.get("/sdapi/v1/loras")
    async def loras():
        # the Lora extension's create_lora_json: the LoRAs the pipeline applies and those its <lora:…> tags find
        pipe, out, seen = server.pipe, [], set()
        files = [(os.path.splitext(os.path.basename(p))[0], p) for p, _ in pipe.loras] + list(pipe.lora_files.items())
        if pipe.lora_dir is not None and pipe.lora_dir.is_dir():
            files += [(p.stem, str(p)) for p in sorted(pipe.lora_dir.glob("*.safetensors"))]
        for name, path in files:
            if name not in seen:
                seen.add(name)
                out.append({"name": name, "alias": name, "path": str(path), "metadata": {}})
        return out

    @api.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        return None  # the list is read afresh on every GET

    @api.get("/sdapi/v1/cmd-flags")
    async def cmd_flags():
        config = server.config  # A1111's vars(cmd_opts), for what this server has (never its credentials)
        return {"api": True, "nowebui": True, "listen": config.host not in ("127.0.0.1", "localhost", "::1"),
                "port": config.port, "api_auth": None, "ckpt": str(config.folder), "lora_dir": None,
                "embeddings_dir": None, "cors_allow_origins": ",".join(config.cors_origins or ()) or None}

    @api.get("/sdapi/v1/memory")
    async def get_memory():
        return memory()

    @api.post("/sdapi/v1/png-info")
    async def png_info(body: PngInfo):
        # A1111's pnginfoapi: {info: the parameters text ("" if none), items: other PNG fields, parameters: parsed}
        from PIL import Image, UnidentifiedImageError

        from sdtrt.runtime.infotext import _info_text, parse_infotext

        data = body.image.strip()
        data = data.partition(",")[2] if data.startswith("data:") else data
        if not data:
            raise UsageError("image is empty: send a base64 image")
        try:
            image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        except (ValueError, TypeError, UnidentifiedImageError, OSError):
            raise UsageError("image is not a base64-encoded image") from None
        with image:
            text = _info_text(image) or ""
            items = {k: v for k, v in image.info.items() if k != "parameters" and isinstance(v, (str, int, float))}
        return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

    @api.get("/internal/ping")
    async def ping():
        return {}

    return api
