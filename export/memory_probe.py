"""Measure what a graph's working memory and arithmetic grow with, so the runtime can refuse a shape before it runs
out, and a benchmark can say how close a run came to the machine.

ONNX Runtime (and the exported graph) materialise every attention score matrix — rows x heads x q x k —
and those dominate at large sizes (a 1024x1024 image of even the tiny model needs ~19 GB). The module
is run at two small sizes with ``scaled_dot_product_attention`` and every submodule's output observed;
each attention's token counts are then linear in the spatial size (latent pixels), which the manifest
records per graph (``MemoryModel``). Measuring beats deriving it from a config: it works for any
architecture diffusers or transformers build.

The same two runs count the graph's FLOPs (``FlopModel``): torch's ``FlopCounterMode`` counts the convolutions and
matrix products, which grow linearly with the spatial size; each attention adds 2 x q x k x (its query/key width + its
value width) per row and head (Q K^T and P V), a quadratic in it from the measured token counts. The counter's own
count of an attention (none on the CPU in torch 2.13; a CUDA kernel's or a decomposed one's elsewhere) is replaced by
that, so nothing is counted twice.
"""

from __future__ import annotations

import math

import numpy as np

from sdtrt.manifest import AttentionSite, FlopModel, MemoryModel

PROBE_LATENTS = (8, 16)  # latent sides: exact for every downsampling level of SD-like U-Nets


