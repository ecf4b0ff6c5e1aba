"""``sdtrt build``: one TensorRT engine per ONNX graph of an engine folder, on the GPU that will run them.

Strongly typed networks: precision comes from the ONNX (TensorRT 11 has no FP16 builder flag; on 10.x the
STRONGLY_TYPED flag gives the same behaviour). Every graph the manifest lists is built (SDXL's second text encoder,
its added-condition inputs and an inpainting U-Net's extra ones included: profiles follow the inputs' named
dimensions). Optimization profiles come from the manifest's ranges and the model's default size (or a static
shape), the timing cache lives in the folder keyed by TensorRT version and GPU and is reused, engines are named with
the TensorRT version and compute capability, and the manifest records what was built with what, the builder's
workspace and each engine's device memory included. Graphs are parsed from their files (``parse_from_file``: the
ONNX bytes are never held twice in host memory), and a build the GPU's free memory cannot hold is refused before
anything is parsed. Every engine is verified on this GPU against ONNX Runtime (``verify.py``) before it is
installed. Written against the TensorRT Python API 10.x/11.x directly; polygraphy's loaders are not needed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from sdtrt.errors import MemoryLimitError, SdtrtError, UsageError
from sdtrt.fsutil import folder_lock, remove_stale, temp_path, write_atomic
from sdtrt.manifest import BuiltEngine, Component, Manifest, ModelInfo, TensorRTBuild, resolve_shape, sha256_file
from sdtrt.memory import gb
from sdtrt.runtime.tensorrt.refit import refittable_graphs

Triple = tuple[int, int, int]
# the default size profile spans these multiples of the model's default size (SD 1.x 256..768, SDXL 512..1536, as
# NVIDIA's A1111 extension defaults to 512..768 for SD 1.5), within the export's range
PROFILE_SPAN = (0.5, 1.5)
# GPU memory a build leaves to the CUDA context, the builder's own allocations and the activations it times tactics
# with, besides the graph's weights and the workspace (TensorRT's default workspace is all of the GPU's memory)
BUILD_RESERVE = 2**30
MIN_WORKSPACE = 2**30  # below this TensorRT skips most tactics of an SD U-Net


class BuildError(SdtrtError):
    """TensorRT could not parse a graph or build an engine."""


@dataclass(frozen=True)
class BuildConfig:
    batch: Triple | None = None  # min, opt, max images; None: the export's batch range, opt = its minimum
    size: Triple | None = None  # min, opt, max pixels (height and width); None: the export's range, opt = default size
    static: tuple[int, int] | None = None  # (width, height): one fixed shape, batch fixed at opt, guidance on
    timing_cache: str | None = None  # default: DIR/timing.trt<version>.sm<cc>.cache
    workspace_gb: float | None = None  # None: what the GPU has free, less the graph's weights and a reserve
    opt_level: int = 3  # builder_optimization_level, 0..5
    verify: bool = True  # check every engine against ONNX Runtime on this GPU before installing it
    refittable: bool = False  # U-Net and text encoders built with REFIT: LoRAs and embeddings without a rebuild
    memory_check: bool = True  # refuse up front a build the GPU's free memory cannot hold (--no-memory-check)

    def resolved(self, manifest: Manifest) -> "BuildConfig":
        """This config with the profiles it leaves unset taken from the manifest: the export's ranges (what its
        graphs were validated for), the optimum at the smallest batch and the model's default size."""
        batch, size = _default_profile(manifest)
        return replace(self, batch=self.batch or batch, size=self.size or size)

    def check(self, manifest: Manifest) -> None:
        cfg = self.resolved(manifest)
        for label, (lo, opt, hi), least in (("batch", cfg.batch, 1), ("size", cfg.size, 8)):
            if lo < least:  # before the range checks: "0 is outside 1..4" does not say what is wrong with 0
                raise UsageError(f"--{label} MIN must be at least {least}, got {lo}")
            if not lo <= opt <= hi:
                raise UsageError(f"--{label} {lo}:{opt}:{hi} must satisfy MIN <= OPT <= MAX")
        if any(v % 8 for v in cfg.size) or (cfg.static and any(v % 8 for v in cfg.static)):
            raise UsageError("sizes must be multiples of 8")
        if not 0 <= cfg.opt_level <= 5:
            raise UsageError(f"--opt-level must be 0..5, got {cfg.opt_level}")
        if cfg.workspace_gb is not None and cfg.workspace_gb <= 0:
            raise UsageError(f"--workspace must be positive, got {cfg.workspace_gb}")
        r = manifest.ranges
        batch, size = _default_profile(manifest)
        if cfg.static:
            if min(cfg.static) < r.size_min or max(cfg.static) > r.size_max:
                raise UsageError(f"--static {cfg.static[0]}x{cfg.static[1]} is outside the exported range "
                                 f"{r.size_min}..{r.size_max}: pass --static WxH within it, or re-export with a wider "
                                 "--size")
        elif cfg.size[0] < r.size_min or cfg.size[2] > r.size_max:
            raise UsageError(f"--size {_colon(cfg.size)} is outside the exported range {r.size_min}..{r.size_max}: "
                             f"pass --size MIN:OPT:MAX within it (default {_colon(size)}), or re-export with a wider "
                             "--size")
        if cfg.batch[0] < r.batch_min or cfg.batch[2] > r.batch_max:
            raise UsageError(f"--batch {_colon(cfg.batch)} is outside the exported range {r.batch_min}..{r.batch_max}: "
                             f"pass --batch MIN:OPT:MAX within it (default {_colon(batch)}), or re-export with a wider "
                             "--batch")


