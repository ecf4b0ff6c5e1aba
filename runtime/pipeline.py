"""txt2img against the engines of an engine folder: tokenizer -> text encoder -> denoising loop -> VAE.

Argument names follow diffusers' StableDiffusionPipeline. Seeds use NumPy's Generator (PCG64): the
initial latents are the first draw, ``standard_normal(shape, float32)``; a stochastic sampler then
draws one array of the same shape per step, in order. So a seed gives the same image on every
backend and machine.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sdtrt.errors import UsageError
from sdtrt.manifest import Manifest
from sdtrt.runtime.backends import check_shapes, load_engines
from sdtrt.runtime.samplers import SamplerConfig, SamplerTable, build_table, step
from sdtrt.runtime.tokenizer import ClipTokenizer


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

    def sampler_table(self, scheduler: str | None, steps: int) -> SamplerTable:
        return build_table(SamplerConfig.from_scheduler_config(self.scheduler_config, scheduler), steps)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, seed: int | None = None, num_images_per_prompt: int = 1,
                 scheduler: str | None = None, latents: np.ndarray | None = None, output_type: str = "pil",
                 callback: Callable[[int, int], None] | None = None) -> GenerationResult:
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        info = self.manifest.model
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        height = height or info.default_size
        width = width or info.default_size
        self._check_arguments(prompts, negatives, num_inference_steps, guidance_scale, height, width,
                              num_images_per_prompt, output_type)
        table = self.sampler_table(scheduler, num_inference_steps)
        cfg = guidance_scale > 1.0  # as diffusers: no negative branch at guidance <= 1
        batch = len(prompts) * num_images_per_prompt
        shape = (batch, info.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)
        n_text = 2 * len(prompts) if cfg else len(prompts)
        plan = {  # every engine's input shapes for this generation
            "text_encoder": {"input_ids": (n_text, info.max_text_length)},
            "unet": {"latents": shape, "encoder_hidden_states": ((2 if cfg else 1) * batch, info.max_text_length,
                                                                  info.text_hidden_size)},
            "vae_decoder": {"latents": shape},
        }
        for name, shapes in plan.items():
            check_shapes(name, self.engines[name], shapes)
        reserve = getattr(self.engines, "reserve", None)
        if reserve is not None:
            reserve(plan)

        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        rng = np.random.Generator(np.random.PCG64(seed))
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)  # (B, C, h, w)
        else:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != shape:
                raise UsageError(f"latents have shape {latents.shape}, expected {shape} for this batch and size")

        t = time.perf_counter()
        embeddings = self._encode(prompts, negatives if cfg else None, num_images_per_prompt)  # (kB, 77, D)
        timings["text_encoder"] = time.perf_counter() - t

        t = time.perf_counter()
        final = self._denoise(table, latents, embeddings, guidance_scale, rng, callback, timings)  # (B, C, h, w)
        timings["denoise"] = time.perf_counter() - t
        timings["steps"] = table.num_steps

        t = time.perf_counter()
        vae = self.engines["vae_decoder"]
        image = vae.run({"latents": final.astype(vae.input_dtype("latents"))})["image"]  # (B, 3, H, W) in [-1, 1]
        timings["vae_decoder"] = time.perf_counter() - t
        image = np.clip(image.astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)  # (B, H, W, 3)
        timings["total"] = time.perf_counter() - t_start

        sampler = table.name
        params = []
        for k in range(batch):
            p = prompts[k // num_images_per_prompt]
            n = negatives[k // num_images_per_prompt]
            params.append(
                f"{p}\nNegative prompt: {n}\nSteps: {num_inference_steps}, Sampler: {sampler}, CFG scale: {guidance_scale}, "
                f"Seed: {seed}, Size: {width}x{height}, Batch index: {k}, Model: {info.family}, Precision: {self.manifest.precision}"
            )
        if output_type == "np":
            return GenerationResult(image, seed, params, timings)
        from PIL import Image

        images = [Image.fromarray((img * 255).round().astype(np.uint8)) for img in image]
        return GenerationResult(images, seed, params, timings)

    def _check_arguments(self, prompts, negatives, steps, guidance, height, width, per_prompt, output_type) -> None:
        ranges = self.manifest.ranges
        if not prompts:
            raise UsageError("no prompt given")
        if len(negatives) != len(prompts):
            raise UsageError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if not isinstance(steps, int) or steps < 1:
            raise UsageError(f"steps must be a positive integer, got {steps!r}")
        if not np.isfinite(guidance) or guidance < 0:
            raise UsageError(f"guidance scale must be >= 0, got {guidance}")
        if per_prompt < 1:
            raise UsageError(f"num_images_per_prompt must be at least 1, got {per_prompt}")
        for label, v in (("height", height), ("width", width)):
            if v % 8 or v % self.manifest.model.vae_scale_factor:
                raise UsageError(f"{label} {v} is not a multiple of {max(8, self.manifest.model.vae_scale_factor)}")
            if not ranges.size_min <= v <= ranges.size_max:
                raise UsageError(f"{label} {v} is outside the exported range {ranges.size_min}..{ranges.size_max} "
                                 f"(re-export with --size to change it)")
        batch = len(prompts) * per_prompt
        if not ranges.batch_min <= batch <= ranges.batch_max:
            raise UsageError(f"batch {batch} (prompts x images per prompt) is outside the exported range "
                             f"{ranges.batch_min}..{ranges.batch_max}")
        if output_type not in ("pil", "np"):
            raise UsageError(f"output_type must be 'pil' or 'np', not {output_type!r}")

    def _encode(self, prompts: list[str], negatives: list[str] | None, per_prompt: int) -> np.ndarray:
        texts = (negatives or []) + prompts
        ids, _ = self.tokenizer(texts)  # (kP, 77)
        hidden = self.engines["text_encoder"].run({"input_ids": ids})["last_hidden_state"]  # (kP, 77, D)
        # each prompt's embedding repeated per image, negatives first: (kB, 77, D)
        embeddings = np.repeat(hidden, per_prompt, axis=0)
        return embeddings.astype(self.engines["unet"].input_dtype("encoder_hidden_states"))

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
        return tokenizer, json.loads(sched_file.read_text())
    except (OSError, json.JSONDecodeError) as ex:
        raise ManifestError(f"cannot read {sched_file}: {ex}") from None


def save_png(image, path: Path, parameters: str) -> None:
    """Write a PNG with the generation parameters in a 'parameters' text chunk; temp file, then rename."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
