"""``sdtrt export``: model -> engine folder (ONNX graphs, tokenizer, scheduler config, manifest.json).

The folder is assembled in a temporary sibling and renamed into place only after every graph has
passed the parity gate, so an interrupted or failed export never leaves a half-written folder.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from sdtrt.errors import ModelSourceError, OutputExistsError, UsageError, ValidationError
from sdtrt.fsutil import folder_lock, only_lock, remove_stale, replace_entries, temp_path
from sdtrt.export.architectures import BUILTIN_ARCHITECTURES
from sdtrt.export.controlnet import BUILTIN_CONTROLNET, parse_spec
from sdtrt.manifest import CONTROLNET_PREFIX, MANIFEST_NAME, owned_entries
from sdtrt.manifest_check import MAX_BATCH, MAX_SIZE
from sdtrt.manifest import AddedConditions, Component, Manifest, ModelInfo, Ranges, TextEncoderInfo, sha256_file
from sdtrt.runtime.prompts import MAX_CHUNKS

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
# torch.onnx.export(dynamo=False), which trace_to_onnx uses, writes opsets up to this one (torch.onnx._constants.
# ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET; tested against torch); above it torch only warns, then fails or writes a graph
# of a lower opset. A constant, so that checking --opset does not import torch.
MAX_OPSET = 20
# Built-in weights are drawn with torch.manual_seed(seed), seed + 1 and seed + 2 (one per component), and torch takes
# seeds up to 2**64 - 1.
MAX_WEIGHT_SEED = 2**64 - 3


@dataclass(frozen=True)
class ExportConfig:
    model: str
    out: str
    precision: str = "fp16"
    batch_min: int = 1
    batch_max: int = 4
    size_min: int = 256
    size_max: int | None = None  # None: the model's (``model_size_max``: 1024 for SD 1.x, 2048 for SDXL)
    opset: int = 17
    force: bool = False
    allow_pickle: bool = False
    seed: int = 0  # weights of built-in architectures
    max_chunks: int = 3  # prompts up to 75 x max_chunks tokens (A1111's 75-token chunks, concatenated)
    controlnets: tuple[str, ...] = ()  # "[NAME=]PATH" of diffusers ControlNetModel folders, or "random"
    loras: tuple[str, ...] = ()  # "FILE[:SCALE]": LoRAs fused into the U-Net and text encoder (export/lora.py)
    config: str | None = None  # single-file checkpoints: the built-in configuration (default: read from the keys)
    prediction_type: str | None = None  # overrides the scheduler config's ("epsilon" or "v_prediction")
    tokenizer: str | None = None  # single-file checkpoints: a tokenizer folder (default: the configuration's)
    memory_check: bool = True  # refuse up front an export this machine's memory cannot hold (--no-memory-check)

    def check(self) -> None:
        if self.precision not in ("fp16", "fp32"):
            raise UsageError(f"precision must be fp16 or fp32, not {self.precision!r}")
        if self.batch_min < 1:
            raise UsageError(f"batch must be at least 1, got {self.batch_min}")
        if self.batch_min > self.batch_max:
            raise UsageError(f"batch range {self.batch_min}:{self.batch_max} has MIN > MAX")
        if self.batch_max > MAX_BATCH:  # what a manifest may say (sdtrt.manifest_check)
            raise UsageError(f"batch must be at most {MAX_BATCH}, got {self.batch_max}")
        for v in (self.size_min, self.size_max or self.size_min):
            if v < 64 or v % 8:
                raise UsageError(f"image size {v} must be a multiple of 8 and at least 64")
            if v > MAX_SIZE:
                raise UsageError(f"image size {v} must be at most {MAX_SIZE}")
        if self.size_max is not None and self.size_min > self.size_max:
            raise UsageError(f"size range {self.size_min}:{self.size_max} has MIN > MAX")
        if not 17 <= self.opset <= MAX_OPSET:
            raise UsageError(f"--opset must be 17..{MAX_OPSET} (what torch.onnx.export writes), got {self.opset}")
        if not 0 <= self.seed <= MAX_WEIGHT_SEED:
            raise UsageError(f"--seed must be 0..{MAX_WEIGHT_SEED} (the weights of built-in models), got {self.seed}")
        if not self.out.strip():
            raise UsageError("the output folder path is empty")  # Path("") is ".": --force would replace it
        if not 1 <= self.max_chunks <= MAX_CHUNKS:
            raise UsageError(f"--max-chunks must be 1..{MAX_CHUNKS} (75 tokens each), got {self.max_chunks}")
        from sdtrt.export.lora import LoraSpec

        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise UsageError(f"--prediction-type must be epsilon or v_prediction, got {self.prediction_type!r}")
        for text in self.loras:
            LoraSpec.parse(text)
        names = [parse_spec(c)[0] for c in self.controlnets]
        for name in names:
            if names.count(name) > 1:
                raise UsageError(f"two ControlNets named {name!r}: give one NAME=PATH")

    @property
    def ranges(self) -> Ranges:
        if self.size_max is None:
            raise AssertionError("ExportConfig.ranges before the model's size range is known (model_size_max)")
        return Ranges(self.batch_min, self.batch_max, self.size_min, self.size_max)


def unet_pixels(sample_size, vae_scale: int, pick=max) -> int:
    """The U-Net's ``sample_size`` in pixels, 0 where it gives none; ``pick`` takes one side of a (height, width)
    pair."""
    if isinstance(sample_size, (list, tuple)) and sample_size:
        sample_size = pick(sample_size)
    return sample_size * vae_scale if isinstance(sample_size, int) and not isinstance(sample_size, bool) else 0


def model_size_max(sample_size, vae_scale: int, size_min: int) -> int:
    """The largest image side an export validates when ``--size`` gives none: twice the model's own size and at
    least 1024 (SD 1.x 512 -> 1024, as before; SDXL 1024 -> 2048, so that its portrait and landscape buckets such as
    832x1216 or 640x1536 run), on a multiple of 8 and of the VAE factor, within the manifest's limit."""
    step = math.lcm(8, vae_scale)
    own = unet_pixels(sample_size, vae_scale)
    return max(min(max(1024, 2 * own), MAX_SIZE) // step * step, size_min)


def default_cases(component: str, ranges: Ranges, max_chunks: int = 1):
    """Two shapes per graph: the smallest, and an odd batch with a non-square size (and, for the U-Net, a prompt
    of several 77-token chunks)."""
    from sdtrt.export.validate import ValidationCase

    b2 = min(ranges.batch_max, max(ranges.batch_min, 3))
    w2 = min(ranges.size_max, ranges.size_min + 64)
    small = ValidationCase(ranges.batch_min, ranges.size_min, ranges.size_min)
    other = ValidationCase(b2, ranges.size_min, w2)
    if component == "unet" or component.startswith(CONTROLNET_PREFIX):
        # Both ways the graph runs: without guidance (B embeddings) and with it (2B embeddings).
        small = ValidationCase(small.batch, small.height, small.width, {"cfg": False, "timestep": 1.0})
        other = ValidationCase(other.batch, other.height, other.width,
                               {"cfg": True, "timestep": 981.0, **({"chunks": 2} if max_chunks > 1 else {})})
    return [small, other]


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0]}
    for dist in ("sdtrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that cannot be an engine folder, before it is made (and locked)."""
    parent = out.parent
    if not parent.is_dir():  # as generate's -o: a mistyped path is not silently created
        what = "is a file, not a folder" if parent.exists() else "does not exist (create it first)"
        raise UsageError(f"cannot create {out}: {'' if parent.exists() else 'folder '}{parent} {what}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} is a file, not a folder (--force replaces folders only)")


def _prepare_out(out: Path, force: bool) -> Path:
    """Check ``out`` (which the export made, or found, and holds the lock of) can be written (replaced, with
    ``force``) and make the temporary folder the export fills. An empty ``out`` is as good as a new one."""
    parent = out.parent
    remove_stale(parent, out.name)  # what an export killed before it could clean up left behind
    owned = owned_entries(out)
    if not only_lock(out) and not force:
        what = "an sdtrt engine folder" if owned is not None else "a folder that is not an sdtrt engine folder"
        raise OutputExistsError(f"output folder {out} already exists ({what}); pass --force to replace sdtrt's files in "
                                "it (files of yours there are kept)")
    if owned is None:  # --force into a folder of other files: never over one of them
        _refuse_foreign(out, [e.name for e in out.iterdir() if e.name in (MANIFEST_NAME, "tokenizer", "scheduler")
                              or e.name.endswith((".onnx", ".onnx.data"))])
    tmp = temp_path(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:  # not os.access: it says "permission denied" for a read-only filesystem, which mkdir names
        tmp.mkdir()
    except OSError as ex:
        raise UsageError(f"cannot write to {parent}: {ex.strerror}") from None
    return tmp


def _check_not_source(out: Path, source: Path) -> None:
    """Refuse an --out that is the model folder, inside it or holds it: --force would delete the model."""
    out, source = out.resolve(), source.resolve()
    if out == source or source in out.parents or out in source.parents:
        where = "is" if out == source else "is inside" if source in out.parents else "contains"
        raise UsageError(f"--out {out} {where} the model folder {source}: the export would overwrite its own source; "
                         "choose an --out outside it")


def _commit(tmp: Path, out: Path) -> None:
    """Put the export in place. Into an existing folder (``--force``), only sdtrt's files are replaced: what its old
    manifest lists (graphs, engines, tokenizer, scheduler) and the names the new export writes; every other file of
    the folder stays (a user's images, notes, subfolders), and a file of the user's under a name the export writes is
    refused, not replaced."""
    owned = owned_entries(out) or set()
    _refuse_foreign(out, sorted(e.name for e in tmp.iterdir() if e.name not in owned and os.path.lexists(out / e.name)))
    replace_entries(tmp, out, owned, last=MANIFEST_NAME)


def _refuse_foreign(out: Path, names: list[str]) -> None:
    """``--force`` replaces sdtrt's files only: names the export writes that are there but no sdtrt manifest lists
    are the user's, and are never replaced."""
    if names:
        raise OutputExistsError(f"{out} holds {', '.join(names)}, which the export would write but no sdtrt manifest "
                                "there lists: --force replaces only sdtrt's own files; move them away or choose "
                                "another --out")


def export(config: ExportConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Manifest:
    """Export ``config.model`` into ``config.out``; returns the manifest written there."""
    config.check()
    out = Path(config.out).expanduser()
    if out.name in ("", "..", "."):  # "." or "x/..": name the folder itself, whose siblings hold the temporaries
        out = out.resolve()

    from sdtrt.export.loaders import load_model, resolve_source

    source = resolve_source(config.model, allow_pickle=config.allow_pickle)
    if isinstance(source, Path):
        _check_not_source(out, source)
    _preflight(config, source)
    _check_out(out)
    # one writer per folder: a second export (or build, export-controlnet) into it waits here, then finds this one's
    # result (refused without --force); a new folder is made now, to hold the lock, and removed again on failure
    with folder_lock(out, "sdtrt export", log, create=True):
        if config.memory_check:  # before anything is loaded or written; after a writer before us freed its memory
            from sdtrt.export.memory_probe import check_export_memory

            check_export_memory(source, config.model, bool(config.loras),
                                tuple(parse_spec(c)[1] for c in config.controlnets))
        tmp = _prepare_out(out, config.force)
        t0 = time.perf_counter()
        try:
            log(f"loading {config.model} ...")
            # not load_model's cached copy: the export converts the modules to fp16 and frees them as it goes
            model = load_model.__wrapped__(config.model, allow_pickle=config.allow_pickle, seed=config.seed,
                                           config=config.config, prediction_type=config.prediction_type,
                                           tokenizer=config.tokenizer)
            log(f"  loaded in {time.perf_counter() - t0:.1f}s")
            _check_scheduler(model.scheduler_config, config.model, log)
            if config.loras:
                from sdtrt.export.lora import LoraSpec, fuse_loras, strongest_change

                base = model
                model = fuse_loras(model, [LoraSpec.parse(t) for t in config.loras], config.allow_pickle, log)
                # what a failed gate reports of the LoRAs' strength, measured now: the unfused weights go here
                changes = {part: strongest_change(base, model, (part,)) for part in ("unet", *(c for c, _, _ in
                                                                                             model.encoders))}
                del base
            from sdtrt.export.controlnet_export import load_controlnet

            controlnets = {name: load_controlnet(source, model, config, log, index)
                           for index, (name, source) in enumerate(map(parse_spec, config.controlnets))}
            try:
                manifest = _export_into(model, config, tmp, log, controlnets)
            except ValidationError as ex:
                if not config.loras:
                    raise
                failed = str(ex).split(" ", 1)[0]  # the gate's message starts with the graph's name
                ratio, layer = changes[failed] if failed in changes else max(changes.values())
                raise ValidationError(
                    f"{ex}; the graphs carry the fused LoRAs ({', '.join(config.loras)}), which change {layer}'s "
                    f"weights by {ratio:.3g}x their own size: a LoRA that strong (or at that scale) takes the model "
                    "where its numbers no longer agree; lower the scale (FILE:SCALE), or export with --precision "
                    "fp32 if the gate failed in fp16") from None
            _commit(tmp, out)
        except BaseException as ex:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(ex, OSError) and ex.filename is None and ex.errno in (errno.ENOSPC, errno.EDQUOT,
                                                                                errno.EFBIG):
                ex.filename = str(out.parent)  # which disk filled up (the ONNX writers do not say)
            raise
    log(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return manifest


def _preflight(config: ExportConfig, source) -> None:
    """Everything about the inputs that can be refused without loading the model (which takes seconds to minutes):
    option combinations, the LoRA files, the ControlNet folders (issue 22)."""
    from sdtrt.export.controlnet import check_controlnet_folder, check_family, read_config
    from sdtrt.export.lora import LoraSpec, check_lora_file

    if (config.config or config.tokenizer) and not (isinstance(source, Path) and source.is_file()):
        raise UsageError("--config and --tokenizer are for single-file checkpoints (.safetensors)")
    for text in config.loras:
        check_lora_file(LoraSpec.parse(text), config.allow_pickle)
    for _, cn in map(parse_spec, config.controlnets):
        if cn != BUILTIN_CONTROLNET:
            path = Path(cn).expanduser()
            check_controlnet_folder(path, config.allow_pickle)
            if not isinstance(source, Path) or (source / "model_index.json").is_file():
                # the family from the configs alone, before the model loads (SDXL's takes minutes); a single-file
                # checkpoint's family is known once loaded (check_compatible)
                check_family(read_config(path), str(path), _is_sdxl(source))


def _is_sdxl(source) -> bool:
    """A built-in with SDXL's added conditioning, or a diffusers folder of an SDXL pipeline (without loading it)."""
    if not isinstance(source, Path):
        return "text_time" == source.unet.get("addition_embed_type")
    try:  # the U-Net's own config, as diffusers decides (addition_embed_type), not the pipeline's class name
        config = json.loads((source / "unet" / "config.json").read_text(encoding="utf-8")) if source.is_dir() else {}
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("addition_embed_type") == "text_time"


def _check_scheduler(scheduler_config: dict, source: str, log) -> None:
    """Refuse, before any tracing, a scheduler config that no sampler of the runtime can run (it would refuse every
    generation); warn when only the model's own sampler cannot, since ``--scheduler`` picks another."""
    from sdtrt.runtime.samplers import SAMPLERS, SamplerConfig, SamplerError

    try:
        SamplerConfig.from_scheduler_config(scheduler_config)
        return
    except SamplerError as ex:
        own = ex
    usable = []
    for name in SAMPLERS:
        try:
            SamplerConfig.from_scheduler_config(scheduler_config, name)
            usable.append(name)
        except SamplerError:
            pass
    if not usable:
        raise ModelSourceError(f"cannot export {source}: no sampler of sdtrt can run its scheduler config ({own})")
    log(f"warning: the model's own sampler cannot run on this runtime ({own}); generate with --scheduler "
        f"{' / '.join(usable)}")


def default_size(sample_size, vae_scale: int, ranges: Ranges, log) -> int:
    """The manifest's default image size (pixels): diffusers' (the U-Net's sample_size times the VAE factor; the
    height of a (height, width) sample_size), clamped into the exported range on a multiple of 8 and of the VAE
    factor, so that a generation without --size runs. ``log`` says when it is not the U-Net's own."""
    step = math.lcm(8, vae_scale)  # size_min and size_max are multiples of both (checked)
    own = unet_pixels(sample_size, vae_scale, pick=lambda hw: hw[0])
    size = max(min(max(own, ranges.size_min), ranges.size_max) // step * step, ranges.size_min)
    if size != own:
        log(f"default size {size}x{size}: the U-Net's sample_size {sample_size!r} x VAE factor {vae_scale} "
            f"({f'{own} px' if own else 'no size'}) is not a multiple of {step} within the exported range "
            f"{ranges.size_min}..{ranges.size_max}")
    return size


def _export_into(model, config: ExportConfig, folder: Path, log, controlnets: dict | None = None) -> Manifest:
    from sdtrt.export.graphs import (CLIP_SKIPS, EMBEDDING_SLOTS, added_inputs, added_time_ids, controlnet_spec,
                                     encoder_layout, graph_specs, vae_scale_factor)
    from sdtrt.export.memory_probe import probe
    from sdtrt.export.validate import format_table

    specs = graph_specs(model)
    vae_scale = vae_scale_factor(model)
    sources = {}
    for name, (controlnet, source) in (controlnets or {}).items():
        specs[CONTROLNET_PREFIX + name] = controlnet_spec(controlnet, int(model.vae.config.latent_channels),
                                                          int(model.unet.config.cross_attention_dim),
                                                          int(model.tokenizer.model_max_length), vae_scale,
                                                          added_inputs(model))
        sources[CONTROLNET_PREFIX + name] = source
    encoders = [c for c, _, _ in model.encoders]
    names = (*encoders, *COMPONENTS[1:], *sources)
    if config.size_max is None:
        config = replace(config, size_max=model_size_max(model.unet.config.sample_size, vae_scale, config.size_min))
    for v in (config.size_min, config.size_max):
        if v % vae_scale:
            raise UsageError(f"image size {v} must be a multiple of this model's VAE factor {vae_scale}")
    ranges = config.ranges
    for component, _, tokenizer in model.encoders:
        tokenizer.save_pretrained(folder / component.replace("text_encoder", "tokenizer"))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2) + "\n")
    work = folder / "_work"
    work.mkdir()

    components: dict[str, Component] = {}
    table = []
    total = len(names) + 1
    seq, chunks = int(model.tokenizer.model_max_length), config.max_chunks
    probes = {name: probe(specs[name], vae_scale) for name in names}  # memory and FLOP models, one pair of runs
    memory = {name: m for name, (m, _) in probes.items()}
    for name in names if config.memory_check else ():  # before any slow work: every gate case must fit in memory
        _check_gate_memory(name, specs[name], default_cases(name, ranges, chunks),
                           *specs[name].tensor_specs(ranges, vae_scale, config.precision, seq, chunks), memory[name])
    from sdtrt.export.low_memory import gate_references_due, parameter_ids, release_weights_of

    release_weights_of(model, specs)
    references: dict = {}
    for step, name in enumerate(names, start=1):
        later = list(names[step:])
        log(f"[{step}/{total}] {name}: PyTorch FP32 outputs for the parity gate ...")
        ref = gate_references_due(name, later, specs, references, ranges, vae_scale, config.precision, seq, chunks)
        components[name] = _export_graph(name, specs[name], folder, work, config.precision, config.opset, ranges,
                                         vae_scale, seq, chunks, memory[name], sources.get(name, ""), table,
                                         f"[{step}/{total}] {name}:", log,
                                         lora_maps=name in ("unet", *encoders),  # every encoder's too (SDXL)
                                         references=ref, keep=parameter_ids(*(specs[n].module for n in later)),
                                         flops=probes[name][1])
    work.rmdir()
    components["sampler_update"] = _export_update_graph(model, config, folder, components["unet"], vae_scale, total, table, log)
    log(format_table(table))

    te = model.text_encoder.config
    layout = encoder_layout(model)
    pooled_width = int(model.encoders[-1][1].config.projection_dim) if model.added_conditioning else 0
    time_ids = added_time_ids(model.unet.config, pooled_width)
    manifest = Manifest(
        model=ModelInfo(
            family=model.family, source=model.source, prediction_type=model.prediction_type,
            latent_channels=int(model.vae.config.latent_channels), vae_scale_factor=vae_scale,
            vae_scaling_factor=float(model.vae.config.scaling_factor),
            text_hidden_size=sum(e["hidden_size"] for e in layout),
            max_text_length=int(model.tokenizer.model_max_length), vocab_size=int(te.vocab_size),
            default_size=default_size(model.unet.config.sample_size, vae_scale, ranges, log),
            max_chunks=config.max_chunks,
            clip_skips=CLIP_SKIPS, loras=_lora_records(config.loras),
            embedding_slots=EMBEDDING_SLOTS,
            weights_seed=config.seed if model.source in BUILTIN_ARCHITECTURES else None,
            # the family as data: SD 1.x/2.x's one encoder is the default (no entries)
            text_encoders=tuple(TextEncoderInfo(**e) for e in layout) if model.added_conditioning else (),
            added_conditions=AddedConditions(time_ids=time_ids) if time_ids else None,
            force_zeros_for_empty_prompt=bool(model.added_conditioning and model.pipeline_config.get(
                "force_zeros_for_empty_prompt", True)),
        ),
        precision=config.precision, ranges=ranges, components=components, tools=tool_versions(),
    )
    manifest.save(folder)
    return manifest



def _export_graph(name: str, spec, folder: Path, work: Path, precision: str, opset: int, ranges: Ranges, vae_scale: int,
                  seq: int, chunks: int, memory, source: str, table: list, prefix: str, log,
                  lora_maps: bool = False, references=None, keep: frozenset = frozenset(), flops=None) -> Component:
    """Trace one graph to ``folder/NAME.onnx`` (fp16 with its FP32 islands, or fp32), run its parity gate, and
    describe it: its manifest entry. ``lora_maps``: record where its weights are (``Component.weights``), for LoRAs and
    embeddings at generation time (the U-Net and every text encoder).

    The weights are held once (``low_memory``): the gate's FP32 ``references`` first (computed here unless given),
    then an fp16 graph's module goes fp16 in place and is traced so; its weights (but ``keep``'s, which a later graph
    uses) are freed before the ONNX files are read and ONNX Runtime loads the graph."""
    import numpy as np

    from sdtrt.export import onnx_tools
    from sdtrt.export.low_memory import release_weights
    from sdtrt.export.validate import format_table, gate_references, ort_session, validate_graph

    t = time.perf_counter()
    inputs, outputs = spec.tensor_specs(ranges, vae_scale, precision, seq, chunks)
    cases = default_cases(name, ranges, chunks)
    fp16_inputs = {s.name for s in inputs if s.dtype == "float16"}
    if references is None:
        references = gate_references(spec, cases, fp16_inputs)
    half = precision == "fp16" and not spec.fp32_all
    if half:
        spec.module.half()  # in place: the FP32 weights go as each tensor is converted
    log(f"{prefix} tracing to ONNX (opset {opset}{', fp16' if half else ''}) ...")
    # Trace at a latent size that does not divide the U-Net's downsampling factor (see trace_to_onnx), with batch 2
    # so no batch axis is specialised to 1, and two chunks: no text-length axis can be specialised to 77.
    sample = spec.make_inputs(2, 17 * vae_scale, 19 * vae_scale, np.random.default_rng(0), {"chunks": 2})
    if half:  # the graph's fp16 inputs; timestep (kept FP32) feeds the time embedding in FP32, as in the graph
        sample = {n: v.astype(np.float16) if n in fp16_inputs else v for n, v in sample.items()}
    traced = work / f"{name}.onnx"
    onnx_tools.trace_to_onnx(spec, sample, traced, opset)
    # LoRAs update these graphs' weights at generation time: weights kept external
    lora = ("unet" if name == "unet" else "text_encoder") if lora_maps else None  # the graph module's own prefix
    digests = None
    if lora is not None:
        from sdtrt.export.weight_map import weight_digests

        digests = weight_digests(spec.module, lora, "float16" if half else "float32")
    release_weights(spec.module, keep)
    inferred = work / f"{name}.shapes.onnx"
    onnx_tools.infer_shapes(traced, inferred)
    final = folder / f"{name}.onnx"
    islands: list[str] = []
    if precision == "fp16":
        log(f"{prefix} converting to fp16 ...")
        external, islands = onnx_tools.convert_to_fp16(inferred, final, spec, external=lora is not None)
    else:
        import onnx

        external = onnx_tools.save_model(onnx.load(str(inferred), load_external_data=False), final,
                                         external=lora is not None, base_dir=work)
    for f in work.iterdir():  # free disk before the next component
        f.unlink()
    actual = onnx_tools.io_types(final)
    for t_spec in inputs + outputs:  # the manifest must describe the file, not our intent
        if actual[t_spec.name] != t_spec.dtype:
            raise ValidationError(f"{name}: {t_spec.name} is {actual[t_spec.name]} in the graph, expected {t_spec.dtype}")
    log(f"{prefix} validating against PyTorch in ONNX Runtime ...")
    results = validate_graph(spec, final, cases, precision, ort_session(final, optimize=False), references)
    table += [(name, "fp32" if spec.fp32_all or precision == "fp32" else "fp16", r) for r in results]
    failed = [r for r in results if not r.passed]
    if failed:
        log(format_table(table))
        worst = max(failed, key=lambda r: r.max_rel_error)
        raise ValidationError(
            f"{name} ({precision}) does not match PyTorch at {worst.shape}: "
            f"max relative error {worst.max_rel_error:.3g} > {worst.tolerance:g}"
        )
    weights = {}
    if digests is not None:
        from sdtrt.export.weight_map import locate_weights

        weights = {k.removeprefix("text_model."): v for k, v in locate_weights(digests, final).items()}
    log(f"{prefix} done in {time.perf_counter() - t:.1f}s")
    return Component(
        file=final.name, sha256=sha256_file(final), memory=memory, flops=flops,
        size_bytes=final.stat().st_size + sum((folder / e).stat().st_size for e in external),
        precision="fp32" if spec.fp32_all or precision == "fp32" else "fp16",
        inputs=inputs, outputs=outputs, external_data=tuple(external),
        external_sha256={e: sha256_file(folder / e) for e in external}, fp32_islands=tuple(islands),
        validation=results, notes=_notes(name), source=source, weights=weights,
    )


def _lora_records(specs) -> tuple[str, ...]:
    """What the manifest says of each fused LoRA: "name:scale:sha256 (first 12)" (A1111's "Lora hashes" use it)."""
    from sdtrt.export.lora import LoraSpec

    out = []
    for text in specs:
        spec = LoraSpec.parse(text)
        out.append(f"{spec.name}:{spec.scale:g}:{sha256_file(Path(spec.path).expanduser())[:12]}")
    return tuple(out)


def _check_gate_memory(name: str, spec, cases, inputs, outputs, memory) -> None:
    """Refuse, before tracing, a parity-gate case that cannot fit in this machine's memory."""
    from sdtrt.export.validate import case_inputs
    from sdtrt.memory import available_bytes, gb, peak_bytes

    avail = available_bytes()
    if avail is None:
        return
    probe = Component(file="", sha256="", size_bytes=0, precision="fp32", inputs=inputs, outputs=outputs, memory=memory)
    for i, case in enumerate(cases):
        need = peak_bytes(probe, {n: v.shape for n, v in case_inputs(spec, case, i).items()})
        if need > avail:
            raise UsageError(f"the parity gate runs {name} at {case.label()}, which needs about {gb(need)} in ONNX Runtime; "
                             f"{gb(avail)} are available: lower --size MIN or --batch (the gate runs at the range's "
                             "smallest sizes)")


def _export_update_graph(model, config: ExportConfig, folder: Path, unet: Component, vae_scale: int, total: int,
                         table: list, log) -> Component:
    """Write and validate sampler_update.onnx, the per-step linear update as a graph (for device loops)."""
    from sdtrt.export.graphs import tensor_spec
    from sdtrt.export.update_graph import build_update_graph, update_inputs
    from sdtrt.export.validate import format_table, validate_update_graph

    prefix = f"[{total}/{total}] sampler_update:"
    log(f"{prefix} writing and validating the sampler update graph ...")
    latents_dtype, model_dtype = unet.input("latents").dtype, unet.outputs[0].dtype
    path = folder / "sampler_update.onnx"
    channels = int(model.vae.config.latent_channels)
    build_update_graph(path, channels, model_dtype, latents_dtype, config.opset)
    results = validate_update_graph(path, channels, model_dtype,
                                    default_cases("sampler_update", config.ranges), vae_scale)
    table += [("sampler_update", "fp32", r) for r in results]
    if not all(r.passed for r in results):
        log(format_table(table))
        raise ValidationError("sampler_update graph does not match the NumPy sampler update")
    ins, outs = update_inputs(channels)
    resolve = {"MODEL": model_dtype, "LATENTS": latents_dtype}
    spec = lambda n, t, d: tensor_spec(n, resolve.get(t, t), d, config.ranges, vae_scale)  # noqa: E731
    return Component(
        file=path.name, sha256=sha256_file(path), size_bytes=path.stat().st_size, precision="fp32",
        inputs=tuple(spec(*i) for i in ins), outputs=tuple(spec(*o) for o in outs), validation=results,
        notes=_notes("sampler_update"),
    )


def _notes(name: str) -> str:
    if name.startswith(CONTROLNET_PREFIX):
        return ("control_image (B, 3, H, W) in [0, 1]; each residual output is its _in input + conditioning_scale x "
                "this ControlNet's residual (zeros in for the first ControlNet of a step, the previous one's out for the "
                "next); encoder_hidden_states (and SDXL's text_embeds, time_ids) as the U-Net's")
    return {
        "unet": "encoder_hidden_states (and SDXL's text_embeds, time_ids) holds [negative; positive] (2B rows) for classifier-free guidance, "
                "or only the positive prompt (B rows) to run without guidance (guidance_scale is then unused); "
                "down_residual_i / mid_residual: ControlNet residuals added to the skip connections (zeros without)",
        "vae_decoder": "image is in [-1, 1], unclamped: map with clip(x / 2 + 0.5, 0, 1)",
        "vae_encoder": "image in [-1, 1]; a posterior sample is latent_mean + latent_std * N(0, 1) (scaling factor "
                       "folded in)",
        "text_encoder": "input_ids: one 77-token prompt chunk per row (runtime/prompts.py)",
        "text_encoder_2": "input_ids: one 77-token prompt chunk per row; text_embeds: the pooled, projected EOS token",
        "sampler_update": "lin = sum coefs[j] state_j + sum coefs[4+j] model_output_j + coefs[9] noise; next_state = "
                          "mask * lin + (1 - mask) * (coefs[10] image_latents + coefs[11] init_noise); coefs = "
                          "runtime.samplers.coefficient_row(table, i); state_j is the state j steps back",
    }[name]