def _fit(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    a = (y2 - y1) / (x2 - x1) if x2 != x1 else 0.0
    return round(a, 6), round(y1 - a * x1, 3)


def _spatial(feeds: dict[str, np.ndarray], order: list[str]) -> int:
    for name in order:
        if feeds[name].ndim == 4:
            return int(np.prod(feeds[name].shape[2:]))
    return 0


def attention_flops(q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...]) -> int:
    """FLOPs of one ``scaled_dot_product_attention`` on q (..., Lq, E), k (..., Lk, E), v (..., Lk, Ev): Q K^T and the
    probabilities times V, a multiply-add counting 2 (the softmax and scaling aside, as the counter leaves them)."""
    return 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _run(spec, feeds: dict[str, np.ndarray]):
    """One forward pass of ``spec.module`` on ``feeds``: every attention's (q, k, v) shapes, the largest submodule
    output's elements, and the FLOPs (``FlopCounterMode`` without its attention count, plus ``attention_flops``)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    calls, largest, inside = [], [0], [0]
    original = torch.nn.functional.scaled_dot_product_attention
    counter = FlopCounterMode(display=False)

    def recording(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        before = counter.get_total_flops()
        out = original(q, k, v, *args, **kwargs)
        inside[0] += counter.get_total_flops() - before  # what the counter made of it, if anything
        return out

    def watch(module, args, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                largest[0] = max(largest[0], t.numel())

    # a module on the meta device (built without weights) is counted on meta inputs
    device = getattr(next(spec.module.parameters(), None), "device", "cpu")
    hooks = [m.register_forward_hook(watch) for m in spec.module.modules()]
    torch.nn.functional.scaled_dot_product_attention = recording
    try:
        with torch.no_grad(), counter:
            spec.module(*[torch.from_numpy(feeds[s.name]).to(device) for s in spec.inputs])
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        for h in hooks:
            h.remove()
    flops = counter.get_total_flops() - inside[0] + sum(attention_flops(*c) for c in calls)
    return calls, largest[0], flops


def count_flops(spec, feeds: dict[str, np.ndarray]) -> int:
    """FLOPs of one run of ``spec.module`` on ``feeds``, counted as ``FlopModel`` counts them."""
    return _run(spec, feeds)[2]


def memory_model(spec, vae_scale: int) -> MemoryModel:
    """Run ``spec.module`` at two sizes (batch 2, guidance on) and fit its attention and activation sizes."""
    return probe(spec, vae_scale)[0]


def probe(spec, vae_scale: int) -> tuple[MemoryModel, FlopModel | None]:
    """Run ``spec.module`` at two sizes (batch 2, guidance on) and fit its attention and activation sizes and its FLOPs
    (None, and an empty ``MemoryModel``, when it attends differently at the two sizes: no model fits)."""
    order = [s.name for s in spec.inputs]
    runs = []
    for side in PROBE_LATENTS:
        px = side * vae_scale
        feeds = spec.make_inputs(2, px, px, np.random.default_rng(0), {"cfg": True, "guidance_scale": 7.5})
        runs.append((feeds, _spatial(feeds, order), *_run(spec, feeds)))
    (f1, hw1, calls1, big1, flops1), (f2, hw2, calls2, big2, flops2) = runs
    if len(calls1) != len(calls2):  # the graph attends differently at other sizes: no linear model
        return MemoryModel(), None
    sites = {}
    for (q1, k1, _), (q2, k2, _) in zip(calls1, calls2):
        rows = q1[0]
        rows_input = next((n for n in order if f1[n].ndim and f1[n].shape[0] == rows), order[0])
        site = AttentionSite(rows_input=rows_input, rows_per_row=round(rows / f1[rows_input].shape[0], 6),
                             heads=int(q1[1]), query=_fit(hw1, q1[2], hw2, q2[2]), key=_fit(hw1, k1[2], hw2, k2[2]))
        sites[site] = None
    rows_input = max(sites, key=lambda s: s.rows_per_row).rows_input if sites else order[0]
    rows = f1[rows_input].shape[0]
    memory = MemoryModel(attention=tuple(sites), activation=_fit(hw1, big1 / rows, hw2, big2 / rows),
                         activation_rows_input=rows_input)
    return memory, _flop_model(rows_input, rows, hw1, hw2, calls1, calls2, flops1, flops2)


def _flop_model(rows_input: str, rows: int, hw1: int, hw2: int, calls1, calls2, flops1: int, flops2: int) -> FlopModel:
    """FLOPs per row as a x hw^2 + b x hw + c: the attentions' from their token counts, fitted linearly in hw (every
    call: q = qa hw + qb tokens, k = ka hw + kb), the rest linear in hw (fitted from the two runs)."""
    a = b = c = 0.0
    rest1, rest2 = flops1, flops2
    for (q1, k1, v1), (q2, k2, v2) in zip(calls1, calls2):
        rest1, rest2 = rest1 - attention_flops(q1, k1, v1), rest2 - attention_flops(q2, k2, v2)
        weight = 2 * math.prod(q1[:-2]) / rows * (q1[-1] + v1[-1])
        (qa, qb), (ka, kb) = _fit(hw1, q1[-2], hw2, q2[-2]), _fit(hw1, k1[-2], hw2, k2[-2])
        a, b, c = a + weight * qa * ka, b + weight * (qa * kb + qb * ka), c + weight * qb * kb
    slope, intercept = _fit(hw1, rest1 / rows, hw2, rest2 / rows)
    return FlopModel(rows_input=rows_input, per_row=(a, b + slope, c + intercept))


# ---- what `sdtrt export` itself needs (issue 25) -------------------------------------------------------------------
# Peak RSS of `sdtrt export`, measured: sdxl fp16 16.3 GB, sdxl fp32 15.6 GB, sd15 fp16 7.9 GB, tiny fp16 0.78 GB. The
# export holds each graph's weights once (``low_memory``), so the peak grows with the largest graph's FP32 weights W
# (the U-Net: sdxl 10.3 GB, sd15 3.4 GB, tiny 6 MB): base + 1.25 W + min(W, 2.8 GB) covers all four (16.5, 8.0 and
# 0.9 GB) without overshooting any by more than 6% beyond the base. The base is Python, torch, diffusers, ONNX and ONNX
# Runtime; the min() term what grows with the model until it saturates (the trace, ONNX Runtime's gate session).
EXPORT_BASE_BYTES = 900_000_000
EXPORT_WEIGHT_FACTOR = 1.25
EXPORT_GROWING_MAX = 2_800_000_000
SINGLE_FILE_PREFIXES = {"model.diffusion_model.": "unet", "first_stage_model.": "vae",
                        "cond_stage_model.": "text_encoder", "conditioner.embedders.0.": "text_encoder",
                        "conditioner.embedders.1.": "text_encoder_2"}


def export_peak_bytes(counts: dict[str, int]) -> int:
    """Estimated peak host memory of exporting a model whose modules have ``counts`` parameters; 0 when unknown."""
    if not counts:
        return 0
    weights = 4 * max(counts.values())
    return int(EXPORT_BASE_BYTES + EXPORT_WEIGHT_FACTOR * weights + min(weights, EXPORT_GROWING_MAX))


def weight_counts(source) -> dict[str, int]:
    """Parameters per module (unet, vae, text_encoder[_2]) of an export's source, known before any weight is loaded:
    a built-in's from its configuration (the modules built on the meta device: shapes, no data), a diffusers folder's
    from its safetensors headers (a pickled file: its size in FP32 elements), a single-file checkpoint's from its
    safetensors header. Empty when it cannot tell without loading (a pickled single file)."""
    from pathlib import Path

    if not isinstance(source, Path):
        return _builtin_counts(source)
    if source.is_file():
        if source.suffix.lower() != ".safetensors":
            return {}
        counts: dict[str, int] = {}
        for key, n in _safetensors_numel(source).items():
            module = next((m for prefix, m in SINGLE_FILE_PREFIXES.items() if key.startswith(prefix)), None)
            if module is not None:
                counts[module] = counts.get(module, 0) + n
        return counts
    counts = {}
    for module in ("unet", "vae", "text_encoder", "text_encoder_2"):
        folder = source / module
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        plain = [f for f in files if f.name.count(".") == 1]  # not a variant (model.fp16.safetensors)
        if plain or files:
            counts[module] = sum(sum(_safetensors_numel(f).values()) for f in plain or files)
        elif folder.is_dir():
            pickles = [f for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            if pickles:
                counts[module] = sum(f.stat().st_size for f in pickles) // 4
    return counts


def _safetensors_numel(path) -> dict[str, int]:
    """key -> element count from a safetensors header (the JSON before the data: nothing else is read)."""
    import json
    import struct

    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(min(size, 100 * 2**20)))
    except (OSError, ValueError, struct.error):
        return {}  # unreadable: the loader reports it
    try:
        return {k: int(np.prod(v.get("shape", ()), dtype=np.int64)) for k, v in header.items()
                if k != "__metadata__" and isinstance(v, dict)}
    except (AttributeError, TypeError, ValueError):  # not a safetensors header: the loader says what is wrong
        return {}


def _builtin_counts(arch) -> dict[str, int]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    def tokens(pad: str) -> dict:  # as loaders.build_builtin fills them: from the built-in tokenizer
        from sdtrt.export.tokenizer import build_clip_tokenizer

        t = build_clip_tokenizer(arch.tokenizer_merges, pad_token=pad)
        return dict(vocab_size=len(t), bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
                    pad_token_id=t.pad_token_id)

    counts = {}
    with torch.device("meta"):
        counts["unet"] = count(UNet2DConditionModel(**arch.unet))
        counts["vae"] = count(AutoencoderKL(**arch.vae))
        for name, kwargs, projected, pad in (
                ("text_encoder", arch.text_encoder, arch.projected_text_encoder, arch.tokenizer_pad_token),
                ("text_encoder_2", arch.text_encoder_2, True, "!")):
            if kwargs:
                cls = CLIPTextModelWithProjection if projected else CLIPTextModel
                config = CLIPTextConfig(**(kwargs if kwargs.get("vocab_size") else {**kwargs, **tokens(pad)}))
                counts[name] = count(cls(config))
    return counts


def check_export_memory(source, what: str, loras: bool = False, controlnets: tuple[str, ...] = ()) -> None:
    """Refuse, before anything is loaded or written, an export this machine's available memory cannot hold. ``loras``:
    ``--lora`` fusing holds a copy of the U-Net and text encoders beside the originals (``export.lora``);
    ``controlnets``: each ``--controlnet`` source (a folder: its header's count; the built-in, shaped like the U-Net's
    encoder half: about half the U-Net's parameters, 0.42-0.49 for SD 1.5 and SDXL) is held in FP32 too."""
    from pathlib import Path

    from sdtrt import memory
    from sdtrt.errors import MemoryLimitError

    avail = memory.available_bytes()
    if avail is None:
        return
    counts = weight_counts(source)
    need = export_peak_bytes(counts)
    if not need:
        return
    extra = []
    if loras:
        extra.append(("--lora's fused copies", 4 * sum(n for m, n in counts.items() if m != "vae")))
    for cn in controlnets:
        folder = Path(cn).expanduser()
        n = sum(sum(_safetensors_numel(f).values()) for f in sorted(folder.glob("*.safetensors"))) \
            if folder.is_dir() else 0
        extra.append((f"ControlNet {cn}", 4 * (n or counts.get("unet", 0) // 2)))
    need += sum(b for _, b in extra)
    if need <= avail:
        return
    largest = max(counts, key=counts.get)
    more = "".join(f", {label} {memory.gb(b)}" for label, b in extra)
    raise MemoryLimitError(f"exporting {what} needs about {memory.gb(need)} of memory (its {largest}: "
                           f"{counts[largest] / 1e9:.2f}B parameters, {memory.gb(4 * counts[largest])} in FP32{more}), "
                           f"{memory.gb(avail)} are available: close other programs, export on a larger machine, or "
                           "pass --no-memory-check to try anyway")
