"""The eager PyTorch side of `sdtrt bench`: diffusers' pipeline of the family, built from the very weights the engine
folder was exported from (a built-in's seeded random weights, or the diffusers folder), timed per component, and
drawing its random arrays from sdtrt's seed contract so both systems start alike; and the check, in a process of its
own, that the rebuilt model is the exported one (``check_baseline_weights``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.benchmarks.harness import NEGATIVE, PROMPT, BenchConfig, control_maps, task_inputs
from sdtrt.errors import UsageError


class SeedDraws:
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


class Baseline:
    name = "baseline"

    def __init__(self, cfg: BenchConfig):
        import torch

        from sdtrt.manifest import Manifest

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        manifest = Manifest.load(Path(cfg.engine_dir))
        self.cuda = torch.cuda.is_available()
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.pipe = diffusers_pipeline(manifest, cfg)
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
        with torch.inference_mode(), SeedDraws(seed):
            images = self.pipe(PROMPT, **args).images
        self._sync()
        # U-Net calls, not the schedule's length: img2img and inpainting below strength 1 run part of it
        timings = dict(self._timers, total=time.perf_counter() - t, steps=self._calls["unet"])
        return np.asarray(images, dtype=np.float32), timings


def baseline_model(manifest):
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
    model = baseline_model(manifest)
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


def diffusers_pipeline(manifest, cfg: BenchConfig):
    import diffusers

    from sdtrt.export.loaders import make_scheduler
    from sdtrt.runtime.samplers import DIFFUSERS_EQUIVALENT

    model = baseline_model(manifest)
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
