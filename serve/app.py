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
from sdtrt.serve.http import BodyReader, ClientGone, Guard, error_response, is_openai, log
from sdtrt.serve.models import ModelRegistry
from sdtrt.serve.worker import EngineWorker, Job, QueueFull


class Interrupted(Exception):
    """A1111's ``POST /sdapi/v1/interrupt`` (or ``skip``) stopped the running request at a step boundary."""

    def __init__(self, how: str):
        super().__init__(how)
        self.how = how


class Server:
    """What the routers share: the configuration, the loaded pipeline, the engine thread, the queue and the metrics."""

    def __init__(self, config: ServeConfig, pipeline=None, replica: str | None = None,
                 models: ModelRegistry | None = None):
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
        self.state: dict[str, Any] = {"waiting": 0, "progress": 0.0, "worker": None,
                                      "job": 0, "running": False, "stop": None}  # stop: (how, job) from stop()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdtrt-load")
        self.models = models or ModelRegistry(config.backend, config.max_loaded, config.models_dir)
        if pipeline is not None:  # one folder's, loaded by the caller
            self.models.add(pipeline, config.folder)
        self.m_loads = Counter("sdtrt_model_loads", "models loaded (--models-dir: on a switch)", ["model"],
                               registry=registry)
        for name, times in self.models.loads.items():
            self.m_loads.labels(name).inc(times)
        self.models.on_load = lambda name: self.m_loads.labels(name).inc()
        Gauge("sdtrt_models_loaded", "models loaded now", registry=registry).set_function(
            lambda: len(self.models.loaded))

    @property
    def pipe(self):
        """The default model's pipeline (or, while it is being loaded, the one used last; None before any)."""
        return self.models.pipe()

    # ---- models (A1111's sd_model_checkpoint, OpenAI's model) --------------------------------------------------------

    def model_entries(self) -> list[dict]:
        """A1111's ``/sdapi/v1/sd-models`` entries of the models this server can run (title ``name [hash]``)."""
        return [e.a1111() for e in self.models.list()]

    def find_model(self, name: str) -> dict:
        """The entry of ``name`` (a title, a model name or a hash, as A1111's ``checkpoint_aliases`` take them), or
        an ``UnknownModel`` (a UsageError) naming the known ones."""
        return self.models.find(name).a1111()

    def current_model(self) -> dict | None:
        """The entry of the default model (A1111's ``sd_model_checkpoint`` is its title)."""
        entry = self.models.current()
        return None if entry is None else entry.a1111()

    def refresh_models(self) -> list[str]:
        """Scan ``--models-dir`` again (A1111's ``refresh-checkpoints``); the folders skipped are logged."""
        problems = self.models.refresh()
        for line in problems:
            log.warning("sdtrt serve: skipped %s", line)
        return problems

    async def select_model(self, name: str) -> dict:
        """Make ``name`` the default model (A1111's ``POST /sdapi/v1/options {"sd_model_checkpoint"}``): requests
        sent from now on without a model run on it; requests already queued keep theirs. Returns once it is loaded,
        behind the work queued before it (the engine thread runs one thing at a time: no generation is cut). A model
        that fails to load leaves the default as it was, and the error is raised."""
        entry = self.models.find(name)
        models, previous = self.models, self.models.default
        models.default = entry.name
        loop = asyncio.get_running_loop()

        def switch():
            models.acquire(entry.name)

        job = Job(loop, switch, 0)
        self.state["worker"].put(job)
        try:
            await asyncio.wait_for(asyncio.shield(job.future), self.config.timeout_s)
        except BaseException:
            if models.default == entry.name:
                models.default = previous
            raise
        return entry.a1111()

    def _model_name(self, model: str | None) -> str:
        """The model a request runs on: the one it names, else the default at the time it is sent."""
        if model is None or model == "":
            return self.models.default
        return self.models.find(model).name

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

    def _checkpoint(self, job: int, during: bool = False) -> bool | None:
        """Called between batches, and between steps (``during``: the pipeline's callback): raises Interrupted when
        this job was asked to stop; an interrupt or skip during a batch returns False instead, which ends the sampler's loop
        and makes the batch's images from the state so far, as A1111 does (modules/sd_samplers_common.py
        ``Sampler.launch_sampling``: ``except InterruptedException: return self.last_latent``)."""
        stop = self.state["stop"]
        if stop is not None and stop[1] == job:
            if stop[0] == "skip":  # this batch ends (its images made so far, as A1111's); the next one runs
                self.state["stop"] = None
            if during:
                return False
            raise Interrupted(stop[0])
        return None

    def _begin(self) -> int:
        state = self.state
        state["job"] += 1
        state["running"], state["stop"] = True, None
        return state["job"]

    # ---- in the engine thread --------------------------------------------------------------------------------------

    def run(self, req, n_iter: int, plan, pipe=None, batch=None) -> tuple[list, list[str]]:
        """``n_iter`` batches on the plan made when the request was checked (it does not depend on the seed). Image
        ``i`` of the whole job, across batches, gets ``seed + i`` (A1111's ``all_seeds``). ``batch(seeds,
        progress)``: how one batch is made (default: ``pipe.generate`` on the plan)."""
        from sdtrt.runtime.seeds import image_seeds

        pipe, state = pipe or self.pipe, self.state
        if batch is None:
            def batch(seeds, progress):
                return pipe.generate(req, callback=progress, plan=plan, seeds=seeds)
        images, infos, stopped = [], [], None
        job = self._begin()
        try:
            for i in range(n_iter):
                state["progress"] = i / n_iter

                def progress(done, total, i=i):
                    state["progress"] = (i + done / total) / n_iter
                    if done < total:  # a batch whose steps are all done is kept
                        return self._checkpoint(job, during=True)
                    return None

                try:
                    stop = state["stop"]
                    if stop is not None and stop == ("skip", job):  # a skip after a batch's last step: spent
                        state["stop"] = None  # (A1111's process_images_inner clears state.skipped per batch)
                    self._checkpoint(job)  # an interrupt between batches (a device loop reports only its end)
                    result = batch(image_seeds(req.seed, req.batch, i * req.batch), progress)
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

    def refined(self, name: str, refiner: str, req, image):
        """One batch maker for ``run``: the base model ``name`` to the switch, then the ``refiner`` from its latents
        (``runtime.refiner``), each loaded when its part runs (with ``--max-loaded-models 1`` they take turns)."""
        from sdtrt.manifest import Manifest
        from sdtrt.runtime import refiner as ensemble
        from sdtrt.runtime.stages import Stages, summed_timings

        entry = self.models.find(refiner)

        def batch(seeds, progress):
            base = self.models.acquire(name)
            first_req = ensemble.base_request(base.manifest.model, req)
            keys = ensemble.refiner_keys(entry.name, Manifest.load(entry.folder), req.denoising_end, req)
            plan = base.plan(first_req, image)
            plan = replace(plan, infotext=plan.infotext + keys)
            base_manifest = base.manifest
            # one bar for both parts (the refiner's step count is known once it is planned, after the base)
            stages = Stages(progress, max(round(plan.table.num_steps / req.denoising_end), plan.table.num_steps + 1))
            t0 = time.perf_counter()
            first = base.generate(first_req, plan=plan, seeds=seeds, callback=stages.at(0))
            if stages.stopped:  # an interrupt in the base skips the refiner (A1111)
                return base.decode(replace(first_req, output_type=req.output_type), plan, first.images, first.seeds,
                                   dict(first.timings), t0)
            pipe = self.models.acquire(entry.name)
            ensemble.check_pair(base_manifest, pipe.manifest)
            second_req = ensemble.refiner_request(pipe.manifest.model, req)
            second_plan = pipe.plan(second_req, image=first.images)
            stages.total = plan.table.num_steps + second_plan.table.num_steps
            second = pipe.generate(second_req, image=first.images, plan=second_plan, seeds=first.seeds,
                                   callback=stages.at(plan.table.num_steps))
            timings = summed_timings(first.timings, second.timings, t0)
            return type(second)(second.images, first.seed, first.parameters, timings, first.seeds)

        return batch

    def merge(self, group: list[Job]) -> list[tuple[list, list[str]]]:
        """txt2img jobs of one batching key as one engine call. Every image keeps its own seed (its request's
        seed + i) and so its own generator, for the initial noise and every later draw of the sampler, and its own
        metadata: every image is the one its request would get alone."""
        from sdtrt.runtime.request import GenerationRequest
        from sdtrt.runtime.seeds import image_seeds

        pipe = self.models.acquire(group[0].key[0])
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
            result = pipe.generate(merged, seeds=seeds, callback=lambda done, total: self._checkpoint(job, during=True) if done < total else None)
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
        return (plan.width, plan.height, req.num_inference_steps, plan.sampler, req.guidance_scale, req.clip_skip,
                max(c.count for c in plan.chunks.values()))

    # ---- on the event loop -----------------------------------------------------------------------------------------

    async def submit(self, endpoint: str, request: Request, req, n_iter: int, image=None, mask=None,
                     model: str | None = None, refiner: str | None = None, switch_at: float = 0.8):
        """Queue ``req`` for the engine thread and wait for it; a client that disconnects, or the timeout, takes it
        off the queue if it has not started. ``model``: the model to run it on (a name ``find_model`` takes; None:
        the default model at this moment); an unknown one is an ``UnknownModel`` before anything is queued."""
        config, state = self.config, self.state
        self.m_requests.labels(endpoint).inc()
        t = time.perf_counter()
        if state["waiting"] >= config.max_queue:
            raise QueueFull()
        name = self._model_name(model)
        if req.seed is None:  # chosen now, as A1111 chooses it (below 2**32): a batched request draws from its seeds
            from sdtrt.runtime.seeds import random_seed

            req = replace(req, seed=random_seed())
        if refiner is not None:  # base + refiner (runtime.refiner): the refiner known, the request split
            from sdtrt.runtime import refiner as ensemble

            refiner = self.models.find(refiner).name
            if mask is not None:
                raise UsageError("a refiner with inpainting is not supported (text-to-image and img2img are)")
            req = ensemble.split(req, switch_at)
        with self.models.planning(name) as planned_on:  # every check before queueing: a bad request never waits
            plan = None if planned_on is None else planned_on.plan(
                req if refiner is None else ensemble.base_request(planned_on.manifest.model, req), image, mask)
        key = self.batch_key(req, n_iter, plan) if image is None and plan is not None and refiner is None else None

        def work():  # on the engine thread: the model loaded if it is not (then the request is checked there)
            if refiner is not None:
                return self.run(req, n_iter, None, batch=self.refined(name, refiner, req, image))
            pipe = self.models.acquire(name)
            return self.run(req, n_iter, plan if pipe is planned_on else pipe.plan(req, image, mask), pipe)

        loop = asyncio.get_running_loop()
        job = Job(loop, work, req.batch * n_iter, None if key is None else (name, *key), req, plan)
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
        """The engine thread, and the default model if none was loaded (``create_app`` without a pipeline)."""
        from sdtrt.runtime import Pipeline

        models = self.models
        loop = asyncio.get_running_loop()
        if models.models_dir is not None and not models.entries:
            await loop.run_in_executor(self.executor, models.refresh)
        if models.pipe() is None:
            if models.models_dir is None:
                pipe = await loop.run_in_executor(
                    self.executor, lambda: Pipeline.from_dir(self.config.folder, self.config.backend))
                models.add(pipe, self.config.folder)
            elif models.default is not None:
                await loop.run_in_executor(self.executor, models.acquire, models.default)
        self.state["worker"] = EngineWorker(self.merge, self.config.batch_window_ms / 1000,
                                            models.batch_max)

    async def close(self) -> None:
        if self.state["worker"] is not None:
            self.state["worker"].stop()
        self.models.close()
        self.executor.shutdown(wait=False)


