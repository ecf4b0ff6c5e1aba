"""LoRAs and textual-inversion embeddings of a ``Pipeline``, applied at generation time without re-export (as
diffusers' ``StableDiffusionLoraLoaderMixin`` and ``TextualInversionLoaderMixin`` add them to its pipelines): the
affected weights of the U-Net and of every text encoder are recomputed from the base weights (``runtime.lora``) and
handed to the engines (ONNX Runtime sessions re-created with new initializers, TensorRT engines refitted); the
embeddings' vectors go into each text encoder's spare token rows. A1111's ``<lora:name:weight>`` prompt tags and
"TI hashes" are read and written here."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from sdtrt.errors import UsageError
from sdtrt.runtime.backends import BackendError
from sdtrt.runtime.lora import network_name
from sdtrt.runtime.request import GenerationRequest

log = logging.getLogger("sdtrt")

_CONCEPT = re.compile(r"<(?!lora:)[^<>:\s]+>")  # diffusers' textual-inversion tokens: <cat-toy>


class AdapterMixin:
    """LoRAs (``set_loras``, prompt tags) and embeddings (``load_textual_inversion``) of a ``Pipeline``: it holds
    ``manifest``, ``folder``, ``engines``, ``tokenizers``, ``loras``, ``lora_dir``, ``lora_files``, ``embeddings``,
    ``embedding_files`` and ``_lora_state`` (a ``LoraState``)."""

    def set_loras(self, loras) -> None:
        """LoRAs for every later generation: [(file, scale), ...] or ["file:scale", ...] (diffusers/PEFT or
        kohya/A1111 .safetensors; an empty list: none). Applied without re-export: the U-Net's and text encoder's
        affected weights are the base weights plus the scaled low-rank updates, computed afresh from the base every
        time (``runtime.lora``), so switching never accumulates. A swap that fails leaves the pipeline as it was: a
        refit TensorRT refused (which may have changed some weights) is undone by restoring the graph's own weights,
        and the LoRAs set before are applied again from those by the next generation."""
        loras = normalize_loras(loras)
        self._apply_loras(loras)  # first: a LoRA that fails leaves the pipeline as it was
        self.loras = loras

    def load_textual_inversion(self, path: str | Path, token: str | None = None, apply: bool = True) -> str:
        """Add a textual-inversion embedding (diffusers' name and file formats; A1111's ``emb_params`` files take
        the file's name as token; SDXL's clip_l/clip_g files, one set per encoder): its vectors go into each text
        encoder's spare token rows, no re-export. Returns the token to write in prompts (an n-vector token expands to
        n tokens, as diffusers does)."""
        from sdtrt.runtime.lora import read_embedding

        m = self.manifest.model
        token, per_encoder = read_embedding(Path(path), token, m)  # graph -> (n, D_e)
        for e in m.encoders:
            engine = self.engines[e.component]
            if not hasattr(engine, "override") or getattr(engine, "refittable", True) is False:
                raise UsageError("embeddings need ONNX Runtime or TensorRT engines built with `sdtrt build "
                                 "--refittable`")
        n = len(next(iter(per_encoder.values())))
        used = sum(len(next(iter(v.values()))) for v in self.embeddings.values())
        if used + n > m.embedding_slots:
            raise UsageError(f"embedding {token!r} needs {n} token rows; this folder has "
                             f"{m.embedding_slots - used} of {m.embedding_slots} left"
                             + (" (exported before sdtrt kept spare rows: re-export it)" if not m.embedding_slots else ""))
        if token in self.embeddings:
            raise UsageError(f"an embedding named {token!r} is already loaded")
        tokens = [token] + [f"{token}_{i}" for i in range(1, n)]
        try:
            for tokenizer in self.tokenizers:  # each encoder's: all checked before any changes
                tokenizer.check_new_tokens(tokens, m.vocab_size + used)
            for tokenizer in self.tokenizers:
                tokenizer.add_tokens(tokens, m.vocab_size + used)
        except Exception as ex:  # ManifestError: a token the vocabulary has, or a tokenizer of another size
            raise UsageError(str(ex)) from None
        self.embeddings[token] = per_encoder
        self.embedding_files[token] = Path(path).expanduser()
        if apply:
            self._apply_loras(self.loras)
        return token

    def _apply_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        from sdtrt.runtime.lora import targets, updated_weights

        state = self._lora_state
        graphs = targets(self.manifest.model)  # the U-Net and every text encoder
        weights = {t.graph: self.manifest.components[t.graph].weights for t in graphs}
        if (loras or self.embeddings) and not all(weights.values()):
            raise UsageError("this folder was exported without weight maps, so LoRAs cannot be applied at generation "
                             "time: re-export it with this sdtrt (or fuse them with `sdtrt export --lora`)")
        layers = [(state.layers(path, weights, graphs), scale) for path, scale in loras]
        encoders = {e.component for e in self.manifest.model.encoders}
        for graph in weights:
            # what this graph's weights must hold: the LoRAs touching it (a file rewritten in place counts as
            # another) and, for a text encoder, the embeddings (only ever added); ((), 0) is the graph's own
            key = (tuple((path, scale, state.version(path)) for (path, scale), (ls, _) in zip(loras, layers)
                         if any(x.graph == graph for x in ls)),
                   len(self.embeddings) if graph in encoders else 0)
            if state.applied.get(graph, ((), 0)) == key:
                continue
            engine = self.engines[graph]
            if not hasattr(engine, "override"):
                raise UsageError(f"the {graph} engine cannot take new weights: use ONNX Runtime or refittable TensorRT "
                                 "engines, or fuse LoRAs at export (`sdtrt export MODEL --lora FILE:SCALE`)")
            new = updated_weights(self.folder, self.manifest.components[graph], graph, layers)
            if graph in encoders and self.embeddings:
                new |= self._token_table(graph, new)
            try:
                engine.override(new)
            except BackendError as ex:
                self._restore_base(graph, engine, ex)
                raise
            state.applied[graph] = key
            state.broken.pop(graph, None)

    def _restore_base(self, graph: str, engine, error: BackendError) -> None:
        """After a failed refit, whose weights TensorRT may have changed in part: never report the earlier LoRAs as
        still applied, and put the graph's own weights back; if even that fails, generations are refused (``generate``)
        until a weight change succeeds."""
        state = self._lora_state
        state.applied[graph] = None  # unknown: differs from every set of LoRAs, the graph's own weights included
        try:
            engine.override({})
        except BackendError as again:
            state.broken[graph] = f"{error}; restoring its own weights failed too ({again})"
            return
        state.applied[graph] = ((), 0)  # the graph's own weights, without LoRAs or embeddings

    def _token_table(self, graph: str, updated: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Text encoder ``graph``'s token table with the embeddings' vectors in its spare rows (after any LoRA
        update)."""
        entry = self.manifest.components[graph].weights["embeddings.token_embedding"]
        table = updated.get(entry.initializer)
        if table is None:
            from sdtrt.runtime.lora import base_weight

            table = base_weight(self.folder, entry)  # (V + K, D)
        rows = np.concatenate([v[graph] for v in self.embeddings.values()])  # (n, D) in load order
        v = self.manifest.model.vocab_size
        table[v:v + len(rows)] = rows.astype(table.dtype)
        return {entry.initializer: table}

    def _expand_embeddings(self, req: GenerationRequest) -> GenerationRequest:
        """Each multi-vector embedding token in the prompts written as its n tokens (diffusers' maybe_convert_prompt).
        A ``<name>`` that is no loaded embedding (diffusers' textual-inversion convention) is only warned about, as
        A1111 does with names it does not know: the words go to the text encoder as they are."""
        loaded = {t.lower() for t in self.embeddings}
        unknown = sorted({m for text in req.prompt + req.negative_prompt for m in _CONCEPT.findall(text)
                          if m.lower() not in loaded})
        if unknown:
            log.warning("%s looks like a textual-inversion token but no such embedding is loaded (--embedding, "
                        "--embeddings-dir); it is read as plain words", ", ".join(unknown))
        if not self.embeddings:
            return req
        from dataclasses import replace as replace_

        from sdtrt.runtime.lora import expand_prompt

        ids = {self.tokenizer._tok.token_to_id(t): t for t in self.embeddings}
        counts = {t: len(next(iter(v.values()))) for t, v in self.embeddings.items()}
        texts = list(req.prompt + req.negative_prompt)
        found = self.tokenizer.fragments(texts)
        texts = [expand_prompt(text, {ids[i] for i in f if i in ids}, counts) for text, f in zip(texts, found)]
        n = len(req.prompt)
        return replace_(req, prompt=tuple(texts[:n]), negative_prompt=tuple(texts[n:]))

    def _prompt_loras(self, req: GenerationRequest) -> tuple[GenerationRequest, tuple[tuple[str, float], ...],
                                                            tuple[str, ...]]:
        """The request with A1111's ``<lora:name:weight>`` tags taken out of its prompts, the LoRAs they name
        (``lora_files[name]``, else ``lora_dir``/name.safetensors; the same name twice: the first weight) and their
        names."""
        from dataclasses import replace as replace_

        from sdtrt.runtime.lora import collect_tags

        texts, found = collect_tags(req.prompt + req.negative_prompt)
        if not found:
            return req, (), ()
        if self.lora_dir is None and not set(found) <= set(self.lora_files):
            name = next(n for n in found if n not in self.lora_files)
            raise UsageError(f"the prompt names <lora:{name}:…>: give the folder of LoRA files (lora_dir=, or "
                             "--lora-dir)")
        loras = []
        for name, weight in found.items():
            path = Path(self.lora_files[name]) if name in self.lora_files else self.lora_dir / f"{name}.safetensors"
            if not path.is_file():
                raise UsageError(f"<lora:{name}:{weight:g}>: {path} does not exist")
            loras.append((str(path), weight))
        n = len(req.prompt)
        return (replace_(req, prompt=tuple(texts[:n]), negative_prompt=tuple(texts[n:])), tuple(loras),
                tuple(found))

    def _ti_hashes(self, *texts: str) -> str | None:
        """A1111's "TI hashes" of the embeddings ``texts`` use: "token: short SHA-256 of its file", in load order."""
        if not self.embeddings:
            return None
        from sdtrt.runtime.lora import file_digest

        ids = {self.tokenizer._tok.token_to_id(t): t for t in self.embeddings}
        used = {ids[i] for found in self.tokenizer.fragments(list(texts)) for i in found if i in ids}
        return ", ".join(f"{network_name(t)}: {file_digest(self.embedding_files[t])[:12]}" for t in self.embeddings
                         if t in used) or None


