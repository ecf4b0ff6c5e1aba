"""Generation against the engines of an engine folder: tokenizer -> text encoder -> (VAE encoder) -> one denoising
loop -> VAE decoder.

txt2img, img2img, inpainting and outpainting are one ``Pipeline.__call__`` (diffusers' argument names: ``image``,
``mask_image``, ``strength``, ``mask_blur``, ``padding_mask_crop``, plus ``outpaint``): a task is data for the one
loop, never a copy of it. It decides the initial state (``SamplerTable.init_scale``/``init_image_scale``: pure noise,
or the image latents noised to the first timestep), where the schedule starts (``strength``), the constant inputs of
an inpainting U-Net (mask, masked-image latents) and 4-channel inpainting's blend after every step (a row of the
table and three arrays). Reference: diffusers' StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline; A1111's ``process_images``.

Seeds are A1111's (``seeds.py``): image ``i`` of a request gets the seed ``seed + i`` and a NumPy generator (PCG64)
of its own, from which it draws ``standard_normal(shape, float32)`` arrays as a batch of one draws them, in the order
diffusers' pipelines draw from a generator (docs/runtime.md, "Seeds"):

- txt2img: the initial noise (1, C, h, w), then one array per stochastic step;
- img2img: the VAE posterior sample of its input image (1, C, h, w), then the noise, then per step;
- inpainting: its image's posterior where the image latents are needed (a 4-channel U-Net, or ``strength`` < 1),
  the noise, the masked image's posterior (drawn for every U-Net, as diffusers encodes the masked image for both
  kinds), then per step.

So a seed gives the same image on every backend and machine, in any batch: diffusers gives the same with one
generator per image and one input image per image of the batch (its ``generator=[...]``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from sdtrt.errors import MemoryLimitError, NumericalError, UsageError
from sdtrt.fsutil import atomic_paths
from sdtrt.manifest import CONTROLNET_PREFIX, Manifest
from sdtrt.memory import ARENA_FACTOR, available_bytes, gb, peak_bytes
from sdtrt import __version__
from sdtrt.runtime.adapters import AdapterMixin, LoraState
from sdtrt.runtime.plan import DEFAULT_STRENGTH, Control, GenerationPlan, GenerationResult, Start, TaskInputs
from sdtrt.runtime.backends import BackendError, check_shapes, load_engines
from sdtrt.runtime.device_loop import residual_shapes, taken_by
from sdtrt.runtime.images import (apply_overlay, blur_mask, default_size, invert_mask, latent_fill, latent_mask,
                                  load_image, outpaint_canvas, prepare_sources)
from sdtrt.runtime.infotext import a1111_names, create_infotext
from sdtrt.runtime.lora import network_name
from sdtrt.runtime import conditioning
from sdtrt.runtime.infotext import conditioning_infotext
from sdtrt.runtime.request import MAX_SEED, GenerationRequest, integer
from sdtrt.runtime.samplers import Blend, SamplerConfig, SamplerTable, build_table, step, with_control
from sdtrt.runtime.seeds import ImageNoise, image_seeds, random_seed
from sdtrt.runtime.tokenizer import ClipTokenizer

log = logging.getLogger("sdtrt")


class Pipeline(AdapterMixin):
    """An engine folder's engines, tokenizers and sampler, and the one generation loop over them; LoRAs and
    embeddings (``AdapterMixin``) change the engines' weights without re-export."""

    def __init__(self, folder: Path, manifest: Manifest, engines: dict, tokenizer, scheduler_config: dict):
        self.folder = Path(folder)
        self.manifest = manifest
        self.engines = engines
        # one tokenizer per text encoder (conditioning.load_tokenizers); ``tokenizer``: the first's
        self.tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
        self.tokenizer = self.tokenizers[0]
        self.scheduler_config = scheduler_config
        self.name: str | None = None  # the name it is known by (sdtrt serve --models-dir: its folder's); model_name
        self.loras: tuple[tuple[str, float], ...] = ()  # set_loras: applied to every generation
        self.lora_dir: Path | None = None  # where A1111's <lora:name:weight> prompt tags find name.safetensors
        self.lora_files: dict[str, str] = {}  # tag name -> file, before lora_dir (a replay's checked files)
        self._lora_state = LoraState()
        # textual-inversion token -> its vectors (n, D_e) per text encoder (graph); in load order in the spare rows
        self.embeddings: dict[str, dict[str, np.ndarray]] = {}
        self.embedding_files: dict[str, Path] = {}  # token -> the file it was read from ("TI hashes")
        self.skipped_embeddings: dict[str, str] = {}  # an embeddings folder's files this model cannot take -> why

    @classmethod
    def from_dir(cls, folder: str | Path, backend: str = "auto", threads: int = 0,
                 device_loop: bool | None = None, loras=None, lora_dir: str | Path | None = None,
                 embeddings=()) -> "Pipeline":
        """Load an engine folder. ``threads``: CPU threads for ONNX Runtime (0: its default, all cores);
        ``device_loop``: see ``backends.load_engines`` (TensorRT always runs the loop on the device); ``loras``:
        [(file, scale), ...] applied without re-export (``set_loras``); ``lora_dir``: where prompts' A1111
        ``<lora:name:weight>`` tags find ``name.safetensors``; ``embeddings``: textual-inversion files (or a folder
        of them, A1111's ``embeddings/``: each file's name is its token) for ``load_textual_inversion``."""
        import os

        if not isinstance(folder, (str, os.PathLike)):
            raise UsageError(f"the engine folder must be a path, got {type(folder).__name__}")
        if not str(folder).strip():
            raise UsageError("the engine folder path is empty")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise UsageError(f"threads must be a non-negative integer (0: ONNX Runtime's default), got {threads!r}")
        if not isinstance(backend, str):
            raise UsageError(f"backend must be a name, got {backend!r}")
        folder = Path(folder)
        manifest = Manifest.load(folder)
        tokenizers, scheduler_config = _assets(folder, manifest)  # before the engines: fail fast, cheaply
        engines = load_engines(folder, manifest, backend, threads, device_loop)
        pipe = cls(folder, manifest, engines, tokenizers, scheduler_config)
        try:
            pipe.lora_dir = None if lora_dir is None else Path(lora_dir)
            for item in [embeddings] if isinstance(embeddings, (str, Path)) else embeddings or ():
                item = Path(item).expanduser()
                if not item.is_dir():
                    pipe.load_textual_inversion(item, apply=False)
                    continue
                for f in sorted(item.glob("*.safetensors")):  # A1111's embeddings/: what this model cannot take
                    try:  # (another family's, a damaged file) is skipped with a line, as A1111 skips it
                        pipe.load_textual_inversion(f, apply=False)
                    except UsageError as ex:
                        log.warning("skipped embedding %s: %s", f.name, ex)
                        pipe.skipped_embeddings[f.stem] = str(ex)
            if loras or pipe.embeddings:
                pipe.set_loras(loras)
        except BaseException:
            pipe.close()
            raise
        return pipe

    @classmethod
    def from_engines(cls, folder: str | Path, manifest: Manifest, engines: dict) -> "Pipeline":
        """A pipeline over engines already loaded (``sdtrt build`` verifies engines before installing them)."""
        return cls(Path(folder), manifest, engines, *_assets(Path(folder), manifest))

    def close(self) -> None:
        """Free the engines and everything they hold on the device (contexts, buffers, CUDA graphs)."""
        close = getattr(self.engines, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def backend_name(self) -> str:
        engine = next(iter(self.engines.values()))
        return getattr(engine, "provider", type(engine).__name__)

    def _sampler(self, req: GenerationRequest) -> tuple[SamplerConfig, int, tuple[int, ...] | None]:
        """The sampler, step count and custom timesteps of ``req``: its ``scheduler`` on the model's config, or a
        few-step preset (``scheduler_config``: the model card's sampler and config on top of the model's)."""
        if req.scheduler_config is None:
            return self.sampler_config(req.scheduler), req.num_inference_steps, req.timesteps
        from sdtrt.runtime.sampler_presets import few_step_preset

        if req.scheduler is not None:
            raise UsageError(f"scheduler {req.scheduler!r} and scheduler_config {req.scheduler_config!r}: give one "
                             "(the preset names its sampler)")
        preset = few_step_preset(req.scheduler_config)
        timesteps = req.timesteps if req.timesteps is not None else preset.timesteps
        steps = len(timesteps) if timesteps is not None else req.num_inference_steps
        return preset.sampler_config(self.scheduler_config), steps, timesteps

    def sampler_config(self, scheduler: str | None) -> SamplerConfig:
        return SamplerConfig.from_scheduler_config(self.scheduler_config, scheduler)

    def sampler_table(self, scheduler: str | None, steps: int) -> SamplerTable:
        return build_table(self.sampler_config(scheduler), steps)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, seed: int | None = None, num_images_per_prompt: int = 1,
                 scheduler: str | None = None, latents: np.ndarray | None = None, output_type: str = "pil",
                 callback: Callable[[int, int], None] | None = None, clip_skip: int | None = None,
                 image=None, mask_image=None, strength: float | None = None, mask_blur: float = 0,
                 padding_mask_crop: int | None = None, outpaint: tuple[int, int, int, int] | None = None,
                 outpaint_fill: str = "edge", control_images=None, controlnet_conditioning_scale=1.0,
                 control_guidance_start=0.0, control_guidance_end=1.0, control_preprocessors="none",
                 canny_thresholds=(100, 200), hires=None, mask_invert: bool = False,
                 inpainting_fill: str | int = "original", overlay: bool = True, **conditioning) -> GenerationResult:
        """Generate images (diffusers' StableDiffusionPipeline argument names). Prompts use A1111's syntax: emphasis
        ``(word:1.3)``, ``BREAK``, and any length up to the export's ``--max-chunks`` x 75 tokens. ``seed`` -1 or
        None: random. ``clip_skip``: as diffusers (1 = the hidden state one layer before the last).

        From an image (diffusers' img2img and inpainting pipelines): ``image`` (a path, PIL image or (H, W, 3)
        array; or one per image of the batch), ``strength`` in (0, 1] (default 0.8 for img2img, 1.0 for
        inpainting), ``mask_image`` (white: repaint), ``mask_blur`` (Gaussian radius, pixels),
        ``padding_mask_crop`` (work on the box around the mask grown by this many pixels, at full size, then paste
        back: A1111's "inpaint only masked"), ``outpaint=(left, top, right, bottom)`` pixels to add (the new area
        starts as ``outpaint_fill``: "edge", "reflect" or "gray"; see ``images.outpaint_canvas``). ``height`` and
        ``width`` default to the image's, rounded down to the model's multiple. ``latents``: the initial noise.
        As A1111: ``mask_invert`` (repaint the mask's black area), ``inpainting_fill`` (A1111's "Masked content",
        what the masked area starts as: "original" (default, as diffusers), "fill" (the colours around it), "latent
        noise", "latent nothing"; or A1111's 0..3), ``overlay`` (default True: the original pixels pasted back
        outside the (blurred) mask, as A1111; False: diffusers' output, the VAE's reconstruction everywhere).

        ControlNets (diffusers' StableDiffusionControlNet*Pipeline names): ``control_images``, a list whose i-th
        image (path, PIL image or array; None to leave one out) goes to the folder's i-th ControlNet
        (``manifest.controlnets``); ``controlnet_conditioning_scale``, ``control_guidance_start`` and
        ``control_guidance_end``: one value, or one per control image; ``control_preprocessors``: "none" (the image
        is the control map) or "canny" (OpenCV's edges, ``canny_thresholds`` (low, high)).

        SDXL (a family with added conditions, diffusers' StableDiffusionXL*Pipeline names): ``original_size``,
        ``crops_coords_top_left``, ``target_size`` and their ``negative_*`` ((height, width) / (top, left)),
        ``aesthetic_score`` / ``negative_aesthetic_score`` (the refiner); the ensemble of experts: ``denoising_end``
        (stop there; with ``output_type="latent"`` hand the latents over) and ``denoising_start`` (start there, from
        ``image=`` latents (B, C, h, w)); ``timesteps``: custom timesteps (few-step models).

        Hires fix (A1111's ``enable_hr``): ``hires``, a ``runtime.hires.Hires`` or a dict of its fields (``scale``,
        ``resize``, ``upscaler``, ``steps``, ``strength``, ``prompt``, ``negative_prompt``, ``sampler``).

        Raises ``UsageError`` (bad arguments), ``ShapeError`` (outside the engines' ranges) or
        ``NumericalError`` (the result is not finite) instead of returning a wrong image."""
        req = GenerationRequest.create(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                                       seed, num_images_per_prompt, scheduler, output_type, clip_skip,
                                       strength=strength, mask_blur=mask_blur, padding_mask_crop=padding_mask_crop,
                                       outpaint=outpaint, outpaint_fill=outpaint_fill,
                                       controlnet_conditioning_scale=controlnet_conditioning_scale,
                                       control_guidance_start=control_guidance_start,
                                       control_guidance_end=control_guidance_end,
                                       control_preprocessors=control_preprocessors, canny_thresholds=canny_thresholds,
                                       hires=hires, mask_invert=mask_invert, inpainting_fill=inpainting_fill,
                                       overlay=overlay, **conditioning)
        if callback is not None and not callable(callback):
            raise UsageError(f"callback must be callable, got {type(callback).__name__}")
        return self.generate(req, latents=latents, callback=callback, image=image, mask_image=mask_image,
                             control_images=control_images)

    def plan(self, req: GenerationRequest, image=None, mask_image=None, control_images=None) -> GenerationPlan:
        """Everything about ``req`` that can be checked before any compute: the images and masks, control images,
        sizes, batch, sampler, prompt chunks, every engine's input shapes, memory. Raises the error the generation
        would raise."""
        if not isinstance(req, GenerationRequest):
            raise UsageError(f"expected a GenerationRequest, got {type(req).__name__}")
        if req.hires is not None:  # two passes through this plan and the loop: txt2img, resize, img2img
            from sdtrt.runtime import hires

            return hires.plan(self, req, image, mask_image, control_images)
        req, loras, names = self._prompt_loras(req)
        req = self._expand_embeddings(req)
        latent_image = self._latent_image(req, image, mask_image)  # the ensemble of experts' hand-over
        inputs = self.task_inputs(req, image, mask_image) if latent_image is None else TaskInputs("img2img")
        controls = self._control_inputs(req, control_images)
        if latent_image is not None:
            f = self.manifest.model.vae_scale_factor
            height, width = latent_image.shape[2] * f, latent_image.shape[3] * f
            if (req.height or height, req.width or width) != (height, width):
                raise UsageError(f"height/width {req.height}x{req.width} do not match the latents given as image "
                                 f"({height}x{width} pixels)")
        else:
            height, width = self._size(req, inputs)
        self._check_request(req, height, width)
        if req.denoising_start is not None and inputs.task == "txt2img":
            raise UsageError("denoising_start needs the latents (or image) to start from: image= (--image)")
        if latent_image is not None and len(latent_image) not in (1, req.batch):
            raise UsageError(f"{len(latent_image)} latents given as image for a batch of {req.batch}: give one, or one "
                             "per image")
        sampler, steps, timesteps = self._sampler(req)
        strength = None
        if inputs.task != "txt2img":
            strength = req.strength if req.strength is not None else DEFAULT_STRENGTH[inputs.task]
        # img2img always starts from the noised image (diffusers' add_noise, even at strength 1); inpainting at
        # strength 1 starts from pure noise (diffusers' is_strength_max)
        schedule = {k: v for k, v in (("timesteps", timesteps), ("denoising_start", req.denoising_start),
                                      ("denoising_end", req.denoising_end)) if v is not None}
        table = build_table(sampler, steps, strength,
                            from_image=inputs.task == "img2img" or (strength is not None and strength < 1), **schedule)
        cfg = req.guidance_scale > 1.0  # as diffusers: no negative branch at guidance <= 1
        conditioning.check_options(self.manifest.model, req)
        text = conditioning.chunk_texts(self.manifest.model, self.tokenizers, req, cfg)
        texts, chunks, k, rows = text.texts, text.chunks[0], text.count, text.rows
        n_images = len(inputs.images)
        if n_images not in (0, 1, req.batch):
            raise UsageError(f"{n_images} images for a batch of {req.batch}: give one image, or one per image of the "
                             "batch (prompts x images per prompt)")
        shapes = self._engine_shapes(len(req.prompt), req.num_images_per_prompt, height, width, cfg, rows, k, n_images,
                                     [c.key for c in controls])
        for name, engine_shapes in shapes.items():
            if name not in self.engines:  # a ControlNet added after `sdtrt build`
                raise UsageError(f"{name} has no engine on this backend: rebuild with `sdtrt build {self.folder}`")
            check_shapes(name, self.engines[name], engine_shapes)
        self._check_memory(len(req.prompt), req.num_images_per_prompt, height, width, cfg, rows, k, n_images)
        sources = None
        if inputs.images:
            factor = self.manifest.model.vae_scale_factor
            sources = prepare_sources(list(inputs.images), None if inputs.masks is None else list(inputs.masks),
                                      height, width, factor, req.padding_mask_crop,
                                      fill=req.inpainting_fill != "original", overlay=req.overlay,
                                      inverted=req.mask_invert)
            w0, h0 = inputs.images[0].size
            if (height, width) != (h0, w0) and req.height is None and req.width is None:  # after every check passed
                log.warning("the image is %dx%d; generating at %dx%d (a multiple of %d)", w0, h0, width, height, factor)
        if controls:
            crop = sources.crop if sources is not None else None
            controls = [c.prepared(height, width, crop, req.canny_thresholds) for c in controls]
            table = with_control(table, [(c.scale, c.start, c.end) for c in controls])
        return GenerationPlan(table, sampler, height, width, cfg, shapes["vae_decoder"]["latents"], shapes, texts,
                              chunks, inputs.task, strength, sources, tuple(controls), req.prompt,
                              req.negative_prompt, self.loras + loras,
                              tuple(Path(p).stem for p, _ in self.loras) + names, len(loras),
                              masked_content=req.inpainting_fill, text=text, image_latents=latent_image,
                              time_ids=conditioning.time_ids(self.manifest.model, req, height, width, inputs.task)
                              if self.manifest.model.added_conditions is not None else None)

    def _control_inputs(self, req: GenerationRequest, control_images) -> list["Control"]:
        """The control images paired with the folder's ControlNets, in order (None leaves one out), loaded."""
        if control_images is None:
            return []
        images = list(control_images) if isinstance(control_images, (list, tuple)) else [control_images]
        available = self.manifest.controlnets
        if not available:
            raise UsageError(f"this folder has no ControlNet: add one with `sdtrt export-controlnet {self.folder} PATH`"
                             " (or export with --controlnet)")
        if len(images) > len(available):
            raise UsageError(f"{len(images)} control images for {len(available)} ControlNet"
                             f"{'s' * (len(available) != 1)} in this folder ({', '.join(available)}): the i-th image "
                             "goes to the i-th ControlNet")
        settings = req.control_settings(len(images))
        controls = []
        for i, ((name, component), image, (scale, start, end, pre)) in enumerate(zip(available.items(), images,
                                                                                   settings)):
            if image is None:
                continue
            label = f"control image {i + 1}" if len(images) > 1 else "control image"
            controls.append(Control(CONTROLNET_PREFIX + name, name, load_image(image, label), scale, start, end, pre))
        if not controls:
            raise UsageError("every control image is None: give at least one, or none at all")
        return controls

    def task_inputs(self, req: GenerationRequest, image=None, mask_image=None) -> TaskInputs:
        """Which task ``req`` with these images is, the images loaded, outpainting's canvas made, masks blurred."""
        inpainting_unet = any(s.name == "mask" for s in self.manifest.components["unet"].inputs)
        needs = [(req.strength is not None, "strength"), (bool(req.outpaint), "outpaint")]
        if image is None:
            for given, what in needs + [(mask_image is not None, "mask_image")]:
                if given:
                    raise UsageError(f"{what} needs an image to start from (image=, or --image)")
            _refuse_without_mask(req, inpainting_unet, "an image and a mask (image= and mask_image=, or --image and "
                                                       "--mask)")
            return TaskInputs("txt2img")
        many = isinstance(image, (list, tuple))
        images = [load_image(x, f"image {i + 1}" if many else "image")
                  for i, x in enumerate(image if many else [image])]
        if not images:
            raise UsageError("image is an empty list")
        masks = None
        if mask_image is not None:
            many_masks = isinstance(mask_image, (list, tuple))
            masks = [load_image(x, f"mask {i + 1}" if many_masks else "mask")
                     for i, x in enumerate(mask_image if many_masks else [mask_image])]
            if len(masks) == 1 and len(images) > 1:
                masks = masks * len(images)
            if len(masks) != len(images):
                raise UsageError(f"{len(masks)} masks for {len(images)} images")
            if req.mask_invert:  # A1111: inverted before the blur (and before outpainting's canvas marks its new area)
                masks = [invert_mask(m) for m in masks]
        if req.outpaint:
            factor = max(8, self.manifest.model.vae_scale_factor)
            if any(p % factor for p in req.outpaint):
                raise UsageError(f"outpaint {','.join(map(str, req.outpaint))}: each side must be a multiple of "
                                 f"{factor} pixels (the model's latent pixel)")
            made = [outpaint_canvas(im, *req.outpaint, fill=req.outpaint_fill, mask=None if masks is None else masks[i])
                    for i, im in enumerate(images)]
            images, masks = [c for c, _ in made], [m for _, m in made]
        if masks is None:
            _refuse_without_mask(req, inpainting_unet, "a mask (mask_image, or --mask)")
            return TaskInputs("img2img", tuple(images))
        if req.mask_blur:
            masks = [blur_mask(m, req.mask_blur) for m in masks]
        return TaskInputs("inpaint", tuple(images), tuple(masks))

    def _latent_image(self, req: GenerationRequest, image, mask_image) -> np.ndarray | None:
        """``image`` given as latents (B, C, h, w) (diffusers: an image with the latents' channel count is taken as
        latents, not encoded; the SDXL refiner's hand-over from ``output_type="latent"``), or None."""
        c = self.manifest.model.latent_channels
        if not (isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == c):
            return None
        if mask_image is not None:
            raise UsageError("latents given as image take no mask_image (inpainting starts from an image)")
        if req.outpaint:
            raise UsageError("outpaint needs an image, not latents")
        return _latents_array(image, image.shape)

    def _size(self, req: GenerationRequest, inputs: TaskInputs) -> tuple[int, int]:
        """(height, width): as asked, else the image's rounded down to the model's multiple (as diffusers), else the
        model's default."""
        info = self.manifest.model
        if inputs.images and (req.height is None or req.width is None):
            h, w = default_size(inputs.images[0], info.vae_scale_factor)
            w0, h0 = inputs.images[0].size
            r = self.manifest.ranges
            for given, v in ((req.height, h), (req.width, w)):
                if given is None and not r.size_min <= v <= r.size_max:
                    rounded = f" ({w}x{h} rounded to a multiple of {info.vae_scale_factor})" if (h, w) != (h0, w0) else ""
                    raise UsageError(f"the image is {w0}x{h0}{rounded}, outside the exported range {r.size_min}.."
                                     f"{r.size_max}: resize it, or pass a size to generate at (height/width, --size)")
            return req.height or h, req.width or w
        return req.height or info.default_size, req.width or info.default_size

    def _engine_shapes(self, prompts: int, per_prompt: int, height: int, width: int, cfg: bool, rows: int | None = None,
                       chunks: int = 1, images: int = 0, controlnets: list[str] = ()) -> dict:
        """Every engine's input shapes for a generation (``rows``: text-encoder rows, ``chunks``: prompt chunks,
        ``images``: input images to encode, 0 for txt2img; ``controlnets``: the ControlNet components used)."""
        info = self.manifest.model
        batch = prompts * per_prompt
        shape = (batch, info.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)
        rows = rows if rows is not None else (2 if cfg else 1) * prompts * chunks
        kb = (2 if cfg else 1) * batch
        unet = {"latents": shape, "encoder_hidden_states": (kb, info.max_text_length * chunks, info.text_hidden_size)}
        if any(s.name == "mask" for s in self.manifest.components["unet"].inputs):
            unet |= {"mask": (batch, 1, *shape[2:]), "masked_image_latents": shape}
        added = info.added_conditions
        if added is not None:
            unet_inputs = self.manifest.components["unet"]
            unet |= {added.pooled_input: (kb, unet_inputs.input(added.pooled_input).shape[-1]),
                     added.time_ids_input: (kb, added.time_ids_width)}
        residuals = residual_shapes(self.manifest.components["unet"], unet["encoder_hidden_states"][0], *shape[2:])
        shapes = {**{e.component: {"input_ids": (rows, info.max_text_length)} for e in info.encoders},
                  "unet": unet | residuals, "vae_decoder": {"latents": shape}}
        for key in controlnets:  # the U-Net's inputs it takes too (latents, embeddings, SDXL's added conditions)
            shared = {s.name: unet[s.name] for s in self.manifest.components[key].inputs if s.name in unet}
            shapes[key] = shared | {"control_image": (batch, 3, height, width)} | {f"{n}_in": s
                                                                                  for n, s in residuals.items()}
        if images:
            shapes["vae_encoder"] = {"image": (images, 3, height, width)}
        return shapes

    def _memory_need(self, prompts: int, per_prompt: int, height: int, width: int, cfg: bool, rows: int | None = None,
                     chunks: int = 1, images: int = 0) -> int:
        shapes = self._engine_shapes(prompts, per_prompt, height, width, cfg, rows, chunks, images)
        return max(peak_bytes(self.manifest.components[n], s, getattr(self.engines.get(n), "fused_attention", 0) > 0)
                   for n, s in shapes.items())

    def _check_memory(self, prompts: int, per_prompt: int, height: int, width: int, cfg: bool, rows: int,
                      chunks: int, images: int = 0) -> None:
        """On ONNX Runtime's CPU provider (host memory), refuse what cannot fit before it starts."""
        if not all(getattr(e, "provider", "") == "CPUExecutionProvider" for e in self.engines.values()):
            return  # TensorRT and CUDA: device memory, checked when it is allocated
        need = self._memory_need(prompts, per_prompt, height, width, cfg, rows, chunks, images)
        avail = available_bytes()
        if not need or avail is None or need * ARENA_FACTOR <= avail:
            return
        what = f"{prompts * per_prompt} x {width}x{height}"
        if need <= avail:
            log.warning("%s may run out of memory: it needs %s to %s (ONNX Runtime's activations and attention; its "
                        "arena can hold twice one run), %s are available", what, gb(need), gb(need * ARENA_FACTOR),
                        gb(avail))
            return
        step = max(64, 8 * self.manifest.model.vae_scale_factor)
        fits = next((s for s in range(min(height, width) // step * step, self.manifest.ranges.size_min - 1, -step)
                     if self._memory_need(prompts, per_prompt, s, s, cfg, rows, chunks, images) * ARENA_FACTOR <= avail),
                    None)
        hint = f"{fits}x{fits} fits" if fits else "no size of this folder's range fits at this batch"
        if prompts * per_prompt > 1 and \
                self._memory_need(1, 1, height, width, cfg, None, chunks, min(images, 1)) * ARENA_FACTOR <= avail:
            hint += f"; one image at {width}x{height} fits"
        raise MemoryLimitError(f"{what} needs about {gb(need)} of memory for ONNX Runtime on the CPU, "
                               f"{gb(avail)} are available: {hint} (or use a GPU backend)")


    def generate(self, req: GenerationRequest, latents: np.ndarray | None = None,
                 callback: Callable[[int, int], None] | None = None, image=None, mask_image=None,
                 plan: GenerationPlan | None = None, control_images=None, seeds=None) -> GenerationResult:
        """Run ``req`` (with ``image``/``mask_image`` for img2img and inpainting, ``control_images`` for ControlNets),
        or a ``plan`` already made for it. Image ``i`` gets the seed ``req.seed + i`` (``seeds.py``); ``seeds``, one
        per image, gives each its own instead (the server's batch of several requests)."""
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        plan = plan if plan is not None else self.plan(req, image, mask_image, control_images)
        if plan.hires is not None:
            from sdtrt.runtime import hires

            return hires.run(self, req, plan, latents, callback, seeds)
        table, batch = plan.table, req.batch
        reserve = getattr(self.engines, "reserve", None)
        if reserve is not None:
            reserve(plan.shapes)

        if self._lora_state.broken:
            graph, why = next(iter(self._lora_state.broken.items()))
            raise BackendError(f"the {graph} engine's weights are in an unknown state ({why}): generations are refused "
                               "until a LoRA change succeeds (set_loras) or the pipeline is loaded again")
        self._apply_loras(plan.loras)
        if seeds is None:
            seeds = image_seeds(req.seed if req.seed is not None else random_seed(), batch)
        elif isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__") or len(seeds) != batch:
            raise UsageError(f"seeds must be a list of one seed per image ({batch}), got {seeds!r:.80}")
        else:
            seeds = [integer(s, "seed", 0, MAX_SEED) for s in seeds]
        noise = ImageNoise(seeds)  # one generator per image
        seed = noise.seeds[0]
        t = time.perf_counter()
        start = self._start(plan, noise, latents)
        timings["vae_encoder"] = time.perf_counter() - t

        t = time.perf_counter()
        cond = self._encode(req, plan)
        embeddings = cond.pop("encoder_hidden_states")  # (kB, 77c, D)
        start.constants.update(cond)  # a family's added conditions (SDXL: text_embeds (kB, P), time_ids (kB, n))
        timings["text_encoder"] = time.perf_counter() - t

        t = time.perf_counter()
        final = self._denoise(table, start, embeddings, req.guidance_scale, noise, callback, timings)  # (B, C, h, w)
        timings["denoise"] = time.perf_counter() - t
        timings["steps"] = table.num_steps
        if not np.isfinite(final).all():  # once per generation: a NaN image must never be written as black
            raise NumericalError(
                f"the denoised latents hold NaN/Inf after {table.num_steps} U-Net calls ({table.name}, guidance "
                f"{req.guidance_scale:g}): the U-Net overflowed"
                + (" in fp16 (re-export with --precision fp32, or lower the guidance scale)"
                   if self.manifest.precision == "fp16" else " (lower the guidance scale)"))
        if req.output_type == "latent":  # diffusers' name: the denoised latents, not decoded (hires fix)
            timings["total"] = time.perf_counter() - t_start
            return GenerationResult(final, seed, [self._infotext(req, plan, noise.seeds[k], k) for k in range(batch)],
                                    timings, list(noise.seeds))
        return self.decode(req, plan, final, noise.seeds, timings, t_start)

    def decode(self, req: GenerationRequest, plan: GenerationPlan, final: np.ndarray, seeds, timings: dict[str, float],
               t_start: float) -> GenerationResult:
        """The result of ``req`` from its denoised latents ``final`` (B, C, h, w): decoded by the VAE, checked, each
        image's metadata, the original pasted back outside an inpainting mask (A1111's overlay)."""
        batch = len(seeds)
        t = time.perf_counter()
        vae = self.engines["vae_decoder"]
        image = vae.run({"latents": final.astype(vae.input_dtype("latents"))})["image"]  # (B, 3, H, W) in [-1, 1]
        timings["vae_decoder"] = time.perf_counter() - t
        if not np.isfinite(image).all():
            raise NumericalError(
                "the VAE decoder produced NaN/Inf from finite latents: "
                + ("an fp16 overflow in the VAE (its fp16 export keeps fp32 only where the VAE config sets "
                   "force_upcast): re-export with --precision fp32"
                   if self.manifest.components["vae_decoder"].precision == "fp16" else "the VAE weights are broken"))
        if image.shape[-2:] != (plan.height, plan.width):
            raise NumericalError(f"the VAE decoder made {image.shape[-1]}x{image.shape[-2]} images for "
                                 f"{plan.width}x{plan.height}: its manifest's vae_scale_factor is wrong (re-export)")
        image = np.clip(image.astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)  # (B, H, W, 3)
        params = [self._infotext(req, plan, seeds[k], k) for k in range(batch)]
        from PIL import Image

        images = [Image.fromarray((img * 255).round().astype(np.uint8)) for img in image]
        src = plan.sources
        if src is not None and src.originals:
            # the original kept outside the mask (A1111's overlay); padding_mask_crop: the crop's result pasted back
            n = len(src.originals)
            images = [apply_overlay(src.masks[k % n], src.originals[k % n], im, src.crop) for k, im in enumerate(images)]
            image = np.stack([np.asarray(im, np.float32) / 255 for im in images])  # (B, H0, W0, 3)
        timings["total"] = time.perf_counter() - t_start
        return GenerationResult(image if req.output_type == "np" else images, seeds[0], params, timings, list(seeds))

    def _start(self, plan: GenerationPlan, rng: ImageNoise, latents: np.ndarray | None) -> "Start":
        """The loop's initial state and the task's constant inputs, each image drawing from its own generator in
        diffusers' order (module docstring); ``latents`` replaces the noise draw."""
        shape, table, src = plan.shape, plan.table, plan.sources
        # each image its own posterior sample, of its own copy of the input image (B, C, h, w)
        image_z = rng.draw(shape[1:]) if plan.needs_image_latents else None
        if latents is None:
            noise = rng.draw(shape[1:])  # (B, C, h, w)
        else:
            noise = _latents_array(latents, shape)
        masked_z = rng.draw(shape[1:]) if plan.task == "inpaint" else None

        def per_image(x):  # (N, ...) -> (B, ...): one image for the whole batch, or one each
            return np.ascontiguousarray(np.repeat(x, shape[0] // len(x), axis=0) if len(x) != shape[0] else x)

        image_latents = self._posterior(src.image, image_z, per_image) if image_z is not None else plan.image_latents
        if image_latents is not None and plan.task == "inpaint":  # A1111's latent noise / latent nothing
            lmask = per_image(latent_mask(src.mask, self.manifest.model.vae_scale_factor))  # (B, 1, h, w)
            image_latents = latent_fill(image_latents, lmask, noise, plan.masked_content)
        state0 = table.init_scale * noise.astype(np.float64)
        if table.init_image_scale:
            state0 += table.init_image_scale * image_latents
        limit = np.finfo(self.engines["unet"].input_dtype("latents")).max
        if latents is not None and np.abs(state0).max() > limit:  # an overflow the U-Net would be blamed for
            raise UsageError(f"latents reach {np.abs(latents).max():g}: the U-Net's first input would exceed its "
                             f"{self.engines['unet'].input_dtype('latents')} range")
        start = Start(state0.astype(np.float32))
        for c in plan.controls:  # (B, 3, H, W) in [0, 1]: diffusers repeats one control image over the batch
            start.controls[c.key] = np.ascontiguousarray(
                np.repeat(c.array, shape[0], axis=0), self.engines[c.key].input_dtype("control_image"))
        if plan.task != "inpaint":
            return start
        mask = per_image(latent_mask(src.mask, self.manifest.model.vae_scale_factor))  # (B, 1, h, w) in {0, 1}
        if plan.inpainting_unet:
            masked = self._posterior(src.masked_image, masked_z, per_image)  # (B, C, h, w)
            start.constants = {"mask": mask, "masked_image_latents": masked}
        else:
            start.blend = {"mask": mask, "image_latents": image_latents, "init_noise": noise}
        return start

    def _posterior(self, image: np.ndarray, z: np.ndarray, per_image) -> np.ndarray:
        """Samples of the VAE posterior of ``image`` (N, 3, H, W) in [-1, 1], scaled: mean + std * z (B, C, h, w), the
        N images encoded once and repeated over the batch by ``per_image``, each image of the batch its own ``z``."""
        vae = self.engines["vae_encoder"]
        out = vae.run({"image": image.astype(vae.input_dtype("image"))})
        mean, std = out["latent_mean"].astype(np.float32), out["latent_std"].astype(np.float32)  # (N, C, h, w)
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            raise NumericalError(
                "the VAE encoder produced NaN/Inf from the input image: "
                + ("an fp16 overflow in the VAE: re-export with --precision fp32"
                   if self.manifest.components["vae_encoder"].precision == "fp16" else "the VAE weights are broken"))
        return per_image(mean) + per_image(std) * z

    def _check_request(self, req: GenerationRequest, height: int, width: int) -> None:
        ranges = self.manifest.ranges
        factor = max(8, self.manifest.model.vae_scale_factor)
        for label, v in (("height", height), ("width", width)):
            if v % 8 or v % self.manifest.model.vae_scale_factor:
                raise UsageError(f"{label} {v} is not a multiple of {factor}")
            if not ranges.size_min <= v <= ranges.size_max:
                raise UsageError(f"{label} {v} is outside the exported range {ranges.size_min}..{ranges.size_max} "
                                 f"(re-export with --size to change it)")
        if not ranges.batch_min <= req.batch <= ranges.batch_max:
            raise UsageError(f"batch {req.batch} (prompts x images per prompt) is outside the exported range "
                             f"{ranges.batch_min}..{ranges.batch_max}")

    def _encode(self, req: GenerationRequest, plan: GenerationPlan) -> dict[str, np.ndarray]:
        """The U-Net's conditioning inputs (``conditioning.encode``): encoder_hidden_states (kB, 77c, D) and a
        family's added conditions."""
        text = plan.text or conditioning.TextPlan(plan.texts, (plan.chunks,))
        return conditioning.encode(self.engines, self.manifest.model, req, text, plan.cfg, plan.prompts,
                                   plan.negatives, plan.time_ids, self.engines["unet"].input_dtype)

    def _infotext(self, req: GenerationRequest, plan: GenerationPlan, seed: int, k: int) -> str:
        """A1111's ``parameters`` text for image ``k`` of the batch, whose own seed is ``seed`` (A1111 writes no batch
        position: the seed alone regenerates the image)."""
        name, schedule = a1111_names(plan.sampler)
        prompt, negative = req.prompt[k // req.num_images_per_prompt], req.negative_prompt[k // req.num_images_per_prompt]
        untagged = len(plan.loras) - plan.tagged  # set_loras' (--lora), whose weights no prompt tag holds
        return create_infotext(prompt, negative, {
            "Steps": req.num_inference_steps, "Sampler": name, "Schedule type": schedule,
            "CFG scale": f"{req.guidance_scale:g}", "Seed": seed, "Size": f"{plan.width}x{plan.height}",
            "Model hash": self.manifest.components["unet"].sha256[:10], "Model": self.model_name,
            "Clip skip": req.clip_skip + 1 if req.clip_skip else None,
            # A1111's record of LoRAs: "name: hash", fused into this folder's graphs at export, then applied now;
            # the weights of those without a prompt tag in sdtrt's "Lora weights"; the embeddings the prompts use
            "Lora hashes": ", ".join([f"{network_name(n)}: {h}" for n, _, h in
                                      (x.rsplit(":", 2) for x in self.manifest.model.loras)]
                                     + [f"{network_name(name)}: {self._lora_state.digest(p)}"
                                        for (p, _), name in zip(plan.loras, plan.lora_names)]) or None,
            "Lora weights": ", ".join(f"{network_name(name)}: {float(w)!r}" for (_, w), name in
                                      zip(plan.loras[:untagged], plan.lora_names[:untagged])) or None,
            "TI hashes": self._ti_hashes(prompt, negative),
            # A1111's img2img keys; "Outpaint" (left,top,right,bottom pixels) and "Outpaint fill" are sdtrt's
            "Denoising strength": f"{plan.strength:g}" if plan.strength is not None else None,
            "Mask blur": f"{req.mask_blur:g}" if plan.task == "inpaint" and req.mask_blur else None,
            "Inpaint area": "Only masked" if req.padding_mask_crop is not None else None,
            "Masked area padding": req.padding_mask_crop,
            "Mask mode": "Inpaint not masked" if plan.task == "inpaint" and req.mask_invert else None,
            "Masked content": plan.masked_content if plan.task == "inpaint" and plan.masked_content != "original"
            else None,  # A1111 writes nothing for original
            # sdtrt's: diffusers' raw output asked for (overlay=False), where A1111 would paste the original back
            "Inpaint overlay": "off" if plan.task == "inpaint" and not plan.sources.originals else None,
            "Outpaint": ",".join(map(str, req.outpaint)) if req.outpaint else None,
            "Outpaint fill": req.outpaint_fill if req.outpaint else None,
            **{f"ControlNet {j}": c.infotext(req.canny_thresholds) for j, c in enumerate(plan.controls)},
            **conditioning_infotext(req),
            **dict(plan.infotext),
            "Version": f"sdtrt {__version__}"})

    @property
    def model_name(self) -> str:
        return self.name or Path(self.manifest.model.source.rstrip("/")).name or self.manifest.model.family

    def _denoise(self, table: SamplerTable, start: "Start", embeddings: np.ndarray, guidance: float,
                 rng: ImageNoise, callback, timings: dict[str, float]) -> np.ndarray:
        unet = self.engines["unet"]
        state0 = start.state  # (B, C, h, w)
        loop = getattr(unet, "device_loop", None)
        if loop is not None:
            # The whole loop on the device: noise is drawn up front, in the order the host loop draws it.
            noises = None
            if table.stochastic:
                noises = np.zeros((table.num_steps, *state0.shape), np.float32)  # (S, B, C, h, w)
                for c, row in zip(table.noise_coef, noises):
                    if c != 0.0:
                        rng.fill(row)
            t0 = time.perf_counter()
            final = loop.run(table, state0, embeddings, guidance, noises, start.constants, start.blend, start.controls)
            timings["unet"], timings["sampler_update"] = time.perf_counter() - t0, 0.0  # not separable without syncs
            if callback is not None:
                callback(table.num_steps, table.num_steps)
            return final
        ks, km = table.state_coef.shape[1], table.model_coef.shape[1]
        # Preallocated run state; buffers are rotated by reference, never reallocated in the loop.
        states = [np.zeros_like(state0) for _ in range(ks + 1)]  # states[0] = s_i  (B, C, h, w)
        outputs = [np.zeros_like(state0) for _ in range(km)]  # outputs[0] = m_i  (B, C, h, w)
        noise = np.zeros_like(state0) if table.stochastic else None
        scratch = np.zeros_like(state0)
        np.copyto(states[0], state0)
        blend = None
        if start.blend is not None:
            mask = start.blend["mask"]  # (B, 1, h, w)
            blend = Blend(mask, 1 - mask, start.blend["image_latents"], start.blend["init_noise"],
                          np.zeros_like(state0))
        residuals = residual_shapes(unet.component, embeddings.shape[0], *state0.shape[2:])
        zeros = {name: np.zeros(s, unet.input_dtype(name)) for name, s in residuals.items()}  # (kB, c_i, h_i, w_i)
        feeds = {
            "latents": np.zeros(state0.shape, unet.input_dtype("latents")),  # (B, C, h, w)
            "timestep": np.zeros(1, unet.input_dtype("timestep")),  # (1,)
            "encoder_hidden_states": embeddings,  # (kB, 77, D)
            "guidance_scale": np.array([guidance], unet.input_dtype("guidance_scale")),  # (1,)
            # an inpainting U-Net's mask (B, 1, h, w) and masked-image latents (B, C, h, w)
            **{name: value.astype(unet.input_dtype(name)) for name, value in start.constants.items()},
            **zeros,  # ControlNet residuals: zeros unless a ControlNet runs at this step
        }
        controls = []  # (engine, its feeds, its column of table.control_scale)
        for j, (key, image) in enumerate(start.controls.items()):
            cn = self.engines[key]
            controls.append((cn, {"latents": feeds["latents"], "timestep": np.zeros(1, cn.input_dtype("timestep")),
                                  "encoder_hidden_states": embeddings, "control_image": image,
                                  "conditioning_scale": np.zeros(1, cn.input_dtype("conditioning_scale")),
                                  # the U-Net's constants it takes too (SDXL's text_embeds, time_ids)
                                  **{name: value.astype(cn.input_dtype(name)) for name, value in start.constants.items()
                                     if name in taken_by(cn)}}, j))
        residual_inputs = [(name, f"{name}_in") for name in zeros]  # a ControlNet's inputs of the sums so far
        unet_s = update_s = control_s = 0.0
        clock = time.perf_counter
        for i in range(table.num_steps):
            t0 = clock()
            np.copyto(feeds["latents"], states[0], casting="unsafe")
            summed = zeros
            for cn, cn_feeds, j in controls:  # chained: each adds its residuals to the ones before it
                if table.control_scale[i, j] == 0.0:  # outside its start/end range: it would add exactly 0
                    continue
                cn_feeds["timestep"][0] = table.timesteps[i]
                cn_feeds["conditioning_scale"][0] = table.control_scale[i, j]
                for name, name_in in residual_inputs:
                    cn_feeds[name_in] = summed[name]
                summed = cn.run(cn_feeds)
            feeds.update(summed)
            tc = clock()
            feeds["timestep"][0] = table.timesteps[i]
            prediction = unet.run(feeds)["noise_pred"]  # (B, C, h, w)
            t1 = clock()
            control_s += tc - t0
            outputs.insert(0, outputs.pop())
            np.copyto(outputs[0], prediction, casting="unsafe")
            if noise is not None and table.noise_coef[i] != 0.0:
                rng.fill(noise)  # each image from its own generator, into the preallocated array
            spare = states.pop()
            step(table, i, states, outputs, noise, out=spare, scratch=scratch, blend=blend)
            states.insert(0, spare)
            t2 = clock()
            unet_s += t1 - tc
            update_s += t2 - t1
            if callback is not None and callback(i + 1, table.num_steps) is False:
                break  # the caller stops the loop: the image is made from the state so far (A1111's interrupt)
        timings["unet"], timings["sampler_update"] = unet_s, update_s
        if controls:
            timings["controlnet"] = control_s
        return states[0]


def _refuse_without_mask(req: GenerationRequest, inpainting_unet: bool, what: str) -> None:
    """A request with no mask: an inpainting U-Net cannot run it, and the mask options mean nothing."""
    if inpainting_unet:
        raise UsageError(f"this folder's U-Net is an inpainting model (9 input channels): it needs {what}, or outpaint")
    for given, option in ((req.mask_blur, "mask_blur"), (req.padding_mask_crop is not None, "padding_mask_crop"),
                          (req.mask_invert, "mask_invert"), (req.inpainting_fill != "original", "inpainting_fill")):
        if given:
            raise UsageError(f"{option} needs {what}")


def _latents_array(latents, shape: tuple[int, ...]) -> np.ndarray:
    """The ``latents`` argument (the initial noise) as a float32 array of ``shape``, or a UsageError."""
    try:
        array = np.asarray(latents)
    except Exception:  # anything NumPy cannot read as an array
        raise UsageError(f"latents must be a float array of shape {shape}, got {type(latents).__name__}") from None
    if array.dtype.kind not in "fiu" or array.dtype == np.bool_:
        raise UsageError(f"latents must be a real float array, got dtype {array.dtype}")
    if array.shape != shape:
        raise UsageError(f"latents have shape {array.shape}, expected {shape} for this batch and size")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise UsageError("latents must be finite (in float32)")
    return array


def _assets(folder: Path, manifest: Manifest) -> tuple[list[ClipTokenizer], dict]:
    """The tokenizers (one per text encoder) and scheduler config of an engine folder."""
    from sdtrt.errors import ManifestError

    tokenizer = conditioning.load_tokenizers(folder, manifest)
    sched_file = folder / manifest.scheduler_config
    try:
        config = json.loads(sched_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as ex:
        raise ManifestError(f"cannot read {sched_file}: {ex}") from None
    if not isinstance(config, dict):
        raise ManifestError(f"{sched_file} does not hold a JSON object")
    unset = set(config.get("_use_default_values") or ())  # as diffusers_config reads it: what the samplers run
    said = config.get("prediction_type", "epsilon") if "prediction_type" not in unset else "epsilon"
    if said != manifest.model.prediction_type:
        raise ManifestError(f"{sched_file} says prediction_type {said!r}, manifest.json {manifest.model.prediction_type!r}:"
                            " one of them was edited; re-export the model (or pass --prediction-type at export)")
    return tokenizer, config


def save_png(image, path: Path, parameters: str) -> None:
    """Write an image with the generation parameters (a PNG's 'parameters' text chunk; for .jpg/.webp the EXIF
    UserComment, as A1111); temp file, then rename."""
    save_pngs([image], [path], [parameters])


def save_pngs(images, paths, parameters, overwrite: bool = True) -> None:
    """``save_png`` for images that belong together (one generation's batch): all appear, or none (``atomic_paths``);
    ``overwrite=False`` refuses a path that something else created meanwhile. The format follows each path's suffix
    (``infotext.IMAGE_FORMATS``; PNG for any other)."""
    from sdtrt.runtime.infotext import IMAGE_FORMATS, write_image

    with atomic_paths([Path(p) for p in paths], overwrite=overwrite) as temps:
        for image, tmp, text, path in zip(images, temps, parameters, paths, strict=True):
            write_image(image, tmp, text, IMAGE_FORMATS.get(Path(path).suffix.lower(), "PNG"))
