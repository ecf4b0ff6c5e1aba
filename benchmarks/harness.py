"""`sdtrt bench`: sdtrt's runtime against eager PyTorch (diffusers), side by side in one run.

Each system lives in its own worker process (so neither pollutes the other's memory figures) and the
parent drives them interleaved, A, B, A, B, with the same prompt, seed, input image and random arrays. The
baseline is diffusers' StableDiffusionPipeline (``--task img2img``: StableDiffusionImg2ImgPipeline, ``inpaint``:
StableDiffusionInpaintPipeline; SDXL's for SDXL) built from the same weights as the engine folder
(``benchmarks/baseline.py``).
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
from sdtrt.errors import SdtrtError, UsageError
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
    task: str = "txt2img"  # "txt2img", "img2img" or "inpaint" (a synthetic picture; inpaint: its centre masked)
    strength: float | None = None  # img2img/inpaint (None: the pipelines' defaults)
    controlnets: int = 0  # the folder's first N ControlNets, each on a synthetic control map
    scheduler_config: str | None = None  # a few-step preset (runtime.sampler_presets) for both systems
    loras: tuple[str, ...] = ()  # "FILE[:SCALE]": LoRAs on both systems (ours: set_loras; diffusers: load_lora_weights)
    # one system at a time (all its runs, then the next's), not interleaved: two SDXL-size fp32 models do not fit
    # together in 24 GB. Costs the interleaving's fairness against drift (thermal, other load)
    one_at_a_time: bool = False
    # more sdtrt backends, each a system of its own ("sdtrt[openvino]") in the same run (benchmarks/systems.py)
    also_backends: tuple[str, ...] = ()

    def check(self) -> None:
        if self.baseline not in ("torch", "torch-compile", "none"):
            raise UsageError(f"--baseline must be torch, torch-compile or none, not {self.baseline!r}")
        if self.task not in TASKS:
            raise UsageError(f"--task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.strength is not None and (self.task == "txt2img" or not 0 < self.strength <= 1):
            raise UsageError("--strength needs --task img2img or inpaint" if self.task == "txt2img"
                             else f"--strength must be in (0, 1], got {self.strength:g}")
        for label, v, lo in (("--steps", self.steps, 1), ("--batch", self.batch, 1), ("--runs", self.runs, 1),
                             ("--warmup", self.warmup, 0), ("--controlnet", self.controlnets, 0)):
            if v < lo:
                raise UsageError(f"{label} must be at least {lo}, got {v}")
        from sdtrt.benchmarks.systems import check_also_backends
        from sdtrt.runtime.adapters import normalize_loras

        check_also_backends(self.backend, self.also_backends)
        for path, _ in normalize_loras(list(self.loras)):
            if not Path(path).expanduser().is_file():
                raise UsageError(f"--lora {path}: no such file")


TASKS = ("txt2img", "img2img", "inpaint")


def control_maps(count: int, width: int, height: int) -> list:
    """``count`` synthetic control maps (white lines on black, as an edge map) at this size."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    maps = []
    for k in range(count):
        lines = ((x + (k + 1) * y) % (24 + 8 * k) < 2) | ((x - y) % 40 < 2)
        maps.append(Image.fromarray(np.repeat((lines * 255).astype(np.uint8)[..., None], 3, axis=-1)))
    return maps


def task_inputs(task: str, width: int, height: int) -> dict[str, Any]:
    """The input image (and mask) of an img2img/inpaint benchmark at this size: a smooth synthetic picture, the
    middle half of it masked; the same for both systems."""
    if task == "txt2img":
        return {}
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(6 * x + 1) * 0.5 + 0.5, np.cos(5 * y) * 0.4 + 0.5, (x + y) / 2], -1)
    out = {"image": Image.fromarray((rgb * 255).astype(np.uint8))}
    if task == "inpaint":
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4:3 * height // 4, width // 4:3 * width // 4] = 255
        out["mask_image"] = Image.fromarray(mask)
    return out


