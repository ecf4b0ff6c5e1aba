"""Scale-out on Ray Serve (``sdtrt serve --ray``, ``serve run sdtrt.serve:ray_app``): the same FastAPI app
(``sdtrt.serve.app.create_app``) runs in each replica of one deployment, one replica per GPU, behind a small gateway
deployment (``sdtrt.serve.ray_gateway``: a request whose replica dies is sent again once, else answered 503 in the
protocol's shape; on SIGTERM new requests get 503 while those in flight finish). Ray's proxy and router pick the
replica and restart dead ones; each replica batches as the plain server does. No load balancer of our own."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdtrt.errors import SdtrtError, UsageError
from sdtrt.serve.config import ServeConfig


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
    # GPUs, 0 for onnxruntime-cpu and openvino; set it on clusters whose GPU nodes start on demand
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
    if gpus is None and config.backend in ("onnxruntime-cpu", "openvino"):  # CPU backends
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


def gateway_options(config: ServeConfig, ray_config: RayConfig) -> dict:
    """Ray Serve's options for the ``Gateway`` in front of the replicas (``sdtrt.serve.ray_gateway``): one replica,
    no CPU of its own (it only forwards bytes), room for every request the replicas run or queue (so their
    back-pressure, answered in the protocol's shape, comes before Ray's plain-text one)."""
    most = ray_config.max_replicas if ray_config.max_replicas is not None else ray_config.replicas
    return {"name": "gateway", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0},
            "max_ongoing_requests": 2 * config.max_queue * max(most, 1) + 8,
            "graceful_shutdown_timeout_s": min(config.timeout_s, 120.0)}


def ray_application(config: ServeConfig, ray_config: RayConfig = RayConfig()):
    """The Ray Serve application: a ``Gateway`` (the ingress, ``sdtrt.serve.ray_gateway``) in front of the
    ``Replica`` deployment, each replica running ``create_app`` on its own engines, worker and metrics;
    ``X-Sdtrt-Replica`` names the replica that answered."""
    from ray import serve

    from sdtrt.serve.ray_gateway import GatewayLogic, Lifespan, call_asgi

    class Replica:
        async def __init__(self):
            from sdtrt.runtime import Pipeline
            from sdtrt.serve.app import create_app

            # loaded in the constructor, not in the app's startup: Ray reports a constructor's exception with its
            # message
            pipe = Pipeline.from_dir(config.folder, config.backend)
            self.app = create_app(config, pipeline=pipe, replica=serve.get_replica_context().replica_id.unique_id)
            self.lifespan = Lifespan(self.app)
            await self.lifespan.start()

        async def handle(self, scope: dict, body: bytes) -> tuple[int, list, bytes]:
            return await call_asgi(self.app, scope, body)

        async def __del__(self):  # Ray Serve's graceful stop of a replica: the engine thread stops, engines close
            await self.lifespan.stop()

    class Gateway(GatewayLogic):
        def __init__(self, replicas):
            super().__init__(replicas, int(config.max_body_mb * 2**20), config.body_timeout_s)

    replicas = serve.deployment(Replica, **ray_deployment_options(config, ray_config)).bind()
    return serve.deployment(Gateway, **gateway_options(config, ray_config)).bind(replicas)


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
    from sdtrt.serve.http import bind

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
        try:  # new requests get 503 (not Ray's 404 once the application is gone) while those in flight finish
            left = serve.get_app_handle(name).drain.remote(drain_s).result(timeout_s=drain_s + 10)
            if left:
                log(f"sdtrt: {left} request(s) still running after {drain_s:g} s: they are cut off")
        except Exception:  # noqa: BLE001  (nothing deployed, or the gateway is gone: nothing to drain)
            pass
        try:
            if address == "local":  # the drain is done: Serve's shutdown stops the proxy in the same step as it
                serve.shutdown()  # removes the routes (a delete first would answer Ray's 404 while replicas stop)
            else:  # a shared cluster's proxy stays: remove our application, its replicas finish what they hold
                serve.delete(name)
        except Exception as ex:  # noqa: BLE001  (cleanup: the error that ended the run matters more)
            log(f"sdtrt: warning: Ray Serve did not shut down cleanly: {type(ex).__name__}: {ex}")

    worker = threading.Thread(target=down, daemon=True)
    worker.start()
    try:
        worker.join(2 * drain_s + 40)  # the drain, then Ray's own graceful stop of the replicas
    except (KeyboardInterrupt, Terminated):
        log("sdtrt: stopping now")
    finally:
        ray.shutdown()
