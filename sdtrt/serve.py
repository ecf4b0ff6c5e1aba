"""``sdtrt serve``: an HTTP API over one engine folder, in the shapes existing clients speak — AUTOMATIC1111's
``/sdapi/v1/*`` and OpenAI's ``/v1/images/generations`` — on FastAPI + uvicorn, pydantic for requests,
prometheus-client for ``/metrics``.

A thin layer: requests become ``GenerationRequest``s (the library checks them; its typed errors become 4xx JSON
bodies), one worker thread runs the engines (one process per GPU), the event loop only waits on it. A bounded queue
answers 503 with ``Retry-After`` when full; each request has a timeout. Safe by default: 127.0.0.1 unless an API key
is set, limits on body size, pixels, steps and images per request, no request field reaches the filesystem (images
come as base64). Compatible txt2img requests that arrive within a short window share one engine call (``EngineWorker``);
a client that goes away takes its queued work with it.

Scale-out is Ray Serve's (``ray_app``, ``serve_ray``): the same FastAPI app is the ingress of a deployment with one
replica per GPU; Ray's proxy routes requests to replicas and restarts dead ones, each replica batches as above. No
load balancer of our own.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import Request  # this module is the serve extra: its imports may be eager (FastAPI reads the
from pydantic import BaseModel, ConfigDict, Field  # handlers' annotations from the module's names)

from sdtrt.errors import SdtrtError, UsageError
from sdtrt.serve_http import BodyReader, ClientGone, Guard, check_credentials, error_response

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


class Img2Img(Txt2Img):
    init_images: list[str] = Field(default_factory=list)
    mask: str | None = None
    denoising_strength: float = 0.75
    mask_blur: float = 0
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32


class OpenAIImages(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    n: int = Field(1, ge=1)
    size: str = "512x512"
    response_format: str = "b64_json"



@dataclass(frozen=True)
class ServeConfig:
    folder: str
    backend: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    api_auth: str | None = None  # A1111's --api-auth: "user:pass[,user2:pass2]" (HTTP Basic)
    max_queue: int = 8  # requests waiting or running; beyond: 503
    timeout_s: float = 600.0  # per request, queue wait included
    max_body_mb: float = 32.0
    max_pixels: int = 1024 * 1024  # per image made
    max_input_pixels: int = 4096 * 4096  # per image sent (img2img's init_images, mask): read from the header first
    max_steps: int = 150
    max_images: int = 8  # per request (batch_size x n_iter)
    batch_window_ms: float = 50.0  # how long the first of compatible requests waits for others (0: no batching)
    cors_origins: tuple[str, ...] = ()  # A1111's --cors-allow-origins; empty: no CORS headers at all
    body_timeout_s: float = 60.0  # the whole body must arrive within this of the request's start; else 408

    def check(self) -> None:
        from sdtrt.runtime.backends import BACKENDS

        if self.backend not in BACKENDS:
            raise UsageError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be 1..65535 (0: any free port), got {self.port!r}")
        check_credentials(self.api_key, self.api_auth)
        if self.host not in ("127.0.0.1", "localhost", "::1") and not (self.api_key or self.api_auth):
            raise UsageError(f"binding to {self.host} exposes the server: set --api-key (clients send "
                             "'Authorization: Bearer KEY') or --api-auth USER:PASS, or keep the default 127.0.0.1")
        for label, value in (("--max-queue", self.max_queue), ("--max-steps", self.max_steps),
                             ("--max-images", self.max_images), ("--max-pixels", self.max_pixels),
                             ("--max-input-pixels", self.max_input_pixels)):
            if value < 1:
                raise UsageError(f"{label} must be at least 1, got {value}")
        for label, seconds in (("--timeout", self.timeout_s), ("--body-timeout", self.body_timeout_s)):
            if not (math.isfinite(seconds) and seconds > 0):
                raise UsageError(f"{label} must be positive, got {seconds}")
        if not (math.isfinite(self.batch_window_ms) and 0 <= self.batch_window_ms <= 10_000):
            raise UsageError(f"--batch-window must be 0..10000 ms, got {self.batch_window_ms}")
        for origin in self.cors_origins:
            host = origin.split("//", 1)[1] if "//" in origin else ""
            if origin != "*" and not (origin.startswith(("http://", "https://")) and host and "/" not in host):
                raise UsageError(f"--cors-allow-origins takes origins like https://app.example.com or *, got {origin!r}")


def _png_b64(image, parameters: str) -> str:
    from sdtrt.runtime.infotext import write_image

    buf = io.BytesIO()
    write_image(image, buf, parameters)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode_image(data: str, label: str, max_pixels: int):
    """A base64 image (A1111 clients send raw base64 or a data: URL) as an upright PIL image, or a UsageError: its
    size is read from the header and held to the server's pixel limit before any pixel is decoded."""
    from sdtrt.runtime.images import open_image

    if not isinstance(data, str) or not data:
        raise UsageError(f"{label} must be a base64-encoded image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        raise UsageError(f"{label} is not valid base64") from None
    return open_image(io.BytesIO(raw), label, max_pixels)


def create_app(config: ServeConfig, pipeline=None, replica: str | None = None):
    """The FastAPI application over ``config.folder`` (``pipeline``: one already loaded, for tests). ``replica``: this
    process's name among several (Ray Serve's replica id), sent back as ``X-Sdtrt-Replica`` and in ``/ready``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from sdtrt.runtime import Pipeline
    from sdtrt.runtime.infotext import A1111_SAMPLERS
    from sdtrt.runtime.request import GenerationRequest

    config.check()
    registry = CollectorRegistry()
    m_requests = Counter("sdtrt_requests", "HTTP generation requests", ["endpoint"], registry=registry)
    m_errors = Counter("sdtrt_errors", "failed requests by kind", ["kind"], registry=registry)
    m_queue = Gauge("sdtrt_queue_depth", "requests waiting or running", registry=registry)
    m_latency = Histogram("sdtrt_latency_seconds", "request latency", registry=registry,
                          buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
    m_images = Counter("sdtrt_images", "images generated", registry=registry)
    m_batch = Histogram("sdtrt_batch_size", "images per engine call", registry=registry,
                        buckets=(1, 2, 3, 4, 6, 8, 16))
    names = {a1111: ours for ours, (a1111, schedule) in A1111_SAMPLERS.items() if schedule is None}
    names |= {f"{a1111} {schedule}": ours for ours, (a1111, schedule) in A1111_SAMPLERS.items() if schedule}
    state: dict[str, Any] = {"pipe": pipeline, "waiting": 0, "progress": 0.0, "worker": None}
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdtrt-load")

    def sampler(name: str | None, schedule: str | None) -> str | None:
        if name is None:
            return None
        key = f"{name} {schedule}" if schedule and schedule not in ("Automatic",) else name
        if key not in names:
            raise UsageError(f"sampler {key!r} is not available; GET /sdapi/v1/samplers lists them")
        return names[key]

    def check_limits(width: int, height: int, steps: int, images: int) -> None:
        if width * height > config.max_pixels:
            raise UsageError(f"{width}x{height} is over this server's limit of {config.max_pixels} pixels per image")
        if steps > config.max_steps:
            raise UsageError(f"steps {steps} is over this server's limit of {config.max_steps}")
        if images > config.max_images:
            raise UsageError(f"{images} images per request is over this server's limit of {config.max_images}")

    def run(req: GenerationRequest, n_iter: int, plan) -> tuple[list, list[str]]:
        """In the engine thread: ``n_iter`` batches (A1111: seed + i for the i-th), on the plan made when the request
        was checked (it does not depend on the seed)."""
        pipe = state["pipe"]
        images, infos = [], []
        for i in range(n_iter):
            batch = replace(req, seed=req.seed + i)
            state["progress"] = i / n_iter

            def progress(done, total, i=i):
                state["progress"] = (i + done / total) / n_iter

            result = pipe.generate(batch, callback=progress, plan=plan)
            m_batch.observe(batch.batch)
            images += result.images
            infos += result.parameters
        state["progress"] = 0.0
        return images, infos

    def merge(group: list[Job]) -> list[tuple[list, list[str]]]:
        """In the engine thread: txt2img jobs of one batching key as one engine call. Each keeps its own initial
        noise (its seed's first draw, as it would alone) and its own metadata; the samplers of batchable jobs draw
        nothing after that, so every image is the one its request would get alone."""
        import numpy as np

        pipe = state["pipe"]
        first = group[0].req
        prompts, negatives, latents = [], [], []
        for job in group:
            b = job.req.num_images_per_prompt
            prompts += [job.req.prompt[0]] * b
            negatives += [job.req.negative_prompt[0]] * b
            rng = np.random.Generator(np.random.PCG64(job.req.seed))
            latents.append(rng.standard_normal((b, *job.plan.shape[1:]), dtype=np.float32))  # (b, C, h, w)
        merged = GenerationRequest.create(prompts, negatives, first.num_inference_steps, first.guidance_scale,
                                          first.height, first.width, first.seed, 1, first.scheduler,
                                          clip_skip=first.clip_skip)
        result = pipe.generate(merged, latents=np.concatenate(latents))
        m_batch.observe(merged.batch)
        out, k = [], 0
        for job in group:
            b = job.req.num_images_per_prompt
            infos = [pipe._infotext(job.req, job.plan, job.req.seed, i) for i in range(b)]
            out.append((result.images[k:k + b], infos))
            k += b
        return out

    def batch_key(req: GenerationRequest, n_iter: int, plan):
        """What requests must share to run as one engine call and give each its own image: txt2img, one prompt, one
        iteration, a sampler that draws no noise after the start, the same size, steps, sampler, guidance, CLIP skip
        and prompt chunk count; None: runs alone."""
        if n_iter != 1 or len(req.prompt) != 1 or plan.task != "txt2img" or plan.table.stochastic or plan.loras:
            return None
        return (plan.width, plan.height, req.num_inference_steps, plan.table.name, req.guidance_scale, req.clip_skip,
                max(c.count for c in plan.chunks.values()))

    async def submit(endpoint: str, request: Request, req: GenerationRequest, n_iter: int, image=None, mask=None):
        """Queue ``req`` for the engine thread and wait for it; a client that disconnects, or the timeout, takes it
        off the queue if it has not started."""
        m_requests.labels(endpoint).inc()
        t = time.perf_counter()
        if state["waiting"] >= config.max_queue:
            raise _QueueFull()
        if req.seed is None:  # chosen now: a batched request draws its own noise from it
            import numpy as np

            req = replace(req, seed=int(np.random.SeedSequence().entropy % (2**63)))
        plan = state["pipe"].plan(req, image, mask)  # every check before queueing: a bad request never waits
        loop = asyncio.get_running_loop()
        job = Job(loop, lambda: run(req, n_iter, plan), req.batch * n_iter,
                  batch_key(req, n_iter, plan) if image is None else None, req, plan)
        state["waiting"] += 1
        m_queue.set(state["waiting"])
        try:
            state["worker"].put(job)
            deadline = time.monotonic() + config.timeout_s
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=min(0.5, max(deadline - time.monotonic(), 0)))
                if done:
                    images, infos = job.future.result()
                    m_latency.observe(time.perf_counter() - t)
                    m_images.inc(len(images))
                    return images, infos
                if time.monotonic() >= deadline:
                    raise asyncio.TimeoutError()
                if await request.is_disconnected():
                    raise ClientGone()
        except BaseException:
            job.cancelled = True
            raise
        finally:
            state["waiting"] -= 1
            m_queue.set(state["waiting"])

    app = FastAPI(title="sdtrt", description="Stable Diffusion on TensorRT / ONNX Runtime")

    @app.on_event("startup")
    async def load() -> None:
        if state["pipe"] is None:
            loop = asyncio.get_running_loop()
            state["pipe"] = await loop.run_in_executor(executor, lambda: Pipeline.from_dir(config.folder,
                                                                                           config.backend))
        state["worker"] = EngineWorker(merge, config.batch_window_ms / 1000, state["pipe"].manifest.ranges.batch_max)

    @app.on_event("shutdown")
    async def close() -> None:
        if state["worker"] is not None:
            state["worker"].stop()
        if state["pipe"] is not None:
            state["pipe"].close()
        executor.shutdown(wait=False)

    @app.exception_handler(SdtrtError)
    async def library_error(request: Request, ex: SdtrtError):
        kind = type(ex).__name__
        m_errors.labels(kind).inc()
        return error_response(request.url.path, 422, kind, str(ex))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, ex: RequestValidationError):
        m_errors.labels("RequestValidationError").inc()
        fields = [".".join(str(p) for p in e.get("loc", ())[1:]) or "body" for e in ex.errors()[:5]]
        detail = "; ".join(f"{f}: {e.get('msg')}" for f, e in zip(fields, ex.errors()))
        return error_response(request.url.path, 422, "invalid_request", detail, param=fields[0] if fields else None)

    @app.exception_handler(_QueueFull)
    async def full(request: Request, ex: _QueueFull):
        m_errors.labels("queue_full").inc()
        return error_response(request.url.path, 503, "busy", f"{config.max_queue} requests are queued or running; "
                              "retry", headers={"Retry-After": "5"})

    @app.exception_handler(asyncio.TimeoutError)
    async def timed_out(request: Request, ex):
        m_errors.labels("timeout").inc()
        return error_response(request.url.path, 504, "timeout", f"not done within {config.timeout_s:g} s")

    def a1111_response(body: BaseModel, images, infos, seed: int | None) -> dict:
        encoded = [_png_b64(im, info) for im, info in zip(images, infos)]
        info = {"prompt": getattr(body, "prompt", ""), "all_prompts": [getattr(body, "prompt", "")] * len(encoded),
                "seed": seed, "infotexts": infos, "sd_model_name": state["pipe"].model_name,
                "sampler_name": getattr(body, "sampler_name", None)}
        return {"images": encoded, "parameters": body.model_dump(), "info": json.dumps(info)}

    def to_request(body: Txt2Img, strength: float | None = None, mask_blur: float = 0,
                   padding: int | None = None) -> GenerationRequest:
        check_limits(body.width, body.height, body.steps, body.batch_size * body.n_iter)
        return GenerationRequest.create(body.prompt, body.negative_prompt or None, body.steps, body.cfg_scale,
                                        body.height, body.width, body.seed, body.batch_size,
                                        sampler(body.sampler_name, body.scheduler),
                                        clip_skip=None if not body.clip_skip or body.clip_skip <= 1 else body.clip_skip - 1,
                                        strength=strength, mask_blur=mask_blur, padding_mask_crop=padding)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2Img, request: Request):
        images, infos = await submit("txt2img", request, to_request(body), body.n_iter)
        return a1111_response(body, images, infos, _seed(infos))

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2Img, request: Request):
        if not body.init_images:
            raise UsageError("init_images needs one base64 image")
        image = _decode_image(body.init_images[0], "init_images[0]", config.max_input_pixels)
        mask = _decode_image(body.mask, "mask", config.max_input_pixels) if body.mask else None
        req = to_request(body, body.denoising_strength, body.mask_blur if mask else 0,
                         body.inpaint_full_res_padding if (mask and body.inpaint_full_res) else None)
        images, infos = await submit("img2img", request, req, body.n_iter, image, mask)
        return a1111_response(body, images, infos, _seed(infos))

    @app.post("/v1/images/generations")
    async def openai_images(body: OpenAIImages, request: Request):
        if body.response_format != "b64_json":
            raise UsageError("response_format must be b64_json (this server returns no URLs)")
        try:
            width, height = (int(v) for v in body.size.lower().split("x"))
        except ValueError:
            raise UsageError(f"size must be WIDTHxHEIGHT, got {body.size!r}") from None
        check_limits(width, height, 30, body.n)
        req = GenerationRequest.create(body.prompt, None, 30, 7.5, height, width, None, body.n)
        images, infos = await submit("openai", request, req, 1)
        return {"created": int(time.time()), "data": [{"b64_json": _png_b64(im, info), "revised_prompt": body.prompt}
                                                      for im, info in zip(images, infos)]}

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": a1111 + (f" {schedule}" if schedule else ""), "aliases": [ours], "options": {}}
                for ours, (a1111, schedule) in A1111_SAMPLERS.items()]

    @app.get("/sdapi/v1/sd-models")
    async def models():
        pipe = state["pipe"]
        sha = pipe.manifest.components["unet"].sha256
        return [{"title": f"{pipe.model_name} [{sha[:10]}]", "model_name": pipe.model_name, "hash": sha[:10],
                 "sha256": sha, "filename": pipe.model_name, "config": None}]

    @app.get("/sdapi/v1/progress")
    async def progress():
        return {"progress": state["progress"], "eta_relative": 0.0,
                "state": {"job_count": state["waiting"], "interrupted": False}, "current_image": None}

    @app.get("/health")
    async def health():
        return {"status": "alive"}

    @app.get("/ready")
    async def ready():
        if state["pipe"] is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "backend": state["pipe"].backend_name, "replica": replica, "pid": os.getpid()}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    accepted = set()  # the Authorization header values that let a request in
    if config.api_key:
        accepted.add(f"Bearer {config.api_key}")
    for pair in (config.api_auth or "").split(",") if config.api_auth else ():
        accepted.add("Basic " + base64.b64encode(pair.encode()).decode())
    max_bytes = int(config.max_body_mb * 2**20)
    # innermost first: the body is read (and checked) only for requests the guard lets in
    count = lambda kind: m_errors.labels(kind).inc()  # noqa: E731
    app.add_middleware(BodyReader, timeout_s=config.body_timeout_s, max_bytes=max_bytes, count=count,
                       json_paths=frozenset(r.path for r in app.routes if "POST" in getattr(r, "methods", ())))
    app.add_middleware(Guard, accepted=accepted, max_bytes=max_bytes, replica=replica, count=count,
                       hint="send Authorization: Bearer <api key>" if config.api_key
                       else "send HTTP Basic credentials (--api-auth)")
    if config.cors_origins:  # outermost: it answers browsers' preflight requests, which carry no credentials
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in config.cors_origins)

    return app


class _QueueFull(Exception):
    pass


class Job:
    """One request's work for the engine thread; its result goes back to the event loop that waits for it."""

    def __init__(self, loop, fn, images: int, key=None, req=None, plan=None):
        self.loop, self.fn, self.images, self.key = loop, fn, images, key
        self.req, self.plan = req, plan  # what a merged engine call needs of each request
        self.future = loop.create_future()
        self.cancelled = False  # the client went away or timed out: skipped if not started

    def _settle(self, ok: bool, value) -> None:
        def settle():
            if not self.future.done():
                (self.future.set_result if ok else self.future.set_exception)(value)

        self.loop.call_soon_threadsafe(settle)


class EngineWorker:
    """The one thread that runs the engines. Jobs run in arrival order; a job with a batching key waits up to the
    window for later jobs with the same key and runs with them as one engine call (``merge``), up to ``max_batch``
    images."""

    def __init__(self, merge, window_s: float, max_batch: int):
        import threading
        from collections import deque

        self.merge, self.window_s, self.max_batch = merge, window_s, max_batch
        self.jobs: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="sdtrt-engine", daemon=True)
        self.thread.start()

    def put(self, job: Job) -> None:
        with self.cond:
            self.jobs.append(job)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()

    def _group(self, first: Job) -> list[Job]:
        """``first`` and the compatible jobs that arrive within the window (called with the lock held)."""
        group, size = [first], first.images
        deadline = time.monotonic() + self.window_s
        while size < self.max_batch:
            for job in [j for j in self.jobs if j.key == first.key and not j.cancelled]:
                if size + job.images <= self.max_batch:
                    self.jobs.remove(job)
                    group.append(job)
                    size += job.images
            left = deadline - time.monotonic()
            if left <= 0 or size >= self.max_batch:
                break
            self.cond.wait(left)
        return group

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.jobs and not self.stopped:
                    self.cond.wait()
                if self.stopped:
                    return
                job = self.jobs.popleft()
                if job.cancelled:
                    continue
                group = self._group(job) if job.key is not None and self.window_s > 0 else [job]
            try:
                results = self.merge(group) if len(group) > 1 else [job.fn()]
            except BaseException as ex:  # noqa: BLE001  (handed to the request that asked, as its error)
                for j in group:
                    j._settle(False, ex)
                continue
            for j, result in zip(group, results):
                j._settle(True, result)


def _seed(infos: list[str]) -> int | None:
    """The seed of the first image, from its metadata (the request may not have named one)."""
    from sdtrt.runtime.infotext import parse_infotext

    value = parse_infotext(infos[0]).get("Seed") if infos else None
    return int(value) if value is not None and value.isdigit() else None


def serve(config: ServeConfig, access_log: bool = True, log_level: str = "warning", say=None) -> None:
    """Run the server (uvicorn) until SIGTERM/SIGINT, then let requests in flight finish and return. Everything that
    can fail is done before uvicorn runs — the configuration checked, the socket bound, the engines loaded and their
    files checked against the manifest — so a failure is the caller's error (the CLI's one line), not a traceback;
    the startup line is printed once the socket listens."""
    import sys

    from sdtrt.errors import Terminated
    from sdtrt.runtime import Pipeline
    from sdtrt.serve_http import bind, run_uvicorn, url

    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    config.check()
    folder = Path(config.folder)
    if not folder.is_dir():
        raise UsageError(f"engine folder {config.folder} {'is a file, not a folder' if folder.exists() else 'does not exist'}")
    sock = bind(config.host, config.port)
    pipe = None
    try:
        try:
            pipe = Pipeline.from_dir(folder, config.backend)
        except (KeyboardInterrupt, Terminated):  # stopped before it served: as a stop while serving, not an error
            say("sdtrt serve: stopped while loading the engines")
            return
        app = create_app(config, pipeline=pipe)
        listening = (f"sdtrt serve: listening on {url(sock, config.host)} (model {pipe.model_name}, backend "
                     f"{pipe.backend_name}, A1111 /sdapi/v1 + OpenAI /v1/images)")
        run_uvicorn(app, sock, lambda: say(listening), access_log=access_log, log_level=log_level,
                    drain_s=min(config.timeout_s, 120.0), say=say)
    finally:
        sock.close()
        if pipe is not None:
            pipe.close()  # also where the app's shutdown did (a second close is a no-op)


# ---- scale-out on Ray Serve --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayConfig:
    """How the app is deployed on Ray Serve: a fixed number of replicas, or Ray Serve's autoscaling between
    ``min_replicas`` and ``max_replicas`` aiming at ``target_ongoing_requests`` per replica. Each replica is one
    process with its own engines and engine thread (and batching): one per GPU."""

    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: autoscaling instead of a fixed count
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # autoscaling's aim per replica; None: 2
    num_gpus: float | None = None  # per replica; None: 1 where the cluster (before connecting: this machine) has
    # GPUs, 0 for onnxruntime-cpu; set it on clusters whose GPU nodes start on demand
    num_cpus: float = 1.0  # per replica, as Ray schedules them
    address: str | None = None  # an existing cluster; None: RAY_ADDRESS, else a local one started here
    name: str = "sdtrt"  # the Ray Serve application's name
    allow_unauthenticated: bool = False  # ray_app only: serve without api_key/api_auth (Ray decides the address)

    def check(self) -> None:
        if self.replicas < 1:
            raise UsageError(f"--replicas must be at least 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise UsageError("autoscaling needs both min_replicas and max_replicas (--autoscale MIN:MAX)")
        if self.max_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas >= 1:
            raise UsageError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {self.min_replicas}:"
                             f"{self.max_replicas}")
        if self.max_replicas is not None and self.replicas != 1:
            raise UsageError("--replicas and --autoscale exclude each other: a fixed count, or Ray's autoscaling")
        if self.target_ongoing_requests is not None and self.max_replicas is None:
            raise UsageError("--target-ongoing-requests steers autoscaling: it needs --autoscale MIN:MAX")
        target = self.target_ongoing_requests
        if target is not None and not (math.isfinite(target) and target > 0):
            raise UsageError(f"--target-ongoing-requests must be positive, got {target}")
        for label, value in (("--gpus-per-replica", self.num_gpus), ("--cpus-per-replica", self.num_cpus)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{label} must be a non-negative number, got {value}")


def ray_deployment_options(config: ServeConfig, ray_config: RayConfig) -> dict:
    """Ray Serve's deployment options for ``config``: Ray never sends a replica more requests than its own queue
    holds (``max_ongoing_requests``), queues at most as many again in each proxy (beyond that Ray answers 503), and
    gives each replica a GPU where the cluster has them (Ray sets CUDA_VISIBLE_DEVICES, so the replica's device 0 is
    its own GPU)."""
    gpus = ray_config.num_gpus
    if gpus is None and config.backend == "onnxruntime-cpu":
        gpus = 0
    elif gpus is None:
        import ray

        from sdtrt.runtime.backends import cuda_driver_device_count

        # `serve run` builds the application before it connects to Ray: then this machine's GPUs decide
        count = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else cuda_driver_device_count()
        gpus = 1 if count >= 1 else 0
    options: dict[str, Any] = {
        "name": "sdtrt", "max_ongoing_requests": config.max_queue, "max_queued_requests": config.max_queue,
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": ray_config.num_cpus},
        "graceful_shutdown_timeout_s": min(config.timeout_s, 120.0),  # in-flight requests finish
    }
    if ray_config.max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": ray_config.min_replicas,
                                         "max_replicas": ray_config.max_replicas,
                                         "target_ongoing_requests": ray_config.target_ongoing_requests or 2.0}
    else:
        options["num_replicas"] = ray_config.replicas
    return options


def ray_application(config: ServeConfig, ray_config: RayConfig = RayConfig()):
    """The Ray Serve application: ``create_app`` as the ingress of one deployment. The app is built in each replica
    (Ray's ingress builder), so each has its own engines, worker and metrics; ``X-Sdtrt-Replica`` names the replica
    that answered."""
    from ray import serve

    def build():
        from sdtrt.runtime import Pipeline

        # loaded here, not in the app's startup event: Ray reports an exception of the replica's constructor with
        # its message (a failed startup event only as "ASGI lifespan startup failed")
        pipe = Pipeline.from_dir(config.folder, config.backend)
        return create_app(config, pipeline=pipe, replica=serve.get_replica_context().replica_id.unique_id)

    return serve.deployment(serve.ingress(build)(), **ray_deployment_options(config, ray_config)).bind()


def ray_app(args: dict):
    """Ray Serve application builder, for ``serve run sdtrt.serve:ray_app folder=/engines/sd15 replicas=2`` or a
    RayService's ``import_path: sdtrt.serve:ray_app`` with ``args`` (``ray_configs`` reads them)."""
    return ray_application(*ray_configs(args))


def ray_configs(args: dict) -> tuple[ServeConfig, RayConfig]:
    """The configs of ``ray_app``'s builder arguments: the fields of ``ServeConfig`` (host and port excepted: those are
    Ray's ``http_options``) and of ``RayConfig`` (address excepted). ``serve run`` passes every value as a string;
    numbers, booleans and JSON lists are read from it, comma-separated lists too."""
    import dataclasses
    import typing

    from sdtrt.config import from_dict

    fields = {c: {f.name: typing.get_type_hints(c)[f.name] for f in dataclasses.fields(c)}
              for c in (ServeConfig, RayConfig)}
    unknown = sorted(set(args) - set(fields[ServeConfig]) - set(fields[RayConfig]) |
                     ({"host", "port", "address", "name"} & set(args)))  # Ray's http_options / serve run's own
    if unknown:
        known = sorted((set(fields[ServeConfig]) | set(fields[RayConfig])) - {"host", "port", "address", "name"})
        raise UsageError(f"sdtrt.serve:ray_app does not take {', '.join(unknown)}; it takes {', '.join(known)}")
    if "folder" not in args:
        raise UsageError("sdtrt.serve:ray_app needs folder=ENGINE_FOLDER")

    def value(tp, v):
        if not isinstance(v, str) or tp is str or (typing.get_origin(tp) is not tuple and str in typing.get_args(tp)):
            return v
        try:
            return json.loads(v)
        except ValueError:
            return [x.strip() for x in v.split(",")] if typing.get_origin(tp) is tuple else v

    parts = []
    for cls in (ServeConfig, RayConfig):
        given = {k: value(fields[cls][k], v) for k, v in args.items() if k in fields[cls]}
        try:
            parts.append(from_dict(cls, given))
        except ValueError as ex:
            raise UsageError(f"sdtrt.serve:ray_app: {ex}") from None
    config, ray_config = parts
    config.check()
    ray_config.check()
    if not Path(config.folder).is_absolute():  # replicas run in other directories, often on other machines
        raise UsageError(f"sdtrt.serve:ray_app needs an absolute folder= (every node that runs a replica reads it "
                         f"there), got {config.folder!r}")
    if not (config.api_key or config.api_auth or ray_config.allow_unauthenticated):
        # Ray's http_options decide where this listens (a RayService: 0.0.0.0), so the key cannot hang on --host
        raise UsageError("sdtrt.serve:ray_app needs api_key= or api_auth=USER:PASS (Ray may expose it beyond this "
                         "machine), or allow_unauthenticated=true for a proxy that only this machine reaches")
    return config, ray_config


def _replica_failure(name: str, ex: Exception) -> str:
    """The replica's own error line (``sdtrt.errors.ManifestError: …``) from the deployment's status, else Ray's."""
    import re

    from ray import serve

    try:
        text = "\n".join(d.message for d in serve.status().applications[name].deployments.values())
    except Exception:  # noqa: BLE001  (the status is a courtesy; Ray's own message stands without it)
        text = ""
    ours = re.findall(r"sdtrt\.errors\.(\w+: .+)", text)
    return ours[-1] if ours else (text.strip().splitlines() or [str(ex)])[-1]


def _ray_logs() -> str:
    import ray

    try:
        return ray._private.worker._global_node.get_logs_dir_path() + "/serve"  # a local cluster's
    except AttributeError:
        return "the Ray dashboard / session logs of the cluster"


def serve_ray(config: ServeConfig, ray_config: RayConfig, log=print) -> None:
    """``sdtrt serve --ray``: deploy on Ray Serve (an existing cluster, or a local one started here) with Ray's HTTP
    proxy on ``config.host:config.port``, and keep it up until Ctrl-C/SIGTERM; then let requests in flight finish,
    remove the application (Serve itself, and the cluster, when they were started here)."""
    import logging
    import threading

    import ray
    from ray import serve

    from sdtrt.errors import Terminated
    from sdtrt.manifest import Manifest

    config.check()
    ray_config.check()
    if config.port == 0:
        raise UsageError("--ray needs a fixed --port (Ray's proxy cannot pick a free one and say which)")
    folder = Path(config.folder).resolve()
    if not folder.is_dir():
        raise UsageError(f"engine folder {config.folder} does not exist")
    Manifest.load(folder)  # a broken folder fails here with its own message, not in every replica
    config = replace(config, folder=str(folder))  # replicas may start in another working directory
    # "local": a cluster of our own, stopped with us (ray.init() alone would join any cluster `ray start` left here)
    address = ray_config.address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        _check_port_free(config.host, config.port)
    import signal

    ours = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # replicas' output stays in Ray's log files (streamed here, a failing replica's traceback would print once
        # per retry); the startup line names the folder
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as ex:
        raise SdtrtError(f"no Ray cluster at {address}: {str(ex).strip().splitlines()[0]}") from None
    if threading.current_thread() is threading.main_thread():
        for sig, handler in ours.items():  # Ray's own SIGTERM handler aborts the process: ours stops it cleanly
            if handler is not None:
                signal.signal(sig, handler)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    quiet = {"log_level": "WARNING"}  # Ray Serve logs every request at INFO; our /metrics counts them
    options: dict[str, Any] = {}
    try:
        options = ray_deployment_options(config, ray_config)
        if address == "local":
            _check_fits(ray_config, options, log)
        _start_proxy(config, quiet)
        deployed = threading.Event()
        threading.Thread(target=_report_waiting, args=(ray_config.name, deployed, log), daemon=True).start()
        try:
            serve.run(ray_application(config, ray_config), name=ray_config.name, route_prefix="/",
                      logging_config=quiet)
        except RuntimeError as ex:  # a replica failed to start: the deployment's status holds its traceback
            raise SdtrtError(f"Ray Serve could not start the replicas: {_replica_failure(ray_config.name, ex)}; "
                             f"replica logs in {_ray_logs()}") from None
        finally:
            deployed.set()
        scale = (f"{ray_config.min_replicas}..{ray_config.max_replicas} replicas (autoscaling)"
                 if ray_config.max_replicas is not None else f"{ray_config.replicas} replica(s)")
        log(f"sdtrt: serving {folder} on http://{config.host}:{config.port} with Ray Serve, {scale}; "
            f"Ray at {ray.get_runtime_context().gcs_address}, replica logs in {_ray_logs()}")
        try:
            while True:
                time.sleep(3600)
        except (KeyboardInterrupt, Terminated):  # the way to stop a server: not an error
            log("sdtrt: stopping: requests in flight finish first (Ctrl-C again: now)")
    finally:
        _stop_ray(address, ray_config.name, options.get("graceful_shutdown_timeout_s", 20.0), log)


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on before starting a cluster (Ray's proxy would fail deep inside)."""
    from sdtrt.serve_http import bind

    bind(host, port).close()


def _check_fits(ray_config: RayConfig, options: dict, log) -> None:
    """On a cluster of our own (this machine), replicas that cannot all be placed would leave Ray waiting forever:
    refuse them, naming what is missing."""
    import ray

    have = ray.cluster_resources()
    count = ray_config.replicas if ray_config.max_replicas is None else ray_config.min_replicas
    for kind, flag in (("CPU", "--cpus-per-replica"), ("GPU", "--gpus-per-replica")):
        each = options["ray_actor_options"][f"num_{kind.lower()}s"]
        if each and count * each > have.get(kind, 0):
            raise UsageError(f"{count} replicas x {each:g} {kind} need {count * each:g} {kind}s; this machine has "
                             f"{have.get(kind, 0):g} for Ray: lower --replicas/--autoscale or {flag}")
        if each and ray_config.max_replicas is not None and ray_config.max_replicas * each > have.get(kind, 0):
            log(f"sdtrt: warning: at most {int(have.get(kind, 0) // each)} of the {ray_config.max_replicas} "
                f"replicas fit on this machine's {have.get(kind, 0):g} {kind}s")


def _start_proxy(config: ServeConfig, logging_config: dict) -> None:
    """Start Ray Serve with its HTTP proxy on ``config.host:config.port``; where Serve already runs on the cluster
    with another address, refuse (Ray would keep its own and ignore ours: the API-key rule would check a host that
    is not the one served)."""
    from ray import serve
    from ray.exceptions import RayError

    try:
        serve.start(http_options={"host": config.host, "port": config.port}, logging_config=logging_config)
    except RayError as ex:
        raise SdtrtError(f"Ray Serve's HTTP proxy could not start on {config.host}:{config.port} "
                         f"({type(ex).__name__}; is the port taken?)") from None
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        actual = (http.host, http.port)
    except Exception:  # noqa: BLE001  (a private API: without it, Ray's own warning is all there is)
        return
    if actual != (config.host, config.port):
        raise UsageError(f"Ray Serve already runs on this cluster with its proxy on {actual[0]}:{actual[1]}, not "
                         f"{config.host}:{config.port}: pass --host {actual[0]} --port {actual[1]} (with --api-key "
                         "where that is not loopback)")


def _report_waiting(name: str, deployed, log) -> None:
    """While ``serve.run`` waits, say once why when Ray reports replicas it cannot place (a cluster still scaling
    up, or resources it will never have)."""
    from ray import serve

    said = set()
    while not deployed.wait(10.0):
        try:
            app = serve.status().applications.get(name)
            messages = [d.message for d in app.deployments.values()] if app else []
        except Exception:  # noqa: BLE001  (only a progress note)
            continue
        for message in messages:
            first = message.strip().splitlines()[0] if message.strip() else ""
            if first and first not in said:
                said.add(first)
                log(f"sdtrt: waiting for Ray: {first}")


def _stop_ray(address: str, name: str, drain_s: float, log) -> None:
    """Take the application down gracefully (requests in flight finish, up to ``drain_s``), then disconnect; a
    cluster started here stops with it. Bounded: a cluster whose processes are already gone does not hang us."""
    import threading

    import ray
    from ray import serve

    from sdtrt.errors import Terminated

    def down():
        try:
            serve.delete(name)  # replicas drain their requests; Serve's shutdown would cut them off
            if address == "local":
                serve.shutdown()
        except Exception as ex:  # noqa: BLE001  (cleanup: the error that ended the run matters more)
            log(f"sdtrt: warning: Ray Serve did not shut down cleanly: {type(ex).__name__}: {ex}")

    worker = threading.Thread(target=down, daemon=True)
    worker.start()
    try:
        worker.join(drain_s + 30)
    except (KeyboardInterrupt, Terminated):
        log("sdtrt: stopping now")
    finally:
        ray.shutdown()