# ---- workers (run in child processes) ---------------------------------------------------------------------

class _Ours:
    name = "sdtrt"

    def __init__(self, cfg: BenchConfig, backend: str | None = None):
        from sdtrt.runtime import Pipeline

        self.pipe = Pipeline.from_dir(cfg.engine_dir, backend=backend or cfg.backend, threads=cfg.threads)
        self.backend = self.pipe.backend_name
        self.details = getattr(next(iter(self.pipe.engines.values())), "details", None)  # OpenVINO's precision
        self.cfg = cfg
        self.lora_s = None
        if cfg.loras:  # applied once, timed: the swap a server makes when a request names other LoRAs
            t = time.perf_counter()
            self.pipe.set_loras(list(cfg.loras))
            self.lora_s = time.perf_counter() - t
        if cfg.controlnets > len(self.pipe.manifest.controlnets):
            raise UsageError(f"--controlnet {cfg.controlnets}: {cfg.engine_dir} has {len(self.pipe.manifest.controlnets)}"
                             " ControlNets (add one with `sdtrt export-controlnet`)")

    def generate(self, width: int, height: int, seed: int) -> tuple[np.ndarray, dict[str, float]]:
        c = self.cfg
        r = self.pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=c.steps, guidance_scale=c.guidance_scale,
                      height=height, width=width, seed=seed, num_images_per_prompt=c.batch, scheduler=c.scheduler,
                      output_type="np", strength=c.strength, **task_inputs(c.task, width, height),
                      **({"scheduler_config": c.scheduler_config} if c.scheduler_config else {}),
                      control_images=control_maps(c.controlnets, width, height) if c.controlnets else None)
        t = r.timings
        encoder = {"vae_encoder": t["vae_encoder"]} if c.task != "txt2img" else {}
        control = {"controlnet": t["controlnet"]} if "controlnet" in t else {}
        return r.images, {"total": t["total"], "text_encoder": t["text_encoder"], **encoder, **control, "unet": t["unet"],
                          "sampler_update": t["sampler_update"], "vae_decoder": t["vae_decoder"], "steps": t["steps"]}


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
        if kind == "check":  # a process of its own: the baseline worker's figures must not include it
            from sdtrt.benchmarks.baseline import check_baseline_weights

            conn.send(("ready", check_baseline_weights(cfg.engine_dir)))
            return
        from sdtrt.benchmarks.systems import system_backend

        if kind.startswith("sdtrt"):
            runner = _Ours(cfg, system_backend(kind, cfg.backend))
        else:
            from sdtrt.benchmarks.baseline import Baseline

            runner = Baseline(cfg)
        details = getattr(runner, "details", None)
        conn.send(("ready", {"load_s": time.perf_counter() - t0, "backend": runner.backend,
                             **({"lora_s": runner.lora_s} if runner.lora_s is not None else {}),
                             **({"details": details} if details else {})}))
        first = True
        while (msg := conn.recv()) is not None:
            width, height, seed = msg
            images, timings = runner.generate(width, height, seed)
            if first:
                timings["cold_start_s"] = time.perf_counter() - t0
                first = False
            conn.send(("ok", (images, timings)))
        conn.send(("memory", _peak_memory(os.getpid(), kind == "baseline" and getattr(runner, "cuda", False))))
    except SdtrtError as ex:  # a message for the user as it is
        conn.send(("error", str(ex)))
    except Exception as ex:  # reported to the parent as one line
        conn.send(("error", f"{kind}: {type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}"))


