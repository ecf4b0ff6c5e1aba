"""What the U-Net's ControlNet residual inputs cost when no ControlNet runs: one U-Net graph without them (an export
of schema 2) against one with them fed zeros (schema 3), and a ControlNet graph of the same folder for scale; ONNX
Runtime CPU, batch 1 with guidance (2 rows), interleaved calls, the median of N after one warm-up each.

    python -m sdtrt.benchmarks.unet_residual_cost OLD_DIR NEW_DIR [N] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def _feeds(session, folder: Path, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of one call at ``size`` pixels: random latents and text, zero residuals (resolved from the manifest's
    named dimensions when the folder has one)."""
    from sdtrt.manifest import resolve_shape

    manifest = json.loads((folder / "manifest.json").read_text())
    factor = manifest["model"]["vae_scale_factor"]
    h = size // factor
    values = {"batch": 1, "text_batch": 2, "latent_height": h, "latent_width": h, "height": size, "width": size,
              "text_length": manifest["model"]["max_text_length"]}
    feeds = {}
    for arg in session.get_inputs():
        shape = resolve_shape(tuple(arg.shape), values)
        zero = "residual" in arg.name
        dtype = np.float16 if arg.type == "tensor(float16)" else np.float32
        feeds[arg.name] = (np.zeros(shape, dtype) if zero else rng.standard_normal(shape).astype(dtype))
    return feeds


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="engine folder whose U-Net has no residual inputs")
    parser.add_argument("new", type=Path, help="engine folder whose U-Net has them (and a ControlNet)")
    parser.add_argument("n", type=int, nargs="?", default=5)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    files = {"U-Net without residual inputs": args.old / "unet.onnx", "U-Net with residual inputs, zeros":
             args.new / "unet.onnx"}
    files |= {f"ControlNet {p.stem}": p for p in sorted(args.new.glob("controlnet_*.onnx"))[:1]}
    rng = np.random.default_rng(0)
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in files.items()}
    feeds = {k: _feeds(s, files[k].parent, args.size, rng) for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():
        s.run(None, feeds[k])
    for _ in range(args.n):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        print(f"{k}: median {statistics.median(v) * 1e3:.0f} ms over {args.n} "
              f"(all: {', '.join(f'{x * 1e3:.0f}' for x in v)})")


if __name__ == "__main__":
    main()
