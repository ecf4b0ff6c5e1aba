"""``sdtrt build``: one TensorRT engine per ONNX graph of an engine folder, on the GPU that will run them.

Strongly typed networks: precision comes from the ONNX (TensorRT 11 has no FP16 builder flag; on 10.x the
STRONGLY_TYPED flag gives the same behaviour). Optimization profiles come from the manifest's ranges (or
a static shape), the timing cache lives in the folder and is reused, engines are named with the
TensorRT version and compute capability, and the manifest records what was built with what.
Written against the TensorRT Python API 10.x/11.x directly; polygraphy's loaders are not needed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from sdtrt.errors import SdtrtError, UsageError
from sdtrt.manifest import BuiltEngine, Component, Manifest, ModelInfo, TensorRTBuild, sha256_file

Triple = tuple[int, int, int]
TIMING_CACHE = "timing.cache"


class BuildError(SdtrtError):
    """TensorRT could not parse a graph or build an engine."""


@dataclass(frozen=True)
class BuildConfig:
    batch: Triple = (1, 1, 4)  # min, opt, max images
    size: Triple = (256, 512, 1024)  # min, opt, max pixels (height and width)
    static: tuple[int, int] | None = None  # (width, height): one fixed shape, batch fixed at opt, guidance on
    timing_cache: str | None = None  # default: DIR/timing.cache
    workspace_gb: float | None = None
    opt_level: int = 3  # builder_optimization_level, 0..5

    def check(self, manifest: Manifest) -> None:
        for label, (lo, opt, hi) in (("batch", self.batch), ("size", self.size)):
            if not lo <= opt <= hi:
                raise UsageError(f"--{label} {lo}:{opt}:{hi} must satisfy MIN <= OPT <= MAX")
        if any(v % 8 for v in self.size) or (self.static and any(v % 8 for v in self.static)):
            raise UsageError("sizes must be multiples of 8")
        if not 0 <= self.opt_level <= 5:
            raise UsageError(f"--opt-level must be 0..5, got {self.opt_level}")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise UsageError(f"--workspace must be positive, got {self.workspace_gb}")
        r = manifest.ranges
        sizes = self.static if self.static else (self.size[0], self.size[2])
        if min(sizes) < r.size_min or max(sizes) > r.size_max:
            raise UsageError(f"size {min(sizes)}..{max(sizes)} is outside the exported range {r.size_min}..{r.size_max} "
                             "(re-export with --size)")
        if self.batch[0] < r.batch_min or self.batch[2] > r.batch_max:
            raise UsageError(f"batch {self.batch[0]}..{self.batch[2]} is outside the exported range "
                             f"{r.batch_min}..{r.batch_max} (re-export with --batch)")


def dim_triples(cfg: BuildConfig, model: ModelInfo) -> dict[str, Triple]:
    """min/opt/max of every named dimension, for a dynamic or a static profile."""
    b, s, f = cfg.batch, cfg.size, model.vae_scale_factor
    if cfg.static:
        w, h = cfg.static
        bo = b[1]
        return {"batch": (bo,) * 3, "text_batch": (2 * bo,) * 3, "height": (h,) * 3, "width": (w,) * 3,
                "latent_height": (h // f,) * 3, "latent_width": (w // f,) * 3}
    lat = (s[0] // f, s[1] // f, s[2] // f)
    # text_batch: B rows without guidance, 2B with it; opt is the guided case
    return {"batch": b, "text_batch": (b[0], 2 * b[1], 2 * b[2]), "height": s, "width": s,
            "latent_height": lat, "latent_width": lat}


def profile_shapes(component: Component, cfg: BuildConfig, model: ModelInfo) -> dict[str, tuple[tuple[int, ...], ...]]:
    """name -> (min, opt, max) shapes for every input with a named (dynamic) dimension."""
    dims = dim_triples(cfg, model)
    shapes = {}
    for spec in component.inputs:
        if all(isinstance(d, int) for d in spec.shape):
            continue
        shapes[spec.name] = tuple(tuple(d if isinstance(d, int) else dims[d][k] for d in spec.shape) for k in range(3))
    return shapes


def engine_file(component: str, trt_version: str, compute_capability: str) -> str:
    return f"{component}.trt{trt_version}.sm{compute_capability}.plan"


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(memoryview(data))
    os.replace(tmp, path)


def build_engines(folder: Path, cfg: BuildConfig, trt=None, cudart=None,
                  log: Callable[[str], None] = print) -> Manifest:
    """Build every graph of ``folder`` into an engine; returns (and saves) the updated manifest."""
    from sdtrt.runtime.tensorrt import api

    folder = Path(folder)
    manifest = Manifest.load(folder)
    cfg.check(manifest)
    trt = trt or api.import_tensorrt()
    cudart = cudart or api.import_cudart()
    device = api.device_info(cudart)
    version = api.trt_version(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = Path(cfg.timing_cache) if cfg.timing_cache else folder / TIMING_CACHE
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    log(f"TensorRT {version} on {device.name} (sm_{device.compute_capability}); timing cache "
        f"{'reused from' if cache_bytes else 'new at'} {cache_path}")
    built: dict[str, BuiltEngine] = {}
    for name, component in manifest.components.items():
        t0 = time.perf_counter()
        shapes = profile_shapes(component, cfg, manifest.model)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(folder / component.file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BuildError(f"TensorRT cannot parse {component.file}: {errors or 'unknown error'}")
        config = builder.create_builder_config()
        if cfg.workspace_gb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gb * 2**30))
        config.builder_optimization_level = cfg.opt_level
        profile = builder.create_optimization_profile()
        for input_name, (lo, opt, hi) in shapes.items():
            profile.set_shape(input_name, lo, opt, hi)
        config.add_optimization_profile(profile)
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, False)
        log(f"  {name}: building ({'static' if cfg.static else 'dynamic'} profile) ...")
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BuildError(f"TensorRT failed to build {component.file} (see the TensorRT log above)")
        out = folder / engine_file(name, version, device.compute_capability)
        _write_atomic(out, plan)
        cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
        _write_atomic(cache_path, cache_bytes)  # after each engine, so an interrupted build keeps what it learned
        built[name] = BuiltEngine(file=out.name, sha256=sha256_file(out), size_bytes=out.stat().st_size,
                                  profile=shapes,
                                  build_seconds=round(time.perf_counter() - t0, 1))
        log(f"  {name}: {out.name} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    record = TensorRTBuild(version=version, gpu=device.name, compute_capability=device.compute_capability,
                           engines=built, timing_cache=str(cache_path), opt_level=cfg.opt_level,
                           workspace_gb=cfg.workspace_gb, static=cfg.static is not None)
    manifest = replace(manifest, tensorrt=record)
    manifest.save(folder)
    return manifest
