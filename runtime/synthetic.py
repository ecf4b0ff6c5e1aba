"""Random LoRAs and textual-inversion embeddings for an engine folder, without torch: to try ``--lora`` and
``--embedding`` on a built-in model (no real files can be downloaded here), and for the swap benchmark.

The LoRA is in kohya/A1111's layout (``lora_unet_…``/``lora_te_…`` with ``lora_down``/``lora_up``/``alpha``), over the
attention projections in the folder's weight maps (``manifest.components[graph].weights``, written at export); the
embedding is A1111's (``{"emb_params": (n, D)}``; SDXL ``{"clip_l": …, "clip_g": …}``; its token the file's name).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sdtrt.errors import UsageError

ATTENTION = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q|k|v|out)_proj)$")


def random_lora(manifest, path: Path, rank: int = 4, seed: int = 0, std: float = 0.05) -> int:
    """Write a rank-``rank`` LoRA with N(0, ``std``²) factors over every attention projection of the U-Net and text
    encoder (fp16, alpha = rank); returns its layer count."""
    from safetensors.numpy import save_file

    if rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    if not (std > 0 and np.isfinite(std)):
        raise UsageError(f"--std must be a positive number, got {std}")
    from sdtrt.runtime.lora import targets

    rng = np.random.default_rng(seed)
    tensors = {}
    for t in targets(manifest.model):  # the U-Net and every text encoder (SDXL: lora_te1_, lora_te2_)
        prefix = t.kohya[0] + ("" if t.graph == "unet" else "text_model_")
        for module, entry in manifest.components[t.graph].weights.items():
            if not ATTENTION.search(module):
                continue
            out_f, in_f = entry.shape[::-1] if entry.transposed else entry.shape
            name = prefix + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = (std * rng.standard_normal((rank, in_f))).astype(np.float16)
            tensors[f"{name}.lora_up.weight"] = (std * rng.standard_normal((out_f, rank))).astype(np.float16)
            tensors[f"{name}.alpha"] = np.array(float(rank), np.float16)
    if not tensors:
        raise UsageError("the engine folder has no weight map (exported before sdtrt recorded one): re-export it")
    save_file(tensors, str(path))
    return len(tensors) // 3


def random_embedding(manifest, path: Path, vectors: int = 2, seed: int = 0, std: float = 0.02) -> tuple[int, ...]:
    """Write an A1111 embedding of ``vectors`` N(0, ``std``²) vectors as wide as the text encoder's tokens (fp32; SDXL:
    clip_l and clip_g, one set per encoder); its token is the file's name. Returns each encoder's width."""
    from safetensors.numpy import save_file

    if vectors < 1:
        raise UsageError(f"--vectors must be at least 1, got {vectors}")
    if not (std > 0 and np.isfinite(std)):
        raise UsageError(f"--std must be a positive number, got {std}")
    from sdtrt.runtime.lora import EMBEDDING_KEYS

    m = manifest.model
    rng = np.random.default_rng(seed)
    keys = {name: key for key, name in EMBEDDING_KEYS.items()}
    tensors = {keys[e.lora_name] if m.text_encoders else "emb_params":
               (std * rng.standard_normal((vectors, e.hidden_size))).astype(np.float32) for e in m.encoders}
    save_file(tensors, str(path))
    return tuple(e.hidden_size for e in m.encoders)