def normalize_loras(loras) -> tuple[tuple[str, float], ...]:
    """[(file, scale) | "file:scale", ...] -> ((file, scale), ...), checked."""
    from sdtrt.runtime.lora import parse_spec
    from sdtrt.runtime.request import real

    if loras is None:
        return ()
    single_pair = isinstance(loras, tuple) and len(loras) == 2 and not isinstance(loras[1], (str, tuple, list, Path))
    if isinstance(loras, (str, Path)) or single_pair:
        loras = [loras]
    out = []
    for item in loras:
        if isinstance(item, Path):
            path, scale = str(item), 1.0
        elif isinstance(item, str):
            path, scale = parse_spec(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            path, scale = str(item[0]), real(item[1], "LoRA scale", -100.0, 100.0)
        else:
            raise UsageError(f"a LoRA is (file, scale) or 'file:scale', got {item!r}")
        out.append((path, scale))
    return tuple(out)


class LoraState:
    """What a pipeline has applied: per graph the LoRAs in its weights, and the files read (by path and mtime)."""

    def __init__(self):
        self.applied: dict[str, tuple] = {}
        self.broken: dict[str, str] = {}  # graph -> why its weights are unknown (a refit and its undoing failed)
        self._read: dict[tuple, list] = {}

    def layers(self, path: str, weights: dict, graphs: tuple) -> list:
        from sdtrt.runtime.lora import read_lora

        p = Path(path).expanduser()
        key = (str(p.resolve()) if p.exists() else str(p), p.stat().st_mtime_ns if p.exists() else 0)
        if key not in self._read:
            if len(self._read) >= 8:  # a few files kept in memory (float32 low-rank factors: small)
                self._read.pop(next(iter(self._read)))
            self._read[key] = read_lora(p, weights, graphs)
        return self._read[key]

    @staticmethod
    def version(path: str) -> tuple[int, int]:
        """(mtime, size) of a LoRA file: what tells a rewritten file from the one applied."""
        try:
            st = Path(path).expanduser().stat()
        except OSError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    @staticmethod
    def digest(path: str) -> str:
        """A1111's short hash of a LoRA file ("Lora hashes")."""
        from sdtrt.runtime.lora import file_digest

        return file_digest(path, "lora")[:12]
