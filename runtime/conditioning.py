"""What the U-Net is conditioned on, composed from the model family the manifest describes.

A family is data (``manifest.ModelInfo``): its text encoders in order (``encoders``: which graph, which tokenizer,
which hidden state, which gives the pooled embedding), its added conditions (``added_conditions``: SDXL's pooled
``text_embeds`` and ``time_ids``) and ``force_zeros_for_empty_prompt``. This module turns a request into the U-Net's
conditioning inputs from that description alone, so SD 1.x/2.x (one encoder), SDXL (two, pooled and size
conditioning) and its refiner (one projected encoder, aesthetic scores) are one code path, and a family with other
encoders is a new description.

Each encoder chunks and weights the prompt as A1111 does (``prompts.py``; A1111's SDXL conditioner runs its
``FrozenCLIPEmbedderWithCustomWords`` per encoder, each padding with its own token and rescaling its own emphasis),
the hidden states are joined along the feature axis (SDXL: 768 + 1280 = 2048), the pooled embedding is the first
chunk's (A1111's ``pooled`` of chunk 0). References: diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and
``_get_add_time_ids``; Podell et al. 2023 (arXiv:2307.01952) sections 2.1-2.2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdtrt.errors import UsageError
from sdtrt.manifest import Manifest, ModelInfo
from sdtrt.runtime.prompts import MAX_CHUNKS, PromptChunks, chunk_prompt, join_chunks
from sdtrt.runtime.request import GenerationRequest
from sdtrt.runtime.tokenizer import ClipTokenizer

PAIRS = ("original_size", "crops_coords_top_left", "target_size")  # the request fields of each time-id item


@dataclass(frozen=True)
class TextPlan:
    """The texts to encode, in row order (negatives first, "" where chunk padding needs it), and each text's chunks
    as each encoder's tokenizer makes them (the same tokens; the padding token differs)."""

    texts: tuple[str, ...]
    chunks: tuple[dict[str, PromptChunks], ...]  # one dict per encoder, in ``ModelInfo.encoders`` order

    @property
    def rows(self) -> int:
        return sum(self.chunks[0][t].count for t in self.texts)

    @property
    def count(self) -> int:  # chunks per prompt after padding
        return max(c.count for c in self.chunks[0].values())


def load_tokenizers(folder: Path, manifest: Manifest) -> list[ClipTokenizer]:
    """One tokenizer per text encoder, from the folders the manifest names."""
    m = manifest.model
    dirs = [e.tokenizer if m.text_encoders else manifest.tokenizer_dir for e in m.encoders]
    return [ClipTokenizer(Path(folder) / d, m.max_text_length, m.vocab_size) for d in dirs]


def max_clip_skip(info: ModelInfo) -> int:
    """The largest CLIP skip (diffusers' ``clip_skip``) every encoder has an output for."""
    return info.clip_skips - max(e.skip_offset for e in info.encoders)


def hidden_output(skip: int | None, offset: int) -> str:
    """The encoder output for CLIP skip ``skip`` (diffusers' meaning) of an encoder whose default is ``offset``
    layers before the last (SDXL: 1, the penultimate layer, ``hidden_states[-(clip_skip + 2)]``)."""
    k = (skip or 0) + offset
    return f"hidden_state_skip{k}" if k else "last_hidden_state"