def create_app(config: ServeConfig, pipeline=None, replica: str | None = None, models: ModelRegistry | None = None):
    """The FastAPI application over ``config.folder`` or ``config.models_dir`` (``pipeline``: the folder's, already
    loaded; ``models``: the registry of ``--models-dir``, scanned and its default loaded). ``replica``: this process's
    name among several (Ray Serve's replica id), sent back as ``X-Sdtrt-Replica`` and in ``/ready``."""
    from fastapi import FastAPI
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from sdtrt.serve import a1111, openai
    from sdtrt.serve import models as model_routes

    config.check()
    server = Server(config, pipeline, replica, models)
    m_errors = server.m_errors
    app = FastAPI(title="sdtrt", description="Stable Diffusion on TensorRT / ONNX Runtime",
                  on_startup=[server.load], on_shutdown=[server.close])
    app.state.server = server

    @app.exception_handler(SdtrtError)
    async def library_error(request: Request, ex: SdtrtError):
        kind = type(ex).__name__
        m_errors.labels(kind).inc()
        return error_response(request.url.path, 422, kind, str(ex), param=getattr(ex, "param", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, ex: RequestValidationError):
        m_errors.labels("RequestValidationError").inc()
        fields = [".".join(str(p) for p in e.get("loc", ())[1:]) or "body" for e in ex.errors()[:5]]
        detail = "; ".join(f"{f}: {e.get('msg')}" for f, e in zip(fields, ex.errors()))
        return error_response(request.url.path, 422, "invalid_request", detail, param=fields[0] if fields else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, ex: StarletteHTTPException):
        """OpenAI's shape for /v1/* (an unknown path: OpenAI's "Invalid URL"); elsewhere FastAPI's own answer."""
        path = request.url.path
        if not is_openai(path):
            return await http_exception_handler(request, ex)
        m_errors.labels(f"http_{ex.status_code}").inc()
        kinds = {404: ("unknown_url", f"Invalid URL ({request.method} {path})"),
                 405: ("method_not_allowed", f"{request.method} is not allowed on {path}"
                                             + (f" (use {ex.headers['Allow']})" if ex.headers and "Allow" in ex.headers
                                                else ""))}
        kind, message = kinds.get(ex.status_code, ("http_error", str(ex.detail)))
        return error_response(path, ex.status_code, kind, message, headers=ex.headers)

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

    routers = [model_routes.a1111_router(server), a1111.router(server), openai.router(server)]
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
                                            if "POST" in getattr(r, "methods", ()) and not _form_route(r)),
                       form_paths=frozenset(r.path for router in routers for r in router.routes if _form_route(r)))
    challenges = ['Basic realm="sdtrt"'] if config.api_auth else []
    challenges += ['Bearer realm="sdtrt"'] if config.api_key else []
    app.add_middleware(Guard, accepted=accepted, max_bytes=max_bytes, replica=replica, count=count,
                       hint="send Authorization: Bearer <api key>" if config.api_key
                       else "send HTTP Basic credentials (--api-auth)", challenge=", ".join(challenges))
    if config.cors_origins:  # outermost: it answers browsers' preflight requests, which carry no credentials
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in config.cors_origins)

    return app


