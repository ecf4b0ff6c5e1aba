"""`sdtrt bench`: sdtrt's runtime against eager PyTorch (diffusers), side by side in one run.

Each system lives in its own worker process (so neither pollutes the other's memory figures) and the
parent drives them interleaved, A, B, A, B, with the same prompt, seed and initial latents. The
baseline is diffusers' StableDiffusionPipeline built from the same weights as the engine folder.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.config import to_dict
from sdtrt.errors import UsageError
from sdtrt.parity import psnr

SCHEMA = "sdtrt-bench/1"
PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed"
NEGATIVE = "blurry, low quality"


@dataclass(frozen=True)
class BenchConfig:
    engine_dir: str
    backend: str = "auto"
    baseline: str = "torch"  # "torch", "torch-compile" or "none"
    sizes: tuple[tuple[int, int], ...] = ((512, 512),)  # (width, height)
    steps: int = 20
    batch: int = 1
    runs: int = 5
    warmup: int = 1
    scheduler: str | None = None
    guidance_scale: float = 7.5
    seed: int = 0
    threads: int = 0  # CPU threads for both systems (0: library default)

    def check(self) -> None:
        if self.baseline not in ("torch", "torch-compile", "none"):
            raise UsageError(f"--baseline must be torch, torch-compile or none, not {self.baseline!r}")
        for label, v, lo in (("--steps", self.steps, 1), ("--batch", self.batch, 1), ("--runs", self.runs, 1),
                             ("--warmup", self.warmup, 0)):
            if v < lo:
                raise UsageError(f"{label} must be at least {lo}, got {v}")


def initial_latents(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The runtime's seed rule (first PCG64 draw), so both systems start from the same latents."""
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)


# ---- workers (run in child processes) ---------------------------------------------------------------------

class _Ours:
    name = "sdtrt"

    def __init__(self, cfg: BenchConfig):
        from sdtrt.runtime import Pipeline

        self.pipe = Pipeline.from_dir(cfg.engine_dir, backend=cfg.backend, threads=cfg.threads)
        self.backend = self.pipe.backend_name
        self.cfg = cfg

    def generate(self, width: int, height: int, seed: int) -> tuple[np.ndarray, dict[str, float]]:
        c = self.cfg
        r = self.pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=c.steps, guidance_scale=c.guidance_scale,
                      height=height, width=width, seed=seed, num_images_per_prompt=c.batch, scheduler=c.scheduler,
                      output_type="np")
        t = r.timings
        return r.images, {"total": t["total"], "text_encoder": t["text_encoder"], "unet": t["unet"],
                          "sampler_update": t["sampler_update"], "vae_decoder": t["vae_decoder"], "steps": t["steps"]}