def chunk_texts(info: ModelInfo, tokenizers: list[ClipTokenizer], req: GenerationRequest, cfg: bool) -> TextPlan:
    """Each distinct text as A1111 chunks, per encoder; refuses a CLIP skip or a length the folder cannot encode."""
    if req.clip_skip and req.clip_skip > max_clip_skip(info):
        top = max_clip_skip(info)
        raise UsageError(f"Clip skip {req.clip_skip + 1} (clip_skip={req.clip_skip} in the API) is beyond this "
                         f"folder's text encoder: it returns up to Clip skip {top + 1} (clip_skip={top})")
    labelled = ([(n, f"negative prompt {i + 1}") for i, n in enumerate(req.negative_prompt)] if cfg else []) + \
               [(p, f"prompt {i + 1}") for i, p in enumerate(req.prompt)]
    per_encoder: list[dict[str, PromptChunks]] = []
    for tok in tokenizers:
        chunks: dict[str, PromptChunks] = {}
        for text, label in labelled:
            if text not in chunks:
                chunks[text] = chunk_prompt(text, tok.fragments, tok.bos_id, tok.eos_id, tok.pad_id, tok.comma_id)
            if chunks[text].count > info.max_chunks:
                label = label.rsplit(" ", 1)[0] if len(req.prompt) == 1 else label
                fix = (f"re-export with --max-chunks {chunks[text].count}" if chunks[text].count <= MAX_CHUNKS else
                       f"shorten it: an export takes at most {MAX_CHUNKS} chunks")
                raise UsageError(f"{label} needs {chunks[text].count} chunks of 75 tokens ({chunks[text].token_count} "
                                 f"tokens); this folder was exported for at most {info.max_chunks} ({fix})")
        per_encoder.append(chunks)
    first = per_encoder[0]
    if any({t: c.count for t, c in other.items()} != {t: c.count for t, c in first.items()}
           for other in per_encoder[1:]):
        raise UsageError("the text encoders' tokenizers split the prompt into different numbers of chunks: this "
                         "folder's tokenizers do not agree (re-export it)")
    texts = list(first)
    k = max(c.count for c in first.values())
    if any(c.count < k for c in first.values()) and "" not in first:  # padding: the empty prompt's encoding
        for tok, chunks in zip(tokenizers, per_encoder):
            chunks[""] = chunk_prompt("", tok.fragments, tok.bos_id, tok.eos_id, tok.pad_id, tok.comma_id)
        texts.append("")
    return TextPlan(tuple(texts), tuple(per_encoder))


def accepted_options(info: ModelInfo) -> set[str]:
    """The request's micro-conditioning fields this family takes."""
    items = info.added_conditions.time_ids if info.added_conditions is not None else ()
    taken = {n for n in PAIRS if n in items} | {f"negative_{n}" for n in PAIRS if n in items}
    if "aesthetic_score" in items:  # the refiner's negative ids take the positive crop (diffusers)
        taken.discard("negative_crops_coords_top_left")
        taken |= {"aesthetic_score", "negative_aesthetic_score"}
    return taken


