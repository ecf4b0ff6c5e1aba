"""More sdtrt backends as systems of one `sdtrt bench` run: ``--also-backend openvino`` adds the system
"sdtrt[openvino]" beside "sdtrt" (its ``--backend``) and "baseline", each in its own worker, interleaved with the
others, with its own latency, components, cold start, load time, memory and PSNR."""

from __future__ import annotations

import numpy as np

from sdtrt.errors import UsageError
from sdtrt.parity import psnr


def system_name(backend: str) -> str:
    return f"sdtrt[{backend}]"


def extra_systems(also_backends) -> list[str]:
    return [system_name(b) for b in also_backends]


def system_backend(kind: str, backend: str) -> str:
    """The backend a worker of system ``kind`` loads: sdtrt's ``backend``, or the one named in "sdtrt[NAME]"."""
    return kind[len("sdtrt["):-1] if kind.startswith("sdtrt[") else backend


def check_also_backends(backend: str, also_backends) -> None:
    from sdtrt.runtime.backends import BACKENDS

    for b in also_backends:
        if b not in BACKENDS:
            raise UsageError(f"--also-backend {b!r}: choose one of {', '.join(BACKENDS)}")
        if b == backend:
            raise UsageError(f"--also-backend {b}: that is sdtrt's --backend already")
    if len(set(also_backends)) != len(also_backends):
        raise UsageError("--also-backend: each backend once")


def psnr_fields(images: dict[str, np.ndarray], systems: list[str]) -> dict:
    """Per-system PSNR: every sdtrt system's against the baseline (``psnr_db``, when there is one) and each extra
    backend's against sdtrt's own backend (``psnr_db_vs_sdtrt``: how far the other engine is from ONNX Runtime's
    image, with or without a baseline)."""
    out = {}
    ours = [k for k in systems if k != "baseline"]
    if "baseline" in systems:
        out["psnr_db"] = {k: psnr(images[k], images["baseline"]) for k in ours}
    extras = [k for k in ours if k != "sdtrt"]
    if extras:
        out["psnr_db_vs_sdtrt"] = {k: psnr(images[k], images["sdtrt"]) for k in extras}
    return out
