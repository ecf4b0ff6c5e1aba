"""Peak working memory of a graph run, estimated from its shapes before it runs, and its FLOPs (torch-free).

The export records per graph how its attention score matrices and largest activations grow with the input
(``manifest.MemoryModel``, measured by ``export/memory_probe.py``). ONNX Runtime materialises each score
matrix. Measured on ONNX Runtime 1.32 (CPU, tiny U-Net, fp16 and fp32 alike, 256..1024 px): one run peaks
at 4.2 bytes per score element of the largest attention over the loaded session; across the runs of a
generation its memory arena can hold up to twice that (1024x1024: 8.9 GB for one U-Net call, 18.9 GB for
the generation). ``tests/test_memory.py`` measures it again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdtrt.manifest import Component

SCORE_BYTES = 4.2  # bytes alive per attention score element at the peak of one ONNX Runtime run
ARENA_FACTOR = 2.0  # what ONNX Runtime's CPU arena can hold over a generation, relative to one run
ACTIVATION_COPIES = 4  # largest intermediate tensor: input, normalised, activated, output


def spatial_size(component: Component, shapes: dict[str, tuple[int, ...]]) -> int:
    """Product of the dims after the first two of the graph's first 4-D input (latent pixels); 0 if none."""
    for spec in component.inputs:
        if len(spec.shape) == 4 and spec.name in shapes:
            return int(np.prod(shapes[spec.name][2:]))
    return 0


def peak_bytes(component: Component, shapes: dict[str, tuple[int, ...]], fused_attention: bool = False) -> int:
    """Estimated working memory of one run of ``component`` at ``shapes`` (input name -> shape), weights aside.
    ``fused_attention``: the engine computes attention tile by tile (``runtime/ort_graphs.py``), no score matrix is
    materialised and the largest activations are what grows."""
    model = component.memory
    if model is None:
        return 0
    hw = spatial_size(component, shapes)
    worst = 0.0
    for site in () if fused_attention else model.attention:
        rows = site.rows_per_row * shapes[site.rows_input][0] if site.rows_input in shapes else 0
        q = site.query[0] * hw + site.query[1]
        k = site.key[0] * hw + site.key[1]
        worst = max(worst, rows * site.heads * q * k * SCORE_BYTES)
    act = 0.0
    if model.activation_rows_input in shapes:
        rows = shapes[model.activation_rows_input][0]
        act = ACTIVATION_COPIES * rows * (model.activation[0] * hw + model.activation[1]) * 4  # fp32 when upcast
    return int(max(worst, act))


def flops(component: Component, shapes: dict[str, tuple[int, ...]]) -> int:
    """Floating-point operations of one run of ``component`` at ``shapes`` (input name -> shape): its convolutions,
    matrix products and attention, as the export counted them (``manifest.FlopModel``); 0 when it has no FLOP model
    (an older export) or ``shapes`` lacks the input its rows are counted by."""
    model = component.flops
    if model is None or model.rows_input not in shapes:
        return 0
    hw = spatial_size(component, shapes)
    a, b, c = model.per_row
    return max(0, round(shapes[model.rows_input][0] * ((a * hw + b) * hw + c)))


def available_bytes() -> int | None:
    """Memory this process can still get: MemAvailable, capped by a cgroup limit; None where it cannot tell."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            room = int(limit) - current
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"
