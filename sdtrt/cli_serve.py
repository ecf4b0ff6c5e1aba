"""``sdtrt serve`` and ``sdtrt bench-serve``: the thin CLI layer over ``sdtrt.serve`` (split from cli.py by
responsibility)."""

from __future__ import annotations

import argparse
import sys

from sdtrt.cli import _finite, _need, _size
from sdtrt.errors import UsageError


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1..65535 (0: any free port), got {text}")
    return value


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve an engine folder over HTTP (A1111 and OpenAI APIs; needs sdtrt[serve])",
                       description="An HTTP server over one engine folder, or a folder of them (--models-dir): "
                                   "AUTOMATIC1111's /sdapi/v1/txt2img, img2img, samplers, sd-models, options, "
                                   "progress; OpenAI's /v1/images/generations, /v1/images/edits, /v1/models; /health, "
                                   "/ready, /metrics. Binds 127.0.0.1 unless --api-key is set.")
    p.add_argument("dir", nargs="?", default=None, help="engine folder (or --models-dir)")
    p.add_argument("--models-dir", default=None, metavar="DIR",
                   help="serve every engine folder in DIR, each a model selected by its folder's name (A1111's "
                        "sd_model_checkpoint, OpenAI's model); the first by name is the default")
    p.add_argument("--max-loaded-models", type=int, default=1, metavar="N",
                   help="with --models-dir: models loaded at once (the least recently used is unloaded)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback needs --api-key)")
    p.add_argument("--port", type=_port, default=7860,
                   help="TCP port, 1..65535 (7860 is A1111's; 0: any free port, named in the startup line)")
    from sdtrt.runtime.backends import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: TensorRT where built and usable, else ONNX Runtime (CUDA, then CPU)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (needed to bind elsewhere)")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS]",
                   help="require HTTP Basic credentials, as A1111's --api-auth (or --api-key, to bind elsewhere)")
    p.add_argument("--max-queue", type=int, default=8, help="requests queued or running before 503")
    p.add_argument("--timeout", type=_finite, default=600.0, help="seconds per request, queue wait included")
    p.add_argument("--max-steps", type=int, default=150, help="most steps a request may ask for")
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-pixels", type=int, default=1024 * 1024, help="pixels per image made")
    p.add_argument("--max-input-pixels", type=int, default=4096 * 4096,
                   help="pixels per image sent (img2img's init_images and mask; checked from the header, before "
                        "decoding)")
    p.add_argument("--max-body-mb", type=_finite, default=32.0, metavar="MB",
                   help="largest request body (JSON or multipart; over it: 413)")
    p.add_argument("--batch-window", type=_finite, default=50.0, metavar="MS",
                   help="how long a request waits for compatible ones to share its engine call (0: no batching)")
    p.add_argument("--cors-allow-origins", default=None, metavar="ORIGIN[,ORIGIN]",
                   help="browser origins allowed to call the API (CORS; off unless given), as A1111's option")
    p.add_argument("--body-timeout", type=_finite, default=60.0, metavar="S",
                   help="seconds a request's whole body may take to arrive (slower, or shorter than its "
                        "Content-Length: 408 and the connection is closed)")
    p.add_argument("--no-access-log", action="store_true", help="no line per request (uvicorn's access log, on stdout)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug", "trace"),
                   default="warning", help="the server's own messages from this level up (info: also uvicorn's "
                                           "start/stop lines); the access log is apart")
    r = p.add_argument_group("scale-out on Ray Serve (needs sdtrt[ray])")
    r.add_argument("--ray", action="store_true",
                   help="deploy on Ray Serve: Ray's proxy on --host:--port routes to replicas, one per GPU")
    r.add_argument("--replicas", type=int, default=1, help="replicas (with --ray)")
    r.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="Ray Serve autoscaling between MIN and MAX replicas instead of --replicas")
    r.add_argument("--target-ongoing-requests", type=_finite, default=None,
                   help="requests per replica that autoscaling aims at (default 2)")
    r.add_argument("--gpus-per-replica", type=_finite, default=None,
                   help="GPUs Ray gives each replica (default: 1 where the cluster has GPUs)")
    r.add_argument("--cpus-per-replica", type=_finite, default=1.0, help="CPUs Ray reserves for each replica")
    r.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster (default: RAY_ADDRESS, else a local cluster started here)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    _need("serve", "fastapi", "uvicorn", "prometheus_client")
    from sdtrt.serve import RayConfig, ServeConfig, serve, serve_ray

    origins = tuple(o.strip() for o in args.cors_allow_origins.split(",")) if args.cors_allow_origins else ()
    if args.max_loaded_models != 1 and args.models_dir is None:
        raise UsageError("--max-loaded-models is an option of --models-dir")
    if args.models_dir is not None and args.ray:
        raise UsageError("--models-dir is not available with --ray yet: serve one engine folder per deployment")
    config = ServeConfig(folder=args.dir, models_dir=args.models_dir, max_loaded=args.max_loaded_models,
                         backend=args.backend, host=args.host, port=args.port, api_key=args.api_key,
                         api_auth=args.api_auth, max_queue=args.max_queue, timeout_s=args.timeout,
                         max_steps=args.max_steps, max_images=args.max_images, max_pixels=args.max_pixels,
                         max_input_pixels=args.max_input_pixels, max_body_mb=args.max_body_mb,
                         batch_window_ms=args.batch_window, cors_origins=origins, body_timeout_s=args.body_timeout)
    ray_given = [flag for flag, value, default in (
        ("--replicas", args.replicas, 1), ("--autoscale", args.autoscale, None),
        ("--target-ongoing-requests", args.target_ongoing_requests, None),
        ("--gpus-per-replica", args.gpus_per_replica, None), ("--cpus-per-replica", args.cpus_per_replica, 1.0),
        ("--ray-address", args.ray_address, None)) if value != default]
    if not args.ray:
        if ray_given:
            raise UsageError(f"{ray_given[0]} is an option of Ray Serve scale-out: add --ray")
        serve(config, access_log=not args.no_access_log, log_level=args.log_level)
        return 0
    plain = [flag for flag, given in (("--no-access-log", args.no_access_log), ("--log-level", args.log_level != "warning"))
             if given]
    if plain:
        raise UsageError(f"{plain[0]} is an option of the server without --ray (Ray Serve keeps its own logs)")
    _need("ray", "ray")
    low = high = None
    if args.autoscale is not None:
        low, sep, high = args.autoscale.partition(":")
        if not (sep and low.strip().isdigit() and high.strip().isdigit()):
            raise UsageError(f"--autoscale takes MIN:MAX replica counts, e.g. 1:4, got {args.autoscale!r}")
        low, high = int(low), int(high)
    serve_ray(config, RayConfig(replicas=args.replicas, min_replicas=low, max_replicas=high,
                                target_ongoing_requests=args.target_ongoing_requests,
                                num_gpus=args.gpus_per_replica, num_cpus=args.cpus_per_replica,
                                address=args.ray_address), log=lambda s: print(s, file=sys.stderr, flush=True))
    return 0


