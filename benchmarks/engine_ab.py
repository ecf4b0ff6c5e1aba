"""The U-Net alone on ONNX Runtime (CPU) and on OpenVINO, in one process, on the inputs the pipeline makes:

    python -m sdtrt.benchmarks.engine_ab DIR [SIZES] [N]       # e.g. engines/sd15 256,512 3

Per size: a warm-up call, then N calls of one engine, then N of the other, the whole done twice (blocks, not
alternate calls: ONNX Runtime's threads spin for a while after a run and would slow the next engine's call); min and
median per engine, and each round's median (a drift between rounds means the machine was not quiet). OpenVINO's
cache is not used (``SDTRT_OPENVINO_CACHE=off``): a compiled model and a cached one ran at the same speed.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np


def main(argv: list[str]) -> None:
    os.environ["SDTRT_OPENVINO_CACHE"] = "off"
    from sdtrt.runtime import Pipeline
    from sdtrt.runtime.openvino import OpenVinoEngine

    folder = argv[0]
    sizes = [int(s) for s in (argv[1] if len(argv) > 1 else "256").split(",")]
    n = int(argv[2]) if len(argv) > 2 else 3
    feeds: dict[tuple, dict[str, np.ndarray]] = {}
    with Pipeline.from_dir(folder, backend="onnxruntime-cpu") as pipe:
        unet = pipe.engines["unet"]
        ort_run = unet.run

        def grab(f):
            feeds.setdefault(f["latents"].shape, {k: np.array(v) for k, v in f.items()})
            return ort_run(f)

        unet.run = grab
        for s in sizes:
            pipe("a cat", num_inference_steps=2, height=s, width=s, seed=0)
        unet.run = ort_run
        component = pipe.manifest.components["unet"]
        openvino = OpenVinoEngine(pipe.folder / component.file, component)
        engines = {"onnxruntime": ort_run, f"openvino ({openvino.precision})": openvino.run}
        for shape, f in feeds.items():
            times: dict[str, list[float]] = {k: [] for k in engines}
            for _ in range(2):
                for name, run in engines.items():
                    run(f)
                    for _ in range(n):
                        t = time.perf_counter()
                        run(f)
                        times[name].append(time.perf_counter() - t)
            diff = float(np.abs(ort_run(f)["noise_pred"] - openvino.run(f)["noise_pred"]).max())
            print(f"latents {shape}: " + "; ".join(
                f"{k} min {min(v) * 1e3:.0f} median {statistics.median(v) * 1e3:.0f} ms (rounds "
                f"{statistics.median(v[:n]) * 1e3:.0f}, {statistics.median(v[n:]) * 1e3:.0f})" for k, v in times.items())
                + f"; max |difference| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
