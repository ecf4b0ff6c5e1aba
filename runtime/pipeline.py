"""txt2img against the engines of an engine folder: tokenizer -> text encoder -> denoising loop -> VAE.

Argument names follow diffusers' StableDiffusionPipeline. Seeds use NumPy's Generator (PCG64): the
initial latents are the first draw, ``standard_normal(shape, float32)``; a stochastic sampler then
draws one array of the same shape per step, in order. So a seed gives the same image on every
backend and machine.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sdtrt.errors import MemoryLimitError, NumericalError, UsageError
from sdtrt.fsutil import atomic_path
from sdtrt.manifest import Manifest
from sdtrt.memory import ARENA_FACTOR, available_bytes, gb, peak_bytes
from sdtrt import __version__
from sdtrt.runtime.backends import check_shapes, load_engines
from sdtrt.runtime.infotext import A1111_SAMPLERS, create_infotext
from sdtrt.runtime.prompts import PromptChunks, chunk_prompt, join_chunks
from sdtrt.runtime.request import GenerationRequest
from sdtrt.runtime.samplers import SamplerConfig, SamplerTable, build_table, step
from sdtrt.runtime.tokenizer import ClipTokenizer

log = logging.getLogger("sdtrt")


@dataclass(frozen=True)
class GenerationPlan:
    """A checked request, resolved against the engine folder (``Pipeline.plan``)."""

    table: SamplerTable
    sampler: SamplerConfig
    height: int
    width: int
    cfg: bool  # classifier-free guidance on (guidance > 1)
    shape: tuple[int, ...]  # latents (B, C, h, w)
    shapes: dict[str, dict[str, tuple[int, ...]]]  # engine -> input -> shape
    texts: tuple[str, ...]  # what the text encoder encodes, in row order (negatives first, "" for padding)
    chunks: dict[str, PromptChunks]  # each text as 77-token chunks with emphasis weights


@dataclass
class GenerationResult:
    images: list  # PIL images, or one (B, H, W, 3) float array in [0, 1] for output_type="np"
    seed: int
    parameters: list[str]  # one 'parameters' text per image (PNG metadata)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


class Pipeline:
    def __init__(self, folder: Path, manifest: Manifest, engines: dict, tokenizer: ClipTokenizer, scheduler_config: dict):
        self.folder = Path(folder)
        self.manifest = manifest
        self.engines = engines
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config

    @classmethod
    def from_dir(cls, folder: str | Path, backend: str = "auto", threads: int = 0,
                 device_loop: bool | None = None) -> "Pipeline":
        """Load an engine folder. ``threads``: CPU threads for ONNX Runtime (0: its default, all cores);
        ``device_loop``: see ``backends.load_engines`` (TensorRT always runs the loop on the device)."""
        folder = Path(folder)
        manifest = Manifest.load(folder)
        tokenizer, scheduler_config = _assets(folder, manifest)  # before the engines: fail fast, cheaply
        engines = load_engines(folder, manifest, backend, threads, device_loop)
        return cls(folder, manifest, engines, tokenizer, scheduler_config)

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

    def sampler_config(self, scheduler: str | None) -> SamplerConfig:
        return SamplerConfig.from_scheduler_config(self.scheduler_config, scheduler)

    def sampler_table(self, scheduler: str | None, steps: int) -> SamplerTable:
        return build_table(self.sampler_config(scheduler), steps)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, seed: int | None = None, num_images_per_prompt: int = 1,
                 scheduler: str | None = None, latents: np.ndarray | None = None, output_type: str = "pil",
                 callback: Callable[[int, int], None] | None = None, clip_skip: int | None = None) -> GenerationResult:
        """Generate images (diffusers' StableDiffusionPipeline argument names). Prompts use A1111's syntax: emphasis
        ``(word:1.3)``, ``BREAK``, and any length up to the export's ``--max-chunks`` x 75 tokens. ``seed`` -1 or
        None: random. ``clip_skip``: as diffusers (1 = the hidden state one layer before the last).
        Raises ``UsageError`` (bad arguments), ``ShapeError`` (outside the engines' ranges) or
        ``NumericalError`` (the result is not finite) instead of returning a wrong image."""
        req = GenerationRequest.create(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                                       seed, num_images_per_prompt, scheduler, output_type, clip_skip)
        if callback is not None and not callable(callback):
            raise UsageError(f"callback must be callable, got {type(callback).__name__}")
        return self.generate(req, latents=latents, callback=callback)

    def plan(self, req: GenerationRequest) -> GenerationPlan:
        """Everything about ``req`` that can be checked before any compute: sizes, batch, sampler, prompt chunks,
        every engine's input shapes, memory. Raises the error the generation would raise."""
        info = self.manifest.model
        height, width = req.height or info.default_size, req.width or info.default_size
        self._check_request(req, height, width)
        sampler = self.sampler_config(req.scheduler)
        table = build_table(sampler, req.num_inference_steps)
        cfg = req.guidance_scale > 1.0  # as diffusers: no negative branch at guidance <= 1
        texts, chunks = self._chunk(req, cfg)
        k = max(c.count for c in chunks.values())
        rows = sum(chunks[t].count for t in texts)
        shapes = self._engine_shapes(len(req.prompt), req.num_images_per_prompt, height, width, cfg, rows, k)
        for name, engine_shapes in shapes.items():
            check_shapes(name, self.engines[name], engine_shapes)
        self._check_memory(len(req.prompt), req.num_images_per_prompt, height, width, cfg, rows, k)
        return GenerationPlan(table, sampler, height, width, cfg, shapes["vae_decoder"]["latents"], shapes, texts, chunks)

    def _chunk(self, req: GenerationRequest, cfg: bool) -> tuple[tuple[str, ...], dict[str, PromptChunks]]:
        """Each distinct text as A1111 chunks; the texts in encoder order, with "" where padding needs it."""
        info, tok = self.manifest.model, self.tokenizer
        if req.clip_skip and req.clip_skip > info.clip_skips:
            raise UsageError(f"clip_skip {req.clip_skip}: this folder's text encoder returns up to clip_skip "
                             f"{info.clip_skips} (A1111's Clip skip {info.clip_skips + 1}); re-export for more")
        labelled = ([(n, f"negative prompt {i + 1}") for i, n in enumerate(req.negative_prompt)] if cfg else []) + \
                   [(p, f"prompt {i + 1}") for i, p in enumerate(req.prompt)]
        chunks: dict[str, PromptChunks] = {}
        for text, label in labelled:
            if text not in chunks:
                chunks[text] = chunk_prompt(text, tok.fragments, tok.bos_id, tok.eos_id, tok.pad_id, tok.comma_id)
            if chunks[text].count > info.max_chunks:
                label = label.rsplit(" ", 1)[0] if len(req.prompt) == 1 else label
                raise UsageError(f"{label} needs {chunks[text].count} chunks of 75 tokens ({chunks[text].token_count} "
                                 f"tokens); this folder was exported for at most {info.max_chunks} (re-export with "
                                 f"--max-chunks {chunks[text].count})")
        texts = list(chunks)
        k = max(c.count for c in chunks.values())
        if any(c.count < k for c in chunks.values()) and "" not in chunks:  # padding: the empty prompt's encoding
            chunks[""] = chunk_prompt("", tok.fragments, tok.bos_id, tok.eos_id, tok.pad_id, tok.comma_id)
            texts.append("")
        return tuple(texts), chunks

    def _engine_shapes(self, prompts: int, per_prompt: int, height: int, width: int, cfg: bool, rows: int | None = None,
                       chunks: int = 1) -> dict:
        """Every engine's input shapes for a generation (``rows``: text-encoder rows, ``chunks``: prompt chunks)."""
        info = self.manifest.model
        batch = prompts * per_prompt
        shape = (batch, info.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)
        rows = rows if rows is not None else (2 if cfg else 1) * prompts * chunks
        return {
            "text_encoder": {"input_ids": (rows, info.max_text_length)},
            "unet": {"latents": shape, "encoder_hidden_states": ((2 if cfg else 1) * batch, info.max_text_length * chunks,
                                                                  info.text_hidden_size)},
            "vae_decoder": {"latents": shape},
        }

    def _memory_need(self, prompts: int, per_prompt: int, height: int, width: int, cfg: bool, rows: int | None = None,
                     chunks: int = 1) -> int:
        shapes = self._engine_shapes(prompts, per_prompt, height, width, cfg, rows, chunks)
        return max(peak_bytes(self.manifest.components[n], s) for n, s in shapes.items())

    def _check_memory(self, prompts: int, per_prompt: int, height: int, width: int, cfg: bool, rows: int,
                      chunks: int) -> None:
        """On ONNX Runtime's CPU provider (host memory), refuse what cannot fit before it starts."""
        if not all(getattr(e, "provider", "") == "CPUExecutionProvider" for e in self.engines.values()):
            return  # TensorRT and CUDA: device memory, checked when it is allocated
        need = self._memory_need(prompts, per_prompt, height, width, cfg, rows, chunks)
        avail = available_bytes()
        if not need or avail is None or need * ARENA_FACTOR <= avail:
            return
        what = f"{prompts * per_prompt} x {width}x{height}"
        if need <= avail:
            log.warning("%s may run out of memory: it needs %s to %s (ONNX Runtime's attention; its arena can hold "
                        "twice one run), %s are available", what, gb(need), gb(need * ARENA_FACTOR), gb(avail))
            return
        step = max(64, 8 * self.manifest.model.vae_scale_factor)
        fits = next((s for s in range(min(height, width) // step * step, self.manifest.ranges.size_min - 1, -step)
                     if self._memory_need(prompts, per_prompt, s, s, cfg, rows, chunks) * ARENA_FACTOR <= avail), None)
        hint = f"{fits}x{fits} fits" if fits else "no size of this folder's range fits at this batch"
        if prompts * per_prompt > 1 and self._memory_need(1, 1, height, width, cfg, None, chunks) * ARENA_FACTOR <= avail:
            hint += f"; one image at {width}x{height} fits"
        raise MemoryLimitError(f"{what} needs about {gb(need)} of memory for ONNX Runtime's attention on the CPU, "
                               f"{gb(avail)} are available: {hint} (or use a GPU backend)")


    def generate(self, req: GenerationRequest, latents: np.ndarray | None = None,
                 callback: Callable[[int, int], None] | None = None) -> GenerationResult:
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        plan = self.plan(req)
        table, shape, batch = plan.table, plan.shape, req.batch
        reserve = getattr(self.engines, "reserve", None)
        if reserve is not None:
            reserve(plan.shapes)

        seed = req.seed if req.seed is not None else int(np.random.SeedSequence().entropy % (2**63))
        rng = np.random.Generator(np.random.PCG64(seed))
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)  # (B, C, h, w)
        else:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != shape:
                raise UsageError(f"latents have shape {latents.shape}, expected {shape} for this batch and size")
            if not np.isfinite(latents).all():
                raise UsageError("latents must be finite")

        t = time.perf_counter()
        embeddings = self._encode(req, plan)  # (kB, 77c, D)
        timings["text_encoder"] = time.perf_counter() - t

        t = time.perf_counter()
        final = self._denoise(table, latents, embeddings, req.guidance_scale, rng, callback, timings)  # (B, C, h, w)
        timings["denoise"] = time.perf_counter() - t
        timings["steps"] = table.num_steps
        if not np.isfinite(final).all():  # once per generation: a NaN image must never be written as black
            raise NumericalError(
                f"the denoised latents hold NaN/Inf after {table.num_steps} U-Net calls ({table.name}, guidance "
                f"{req.guidance_scale:g}): the U-Net overflowed"
                + (" in fp16 (re-export with --precision fp32, or lower the guidance scale)"
                   if self.manifest.precision == "fp16" else " (lower the guidance scale)"))

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
        image = np.clip(image.astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)  # (B, H, W, 3)
        timings["total"] = time.perf_counter() - t_start

        params = [self._infotext(req, plan, seed, k) for k in range(batch)]
        if req.output_type == "np":
            return GenerationResult(image, seed, params, timings)
        from PIL import Image

        images = [Image.fromarray((img * 255).round().astype(np.uint8)) for img in image]
        return GenerationResult(images, seed, params, timings)

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

    def _encode(self, req: GenerationRequest, plan: GenerationPlan) -> np.ndarray:
        """Text-encoder rows of every chunk of every distinct text, one call; emphasis, chunks joined and padded;
        then [negatives; prompts], each repeated per image: (kB, 77c, D)."""
        ids = np.concatenate([plan.chunks[t].ids for t in plan.texts])  # (R, 77)
        out = f"hidden_state_skip{req.clip_skip}" if req.clip_skip else "last_hidden_state"
        hidden = self.engines["text_encoder"].run({"input_ids": ids})[out]  # (R, 77, D)
        empty = None
        if "" in plan.texts:  # the empty prompt pads shorter prompts (A1111's pad_cond)
            row = sum(plan.chunks[t].count for t in plan.texts[:plan.texts.index("")])
            empty = hidden[row].astype(np.float32)  # (77, D)
        encoded = dict(zip(plan.texts, join_chunks(hidden, [plan.chunks[t] for t in plan.texts], empty)))  # (77k, D)
        order = (list(req.negative_prompt) if plan.cfg else []) + list(req.prompt)
        stacked = np.stack([encoded[t] for t in order])  # (kP, 77c, D)
        return np.repeat(stacked, req.num_images_per_prompt, axis=0).astype(
            self.engines["unet"].input_dtype("encoder_hidden_states"))

    def _infotext(self, req: GenerationRequest, plan: GenerationPlan, seed: int, k: int) -> str:
        """A1111's ``parameters`` text for image ``k`` of the batch."""
        name, schedule = A1111_SAMPLERS[plan.table.name]
        if schedule is None and plan.sampler.use_karras_sigmas:
            schedule = "Karras"
        return create_infotext(req.prompt[k // req.num_images_per_prompt],
                               req.negative_prompt[k // req.num_images_per_prompt], {
            "Steps": req.num_inference_steps, "Sampler": name, "Schedule type": schedule,
            "CFG scale": f"{req.guidance_scale:g}", "Seed": seed, "Size": f"{plan.width}x{plan.height}",
            "Model hash": self.manifest.components["unet"].sha256[:10], "Model": self.model_name,
            "Clip skip": req.clip_skip + 1 if req.clip_skip else None,
            "Batch size": req.batch if req.batch > 1 else None, "Batch pos": k if req.batch > 1 else None,
            "Version": f"sdtrt {__version__}"})

    @property
    def model_name(self) -> str:
        return Path(self.manifest.model.source.rstrip("/")).name or self.manifest.model.family

    def _denoise(self, table: SamplerTable, latents: np.ndarray, embeddings: np.ndarray, guidance: float,
                 rng: np.random.Generator, callback, timings: dict[str, float]) -> np.ndarray:
        unet = self.engines["unet"]
        loop = getattr(unet, "device_loop", None)
        if loop is not None:
            # The whole loop on the device: noise is drawn up front, in the order the host loop draws it.
            noises = None
            if table.stochastic:
                noises = np.stack([rng.standard_normal(latents.shape, dtype=np.float32) if c != 0.0
                                   else np.zeros(latents.shape, np.float32) for c in table.noise_coef])
            t0 = time.perf_counter()
            final = loop.run(table, latents * np.float32(table.init_scale), embeddings, guidance, noises)
            timings["unet"], timings["sampler_update"] = time.perf_counter() - t0, 0.0  # not separable without syncs
            if callback is not None:
                callback(table.num_steps, table.num_steps)
            return final
        ks, km = table.state_coef.shape[1], table.model_coef.shape[1]
        # Preallocated run state; buffers are rotated by reference, never reallocated in the loop.
        states = [np.zeros_like(latents) for _ in range(ks + 1)]  # states[0] = s_i  (B, C, h, w)
        outputs = [np.zeros_like(latents) for _ in range(km)]  # outputs[0] = m_i  (B, C, h, w)
        noise = np.zeros_like(latents) if table.stochastic else None
        scratch = np.zeros_like(latents)
        np.multiply(latents, table.init_scale, out=states[0])
        feeds = {
            "latents": np.zeros(latents.shape, unet.input_dtype("latents")),  # (B, C, h, w)
            "timestep": np.zeros(1, unet.input_dtype("timestep")),  # (1,)
            "encoder_hidden_states": embeddings,  # (kB, 77, D)
            "guidance_scale": np.array([guidance], unet.input_dtype("guidance_scale")),  # (1,)
        }
        unet_s = update_s = 0.0
        clock = time.perf_counter
        for i in range(table.num_steps):
            t0 = clock()
            np.copyto(feeds["latents"], states[0], casting="unsafe")
            feeds["timestep"][0] = table.timesteps[i]
            prediction = unet.run(feeds)["noise_pred"]  # (B, C, h, w)
            t1 = clock()
            outputs.insert(0, outputs.pop())
            np.copyto(outputs[0], prediction, casting="unsafe")
            if noise is not None and table.noise_coef[i] != 0.0:
                rng.standard_normal(latents.shape, dtype=np.float32, out=noise)
            spare = states.pop()
            step(table, i, states, outputs, noise, out=spare, scratch=scratch)
            states.insert(0, spare)
            t2 = clock()
            unet_s += t1 - t0
            update_s += t2 - t1
            if callback is not None:
                callback(i + 1, table.num_steps)
        timings["unet"], timings["sampler_update"] = unet_s, update_s
        return states[0]


def _assets(folder: Path, manifest: Manifest) -> tuple[ClipTokenizer, dict]:
    """The tokenizer and scheduler config of an engine folder."""
    from sdtrt.errors import ManifestError

    tokenizer = ClipTokenizer(folder / manifest.tokenizer_dir, manifest.model.max_text_length)
    sched_file = folder / manifest.scheduler_config
    try:
        config = json.loads(sched_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as ex:
        raise ManifestError(f"cannot read {sched_file}: {ex}") from None
    if not isinstance(config, dict):
        raise ManifestError(f"{sched_file} does not hold a JSON object")
    return tokenizer, config


def save_png(image, path: Path, parameters: str) -> None:
    """Write a PNG with the generation parameters in a 'parameters' text chunk; temp file, then rename."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
