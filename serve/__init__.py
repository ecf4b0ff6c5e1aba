"""``sdtrt serve``: an HTTP API over engine folders, in the shapes existing clients speak — AUTOMATIC1111's
``/sdapi/v1/*`` and OpenAI's ``/v1/images/*`` — on FastAPI + uvicorn, pydantic for requests, prometheus-client for
``/metrics``. The fourth stage beside export, engines and runtime; a thin layer over ``sdtrt.runtime``.

- ``config``: ``ServeConfig``, what a server serves and its limits;
- ``http``: the HTTP edge (credentials, body deadline and size, each protocol's error shape, bind, uvicorn, drain);
- ``app``: the FastAPI app and its scheduling (queue, timeout, the engine thread of ``worker``, metrics);
- ``a1111`` and ``openai``: one router per protocol; ``images``: base64 images in and out;
- ``ray``: scale-out on Ray Serve (``sdtrt serve --ray``, ``serve run sdtrt.serve:ray_app``).

Safe by default: 127.0.0.1 unless an API key is set, limits on body size, pixels, steps and images per request, no
request field reaches the filesystem (images come as base64).
"""

from sdtrt.serve.app import create_app, serve
from sdtrt.serve.config import ServeConfig
from sdtrt.serve.ray import RayConfig, ray_app, ray_application, ray_configs, ray_deployment_options, serve_ray

__all__ = ["RayConfig", "ServeConfig", "create_app", "ray_app", "ray_application", "ray_configs",
           "ray_deployment_options", "serve", "serve_ray"]
