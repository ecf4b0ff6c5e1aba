"""``sdtrt export``: model -> engine folder (ONNX graphs, tokenizer, scheduler config, manifest.json).

The folder is assembled in a temporary sibling and renamed into place only after every graph has
passed the parity gate, so an interrupted or failed export never leaves a half-written folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sdtrt.errors import OutputExistsError, UsageError, ValidationError
from sdtrt.fsutil import remove_stale, temp_path
from sdtrt.export.architectures import BUILTIN_ARCHITECTURES
from sdtrt.manifest import Component, Manifest, ModelInfo, Ranges, sha256_file

COMPONENTS = ("text_encoder", "unet", "vae_decoder")


@dataclass(frozen=True)
class ExportConfig:
    model: str
    out: str
    precision: str = "fp16"
    batch_min: int = 1
    batch_max: int = 4
    size_min: int = 256
    size_max: int = 1024
    opset: int = 17
    force: bool = False
    allow_pickle: bool = False
    seed: int = 0  # weights of built-in architectures
    max_chunks: int = 3  # prompts up to 75 x max_chunks tokens (A1111's 75-token chunks, concatenated)

    def check(self) -> None:
        if self.precision not in ("fp16", "fp32"):
            raise UsageError(f"precision must be fp16 or fp32, not {self.precision!r}")
        if self.batch_min < 1:
            raise UsageError(f"batch must be at least 1, got {self.batch_min}")
        if self.batch_min > self.batch_max:
            raise UsageError(f"batch range {self.batch_min}:{self.batch_max} has MIN > MAX")
        for v in (self.size_min, self.size_max):
            if v < 64 or v % 8:
                raise UsageError(f"image size {v} must be a multiple of 8 and at least 64")
        if self.size_min > self.size_max:
            raise UsageError(f"size range {self.size_min}:{self.size_max} has MIN > MAX")
        if self.opset < 17:
            raise UsageError(f"opset must be >= 17, got {self.opset}")
        if not 1 <= self.max_chunks <= 16:
            raise UsageError(f"--max-chunks must be 1..16 (75 tokens each), got {self.max_chunks}")

    @property
    def ranges(self) -> Ranges:
        return Ranges(self.batch_min, self.batch_max, self.size_min, self.size_max)


def default_cases(component: str, ranges: Ranges, max_chunks: int = 1):
    """Two shapes per graph: the smallest, and an odd batch with a non-square size (and, for the U-Net, a prompt
    of several 77-token chunks)."""
    from sdtrt.export.validate import ValidationCase

    b2 = min(ranges.batch_max, max(ranges.batch_min, 3))
    w2 = min(ranges.size_max, ranges.size_min + 64)
    small = ValidationCase(ranges.batch_min, ranges.size_min, ranges.size_min)
    other = ValidationCase(b2, ranges.size_min, w2)
    if component == "unet":
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


def _prepare_out(out: Path, force: bool) -> Path:
    remove_stale(out.parent, out.name)  # what an export killed before it could clean up left behind
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} is a file, not a folder (--force replaces folders only)")
    if out.exists() and not force:
        raise OutputExistsError(f"output folder {out} already exists (pass --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as ex:
        raise UsageError(f"cannot create {out.parent}: {ex.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"cannot write to {out.parent}: permission denied")
    tmp = temp_path(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
    except OSError as ex:
        raise UsageError(f"cannot write to {out.parent}: {ex.strerror}") from None
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = temp_path(out, "old")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(config: ExportConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Manifest:
    """Export ``config.model`` into ``config.out``; returns the manifest written there."""
    config.check()
    out = Path(config.out).expanduser()

    from sdtrt.export.loaders import load_model, resolve_source

    resolve_source(config.model, allow_pickle=config.allow_pickle)
    tmp = _prepare_out(out, config.force)
    t0 = time.perf_counter()
    try:
        log(f"loading {config.model} ...")
        model = load_model(config.model, allow_pickle=config.allow_pickle, seed=config.seed)
        log(f"  loaded in {time.perf_counter() - t0:.1f}s")
        manifest = _export_into(model, config, tmp, log)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return manifest


def _export_into(model, config: ExportConfig, folder: Path, log) -> Manifest:
    import numpy as np

    from sdtrt.export import onnx_tools
    from sdtrt.export.graphs import CLIP_SKIPS, graph_specs, vae_scale_factor
    from sdtrt.export.memory_probe import memory_model
    from sdtrt.export.validate import format_table, validate_graph

    specs = graph_specs(model)
    vae_scale = vae_scale_factor(model)
    for v in (config.size_min, config.size_max):
        if v % vae_scale:
            raise UsageError(f"image size {v} must be a multiple of this model's VAE factor {vae_scale}")
    ranges = config.ranges
    model.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2) + "\n")
    work = folder / "_work"
    work.mkdir()

    # Trace at a latent size that does not divide the U-Net's downsampling factor (see trace_to_onnx),
    # with batch 2 so no batch axis is specialised to 1.
    trace_h, trace_w = 17 * vae_scale, 19 * vae_scale
    components: dict[str, Component] = {}
    table = []
    total = len(COMPONENTS) + 1
    seq, chunks = int(model.tokenizer.model_max_length), config.max_chunks
    memory = {name: memory_model(specs[name], vae_scale) for name in COMPONENTS}
    for name in COMPONENTS:  # before any slow work: every gate case must fit in memory
        _check_gate_memory(name, specs[name], default_cases(name, ranges, chunks),
                           *specs[name].tensor_specs(ranges, vae_scale, config.precision, seq, chunks), memory[name])
    for step, name in enumerate(COMPONENTS, start=1):
        spec = specs[name]
        prefix = f"[{step}/{total}] {name}:"
        t = time.perf_counter()
        inputs, outputs = spec.tensor_specs(ranges, vae_scale, config.precision, seq, chunks)
        cases = default_cases(name, ranges, chunks)
        log(f"{prefix} tracing to ONNX (opset {config.opset}) ...")
        # two chunks: no text-length axis can be specialised to 77
        sample = spec.make_inputs(2, trace_h, trace_w, np.random.default_rng(0), {"chunks": 2})
        traced = work / f"{name}.onnx"
        onnx_tools.trace_to_onnx(spec, sample, traced, config.opset)
        inferred = work / f"{name}.shapes.onnx"
        onnx_tools.infer_shapes(traced, inferred)
        final = folder / f"{name}.onnx"
        islands: list[str] = []
        if config.precision == "fp16":
            log(f"{prefix} converting to fp16 ...")
            external, islands = onnx_tools.convert_to_fp16(inferred, final, spec)
        else:
            import onnx

            external = onnx_tools.save_model(onnx.load(str(inferred), load_external_data=True), final)
        for f in work.iterdir():  # free disk before the next component
            f.unlink()
        log(f"{prefix} validating against PyTorch in ONNX Runtime ...")
        results = validate_graph(spec, final, cases, config.precision)
        table += [(name, "fp32" if spec.fp32_all or config.precision == "fp32" else "fp16", r) for r in results]
        failed = [r for r in results if not r.passed]
        if failed:
            log(format_table(table))
            worst = max(failed, key=lambda r: r.max_rel_error)
            raise ValidationError(
                f"{name} ({config.precision}) does not match PyTorch at {worst.shape}: "
                f"max relative error {worst.max_rel_error:.3g} > {worst.tolerance:g}"
            )
        actual = onnx_tools.io_types(final)
        for t_spec in inputs + outputs:  # the manifest must describe the file, not our intent
            if actual[t_spec.name] != t_spec.dtype:
                raise ValidationError(f"{name}: {t_spec.name} is {actual[t_spec.name]} in the graph, expected {t_spec.dtype}")
        components[name] = Component(
            file=final.name, sha256=sha256_file(final), memory=memory[name],
            size_bytes=final.stat().st_size + sum((folder / e).stat().st_size for e in external),
            precision="fp32" if spec.fp32_all or config.precision == "fp32" else "fp16",
            inputs=inputs, outputs=outputs, external_data=tuple(external),
            external_sha256={e: sha256_file(folder / e) for e in external}, fp32_islands=tuple(islands),
            validation=results,
            notes=_notes(name),
        )
        log(f"{prefix} done in {time.perf_counter() - t:.1f}s")
    work.rmdir()
    components["sampler_update"] = _export_update_graph(model, config, folder, components["unet"], vae_scale, total, table, log)
    log(format_table(table))

    te = model.text_encoder.config
    manifest = Manifest(
        model=ModelInfo(
            family=model.family, source=model.source, prediction_type=model.prediction_type,
            latent_channels=int(model.vae.config.latent_channels), vae_scale_factor=vae_scale,
            vae_scaling_factor=float(model.vae.config.scaling_factor), text_hidden_size=int(te.hidden_size),
            max_text_length=int(model.tokenizer.model_max_length), vocab_size=int(te.vocab_size),
            default_size=int(model.unet.config.sample_size) * vae_scale, max_chunks=config.max_chunks,
            clip_skips=CLIP_SKIPS,
            weights_seed=config.seed if model.source in BUILTIN_ARCHITECTURES else None,
        ),
        precision=config.precision, ranges=ranges, components=components, tools=tool_versions(),
    )
    manifest.save(folder)
    return manifest


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
    return {
        "unet": "encoder_hidden_states holds [negative; positive] (2B rows) for classifier-free guidance, "
                "or only the positive prompt (B rows) to run without guidance (guidance_scale is then unused)",
        "vae_decoder": "image is in [-1, 1], unclamped: map with clip(x / 2 + 0.5, 0, 1)",
        "text_encoder": "input_ids padded/truncated to the tokenizer's model_max_length",
        "sampler_update": "next_state = sum coefs[j] state_j + sum coefs[4+j] model_output_j + coefs[9] noise, "
                          "coefs = runtime.samplers.coefficient_row(table, i); state_j is the state j steps back",
    }[name]
