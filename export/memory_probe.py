"""Measure what a graph's working memory grows with, so the runtime can refuse a shape before it runs out.

ONNX Runtime (and the exported graph) materialise every attention score matrix — rows x heads x q x k —
and those dominate at large sizes (a 1024x1024 image of even the tiny model needs ~19 GB). The module
is run at two small sizes with ``scaled_dot_product_attention`` and every submodule's output observed;
each attention's token counts are then linear in the spatial size (latent pixels), which the manifest
records per graph (``MemoryModel``). Measuring beats deriving it from a config: it works for any
architecture diffusers or transformers build.
"""

from __future__ import annotations

import numpy as np

from sdtrt.manifest import AttentionSite, MemoryModel

PROBE_LATENTS = (8, 16)  # latent sides: exact for every downsampling level of SD-like U-Nets


def _fit(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    a = (y2 - y1) / (x2 - x1) if x2 != x1 else 0.0
    return round(a, 6), round(y1 - a * x1, 3)


def _spatial(feeds: dict[str, np.ndarray], order: list[str]) -> int:
    for name in order:
        if feeds[name].ndim == 4:
            return int(np.prod(feeds[name].shape[2:]))
    return 0


def memory_model(spec, vae_scale: int) -> MemoryModel:
    """Run ``spec.module`` at two sizes (batch 2, guidance on) and fit its attention and activation sizes."""
    import torch

    order = [s.name for s in spec.inputs]
    runs = []
    for side in PROBE_LATENTS:
        px = side * vae_scale
        feeds = spec.make_inputs(2, px, px, np.random.default_rng(0), {"cfg": True, "guidance_scale": 7.5})
        calls, largest = [], [0]
        original = torch.nn.functional.scaled_dot_product_attention

        def recording(q, k, v, *args, **kwargs):
            calls.append((tuple(q.shape), tuple(k.shape)))
            return original(q, k, v, *args, **kwargs)

        def watch(module, args, output):
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(t, torch.Tensor):
                    largest[0] = max(largest[0], t.numel())

        hooks = [m.register_forward_hook(watch) for m in spec.module.modules()]
        torch.nn.functional.scaled_dot_product_attention = recording
        try:
            with torch.no_grad():
                spec.module(*[torch.from_numpy(feeds[n]) for n in order])
        finally:
            torch.nn.functional.scaled_dot_product_attention = original
            for h in hooks:
                h.remove()
        runs.append((feeds, _spatial(feeds, order), calls, largest[0]))
    (f1, hw1, calls1, big1), (f2, hw2, calls2, big2) = runs
    if len(calls1) != len(calls2):  # the graph attends differently at other sizes: no linear model
        return MemoryModel()
    sites = {}
    for (q1, k1), (q2, k2) in zip(calls1, calls2):
        rows = q1[0]
        rows_input = next((n for n in order if f1[n].ndim and f1[n].shape[0] == rows), order[0])
        site = AttentionSite(rows_input=rows_input, rows_per_row=round(rows / f1[rows_input].shape[0], 6),
                             heads=int(q1[1]), query=_fit(hw1, q1[2], hw2, q2[2]), key=_fit(hw1, k1[2], hw2, k2[2]))
        sites[site] = None
    rows_input = max(sites, key=lambda s: s.rows_per_row).rows_input if sites else order[0]
    rows = f1[rows_input].shape[0]
    return MemoryModel(attention=tuple(sites), activation=_fit(hw1, big1 / rows, hw2, big2 / rows),
                       activation_rows_input=rows_input)
