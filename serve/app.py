"""The FastAPI application of ``sdtrt serve`` and its scheduling: requests of every protocol become
``GenerationRequest``s (the library checks them; its typed errors become 4xx bodies in the protocol's own shape),
are queued for the one engine thread (``worker.EngineWorker``) and waited for on the event loop. A bounded queue
answers 503 with ``Retry-After`` when full; each request has a timeout; a client that goes away takes its queued work
with it. The protocols are routers of their own (``a1111``, ``openai``) over one ``Server``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import Request

from sdtrt.errors import SdtrtError, UsageError
from sdtrt.serve.config import ServeConfig
from sdtrt.serve.http import BodyReader, ClientGone, Guard, error_response
from sdtrt.serve.worker import EngineWorker, Job, QueueFull


class Interrupted(Exception):
    """A1111's ``POST /sdapi/v1/interrupt`` (or ``skip``) stopped the running request at a step boundary."""

    def __init__(self, how: str):
        super().__init__(how)
        self.how = how


class Server:
    """What the routers share: the configuration, the loaded pipeline, the engine thread, the queue and the metrics."""

    def __init__(self, config: ServeConfig, pipeline=None, replica: str | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.config, self.replica = config, replica
        self.registry = registry = CollectorRegistry()
        self.m_requests = Counter("sdtrt_requests", "HTTP generation requests", ["endpoint"], registry=registry)
        self.m_errors = Counter("sdtrt_errors", "failed requests by kind", ["kind"], registry=registry)
        self.m_queue = Gauge("sdtrt_queue_depth", "requests waiting or running", registry=registry)
        self.m_latency = Histogram("sdtrt_latency_seconds", "request latency", registry=registry,
                                   buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self.m_images = Counter("sdtrt_images", "images generated", registry=registry)
        self.m_batch = Histogram("sdtrt_batch_size", "images per engine call", registry=registry,
                                 buckets=(1, 2, 3, 4, 6, 8, 16))
        self.state: dict[str, Any] = {"pipe": pipeline, "waiting": 0, "progress": 0.0, "worker": None,
                                      "job": 0, "running": False, "stop": None}  # stop: (how, job) from stop()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdtrt-load")

    @property
    def pipe(self):
        return self.state["pipe"]

    def model_entries(self) -> list[dict]:
        """A1111's ``/sdapi/v1/sd-models`` entries of the models this server can run (title ``name [hash]``)."""
        pipe = self.pipe
        sha = pipe.manifest.components["unet"].sha256
        return [{"title": f"{pipe.model_name} [{sha[:10]}]", "model_name": pipe.model_name, "hash": sha[:10],
                 "sha256": sha, "filename": pipe.model_name, "config": None}]

    def find_model(self, name: str) -> dict:
        """The entry of ``name`` (a title, a model name or a hash, as A1111's ``get_closet_checkpoint_match``
        takes them), or a UsageError naming the known ones."""
        entries = self.model_entries()
        for e in entries:
            if name in (e["title"], e["model_name"], e["hash"], e["sha256"]):
                return e
        raise UsageError(f"unknown model {name!r}; this server has: {', '.join(e['title'] for e in entries)}")

    def check_limits(self, width: int, height: int, steps: int, images: int) -> None:
        config = self.config
        if width * height > config.max_pixels:
            raise UsageError(f"{width}x{height} is over this server's limit of {config.max_pixels} pixels per image")
        if steps > config.max_steps:
            raise UsageError(f"steps {steps} is over this server's limit of {config.max_steps}")
        if images > config.max_images:
            raise UsageError(f"{images} images per request is over this server's limit of {config.max_images}")

    def stop(self, how: str) -> None:
        """A1111's interrupt ("interrupt": the running request ends at its next step, answering the images it has
        finished) and skip ("skip": its current batch ends, the next runs); no effect when nothing runs, and none on
        queued requests, as A1111's ``shared.state``."""
        if self.state["running"]:
            self.state["stop"] = (how, self.state["job"])

    def _checkpoint(self, job: int) -> None:
        """Called between steps (the pipeline's callback): raises Interrupted when this job was asked to stop."""
        stop = self.state["stop"]
        if stop is not None and stop[1] == job:
            if stop[0] == "skip":
                self.state["stop"] = None
            raise Interrupted(stop[0])

    def _begin(self) -> int:
        state = self.state
        state["job"] += 1
        state["running"], state["stop"] = True, None
        return state["job"]

    # ---- in the engine thread --------------------------------------------------------------------------------------

    def run(self, req, n_iter: int, plan) -> tuple[list, list[str]]:
        """``n_iter`` batches on the plan made when the request was checked (it does not depend on the seed). Image
        ``i`` of the whole job, across batches, gets ``seed + i`` (A1111's ``all_seeds``)."""
        from sdtrt.runtime.seeds import image_seeds

        pipe, state = self.pipe, self.state
        images, infos, stopped = [], [], None
        job = self._begin()
        try:
            for i in range(n_iter):
                state["progress"] = i / n_iter

                def progress(done, total, i=i):
                    state["progress"] = (i + done / total) / n_iter
                    if done < total:  # a batch whose steps are all done is kept
                        self._checkpoint(job)

                try:
                    self._checkpoint(job)  # asked between batches (a device loop reports only its end)
                    result = pipe.generate(req, callback=progress, plan=plan,
                                           seeds=image_seeds(req.seed, req.batch, i * req.batch))
                except Interrupted as ex:  # skip: the next batch; interrupt: what is finished
                    stopped = ex.how
                    if ex.how == "skip":
                        continue
                    break
                self.m_batch.observe(req.batch)
                images += result.images
                infos += result.parameters
        finally:
            state["progress"], state["running"] = 0.0, False
        if not images and stopped:
            raise Interrupted(stopped)
        return images, infos

    def merge(self, group: list[Job]) -> list[tuple[list, list[str]]]:
        """txt2img jobs of one batching key as one engine call. Every image keeps its own seed (its request's
        seed + i) and so its own generator, for the initial noise and every later draw of the sampler, and its own
        metadata: every image is the one its request would get alone."""
        from sdtrt.runtime.request import GenerationRequest
        from sdtrt.runtime.seeds import image_seeds

        pipe = self.pipe
        first = group[0].req
        prompts, negatives, seeds = [], [], []
        for job in group:
            b = job.req.num_images_per_prompt
            prompts += [job.req.prompt[0]] * b
            negatives += [job.req.negative_prompt[0]] * b
            seeds += image_seeds(job.req.seed, b)
        merged = GenerationRequest.create(prompts, negatives, first.num_inference_steps, first.guidance_scale,
                                          first.height, first.width, first.seed, 1, first.scheduler,
                                          clip_skip=first.clip_skip)
        job = self._begin()
        try:
            result = pipe.generate(merged, seeds=seeds, callback=lambda done, total: done < total and self._checkpoint(job))
        finally:
            self.state["running"] = False
        self.m_batch.observe(merged.batch)
        out, k = [], 0
        for job in group:
            b = job.req.num_images_per_prompt
            infos = [pipe._infotext(job.req, job.plan, seed, i) for i, seed in enumerate(seeds[k:k + b])]
            out.append((result.images[k:k + b], infos))
            k += b
        return out

    @staticmethod
    def batch_key(req, n_iter: int, plan):
        """What requests must share to run as one engine call and give each its own image: txt2img, one prompt, one
        iteration, no LoRA, the same size, steps, sampler, guidance, CLIP skip and prompt chunk count (every image
        draws its noise from its own seed's generator, so stochastic samplers batch too); None: runs alone."""
        if n_iter != 1 or len(req.prompt) != 1 or plan.task != "txt2img" or plan.loras \
                or plan.hires is not None:
            return None
        return (plan.width, plan.height, req.num_inference_steps, plan.table.name, req.guidance_scale, req.clip_skip,
                max(c.count for c in plan.chunks.values()))

    # ---- on the event loop -----------------------------------------------------------------------------------------

    async def submit(self, endpoint: str, request: Request, req, n_iter: int, image=None, mask=None):
        """Queue ``req`` for the engine thread and wait for it; a client that disconnects, or the timeout, takes it
        off the queue if it has not started."""
        config, state = self.config, self.state
        self.m_requests.labels(endpoint).inc()
        t = time.perf_counter()
        if state["waiting"] >= config.max_queue:
            raise QueueFull()
        if req.seed is None:  # chosen now, as A1111 chooses it (below 2**32): a batched request draws from its seeds
            from sdtrt.runtime.seeds import random_seed

            req = replace(req, seed=random_seed())
        plan = self.pipe.plan(req, image, mask)  # every check before queueing: a bad request never waits
        loop = asyncio.get_running_loop()
        job = Job(loop, lambda: self.run(req, n_iter, plan), req.batch * n_iter,
                  self.batch_key(req, n_iter, plan) if image is None else None, req, plan)
        state["waiting"] += 1
        self.m_queue.set(state["waiting"])
        try:
            state["worker"].put(job)
            deadline = time.monotonic() + config.timeout_s
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=min(0.5, max(deadline - time.monotonic(), 0)))
                if done:
                    images, infos = job.future.result()
                    self.m_latency.observe(time.perf_counter() - t)
                    self.m_images.inc(len(images))
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
            self.m_queue.set(state["waiting"])

    async def load(self) -> None:
        from sdtrt.runtime import Pipeline

        if self.state["pipe"] is None:
            loop = asyncio.get_running_loop()
            self.state["pipe"] = await loop.run_in_executor(
                self.executor, lambda: Pipeline.from_dir(self.config.folder, self.config.backend))
        self.state["worker"] = EngineWorker(self.merge, self.config.batch_window_ms / 1000,
                                            self.pipe.manifest.ranges.batch_max)

    async def close(self) -> None:
        if self.state["worker"] is not None:
            self.state["worker"].stop()
        if self.state["pipe"] is not None:
            self.state["pipe"].close()
        self.executor.shutdown(wait=False)


def create_app(config: ServeConfig, pipeline=None, replica: str | None = None):
    """The FastAPI application over ``config.folder`` (``pipeline``: one already loaded, for tests). ``replica``: this
    process's name among several (Ray Serve's replica id), sent back as ``X-Sdtrt-Replica`` and in ``/ready``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from sdtrt.serve import a1111, openai

    config.check()
    server = Server(config, pipeline, replica)
    m_errors = server.m_errors
    app = FastAPI(title="sdtrt", description="Stable Diffusion on TensorRT / ONNX Runtime",
                  on_startup=[server.load], on_shutdown=[server.close])
    app.state.server = server

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

    @app.exception_handler(QueueFull)
    async def full(request: Request, ex: QueueFull):
        m_errors.labels("queue_full").inc()
        return error_response(request.url.path, 503, "busy", f"{config.max_queue} requests are queued or running; "
                              "retry", headers={"Retry-After": "5"})

    @app.exception_handler(Interrupted)
    async def interrupted(request: Request, ex: Interrupted):
        m_errors.labels("interrupted").inc()
        return error_response(request.url.path, 409, "Interrupted", f"stopped by POST /sdapi/v1/{ex.how} before any "
                              "image was finished")

    @app.exception_handler(asyncio.TimeoutError)
    async def timed_out(request: Request, ex):
        m_errors.labels("timeout").inc()
        return error_response(request.url.path, 504, "timeout", f"not done within {config.timeout_s:g} s")

    routers = [a1111.router(server), openai.router(server)]
    for r in routers:
        app.include_router(r)

    @app.get("/health")
    async def health():
        return {"status": "alive"}

    @app.get("/ready")
    async def ready():
        if server.pipe is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "backend": server.pipe.backend_name, "replica": replica, "pid": os.getpid()}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

    accepted = set()  # the Authorization header values that let a request in
    if config.api_key:
        accepted.add(f"Bearer {config.api_key}")
    for pair in (config.api_auth or "").split(",") if config.api_auth else ():
        accepted.add("Basic " + base64.b64encode(pair.encode()).decode())
    max_bytes = int(config.max_body_mb * 2**20)
    # innermost first: the body is read (and checked) only for requests the guard lets in
    count = lambda kind: m_errors.labels(kind).inc()  # noqa: E731
    app.add_middleware(BodyReader, timeout_s=config.body_timeout_s, max_bytes=max_bytes, count=count,
                       json_paths=frozenset(r.path for router in routers for r in router.routes
                                            if "POST" in getattr(r, "methods", ())))
    app.add_middleware(Guard, accepted=accepted, max_bytes=max_bytes, replica=replica, count=count,
                       hint="send Authorization: Bearer <api key>" if config.api_key
                       else "send HTTP Basic credentials (--api-auth)")
    if config.cors_origins:  # outermost: it answers browsers' preflight requests, which carry no credentials
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in config.cors_origins)

    return app


def serve(config: ServeConfig, access_log: bool = True, log_level: str = "warning", say=None) -> None:
    """Run the server (uvicorn) until SIGTERM/SIGINT, then let requests in flight finish and return. Everything that
    can fail is done before uvicorn runs — the configuration checked, the socket bound, the engines loaded and their
    files checked against the manifest — so a failure is the caller's error (the CLI's one line), not a traceback;
    the startup line is printed once the socket listens."""
    import sys

    from sdtrt.errors import Terminated
    from sdtrt.runtime import Pipeline
    from sdtrt.serve.http import bind, run_uvicorn, url

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
