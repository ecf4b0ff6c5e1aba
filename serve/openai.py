"""OpenAI's images API over the server, in the shapes of OpenAI's API reference and its Python SDK: ``POST
/v1/images/generations`` (JSON), ``POST /v1/images/edits`` (multipart/form-data: inpainting, the fully transparent
pixels of the mask — or of the image, without one — are the area to edit), ``GET /v1/models`` and
``GET /v1/models/{id}`` (the server's models, by name). ``model`` selects one of them; OpenAI's own model names
(``dall-e-2``, ``dall-e-3``, ``gpt-image-…``), which clients send by default, run on the server's default model.
Errors in OpenAI's ``{"error": {...}}`` shape come from ``sdtrt.serve.http.error_body`` (every ``/v1/*`` path)."""

from __future__ import annotations

import time

from fastapi import APIRouter, File, Form, Request, UploadFile  # FastAPI reads the handlers' annotations by name
from pydantic import BaseModel, ConfigDict, Field

from sdtrt.errors import UnknownModel, UsageError
from sdtrt.serve.http import error_response
from sdtrt.serve.images import png_b64

STEPS, GUIDANCE = 30, 7.5  # OpenAI's API names neither: what every OpenAI request runs with
OPENAI_MODELS = ("dall-e-", "gpt-image-")  # prefixes of OpenAI's own image models: the default model here


class OpenAIImages(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None  # None or "auto": the model's own size (512x512 for SD 1.x, 1024x1024 for SDXL)
    response_format: str | None = "b64_json"


def refused(param: str, message: str) -> UsageError:
    """A UsageError about one request field (OpenAI's ``param``)."""
    ex = UsageError(message)
    ex.param = param
    return ex


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's ``size`` ("WIDTHxHEIGHT"; None or "auto": the image's own, for edits) as (width, height)."""
    if size is None or size == "auto":
        return None, None
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise refused("size", f"size must be WIDTHxHEIGHT (e.g. 512x512), got {size!r}") from None
    return width, height


def check_format(response_format: str | None) -> None:
    if response_format not in (None, "b64_json"):
        raise refused("response_format", f"response_format must be b64_json (this server returns no URLs), got "
                                         f"{response_format!r}")


def edit_mask(image, mask):
    """A1111's mask (L, white: inpaint) of an OpenAI edit: the fully transparent (alpha 0) pixels of ``mask``, or of
    ``image`` when no mask is sent; a UsageError naming the field where there is no such pixel, or no alpha at all,
    or the mask's size differs from the image's."""
    import numpy as np
    from PIL import Image

    source, param = (image, "image") if mask is None else (mask, "mask")
    if mask is not None and mask.size != image.size:
        raise refused("mask", f"the mask is {mask.width}x{mask.height} and the image {image.width}x{image.height}: "
                              "they must be the same size")
    if not source.has_transparency_data:
        raise refused(param, "the image has no transparency and no mask was sent: the fully transparent pixels of the "
                             "mask (or of the image, without one) are the area to edit" if mask is None else
                             "the mask has no alpha channel: its fully transparent pixels are the area to edit")
    edit = np.asarray(source.convert("RGBA"))[..., 3] == 0
    if not edit.any():
        raise refused(param, f"the {param} has no fully transparent pixel (alpha 0): nothing to edit")
    return Image.fromarray(np.where(edit, 255, 0).astype(np.uint8), "L")


def router(server) -> APIRouter:
    from sdtrt.runtime.request import GenerationRequest

    config = server.config
    api = APIRouter()

    def default_size(name: str | None) -> int:
        """The side of the images of model ``name`` (None: the default model) when a request sends no size."""
        entry = server.models.find(name) if name is not None else server.models.current()
        return 512 if entry is None else entry.default_size

    def model_name(model: str | None) -> str | None:
        """The server's model a request's ``model`` names (None: the default); an unknown one is refused by name."""
        if model is None or model == "" or model.startswith(OPENAI_MODELS):
            return None
        return server.find_model(model)["model_name"]

    def answer(images, infos, prompt: str) -> dict:
        return {"created": int(time.time()),
                "data": [{"b64_json": png_b64(im, info), "revised_prompt": prompt} for im, info in zip(images, infos)]}

    @api.post("/v1/images/generations")
    async def generations(body: OpenAIImages, request: Request):
        check_format(body.response_format)
        model = model_name(body.model)
        width, height = parse_size(body.size)
        if width is None:
            width = height = default_size(model)
        server.check_limits(width, height, STEPS, body.n)
        req = GenerationRequest.create(body.prompt, None, STEPS, GUIDANCE, height, width, None, body.n)
        images, infos = await server.submit("openai", request, req, 1, model=model)
        return answer(images, infos, body.prompt)

    @api.post("/v1/images/edits")
    async def edits(request: Request, prompt: str = Form(...), image: UploadFile | None = File(None),
                    images: list[UploadFile] | None = File(None, alias="image[]"), mask: UploadFile | None = File(None),
                    model: str | None = Form(None), n: int = Form(1, ge=1), size: str | None = Form(None),
                    response_format: str | None = Form(None)):
        import io

        from sdtrt.runtime.images import open_image

        check_format(response_format)
        files = ([image] if image is not None else []) + list(images or [])
        if len(files) != 1:
            raise refused("image", "send one image to edit (a multipart file part named image)" if not files else
                                   f"this server edits one image at a time, got {len(files)}")
        name = model_name(model)

        async def read(part: UploadFile, label: str):
            try:
                return open_image(io.BytesIO(await part.read()), label, config.max_input_pixels)
            except UsageError as ex:
                ex.param = label
                raise

        picture = await read(files[0], "image")
        stencil = None if mask is None else await read(mask, "mask")
        inpaint = edit_mask(picture, stencil)
        width, height = parse_size(size)
        server.check_limits(width or picture.width, height or picture.height, STEPS, n)
        req = GenerationRequest.create(prompt, None, STEPS, GUIDANCE, height, width, None, n)
        result, infos = await server.submit("openai", request, req, 1, picture.convert("RGB"), inpaint, model=name)
        return answer(result, infos, prompt)

    def listed(entry) -> dict:
        return {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "sdtrt"}

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [listed(e) for e in server.models.list()]}

    @api.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        try:
            return listed(server.models.find(model_id))
        except UnknownModel as ex:  # OpenAI's answer to retrieving a model it does not have
            return error_response(request.url.path, 404, "model_not_found", str(ex), param="model")

    return api
