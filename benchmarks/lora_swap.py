"""How long a LoRA swap takes at generation time (no re-export, no rebuild): random rank-R LoRAs in kohya's layout
over every attention projection of the U-Net and text encoder of an engine folder (made from its weight map, so no
torch is needed), then ``Pipeline.set_loras`` A, B, A again and none, each timed, on ONNX Runtime.

    python -m sdtrt.benchmarks.lora_swap DIR [--rank 16] [--backend onnxruntime-cpu]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q|k|v|out)_proj)$")


def random_lora(manifest, path: Path, rank: int, seed: int) -> int:
    """A kohya-layout LoRA over the attention projections in the manifest's weight maps; returns its layer count."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for graph, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        for module, entry in manifest.components[graph].weights.items():
            if not TARGETS.search(module):
                continue
            out_f, in_f = entry.shape[::-1] if entry.transposed else entry.shape
            name = prefix + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = (0.05 * rng.standard_normal((rank, in_f))).astype(np.float16)
            tensors[f"{name}.lora_up.weight"] = (0.05 * rng.standard_normal((out_f, rank))).astype(np.float16)
            tensors[f"{name}.alpha"] = np.array(float(rank), np.float16)
    save_file(tensors, str(path))
    return len(tensors) // 3


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