class _Baseline:
    name = "baseline"

    def __init__(self, cfg: BenchConfig):
        import torch

        from sdtrt.manifest import Manifest

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        manifest = Manifest.load(Path(cfg.engine_dir))
        self.cuda = torch.cuda.is_available()
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.pipe = _diffusers_pipeline(manifest, cfg)
        if self.cuda:  # the random-weight modules are already fp32 on the CPU
            self.pipe = self.pipe.to("cuda", self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        if cfg.baseline == "torch-compile":
            self.pipe.unet = torch.compile(self.pipe.unet)
        self.backend = f"diffusers eager ({'cuda' if self.cuda else 'cpu'}, {str(self.dtype).replace('torch.', '')}, SDPA)" \
            + (" + torch.compile" if cfg.baseline == "torch-compile" else "")
        self.cfg = cfg
        self.latent_channels = manifest.model.latent_channels
        self.vae_scale = manifest.model.vae_scale_factor
        self._timers: dict[str, float] = {}
        self._wrap(self.pipe.text_encoder, "forward", "text_encoder")
        self._wrap(self.pipe.unet, "forward", "unet")
        self._wrap(self.pipe.vae, "decode", "vae_decoder")
        self._wrap(self.pipe.scheduler, "step", "sampler_update")

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _wrap(self, obj, method: str, label: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            self._sync()
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            self._sync()
            self._timers[label] = self._timers.get(label, 0.0) + time.perf_counter() - t
            return out

        setattr(obj, method, timed)

    def generate(self, width: int, height: int, seed: int) -> tuple[np.ndarray, dict[str, float]]:
        import torch

        c = self.cfg
        shape = (c.batch, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        latents = torch.from_numpy(initial_latents(seed, shape)).to(self.pipe.device, self.dtype)
        self._timers = {}
        self._sync()
        t = time.perf_counter()
        with torch.inference_mode():
            images = self.pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=c.steps,
                               guidance_scale=c.guidance_scale, height=height, width=width, latents=latents,
                               num_images_per_prompt=c.batch, output_type="np").images
        self._sync()
        timings = dict(self._timers, total=time.perf_counter() - t, steps=len(self.pipe.scheduler.timesteps))
        return np.asarray(images, dtype=np.float32), timings


def _diffusers_pipeline(manifest, cfg: BenchConfig):
    import diffusers

    from sdtrt.export.loaders import load_model, make_scheduler
    from sdtrt.runtime.samplers import DIFFUSERS_EQUIVALENT

    source = manifest.model.source
    model = load_model(source, seed=manifest.model.weights_seed or 0)
    scheduler_config = dict(model.scheduler_config)
    if cfg.scheduler:
        cls, extra = DIFFUSERS_EQUIVALENT[cfg.scheduler]
        scheduler_config.update(extra, _class_name=cls)
    return diffusers.StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=make_scheduler(scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process's address space. Not ru_maxrss: Linux carries that across
    exec, so a spawned worker would report its parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_memory(pid: int, cuda_torch: bool) -> dict[str, float]:
    mem = {"peak_host_rss_mb": peak_rss_mb()}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory:
                mem["device_mb_nvml"] = proc.usedGpuMemory / 2**20
    except Exception:  # no NVML / no GPU: host figures only
        pass
    if cuda_torch:
        import torch

        mem["device_peak_allocated_mb_torch"] = torch.cuda.max_memory_allocated() / 2**20
    return mem


def _worker(kind: str, cfg_json: str, conn) -> None:
    import signal

    from sdtrt.config import from_dict

    # Ctrl-C reaches the whole process group: the parent handles it (and ends this process), so the worker
    # prints no traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    cfg = from_dict(BenchConfig, json.loads(cfg_json))
    t0 = time.perf_counter()
    try:
        if cfg.threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
        runner = _Ours(cfg) if kind == "sdtrt" else _Baseline(cfg)
        conn.send(("ready", {"load_s": time.perf_counter() - t0, "backend": runner.backend}))
        first = True
        while (msg := conn.recv()) is not None:
            width, height, seed = msg
            images, timings = runner.generate(width, height, seed)
            if first:
                timings["cold_start_s"] = time.perf_counter() - t0
                first = False
            conn.send(("ok", (images, timings)))
        conn.send(("memory", _peak_memory(os.getpid(), kind == "baseline" and getattr(runner, "cuda", False))))
    except Exception as ex:  # reported to the parent as one line
        conn.send(("error", f"{kind}: {type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}"))


class _Client:
    def __init__(self, kind: str, cfg: BenchConfig):
        ctx = mp.get_context("spawn")
        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(kind, json.dumps(to_dict(cfg)), child), daemon=True)
        self.proc.start()
        self.info = self._expect("ready")

    def _expect(self, tag: str):
        got, payload = self.conn.recv()
        if got == "error":
            self.close()
            raise BenchError(payload)
        assert got == tag, (got, tag)
        return payload

    def generate(self, width: int, height: int, seed: int):
        self.conn.send((width, height, seed))
        return self._expect("ok")

    def finish(self) -> dict[str, float]:
        self.conn.send(None)
        mem = self._expect("memory")
        self.close()
        return mem

    def close(self, wait: float = 30) -> None:
        self.proc.join(timeout=wait)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)


class BenchError(UsageError):
    """A benchmark worker failed (its one-line reason is the message)."""


# ---- statistics and the parent loop ---------------------------------------------------------------------

def _summary(samples: list[dict[str, float]], batch: int) -> dict[str, Any]:
    totals = [s["total"] for s in samples]
    steps = samples[0]["steps"]
    med = lambda key: statistics.median(s[key] for s in samples)  # noqa: E731
    return {
        "latency_s": {"median": statistics.median(totals), "p90": float(np.percentile(totals, 90)), "min": min(totals),
                      "all": totals},
        "latency_per_image_s": statistics.median(totals) / batch,
        "images_per_s": batch / statistics.median(totals),
        "components_s": {
            "text_encoder": med("text_encoder"),
            "unet_per_step": med("unet") / steps,
            "sampler_update_per_step": med("sampler_update") / steps,
            "vae_decoder": med("vae_decoder"),
        },
        "unet_it_per_s": steps / med("unet"),
        "steps": steps,
    }


def host_overhead(engine_dir: str, steps: int = 50, size: int = 512, sampler: str = "dpmpp_2m") -> dict[str, Any]:
    """The runtime's own per-step cost with engines that return instantly (same process, no graphs loaded)."""
    import json as _json

    from sdtrt.manifest import Manifest
    from sdtrt.runtime import Pipeline
    from sdtrt.runtime.tokenizer import ClipTokenizer

    folder = Path(engine_dir)
    manifest = Manifest.load(folder)
    info, r = manifest.model, manifest.ranges
    size = min(max(size, r.size_min), r.size_max) // 8 * 8
    h = size // info.vae_scale_factor
    shapes = {"text_encoder": (2, info.max_text_length, info.text_hidden_size),
              "unet": (1, info.latent_channels, h, h), "vae_decoder": (1, 3, size, size)}
    engines = {name: NullEngine(manifest.components[name], shape) for name, shape in shapes.items()}
    pipe = Pipeline(folder, manifest, engines, ClipTokenizer(folder / manifest.tokenizer_dir, info.max_text_length),
                    _json.loads((folder / manifest.scheduler_config).read_text()))
    runs = [pipe("x", num_inference_steps=steps, height=size, width=size, seed=0, scheduler=sampler,
                 output_type="np").timings for _ in range(5)]
    per_step = statistics.median((t["unet"] + t["sampler_update"]) / t["steps"] for t in runs)
    update = statistics.median(t["sampler_update"] / t["steps"] for t in runs)
    return {"sampler": sampler, "steps": steps, "size": size, "us_per_step": per_step * 1e6,
            "sampler_update_us_per_step": update * 1e6}


class NullEngine:
    """An engine that returns a preallocated output at once: what is left is the runtime's own work."""

    def __init__(self, component, shape):
        self.component = component
        self._dtypes = {s.name: np.dtype(s.dtype) for s in component.inputs}
        out = component.outputs[0]
        self._out = {out.name: np.zeros(shape, out.dtype)}

    def input_dtype(self, name):
        return self._dtypes[name]

    def run(self, feeds):
        return self._out


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        env["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        env["cpu"] = platform.processor()
    try:
        env["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    try:
        import subprocess

        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        if q.returncode == 0:
            env["gpu"] = q.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    versions = {}
    for dist in ("sdtrt", "numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "torch", "diffusers", "transformers",
                 "tensorrt"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    env["versions"] = versions
    return env


def run_bench(cfg: BenchConfig, log=lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    cfg.check()
    from sdtrt.manifest import Manifest

    manifest = Manifest.load(Path(cfg.engine_dir))
    r = manifest.ranges
    for w, h in cfg.sizes:
        if w % 8 or h % 8 or not (r.size_min <= min(w, h) and max(w, h) <= r.size_max):
            raise UsageError(f"size {w}x{h}: must be multiples of 8 within the exported range {r.size_min}..{r.size_max}")
    if not r.batch_min <= cfg.batch <= r.batch_max:
        raise UsageError(f"batch {cfg.batch} is outside the exported range {r.batch_min}..{r.batch_max}")
    systems = ["sdtrt"] + ([] if cfg.baseline == "none" else ["baseline"])
    log(f"starting {', '.join(systems)} ...")
    clients: dict[str, _Client] = {}
    samples: dict[tuple[int, int], dict[str, list]] = {}
    images: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    cold: dict[str, float] = {}
    finished = False
    try:
        for k in systems:
            clients[k] = _Client(k, cfg)
        for w, h in cfg.sizes:
            per = samples.setdefault((w, h), {k: [] for k in systems})
            for i in range(cfg.warmup + cfg.runs):
                for k in systems:  # interleaved: A, B, A, B ...
                    img, t = clients[k].generate(w, h, cfg.seed)
                    cold.setdefault(k, t.get("cold_start_s", float("nan")))
                    if i >= cfg.warmup:
                        per[k].append(t)
                    images.setdefault((w, h), {})[k] = img
                    tag = "warm-up" if i < cfg.warmup else f"run {i - cfg.warmup + 1}/{cfg.runs}"
                    log(f"  {w}x{h} {k:<8} {tag}: {t['total']:.2f}s")
        memory = {k: c.finish() for k, c in clients.items()}
        finished = True
    finally:  # after an error or Ctrl-C the workers are ended at once, not waited for
        for c in clients.values():
            c.close(wait=30 if finished else 0)
    results = []
    for (w, h), per in samples.items():
        entry = {"size": f"{w}x{h}", "batch": cfg.batch, "systems": {}}
        for k in systems:
            entry["systems"][k] = dict(_summary(per[k], cfg.batch), backend=clients[k].info["backend"])
        if "baseline" in systems:
            entry["psnr_db_vs_baseline"] = psnr(images[(w, h)]["sdtrt"], images[(w, h)]["baseline"])
        results.append(entry)
    return {
        "schema": SCHEMA,
        "config": to_dict(cfg),
        "precision": manifest.precision,
        "model": to_dict(manifest.model),
        "environment": environment(),
        "results": results,
        "load_s": {k: c.info["load_s"] for k, c in clients.items()},
        "cold_start_s": cold,
        "memory": memory,
        "host_overhead": host_overhead(cfg.engine_dir, steps=50, size=max(s[0] for s in cfg.sizes)),
    }