def _default_profile(manifest: Manifest) -> tuple[Triple, Triple]:
    """(batch, size) profiles of a build that sets none: the export's batch range, optimal at one image (or the
    smallest batch); sizes from the model's default size (``PROFILE_SPAN`` around it, optimal at it), clamped into
    the export's range on multiples of 8 and of the VAE factor."""
    r, model = manifest.ranges, manifest.model
    step = math.lcm(8, model.vae_scale_factor)

    def clamp(v: float, up: bool) -> int:
        v = -(-int(v) // step) * step if up else int(v) // step * step
        return min(max(v, r.size_min), r.size_max)

    d = model.default_size
    lo, opt, hi = clamp(d * PROFILE_SPAN[0], True), clamp(d, False), clamp(d * PROFILE_SPAN[1], False)
    return (r.batch_min, r.batch_min, r.batch_max), (min(lo, opt), opt, max(hi, opt))


def _colon(triple: Triple) -> str:
    return ":".join(str(v) for v in triple)


def dim_triples(cfg: BuildConfig, model: ModelInfo) -> dict[str, Triple]:
    """min/opt/max of every named dimension, for a dynamic or a static profile (of a config ``resolved`` against the
    manifest). The prompt's text axis stays dynamic even in a static profile (77 tokens per chunk, up to the
    export's chunks; opt: one chunk)."""
    b, s, f = cfg.batch, cfg.size, model.vae_scale_factor
    seq, k = model.max_text_length, model.max_chunks
    text = {"text_length": (seq, seq, seq * k)}
    if cfg.static:
        w, h = cfg.static
        bo = b[1]
        return {"batch": (bo,) * 3, "text_batch": (2 * bo,) * 3, "text_rows": (1, 2 * bo, 2 * bo * k),
                "height": (h,) * 3, "width": (w,) * 3, "latent_height": (h // f,) * 3, "latent_width": (w // f,) * 3,
                **text}
    lat = (s[0] // f, s[1] // f, s[2] // f)
    # text_batch: B rows without guidance, 2B with it; opt is the guided case. text_rows: chunks of prompts and
    # negative prompts, one call
    return {"batch": b, "text_batch": (b[0], 2 * b[1], 2 * b[2]), "text_rows": (1, 2 * b[1], 2 * b[2] * k),
            "height": s, "width": s, "latent_height": lat, "latent_width": lat, **text}


def profile_shapes(component: Component, cfg: BuildConfig, model: ModelInfo) -> dict[str, tuple[tuple[int, ...], ...]]:
    """name -> (min, opt, max) shapes for every input with a named (dynamic) dimension."""
    dims = dim_triples(cfg, model)
    shapes = {}
    for spec in component.inputs:
        if all(isinstance(d, int) for d in spec.shape):
            continue
        # level dims (latent_height_4, ControlNet residuals) follow their base's min/opt/max
        shapes[spec.name] = tuple(resolve_shape(spec.shape, {n: v[k] for n, v in dims.items()}) for k in range(3))
    return shapes


def engine_file(component: str, trt_version: str, compute_capability: str, sha256: str) -> str:
    """``unet.trt10.16.1.11.sm90.1a2b3c4d.plan``: where it runs, and which build (a new build never overwrites
    the files the installed manifest points at, so switching manifests is the one atomic step of an install)."""
    return f"{component}.trt{trt_version}.sm{compute_capability}.{sha256[:8]}.plan"


def timing_cache_file(trt_version: str, compute_capability: str) -> str:
    """Default cache name: TensorRT refuses a cache made by another version or on another GPU."""
    return f"timing.trt{trt_version}.sm{compute_capability}.cache"


class TimingCache:
    """The builder's timing cache, kept in a file between engines and between builds.

    ``set_timing_cache`` refuses a cache made on another GPU or TensorRT version, ``create_timing_cache``
    can give nothing for a corrupt file, and ``get_timing_cache`` can return None: each falls back to a
    fresh cache (or none) with one warning, never a failed build."""

    def __init__(self, path: Path, log: Callable[[str], None]):
        self.path, self.log = path, log
        try:
            self.data = path.read_bytes() if path.is_file() else b""
        except OSError as ex:
            log(f"warning: cannot read timing cache {path} ({ex.strerror}); starting a fresh one")
            self.data = b""
        self.reused = bool(self.data)
        self._warned = False

    def _warn(self, message: str) -> None:
        if not self._warned:
            self.log(f"warning: {message}")
            self._warned = True

    def attach(self, config) -> None:
        if self.data:
            cache = config.create_timing_cache(self.data)
            if cache is not None and config.set_timing_cache(cache, False):
                return
            self._warn(f"timing cache {self.path} was made for another GPU or TensorRT version, or is corrupt; "
                       "starting a fresh one (it will be overwritten)")
            self.data, self.reused = b"", False
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            self._warn("TensorRT refused a fresh timing cache; building without one")

    def save(self, config) -> None:
        cache = config.get_timing_cache()
        if cache is None:
            self._warn("TensorRT returned no timing cache; timings of this build are not kept")
            return
        self.data = bytes(memoryview(cache.serialize()))
        try:
            write_atomic(self.path, self.data)  # after each engine, so an interrupted build keeps what it learned
        except OSError as ex:
            self._warn(f"cannot write timing cache {self.path} ({ex.strerror})")


def build_engines(folder: Path, cfg: BuildConfig, trt=None, cudart=None,
                  log: Callable[[str], None] = print) -> Manifest:
    """Build every graph of ``folder`` into an engine, verify them on this GPU (unless ``cfg.verify`` is
    off) and install them; returns (and saves) the updated manifest.

    Engines are written to temporary files and renamed into place only after every one was built and
    verified: a failed or interrupted build leaves the previous engines and manifest as they were. The folder is
    locked throughout (``fsutil.folder_lock``): another build, export or export-controlnet waits for this one."""
    folder = Path(folder)
    with folder_lock(folder, "sdtrt build", log):
        return _build_engines(folder, cfg, trt, cudart, log)


def graph_weight_bytes(folder: Path, component: Component) -> int:
    """Bytes of a graph's weights as its files hold them: the ONNX file and its external data (what the parser loads,
    and the builder holds on the GPU); a file that is missing counts 0 (the parser then says so)."""
    total = 0
    for name in (component.file, *component.external_data):
        try:
            total += (folder / name).stat().st_size
        except OSError:
            pass
    return total


@dataclass(frozen=True)
class BuildMemory:
    """What a build needs of the GPU, known before anything is parsed: the largest graph's weights plus the builder's
    workspace (``--workspace``, or at least ``MIN_WORKSPACE``)."""

    free: int  # bytes free on the GPU now (cudaMemGetInfo)
    total: int
    weights: dict[str, int]  # graph -> bytes of its weights
    workspace: int | None  # --workspace in bytes; None: sized per graph from the free memory

    @property
    def largest(self) -> str:
        return max(self.weights, key=self.weights.get)

    @property
    def need(self) -> int:
        return self.weights[self.largest] + (self.workspace or MIN_WORKSPACE) + BUILD_RESERVE

    def workspace_for(self, name: str, free: int) -> int:
        """The workspace limit for graph ``name`` when ``free`` bytes are free on the GPU: ``--workspace``, else what
        is left after its weights and ``BUILD_RESERVE`` (at least ``MIN_WORKSPACE``)."""
        if self.workspace:
            return self.workspace
        return max(MIN_WORKSPACE, free - self.weights[name] - BUILD_RESERVE)

    def check(self, folder: Path) -> None:
        if self.need <= self.free:
            return
        ws = f"--workspace {self.workspace / 2**30:g} GB" if self.workspace else f"a {gb(MIN_WORKSPACE)} workspace"
        raise MemoryLimitError(
            f"building {folder}'s engines needs about {gb(self.need)} of GPU memory ({self.largest}: "
            f"{gb(self.weights[self.largest])} of weights, {ws}, {gb(BUILD_RESERVE)} reserve), the GPU has "
            f"{gb(self.free)} free of {gb(self.total)}: free the GPU (other processes), build on a larger one, or pass "
            "--no-memory-check to try anyway")


def build_memory(folder: Path, manifest: Manifest, cfg: BuildConfig, cudart) -> BuildMemory:
    from sdtrt.runtime.tensorrt import api

    free, total = api.memory_info(cudart)
    weights = {name: graph_weight_bytes(folder, c) for name, c in manifest.components.items()}
    return BuildMemory(free=free, total=total, weights=weights,
                       workspace=int(cfg.workspace_gb * 2**30) if cfg.workspace_gb else None)


def _build_engines(folder: Path, cfg: BuildConfig, trt, cudart, log) -> Manifest:
    from sdtrt.runtime.tensorrt import api

    manifest = Manifest.load(folder)
    cfg.check(manifest)
    cfg = cfg.resolved(manifest)
    trt = trt or api.import_tensorrt()
    api.check_tensorrt_version(trt)
    cudart = cudart or api.import_cudart()
    device = api.device_info(cudart)
    memory = build_memory(folder, manifest, cfg, cudart)
    if cfg.memory_check:
        memory.check(folder)  # before anything is parsed or written
    remove_stale(folder)  # engine and cache temporaries of a build that was killed
    version = api.trt_version(trt)
    logger = api.logger(trt)
    cache = TimingCache(Path(cfg.timing_cache) if cfg.timing_cache else
                        folder / timing_cache_file(version, device.compute_capability), log)
    log(f"TensorRT {version} on {device.name} (sm_{device.compute_capability}, {gb(memory.free)} free of "
        f"{gb(memory.total)}); timing cache {'reused from' if cache.reused else 'new at'} {cache.path}")
    refittable = frozenset(refittable_graphs(manifest)) if cfg.refittable else frozenset()
    runtime = trt.Runtime(logger)  # to read each new engine's device memory
    built: dict[str, BuiltEngine] = {}
    pending: dict[str, Path] = {}  # component -> temporary engine file
    moved: list[Path] = []  # engines renamed into place, not yet installed by the manifest
    old = manifest.tensorrt
    try:
        for name, component in manifest.components.items():
            t0 = time.perf_counter()
            shapes = profile_shapes(component, cfg, manifest.model)
            workspace = memory.workspace_for(name, api.memory_info(cudart)[0])
            log(f"  {name}: building ({'static' if cfg.static else 'dynamic'} profile, {gb(memory.weights[name])} of "
                f"weights, workspace {gb(workspace)}) ...")
            tmp = pending[name] = temp_path(folder / f"{name}.plan")
            workspace, device_memory = _build_one(trt, logger, runtime, folder / component.file, shapes, workspace,
                                                  cfg.opt_level, name in refittable, cache, tmp)
            digest = sha256_file(tmp)
            final = engine_file(name, version, device.compute_capability, digest)
            built[name] = BuiltEngine(file=final, sha256=digest, size_bytes=tmp.stat().st_size,
                                      profile=shapes, build_seconds=round(time.perf_counter() - t0, 1),
                                      workspace_bytes=workspace, device_memory_bytes=device_memory)
            log(f"  {name}: {final} ({built[name].size_bytes / 1e6:.1f} MB serialized, {device_memory / 1e6:.1f} MB of "
                f"device memory at the profile's largest shapes) in {time.perf_counter() - t0:.1f}s")
        record = TensorRTBuild(version=version, gpu=device.name, compute_capability=device.compute_capability,
                               engines=built, timing_cache=_in_folder(cache.path, folder), opt_level=cfg.opt_level,
                               workspace_gb=cfg.workspace_gb, static=cfg.static is not None,
                               refittable=cfg.refittable, gpu_free_bytes=memory.free)
        if cfg.verify:
            record = _verify(folder, replace(manifest, tensorrt=record), {n: p.name for n, p in pending.items()},
                             trt, cudart, log)
        else:
            log("  verification skipped (--no-verify): nothing shows these engines compute what the ONNX does")
        for name in list(pending):  # new names: the installed manifest's files are untouched
            os.replace(pending.pop(name), folder / built[name].file)
            moved.append(folder / built[name].file)
        manifest = replace(manifest, tensorrt=record)
        manifest.save(folder)  # the switch: before it the old engines are installed, after it the new ones
        moved.clear()
    finally:  # an error or an interrupt: remove what is not installed
        for tmp in pending.values():
            tmp.unlink(missing_ok=True)
        keep = {e.file for e in old.engines.values()} if old is not None else set()
        for path in moved:
            if path.name not in keep:
                path.unlink(missing_ok=True)
    if old is not None:  # engines of an earlier build are stale now
        for stale in {e.file for e in old.engines.values()} - {e.file for e in record.engines.values()}:
            (folder / stale).unlink(missing_ok=True)
    return manifest


def _build_one(trt, logger, runtime, onnx: Path, shapes: dict, workspace: int, opt_level: int, refit: bool,
               cache: TimingCache, out: Path) -> tuple[int, int]:
    """Build one graph into ``out``; returns (the builder's workspace limit, the engine's device memory at the
    profile's largest shapes), both in bytes. The builder, network and parser are gone when it returns, so the next
    graph's build does not share the GPU with them; the engine is deserialized once, after them, only to read its
    device memory (``device_memory_size_v2``)."""
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):  # reads the file (and its external data) itself
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx.name}: {errors or 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    config.builder_optimization_level = opt_level
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    opt_profile = builder.create_optimization_profile()
    for input_name, (lo, opt, hi) in shapes.items():
        opt_profile.set_shape(input_name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache.attach(config)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT failed to build {onnx.name} (see the TensorRT log above; out of GPU memory "
                         "shows there: a smaller --workspace or --size MAX needs less)")
    workspace = int(config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE))
    with open(out, "wb") as fh:
        fh.write(memoryview(plan))
    cache.save(config)
    del parser, network, builder, config
    cuda_engine = runtime.deserialize_cuda_engine(plan)
    if cuda_engine is None:
        raise BuildError(f"TensorRT cannot load the engine it has just built from {onnx.name} (see the TensorRT log "
                         "above)")
    device_memory = int(cuda_engine.device_memory_size_v2)
    del cuda_engine, plan
    return workspace, device_memory


def _in_folder(path: Path, folder: Path) -> str:
    """The timing cache as the manifest records it: its name in the folder, or "" for one kept elsewhere
    (``--timing-cache``): a manifest names no file outside its folder."""
    return path.name if path.resolve().parent == folder.resolve() else ""


def _verify(folder: Path, manifest: Manifest, files: dict[str, str], trt, cudart, log) -> TensorRTBuild:
    """Run both checks of ``verify`` on the not-yet-installed engines; raise if either fails."""
    from sdtrt.parity import format_table
    from sdtrt.runtime.tensorrt.backend import load_trt_engines
    from sdtrt.runtime.tensorrt.verify import end_to_end, reference_backend, verify_engines

    log(f"  verifying each engine against ONNX Runtime ({reference_backend()}) on the same ONNX ...")
    engines = load_trt_engines(folder, manifest, trt, cudart, files=files)
    try:
        by_name = {**engines, "sampler_update": engines["unet"].device_loop.update}
        results = verify_engines(folder, manifest, by_name, log)
        rows = [(name, manifest.components[name].precision, r) for name, rs in results.items() for r in rs]
        log(format_table(rows))
        failed = [(name, r) for name, r in ((n, r) for n, rs in results.items() for r in rs) if not r.passed]
        if failed:
            name, worst = max(failed, key=lambda f: f[1].max_rel_error)
            raise BuildError(f"the {name} engine does not match ONNX Runtime at {worst.shape}: max relative error "
                             f"{worst.max_rel_error:.3g} > {worst.tolerance:g}; engines not installed (this is a "
                             "TensorRT or driver problem worth reporting; --no-verify installs them anyway)")
        e2e = end_to_end(folder, manifest, engines, log=log)
    finally:
        engines.close()
    log(f"  end to end: {e2e.batch}x {e2e.width}x{e2e.height}, {e2e.steps} {e2e.sampler} steps, TensorRT device loop "
        f"vs {e2e.reference}: PSNR {e2e.psnr_db:.1f} dB (need {e2e.min_psnr_db:.0f})")
    if not e2e.passed:
        raise BuildError(f"a generation on the new engines differs from ONNX Runtime (PSNR {e2e.psnr_db:.1f} dB < "
                         f"{e2e.min_psnr_db:.0f}); engines not installed (--no-verify installs them anyway)")
    return replace(manifest.tensorrt, verification=results, end_to_end=e2e)
