"""`sdtrt bench`: sdtrt's runtime against eager PyTorch (diffusers), side by side in one run.

Each system lives in its own worker process (so neither pollutes the other's memory figures) and the
parent drives them interleaved, A, B, A, B, with the same prompt, seed, input image and random arrays. The
baseline is diffusers' StableDiffusionPipeline (``--task img2img``: StableDiffusionImg2ImgPipeline, ``inpaint``:
StableDiffusionInpaintPipeline) built from the same weights as the engine folder.
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


class _SeedDraws:
    """diffusers' pipelines draw the VAE posterior and the forward noise from their generator: hand them our seed
    contract's arrays instead (in the order the runtime draws them, README "Seeds"), so both systems start alike."""

    MODULES = ("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.randn_tensor",
               "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img.randn_tensor",
               "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint.randn_tensor",
               "diffusers.pipelines.controlnet.pipeline_controlnet.randn_tensor",
               "diffusers.pipelines.controlnet.pipeline_controlnet_img2img.randn_tensor",
               "diffusers.pipelines.controlnet.pipeline_controlnet_inpaint.randn_tensor",
               "diffusers.pipelines.controlnet.pipeline_controlnet_sd_xl.randn_tensor",
               "diffusers.pipelines.controlnet.pipeline_controlnet_sd_xl_img2img.randn_tensor",
               "diffusers.pipelines.controlnet.pipeline_controlnet_inpaint_sd_xl.randn_tensor",
               "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl.randn_tensor",
               "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img.randn_tensor",
               "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint.randn_tensor",
               "diffusers.models.autoencoders.vae.randn_tensor")

    def __init__(self, seed: int):
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, shape, generator=None, device=None, dtype=None, **kwargs):
        import torch

        draw = torch.from_numpy(self.rng.standard_normal(tuple(shape), dtype=np.float32))
        return draw.to(device=device, dtype=dtype)

    def __enter__(self):
        from contextlib import ExitStack
        from unittest import mock

        self.stack = ExitStack()
        for target in self.MODULES:
            self.stack.enter_context(mock.patch(target, side_effect=self))
        return self

    def __exit__(self, *exc):
        self.stack.close()


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
        self._calls: dict[str, int] = {}
        for encoder in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None)):
            if encoder is not None:  # SDXL: both encoders' time is the text encoding's
                self._wrap(encoder, "forward", "text_encoder")
        self._wrap(self.pipe.unet, "forward", "unet")
        self._wrap(self.pipe.vae, "decode", "vae_decoder")
        self._wrap(self.pipe.vae, "encode", "vae_encoder")
        self._wrap(self.pipe.scheduler, "step", "sampler_update")
        if cfg.controlnets:
            self._wrap(self.pipe.controlnet, "forward", "controlnet")
        self.lora_s = None
        if cfg.loras:  # diffusers' way: each file as a PEFT adapter, weighted with set_adapters (not fused)
            from sdtrt.runtime.adapters import normalize_loras

            t = time.perf_counter()
            loras = normalize_loras(list(cfg.loras))
            names = [f"lora{i}" for i in range(len(loras))]
            for name, (path, _) in zip(names, loras):
                self.pipe.load_lora_weights(str(Path(path).expanduser()), adapter_name=name)
            self.pipe.set_adapters(names, [scale for _, scale in loras])
            self.lora_s = time.perf_counter() - t

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
            self._calls[label] = self._calls.get(label, 0) + 1
            return out

        setattr(obj, method, timed)

    def generate(self, width: int, height: int, seed: int) -> tuple[np.ndarray, dict[str, float]]:
        import torch

        c = self.cfg
        self._timers, self._calls = {}, {}
        self._sync()
        t = time.perf_counter()
        args = dict(negative_prompt=NEGATIVE, num_inference_steps=c.steps, guidance_scale=c.guidance_scale,
                    num_images_per_prompt=c.batch, output_type="np", **task_inputs(c.task, width, height))
        if c.task != "img2img":  # img2img's size is its image's
            args.update(height=height, width=width)
        if c.strength is not None:
            args["strength"] = c.strength
        if c.scheduler_config:
            from sdtrt.runtime.sampler_presets import few_step_preset

            preset = few_step_preset(c.scheduler_config)
            if preset.timesteps is not None:
                args["timesteps"] = list(preset.timesteps)
                del args["num_inference_steps"]
        if c.controlnets:  # the ControlNet pipelines call the input image `image` only for txt2img
            maps = control_maps(c.controlnets, width, height)
            args["image" if c.task == "txt2img" else "control_image"] = maps[0] if len(maps) == 1 else maps
            # ours: 1 for every task; diffusers' img2img pipelines default to 0.8, SD's inpainting one to 0.5
            args["controlnet_conditioning_scale"] = 1.0
        with torch.inference_mode(), _SeedDraws(seed):
            images = self.pipe(PROMPT, **args).images
        self._sync()
        # U-Net calls, not the schedule's length: img2img and inpainting below strength 1 run part of it
        timings = dict(self._timers, total=time.perf_counter() - t, steps=self._calls["unet"])
        return np.asarray(images, dtype=np.float32), timings


