"""OpenAI's images API (``/v1/images/generations``) over the server: its request and response shapes; errors in
OpenAI's ``{"error": {...}}`` shape come from ``sdtrt.serve.http.error_body`` (every ``/v1/*`` path)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request  # FastAPI reads the handlers' annotations from the module's names
from pydantic import BaseModel, ConfigDict, Field

from sdtrt.errors import UsageError
from sdtrt.serve.images import png_b64


class OpenAIImages(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    n: int = Field(1, ge=1)
    size: str = "512x512"
    response_format: str = "b64_json"


def router(server) -> APIRouter:
    from sdtrt.runtime.request import GenerationRequest

    api = APIRouter()

    @api.post("/v1/images/generations")
    async def openai_images(body: OpenAIImages, request: Request):
        if body.response_format != "b64_json":
            raise UsageError("response_format must be b64_json (this server returns no URLs)")
        try:
            width, height = (int(v) for v in body.size.lower().split("x"))
        except ValueError:
            raise UsageError(f"size must be WIDTHxHEIGHT, got {body.size!r}") from None
        server.check_limits(width, height, 30, body.n)
        req = GenerationRequest.create(body.prompt, None, 30, 7.5, height, width, None, body.n)
        images, infos = await server.submit("openai", request, req, 1)
        return {"created": int(time.time()), "data": [{"b64_json": png_b64(im, info), "revised_prompt": body.prompt}
                                                      for im, info in zip(images, infos)]}

    return api
