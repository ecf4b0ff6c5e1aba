"""How long a LoRA swap takes at generation time (no re-export, no rebuild): random rank-R LoRAs in kohya's layout
over every attention projection of the U-Net and text encoders of an engine folder (made from its weight map, so no
torch is needed), then ``Pipeline.set_loras`` A, B, A again and none, each timed, on ONNX Runtime.

    python -m sdtrt.benchmarks.lora_swap DIR [--rank 16] [--backend onnxruntime-cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sdtrt.runtime.synthetic import random_lora


def main() -> None:
    from sdtrt.runtime import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--backend", default="onnxruntime-cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Pipeline.from_dir(args.dir, backend=args.backend) as pipe:
        files = [Path(tmp) / f"{n}.safetensors" for n in "AB"]
        layers = [random_lora(pipe.manifest, f, args.rank, i) for i, f in enumerate(files)]
        print(f"{args.dir}: LoRAs of rank {args.rank} over {layers[0]} attention layers, {files[0].stat().st_size / 1e6:.1f}"
              f" MB each, on {pipe.backend_name}")
        for label, loras in (("A", [(files[0], 0.8)]), ("B", [(files[1], 0.6)]), ("A again", [(files[0], 0.8)]),
                             ("A + B", [(files[0], 0.8), (files[1], 0.6)]), ("none", [])):
            t = time.perf_counter()
            pipe.set_loras(loras)
            print(f"  set_loras({label}): {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