def _baseline_model(manifest):
    """The PyTorch model the export was made from, rebuilt from its source: a built-in's seeded random weights under
    this sdtrt, or the diffusers folder as it is now. Not ``load_model``'s cached copy: the check frees its weights as
    it goes (harmless in a worker process of its own, not in a caller's that holds the same model)."""
    from sdtrt.export.loaders import load_model

    return load_model.__wrapped__(manifest.model.source, seed=manifest.model.weights_seed or 0)


def check_baseline_weights(engine_dir: str) -> dict[str, Any]:
    """Refuse a baseline that is not the exported model: the built-in weights changed since the export (another
    sdtrt), or the diffusers folder was edited or replaced. Its PSNR against our image would then be a wrong number
    (32 dB instead of 130), not a finding. Each graph of the folder runs on the export's first parity-gate case in
    ONNX Runtime against the rebuilt module, as the export's gate did. Returns what the parent needs of the rebuilt
    model: ``unet_flops``, the U-Net's FLOP model as JSON, when the manifest has none (``roofline``)."""
    from sdtrt.export.exporter import default_cases
    from sdtrt.export.graphs import AddedInputs, controlnet_spec, graph_specs
    from sdtrt.export.validate import validate_graph
    from sdtrt.manifest import CONTROLNET_PREFIX, Manifest

    folder = Path(engine_dir)
    manifest = Manifest.load(folder)
    model = _baseline_model(manifest)
    specs = graph_specs(model)
    m = manifest.model
    for name, component in manifest.controlnets.items():
        specs[CONTROLNET_PREFIX + name] = controlnet_spec(baseline_controlnet(manifest, model, component),
                                                          m.latent_channels, m.text_hidden_size, m.max_text_length,
                                                          m.vae_scale_factor, AddedInputs.of_manifest(manifest))
    from sdtrt.export.low_memory import parameter_ids, release_weights, release_weights_of
    from sdtrt.export.validate import gate_references, ort_session

    learned = {}
    if manifest.components["unet"].flops is None:  # an older export: counted here, before the weights go
        from sdtrt.benchmarks.roofline import count_unet_flops

        learned["unet_flops"] = count_unet_flops(specs["unet"], m.vae_scale_factor)
    # as the export's gate holds them: each module's FP32 outputs first, then its weights freed (but those a graph
    # still to check shares), then the graph as written in ONNX Runtime (no FP32 copies of fp16 weights) — an SDXL
    # check with a ControlNet then holds one FP32 module at a time, not all of them beside a session
    release_weights_of(model, specs)
    names = [n for n in manifest.components if n in specs]  # not the sampler-update graph: no weights
    for i, name in enumerate(names):
        component = manifest.components[name]
        case = default_cases(name, manifest.ranges, m.max_chunks)[0]
        inputs = specs[name].tensor_specs(manifest.ranges, m.vae_scale_factor, manifest.precision, m.max_text_length,
                                          m.max_chunks)[0]
        references = gate_references(specs[name], [case], {s.name for s in inputs if s.dtype == "float16"})
        release_weights(specs[name].module, parameter_ids(*(specs[n].module for n in names[i + 1:])))
        session = ort_session(folder / component.file, optimize=False)
        result = validate_graph(specs[name], folder / component.file, [case], manifest.precision, session=session,
                                references=references)[0]
        del session, references
        if not result.passed:
            seed = manifest.model.weights_seed
            source = manifest.model.source + (f" (weights seed {seed})" if seed is not None else "")
            raise UsageError(
                f"the baseline model differs from the one exported to {engine_dir}: {name} rebuilt from {source} is "
                f"{result.max_rel_error:.2g} (relative) away from {component.file} at {result.shape}, where the "
                f"export's gate allows {result.tolerance:g}: its weights changed since the export; re-export the "
                "model to benchmark it")
    return learned