def _form_route(route) -> bool:
    """Whether a route reads a form body (multipart/form-data: OpenAI's image edits) rather than JSON."""
    from fastapi import params

    dependant = getattr(route, "dependant", None)
    return dependant is not None and any(isinstance(p.field_info, params.Form) for p in dependant.body_params)


def serve(config: ServeConfig, access_log: bool = True, log_level: str = "warning", say=None) -> None:
    """Run the server (uvicorn) until SIGTERM/SIGINT, then let requests in flight finish and return. Everything that
    can fail is done before uvicorn runs — the configuration checked, the socket bound, the engines loaded and their
    files checked against the manifest — so a failure is the caller's error (the CLI's one line), not a traceback;
    the startup line is printed once the socket listens. ``--models-dir``: the folders that cannot be served are
    named in one warning line and skipped; the first model (by name) is loaded and is the default."""
    import sys

    from sdtrt.errors import Terminated
    from sdtrt.serve.http import bind, run_uvicorn, url

    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    config.check()
    models = ModelRegistry(config.backend, config.max_loaded, config.models_dir)
    if config.models_dir is not None:
        problems = models.refresh()
        if problems:
            say(f"sdtrt serve: warning: skipped {len(problems)} folder(s) of {config.models_dir}: "
                f"{'; '.join(problems)}")
        if not models.entries:
            raise UsageError(f"--models-dir {config.models_dir} holds no engine folder that can be served (each model "
                             "is a folder made by `sdtrt export`, with its manifest.json)")
    else:
        folder = Path(config.folder)
        if not folder.is_dir():
            raise UsageError(f"engine folder {config.folder} {'is a file, not a folder' if folder.exists() else 'does not exist'}")
    sock = bind(config.host, config.port)
    try:
        try:
            if config.models_dir is not None:
                pipe = models.acquire(models.default)
            else:
                from sdtrt.runtime import Pipeline

                pipe = Pipeline.from_dir(config.folder, config.backend)
                models.add(pipe, config.folder)
        except (KeyboardInterrupt, Terminated):  # stopped before it served: as a stop while serving, not an error
            say("sdtrt serve: stopped while loading the engines")
            return
        app = create_app(config, models=models)
        served = (f"model {pipe.model_name}" if config.models_dir is None else
                  f"{len(models.entries)} models, default {pipe.model_name}, at most {config.max_loaded} loaded")
        listening = (f"sdtrt serve: listening on {url(sock, config.host)} ({served}, backend "
                     f"{pipe.backend_name}, A1111 /sdapi/v1 + OpenAI /v1/images)")
        run_uvicorn(app, sock, lambda: say(listening), access_log=access_log, log_level=log_level,
                    drain_s=min(config.timeout_s, 120.0), say=say)
    finally:
        sock.close()
        models.close()  # also where the app's shutdown did (a second close is a no-op)