class _Client:
    def __init__(self, kind: str, cfg: BenchConfig):
        ctx = mp.get_context("spawn")
        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(kind, json.dumps(to_dict(cfg)), child), daemon=True)
        self.proc.start()
        child.close()  # the worker holds its end: if it dies, recv() sees EOF instead of waiting forever
        self.info = self._expect("ready")

    def _expect(self, tag: str):
        try:
            got, payload = self.conn.recv()
        except EOFError:
            self.proc.join(timeout=5)
            code = self.proc.exitcode
            why = " (killed: out of memory?)" if code == -9 else ""
            raise BenchError(f"the {self.kind} worker died with exit code {code}{why}") from None
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
            **({"vae_encoder": med("vae_encoder")} if "vae_encoder" in samples[0] else {}),
            **({"controlnet_per_step": med("controlnet") / steps} if "controlnet" in samples[0] else {}),
        },
        "unet_it_per_s": steps / med("unet"),
        "steps": steps,
    }


def host_overhead(engine_dir: str, steps: int = 50, size: int = 512, sampler: str = "dpmpp_2m") -> dict[str, Any]:
    """The runtime's own per-step cost with engines that return instantly (same process, no graphs loaded)."""
    import json as _json

    from sdtrt.manifest import Manifest
    from sdtrt.runtime import Pipeline
    folder = Path(engine_dir)
    manifest = Manifest.load(folder)
    info, r = manifest.model, manifest.ranges
    size = min(max(size, r.size_min), r.size_max) // 8 * 8
    names = [e.component for e in info.encoders] + ["unet", "vae_decoder"]
    engines = {name: NullEngine(manifest.components[name], info.vae_scale_factor) for name in names}
    from sdtrt.runtime.conditioning import load_tokenizers

    pipe = Pipeline(folder, manifest, engines, load_tokenizers(folder, manifest),
                    _json.loads((folder / manifest.scheduler_config).read_text()))
    runs = [pipe("x", num_inference_steps=steps, height=size, width=size, seed=0, scheduler=sampler,
                 output_type="np").timings for _ in range(5)]
    per_step = statistics.median((t["unet"] + t["sampler_update"]) / t["steps"] for t in runs)
    update = statistics.median(t["sampler_update"] / t["steps"] for t in runs)
    return {"sampler": sampler, "steps": steps, "size": size, "us_per_step": per_step * 1e6,
            "sampler_update_us_per_step": update * 1e6}


class NullEngine:
    """An engine that returns zeros at once: what is left is the runtime's own work. Its outputs take the shapes
    their specs give for the inputs' sizes (the named dims read from the feeds), allocated once per shape."""

    def __init__(self, component, vae_scale: int = 8):
        self.component, self.vae_scale = component, vae_scale
        self._dtypes = {s.name: np.dtype(s.dtype) for s in component.inputs}
        self._out: dict[tuple, dict[str, np.ndarray]] = {}

    def input_dtype(self, name):
        return self._dtypes[name]

    def run(self, feeds):
        from sdtrt.manifest import resolve_shape

        key = tuple(sorted((k, v.shape) for k, v in feeds.items()))
        if key not in self._out:
            values = {d: n for s in self.component.inputs if s.name in feeds
                      for d, n in zip(s.shape, feeds[s.name].shape) if isinstance(d, str)}
            for side in ("height", "width"):  # the VAE decoder's pixels from its latents
                if f"latent_{side}" in values:
                    values.setdefault(side, values[f"latent_{side}"] * self.vae_scale)
            self._out[key] = {o.name: np.zeros(resolve_shape(o.shape, values), o.dtype) for o in self.component.outputs}
        return self._out[key]


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
                 "tensorrt", "openvino"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    env["versions"] = versions
    return env