def for_model(info: ModelInfo, req: GenerationRequest) -> GenerationRequest:
    """``req`` without the micro-conditioning this family does not take (one request for two models: base and
    refiner each take their own)."""
    from dataclasses import replace

    taken = accepted_options(info)
    defaults = {n: None for n in (*PAIRS, *(f"negative_{n}" for n in PAIRS)) if n not in taken}
    if "aesthetic_score" not in taken:
        defaults |= {"aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}
    return replace(req, **defaults)


def check_options(info: ModelInfo, req: GenerationRequest) -> None:
    """Refuse conditioning options this family does not take (never silently ignored)."""
    items = info.added_conditions.time_ids if info.added_conditions is not None else ()
    taken = accepted_options(info)
    for name in (*PAIRS, *(f"negative_{n}" for n in PAIRS)):
        if getattr(req, name) is not None and name not in taken:
            raise UsageError(f"{name} is micro-conditioning this model does not take (its U-Net is conditioned on "
                             f"{', '.join(items) or 'the text alone'})")
    if "aesthetic_score" not in taken and (req.aesthetic_score, req.negative_aesthetic_score) != (6.0, 2.5):
        raise UsageError("aesthetic_score is the SDXL refiner's conditioning; this model does not take it")


def time_ids(info: ModelInfo, req: GenerationRequest, height: int, width: int, task: str) -> np.ndarray:
    """The (negative, positive) time ids (2, n) float32, diffusers' ``_get_add_time_ids``: the original and target
    sizes default to the generation's (height, width), the crop to (0, 0). Negative: txt2img's (base pipeline) are
    the positive ones unless both negative sizes are given; img2img/inpainting's take each negative value or the
    positive one (the crop (0, 0)); with aesthetic scores (the refiner), the negative original size, the positive
    crop and the negative score."""
    items = info.added_conditions.time_ids
    size = (height, width)
    pos = {"original_size": req.original_size or size, "crops_coords_top_left": req.crops_coords_top_left or (0, 0),
           "target_size": req.target_size or size, "aesthetic_score": (req.aesthetic_score,)}
    if "aesthetic_score" in items:
        neg = dict(pos, original_size=req.negative_original_size or pos["original_size"],
                   aesthetic_score=(req.negative_aesthetic_score,))
    elif task == "txt2img":
        both = req.negative_original_size is not None and req.negative_target_size is not None
        neg = dict(original_size=req.negative_original_size, target_size=req.negative_target_size,
                   crops_coords_top_left=req.negative_crops_coords_top_left or (0, 0)) if both else pos
    else:
        neg = dict(original_size=req.negative_original_size or pos["original_size"],
                   crops_coords_top_left=req.negative_crops_coords_top_left or (0, 0),
                   target_size=req.negative_target_size or pos["target_size"])
    return np.array([[v for item in items for v in values[item]] for values in (neg, pos)], np.float32)  # (2, n)


def encode(engines, info: ModelInfo, req: GenerationRequest, plan: TextPlan, cfg: bool, prompts, negatives,
           ids: np.ndarray | None, dtypes) -> dict[str, np.ndarray]:
    """The U-Net's conditioning inputs: ``encoder_hidden_states`` (kB, 77c, D) = [negatives; prompts] each repeated
    per image (k = 2 with guidance), and with added conditions the pooled embeddings (kB, P) and time ids (kB, n)
    (``ids``: ``time_ids``' (2, n)). ``dtypes(name)``: the U-Net's input dtype. Every encoder runs once on every
    chunk of every distinct text."""
    encoded: list[dict[str, np.ndarray]] = []
    pooled: dict[str, np.ndarray] = {}
    for e, chunks in zip(info.encoders, plan.chunks):
        rows = np.concatenate([chunks[t].ids for t in plan.texts])  # (R, 77)
        out = engines[e.component].run({"input_ids": rows})
        hidden = out[hidden_output(req.clip_skip, e.skip_offset)]  # (R, 77, D_e)
        starts = np.cumsum([0] + [chunks[t].count for t in plan.texts])  # each text's first row
        empty = hidden[starts[plan.texts.index("")]].astype(np.float32) if "" in plan.texts else None  # (77, D_e)
        encoded.append(dict(zip(plan.texts, join_chunks(hidden, [chunks[t] for t in plan.texts], empty))))
        if e.pooled:  # the first chunk's (A1111); diffusers has only one
            pooled = {t: out[e.pooled][starts[i]].astype(np.float32) for i, t in enumerate(plan.texts)}  # (P,)
    joined = {t: np.concatenate([enc[t] for enc in encoded], axis=-1) for t in plan.texts}  # (77k, D)
    bad = [t for t, x in joined.items() if not np.isfinite(x).all()]
    if bad:  # emphasis weights whose product overflows, or that cancel the chunk's mean (weights summing to 0)
        raise UsageError(f"the emphasis weights of {bad[0]!r:.80} make its encoding non-finite; use other weights")
    zero = info.force_zeros_for_empty_prompt  # diffusers: zeros for a negative prompt not given; A1111: an empty one

    def rows_of(table: dict[str, np.ndarray]) -> np.ndarray:
        order = [(t, True) for t in negatives] if cfg else []
        stacked = np.stack([np.zeros_like(table[t]) if negative and zero and t == "" else table[t]
                            for t, negative in order + [(t, False) for t in prompts]])  # (kP, ...)
        return np.repeat(stacked, req.num_images_per_prompt, axis=0)  # (kB, ...)

    feeds = {"encoder_hidden_states": rows_of(joined).astype(dtypes("encoder_hidden_states"))}
    added = info.added_conditions
    if added is not None:
        feeds[added.pooled_input] = rows_of(pooled).astype(dtypes(added.pooled_input))  # (kB, P)
        batch = len(prompts) * req.num_images_per_prompt
        halves = [ids[0:1]] * (batch if cfg else 0) + [ids[1:2]] * batch
        feeds[added.time_ids_input] = np.concatenate(halves).astype(dtypes(added.time_ids_input))  # (kB, n)
    return feeds
