"""``sdtrt make-lora`` / ``sdtrt make-embedding``: random test files for an engine folder (``runtime/synthetic.py``),
so ``--lora`` and ``--embedding`` can be tried on a built-in model without downloading anything."""

from __future__ import annotations

import sys
from pathlib import Path

from sdtrt.errors import UsageError


def add_commands(sub) -> None:
    p = sub.add_parser("make-lora", help="write a random LoRA for an engine folder's model (to try --lora)",
                       description="Write a random kohya/A1111-layout LoRA over every attention projection of the "
                                   "folder's U-Net and text encoder (from the weight map the export recorded; no "
                                   "torch). For trying --lora and <lora:NAME:W> on built-in models.")
    p.add_argument("dir", help="engine folder written by `sdtrt export`")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--seed", type=int, default=0, help="seed of the random factors")
    p.add_argument("--std", type=float, default=0.1, help="standard deviation of the up/down factors")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_cmd_make_lora)
    p = sub.add_parser("make-embedding", help="write a random textual-inversion embedding (to try --embedding)",
                       description="Write a random A1111-format embedding ({'emb_params': (N, D)}) as wide as the "
                                   "folder's text encoder; write its file name (without .safetensors) in a prompt.")
    p.add_argument("dir", help="engine folder written by `sdtrt export`")
    p.add_argument("out", help="the .safetensors file to write; its name is the prompt token")
    p.add_argument("--vectors", type=int, default=2, help="vectors (tokens) of the embedding")
    p.add_argument("--seed", type=int, default=0, help="seed of the random vectors")
    p.add_argument("--std", type=float, default=0.1, help="standard deviation of the vectors")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_cmd_make_embedding)


def _target(out: str, force: bool) -> Path:
    path = Path(out)
    if path.suffix != ".safetensors" or not path.stem:
        raise UsageError(f"{out} must be a file name ending in .safetensors")
    if path.is_dir():
        raise UsageError(f"cannot write {out}: it is a folder")
    if not (path.parent if str(path.parent) else Path(".")).is_dir():
        raise UsageError(f"cannot write {out}: folder {path.parent} does not exist")
    if path.exists() and not force:
        raise UsageError(f"{out} exists (pass --force to overwrite it)")
    return path


def _cmd_make_lora(args) -> int:
    from sdtrt.fsutil import atomic_path
    from sdtrt.manifest import Manifest
    from sdtrt.runtime.synthetic import random_lora

    manifest, path = Manifest.load(Path(args.dir)), _target(args.out, args.force)
    with atomic_path(path, ".safetensors") as tmp:
        layers = random_lora(manifest, tmp, args.rank, args.seed, args.std)
    print(f"wrote {path}: rank {args.rank}, {layers} layers (U-Net and text-encoder attention, every encoder); use --lora "
          f"{path}:0.8, or <lora:{path.stem}:0.8> with --lora-dir {path.parent}", file=sys.stderr)
    return 0


def _cmd_make_embedding(args) -> int:
    from sdtrt.fsutil import atomic_path
    from sdtrt.manifest import Manifest
    from sdtrt.runtime.synthetic import random_embedding

    manifest, path = Manifest.load(Path(args.dir)), _target(args.out, args.force)
    with atomic_path(path, ".safetensors") as tmp:
        widths = random_embedding(manifest, tmp, args.vectors, args.seed, args.std)
    print(f"wrote {path}: {args.vectors} vectors of {' + '.join(map(str, widths))} (one set per text encoder); use --embedding {path} and write {path.stem} in the "
          "prompt", file=sys.stderr)
    return 0