def _diffusers_pipeline(manifest, cfg: BenchConfig):
    import diffusers

    from sdtrt.export.loaders import make_scheduler
    from sdtrt.runtime.samplers import DIFFUSERS_EQUIVALENT

    model = _baseline_model(manifest)
    scheduler_config = dict(model.scheduler_config)
    sampler = cfg.scheduler
    if cfg.scheduler_config:  # the model card's scheduler settings on the model's config, as diffusers' from_config
        from sdtrt.runtime.sampler_presets import few_step_preset

        preset = few_step_preset(cfg.scheduler_config)
        scheduler_config, sampler = preset.scheduler_config(scheduler_config), preset.sampler
    if sampler:
        cls, extra = DIFFUSERS_EQUIVALENT[sampler]
        scheduler_config.update(extra, _class_name=cls)
    scheduler = make_scheduler(scheduler_config)
    # diffusers' ControlNet pipelines take one ControlNetModel, or a list (a MultiControlNetModel)
    models = [baseline_controlnet(manifest, model, c) for c in list(manifest.controlnets.values())[:cfg.controlnets]]
    controlnet = dict(controlnet=models[0] if len(models) == 1 else models) if models else {}
    if model.added_conditioning:  # SDXL: the pipelines of the family, from the same modules
        refiner = model.text_encoder_2 is None
        encoders = (dict(text_encoder=None, tokenizer=None, text_encoder_2=model.text_encoder,
                         tokenizer_2=model.tokenizer) if refiner else
                    dict(text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                         text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2))
        name = {"txt2img": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
                "img2img": "StableDiffusionXLImg2ImgPipeline", "inpaint": "StableDiffusionXLInpaintPipeline"}[cfg.task]
        if models:  # StableDiffusionXLControlNet{,Img2Img,Inpaint}Pipeline
            name = name.replace("StableDiffusionXL", "StableDiffusionXLControlNet")
        return getattr(diffusers, name)(vae=model.vae, unet=model.unet, scheduler=scheduler, **encoders,
                                        **model.pipeline_config, **controlnet)
    components = dict(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
                      scheduler=scheduler, safety_checker=None, feature_extractor=None,
                      requires_safety_checker=False)
    if cfg.controlnets:
        pipeline = {"txt2img": diffusers.StableDiffusionControlNetPipeline,
                    "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
                    "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline}[cfg.task]
        return pipeline(**components, **controlnet)
    pipeline = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
                "inpaint": diffusers.StableDiffusionInpaintPipeline}[cfg.task]
    return pipeline(**components)


def baseline_controlnet(manifest, model, component):
    """The PyTorch ControlNet a component was exported from: the built-in rebuilt from its seed, or its folder."""
    from sdtrt.export.controlnet import BUILTIN_CONTROLNET, builtin_controlnet, load_controlnet_folder

    kind, _, seed = component.source.partition(":")
    if kind == BUILTIN_CONTROLNET and seed.isdigit():
        return builtin_controlnet(model.unet, manifest.model.latent_channels, manifest.model.vae_scale_factor, int(seed))
    return load_controlnet_folder(Path(component.source))


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
            conn.send(("ready", check_baseline_weights(cfg.engine_dir)))
            return
        from sdtrt.benchmarks.systems import system_backend

        runner = _Ours(cfg, system_backend(kind, cfg.backend)) if kind.startswith("sdtrt") else _Baseline(cfg)
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