def run_bench(cfg: BenchConfig, log=lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    cfg.check()
    from sdtrt.benchmarks.roofline import NO_FLOPS, NO_MODEL, add_roofline, unet_flops_per_step
    from sdtrt.config import from_dict
    from sdtrt.manifest import FlopModel, Manifest

    manifest = Manifest.load(Path(cfg.engine_dir))
    r = manifest.ranges
    for w, h in cfg.sizes:
        if w % 8 or h % 8 or not (r.size_min <= min(w, h) and max(w, h) <= r.size_max):
            raise UsageError(f"size {w}x{h}: must be multiples of 8 within the exported range {r.size_min}..{r.size_max}")
    if not r.batch_min <= cfg.batch <= r.batch_max:
        raise UsageError(f"batch {cfg.batch} is outside the exported range {r.batch_min}..{r.batch_max}")
    from sdtrt.benchmarks.systems import extra_systems, psnr_fields

    systems = ["sdtrt", *extra_systems(cfg.also_backends)] + ([] if cfg.baseline == "none" else ["baseline"])
    flop_model, flops_from = None, "manifest" if manifest.components["unet"].flops is not None else None
    if cfg.baseline != "none":
        log("checking that the baseline rebuilds the exported model ...")
        check = _Client("check", cfg)
        check.close()
        if check.info.get("unet_flops"):
            flop_model, flops_from = from_dict(FlopModel, check.info["unet_flops"]), "the baseline's rebuilt U-Net"
    log(f"starting {', '.join(systems)} ...")
    clients: dict[str, _Client] = {}
    samples: dict[tuple[int, int], dict[str, list]] = {}
    images: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    cold: dict[str, float] = {}
    finished = False
    memory: dict[str, dict] = {}
    info: dict[str, dict] = {}

    def runs(active: list[str]) -> None:
        for w, h in cfg.sizes:
            per = samples.setdefault((w, h), {k: [] for k in systems})
            for i in range(cfg.warmup + cfg.runs):
                for k in active:  # interleaved: A, B, A, B ...
                    img, t = clients[k].generate(w, h, cfg.seed)
                    cold.setdefault(k, t.get("cold_start_s", float("nan")))
                    if i >= cfg.warmup:
                        per[k].append(t)
                    images.setdefault((w, h), {})[k] = img
                    tag = "warm-up" if i < cfg.warmup else f"run {i - cfg.warmup + 1}/{cfg.runs}"
                    log(f"  {w}x{h} {k:<{max(8, *map(len, systems))}} {tag}: {t['total']:.2f}s")

    try:
        for group in ([[k] for k in systems] if cfg.one_at_a_time else [systems]):
            for k in group:
                clients[k] = _Client(k, cfg)
                info[k] = clients[k].info
            runs(group)
            memory |= {k: clients[k].finish() for k in group}
        finished = True
    finally:  # after an error or Ctrl-C the workers are ended at once, not waited for
        for c in clients.values():
            c.close(wait=30 if finished else 0)
    results = []
    for (w, h), per in samples.items():
        entry = {"size": f"{w}x{h}", "batch": cfg.batch, "systems": {}}
        for k in systems:
            entry["systems"][k] = dict(_summary(per[k], cfg.batch), backend=info[k]["backend"])
        if "baseline" in systems:
            entry["psnr_db_vs_baseline"] = psnr(images[(w, h)]["sdtrt"], images[(w, h)]["baseline"])
        add_roofline(entry, unet_flops_per_step(manifest, flop_model, w, h, cfg.batch, cfg.guidance_scale),
                     NO_FLOPS if cfg.baseline == "none" else NO_MODEL)
        entry |= psnr_fields(images[(w, h)], systems)
        results.append(entry)
    return {
        "schema": SCHEMA,
        "config": to_dict(cfg),
        "precision": manifest.precision,
        "model": to_dict(manifest.model),
        "environment": environment(),
        "results": results,
        "unet_flops_from": flops_from,  # the U-Net's FLOP count: "manifest", the rebuilt model's, or None (n/a)
        "load_s": {k: i["load_s"] for k, i in info.items()},
        **({"lora_s": {k: i["lora_s"] for k, i in info.items() if "lora_s" in i}} if cfg.loras else {}),
        "cold_start_s": cold,
        **({"backend_details": {k: i["details"] for k, i in info.items() if "details" in i}}
           if any("details" in i for i in info.values()) else {}),
        "memory": memory,
        "host_overhead": host_overhead(cfg.engine_dir, steps=50, size=max(s[0] for s in cfg.sizes)),
    }