def _add_bench_serve(sub) -> None:
    p = sub.add_parser("bench-serve", help="load-test a running `sdtrt serve` (loopback)",
                       description="C clients post A1111 txt2img requests back to back for S seconds; prints "
                                   "throughput, p50/p95/p99 latency and errors by status as JSON.")
    p.add_argument("url", help="e.g. http://127.0.0.1:7860")
    p.add_argument("--concurrency", type=int, default=4, help="clients posting back to back, 1..256")
    p.add_argument("--duration", type=_finite, default=30.0, metavar="S", help="seconds of load")
    p.add_argument("--steps", type=int, default=20, help="steps per request")
    p.add_argument("--size", type=_size, default=(512, 512), metavar="WxH", help="image size per request")
    p.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=_cmd_bench_serve)


def _cmd_bench_serve(args) -> int:
    _need("serve", "httpx")
    from sdtrt.benchmarks.serve_load import main as load

    if not 1 <= args.concurrency <= 256:
        raise UsageError(f"--concurrency must be 1..256, got {args.concurrency}")
    if not 0 < args.duration <= 3600:
        raise UsageError(f"--duration must be in (0, 3600] seconds, got {args.duration:g}")
    body = {"prompt": "a lighthouse at dawn", "steps": args.steps, "width": args.size[0], "height": args.size[1],
            "seed": 1}
    load(args.url, args.concurrency, args.duration, body, args.api_key, args.out)
    return 0


def add_commands(sub) -> None:
    _add_serve(sub)
    _add_bench_serve(sub)
