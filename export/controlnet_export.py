"""ControlNets into an engine folder: with the model (``sdtrt export --controlnet``: ``load_controlnet``) or into a
folder already exported (``sdtrt export-controlnet``: ``add_controlnet``), each through the same parity gate as the
model's graphs (``exporter._export_graph``)."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

from sdtrt.errors import ManifestError, OutputExistsError, UsageError
from sdtrt.export.architectures import BUILTIN_ARCHITECTURES
from sdtrt.export.controlnet import BUILTIN_CONTROLNET, parse_spec
from sdtrt.export.exporter import ExportConfig, _export_graph, _refuse_foreign
from sdtrt.fsutil import folder_lock, temp_path
from sdtrt.manifest import CONTROLNET_PREFIX, Manifest, owned_entries


def load_controlnet(source: str, model, config: ExportConfig, log, index: int = 0):
    """The ``index``-th ``--controlnet`` (a folder, or the built-in: its weights are seeded with seed + 3 + index, so
    two built-ins differ), checked against the base ``model``."""
    from sdtrt.export.controlnet import builtin_controlnet, check_compatible, load_controlnet_folder
    from sdtrt.export.graphs import added_inputs, vae_scale_factor

    latent, hidden = int(model.vae.config.latent_channels), int(model.unet.config.cross_attention_dim)
    if source == BUILTIN_CONTROLNET:
        seed = config.seed + 3 + index
        log(f"building a random-weight ControlNet shaped like {config.model}'s U-Net (seed {seed}) ...")
        return builtin_controlnet(model.unet, latent, vae_scale_factor(model), seed), f"{BUILTIN_CONTROLNET}:{seed}"
    path = Path(source).expanduser()
    log(f"loading ControlNet {path} ...")
    controlnet = load_controlnet_folder(path, config.allow_pickle)
    check_compatible(controlnet, str(path), unet_levels(model.unet.config), latent, hidden, vae_scale_factor(model),
                     added_inputs(model))
    return controlnet, str(path)


def unet_levels(config) -> list[tuple[int, int]]:
    from sdtrt.export.controlnet import mid_level, residual_levels

    return [*residual_levels(config), mid_level(config)]


def add_controlnet(folder: str | Path, spec: str, allow_pickle: bool = False, force: bool = False, opset: int = 17,
                   log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Manifest:
    """``sdtrt export-controlnet DIR [NAME=]PATH``: export one more ControlNet into an engine folder, for the U-Net
    already there (its residual inputs say which ControlNets fit), through the same parity gate; the graph's files
    are written first, the manifest last (atomically), so an interrupted run leaves the folder as it was. The folder
    is locked throughout: a second run waits, then adds its ControlNet to the manifest this one wrote."""
    with folder_lock(Path(folder), "sdtrt export-controlnet", log):
        return _add_controlnet(Path(folder), spec, allow_pickle, force, opset, log)


def _add_controlnet(folder: Path, spec: str, allow_pickle: bool, force: bool, opset: int, log) -> Manifest:
    from sdtrt.export.controlnet import (builtin_controlnet, check_compatible, check_controlnet_folder, check_family,
                                         load_controlnet_folder, read_config)
    from sdtrt.export.graphs import AddedInputs, controlnet_spec
    from sdtrt.export.memory_probe import probe
    from sdtrt.export.validate import format_table

    manifest = Manifest.load(folder)
    name, source = parse_spec(spec)
    key = CONTROLNET_PREFIX + name
    if key in manifest.components and not force:
        raise OutputExistsError(f"{folder} already has a ControlNet named {name!r} (pass --force to replace it, or "
                                "NAME=PATH to add it under another name)")
    m = manifest.model
    levels = manifest.residual_levels()
    added = AddedInputs.of_manifest(manifest)
    if source == BUILTIN_CONTROLNET:
        if m.weights_seed is None:
            raise UsageError(f"{BUILTIN_CONTROLNET!r} is shaped like a built-in model's U-Net; {folder} was exported "
                             f"from {m.source}: give a ControlNet folder")
        if m.source not in BUILTIN_ARCHITECTURES:  # weights_seed is only recorded for them: never load a path
            raise ManifestError(f"{folder}/manifest.json records weights_seed for source {m.source!r}, which is no "
                                f"built-in model ({', '.join(BUILTIN_ARCHITECTURES)}): hand-edited?")
        from sdtrt.export.loaders import load_model

        base = load_model(m.source, seed=m.weights_seed)
        seed = m.weights_seed + 3 + len(manifest.controlnets) - (key in manifest.components)
        controlnet = builtin_controlnet(base.unet, m.latent_channels, m.vae_scale_factor, seed)
        source = f"{BUILTIN_CONTROLNET}:{seed}"
    else:
        source = str(Path(source).expanduser())
        check_controlnet_folder(Path(source), allow_pickle)
        check_family(read_config(Path(source)), name, added is not None)  # before the slow load
        log(f"loading ControlNet {source} ...")
        controlnet = load_controlnet_folder(Path(source), allow_pickle)
    check_compatible(controlnet, name, levels, m.latent_channels, m.text_hidden_size, m.vae_scale_factor, added)
    graph = controlnet_spec(controlnet, m.latent_channels, m.text_hidden_size, m.max_text_length, m.vae_scale_factor,
                            added)
    tmp = temp_path(folder / key)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        work = tmp / "_work"
        work.mkdir()
        table: list = []
        memory, flops = probe(graph, m.vae_scale_factor)
        component = _export_graph(key, graph, tmp, work, manifest.precision, opset, manifest.ranges,
                                  m.vae_scale_factor, m.max_text_length, m.max_chunks, memory, source, table,
                                  f"{key}:", log, flops=flops)
        log(format_table(table))
        work.rmdir()
        old = manifest.components.get(key)
        owned = owned_entries(folder) or set()
        _refuse_foreign(folder, sorted(f.name for f in tmp.iterdir() if f.name not in owned
                                       and os.path.lexists(folder / f.name)))
        for f in tmp.iterdir():  # new files under names no installed manifest points at, until the manifest switches
            f.rename(folder / f.name)
        manifest = replace(manifest, components={**manifest.components, key: component})
        manifest.save(folder)
        if old is not None:
            for f in {old.file, *old.external_data} - {component.file, *component.external_data}:
                (folder / f).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"added ControlNet {name} to {folder}" + (f"; run `sdtrt build {folder}` to build its TensorRT engine"
                                                   if manifest.tensorrt is not None else ""))
    return manifest
