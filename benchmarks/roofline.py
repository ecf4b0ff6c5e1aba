"""The roofline figure of `sdtrt bench` (issue 26): the U-Net's FLOPs per step at the benchmarked shape over its
measured time per step, as achieved TFLOP/s, for sdtrt and the baseline alike (diffusers runs the same U-Net on the
same rows: 2B with classifier-free guidance, B without).

The FLOPs come from the manifest's ``FlopModel`` (counted at export: convolutions, matrix products and attention, not
norms and other elementwise work; ``export/memory_probe.py``). A folder exported before sdtrt counted them gets them
from the bench's baseline check, which rebuilds the PyTorch model anyway (``count_unet_flops``); without a baseline
the figure is n/a, with the reason (``NO_FLOPS``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

NO_FLOPS = ("the engine folder's manifest has no U-Net FLOP count (exported by an older sdtrt) and --baseline none "
            "rebuilds no PyTorch model to count them: re-export the model, or bench with a baseline")
NO_MODEL = "the rebuilt U-Net attends differently at the probe's two sizes: no FLOP model fits it"


def unet_rows(batch: int, guidance_scale: float) -> int:
    """The U-Net's rows per step: both halves of the guided batch at guidance above 1 (as the runtime and diffusers
    decide), the batch alone otherwise."""
    return batch * (2 if guidance_scale > 1.0 else 1)


def unet_flops_per_step(manifest, flop_model, width: int, height: int, batch: int, guidance_scale: float) -> int:
    """FLOPs of one U-Net call of a ``batch``-image generation at ``width`` x ``height`` (one 77-token prompt chunk);
    ``flop_model`` stands in for the manifest's (None: the manifest's own); 0 when neither has one."""
    from sdtrt import memory
    from sdtrt.manifest import resolve_shape

    unet = manifest.components["unet"]
    if flop_model is not None:
        unet = replace(unet, flops=flop_model)
    m = manifest.model
    values = {"batch": batch, "text_batch": unet_rows(batch, guidance_scale), "text_length": m.max_text_length,
              "latent_height": height // m.vae_scale_factor, "latent_width": width // m.vae_scale_factor,
              "height": height, "width": width}
    shapes = {}
    for spec in unet.inputs:
        try:
            shapes[spec.name] = resolve_shape(spec.shape, values)
        except KeyError:  # a dim the FLOP model does not use
            pass
    return memory.flops(unet, shapes)


def count_unet_flops(spec, vae_scale: int) -> dict[str, Any]:
    """The FLOP model of a rebuilt U-Net's graph (``graph_specs(model)["unet"]``), as the export counts it, as JSON
    (it crosses the bench's worker pipe); {} when none fits."""
    from sdtrt.config import to_dict
    from sdtrt.export.memory_probe import probe

    model = probe(spec, vae_scale)[1]
    return to_dict(model) if model is not None else {}


def add_roofline(entry: dict[str, Any], flops: int, note: str) -> None:
    """Put one size's figures into its result ``entry``: ``unet_tflop_per_step`` beside the systems, each system's
    ``unet_tflops_achieved`` (None, and ``unet_flops_note`` saying why, when there is no count)."""
    entry["unet_tflop_per_step"] = flops / 1e12 if flops else None
    if not flops:
        entry["unet_flops_note"] = note
    for s in entry["systems"].values():
        per_step = s["components_s"]["unet_per_step"]
        s["unet_tflops_achieved"] = flops / per_step / 1e12 if flops and per_step > 0 else None
