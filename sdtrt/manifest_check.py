"""What a ``manifest.json`` may say, beyond its types: sane numbers, and file names inside its folder.

An engine folder is input like any other: a hand-edited or hostile manifest must not make sdtrt read outside the
folder (``/etc``, ``../..``, a symlink out) or compute with impossible numbers (``embedding_slots: -5`` once read
"-5 of -5 left"). ``values_problem`` checks what the JSON says; ``folder_problem`` checks where its names lead
in the folder it was loaded from. Both return one line, or None. Torch-free.

Two fields name things outside the folder on purpose and are no file of it: ``model.source`` and a ControlNet's
``source`` (what the export was made from, shown by ``info``; ``bench`` loads the model from there for its
PyTorch baseline, and ``export-controlnet`` re-creates a built-in only by its name).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path, PurePosixPath

MAX_BATCH = 4096  # images per generation an export may allow
MAX_SIZE = 32768  # pixels per side an export may allow
MAX_DIM = 2**31 - 1  # a tensor dimension (TensorRT's and ONNX Runtime's int32 shapes)
MAX_COUNT = 2**53  # any other count, size or offset (JSON's exact integers)
MAX_SEED = 2**64 - 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_WEIGHT_DTYPES = ("float16", "float32", "bfloat16")
# records of a comparison, where infinity means "did not match" (parity.compare, psnr)
_UNBOUNDED_FLOATS = {"max_abs_error", "max_rel_error", "psnr_db"}


def values_problem(m) -> str | None:
    """Why the numbers and names of manifest ``m`` cannot describe an engine folder, or None."""
    return _scalars_problem(m) or _model_problem(m) or _components_problem(m) or _tensorrt_problem(m)


def _scalars_problem(obj, label: str = "") -> str | None:
    """Every integer of the manifest is a count, size, offset or index: 0 or more and not absurd; every float is
    finite (but a comparison's error); no string holds a NUL (a path with one fails deep inside the OS)."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            problem = _scalars_problem(getattr(obj, f.name), f"{label}.{f.name}" if label else f.name)
            if problem:
                return problem
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            problem = ("\0" in k and f"{label} has a name with a NUL character") or _scalars_problem(v, f"{label}.{k}")
            if problem:
                return problem
        return None
    if isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            problem = _scalars_problem(v, f"{label}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(obj, bool):
        return None
    if isinstance(obj, int):
        top = MAX_SEED if label.endswith("weights_seed") else MAX_COUNT
        return None if 0 <= obj <= top else f"{label} = {obj} (must be 0..{top})"
    if isinstance(obj, float):
        if label.rpartition(".")[2] in _UNBOUNDED_FLOATS or math.isfinite(obj):
            return None
        return f"{label} = {obj} (must be a finite number)"
    if isinstance(obj, str) and "\0" in obj:
        return f"{label} holds a NUL character"
    return None


def _model_problem(m) -> str | None:
    model, r = m.model, m.ranges
    checks = [
        (model.latent_channels <= 1024, f"latent_channels = {model.latent_channels} (at most 1024)"),
        (model.vae_scale_factor <= 64, f"vae_scale_factor = {model.vae_scale_factor} (at most 64)"),
        (model.text_hidden_size <= 65536, f"text_hidden_size = {model.text_hidden_size} (at most 65536)"),
        (model.max_text_length <= 4096, f"max_text_length = {model.max_text_length} (at most 4096)"),
        (model.embedding_slots <= 65536, f"embedding_slots = {model.embedding_slots} (at most 65536)"),
        (model.vocab_size + model.embedding_slots <= 2**31 - 1,
         f"vocab_size + embedding_slots = {model.vocab_size + model.embedding_slots} (token ids are int32)"),
        (r.batch_max <= MAX_BATCH, f"batch range {r.batch_min}..{r.batch_max} (at most {MAX_BATCH})"),
        (r.size_max <= MAX_SIZE, f"size range {r.size_min}..{r.size_max} (at most {MAX_SIZE} px)"),
    ]
    for ok, what in checks:
        if not ok:
            return what
    for label, path in (("tokenizer_dir", m.tokenizer_dir), ("scheduler_config", m.scheduler_config),
                        *((f"{e.component} tokenizer", e.tokenizer) for e in m.model.text_encoders)):
        problem = _relative_problem(label, path)
        if problem:
            return problem
    return None


def _relative_problem(label: str, path: str) -> str | None:
    """A path inside the folder, written relative to it: no absolute path, no ``..``, nothing empty."""
    parts = PurePosixPath(path).parts
    if not path or path.startswith(("/", "~")) or "\\" in path or ".." in parts or not parts:
        return f"{label} = {path!r} (a path inside the engine folder)"
    return None


def _plain_name(label: str, name: str) -> str | None:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return f"{label} {name!r} (a file name inside the folder)"
    return None


def _components_problem(m) -> str | None:
    for name, c in m.components.items():
        if not _SHA256.match(c.sha256):
            return f"{name} sha256 {c.sha256!r} (64 hex digits)"
        if len(set(c.external_data)) != len(c.external_data) or c.file in c.external_data:
            return f"{name} lists a file twice"
        for file, digest in c.external_sha256.items():
            if file not in c.external_data or not _SHA256.match(digest):
                return f"{name} external_sha256 of {file!r}"
        for spec in c.inputs + c.outputs:
            if any(hi > MAX_DIM for hi in spec.max_shape):
                return f"{name}.{spec.name} max_shape {spec.max_shape} (dimensions up to {MAX_DIM})"
        for key, w in c.weights.items():
            label = f"{name} weight {key}"
            if w.file not in c.external_data:
                return f"{label} is in {w.file!r}, not one of the graph's external data files"
            if w.dtype not in _WEIGHT_DTYPES or not w.shape or min(w.shape) < 1:
                return f"{label}: dtype {w.dtype!r}, shape {w.shape}"
            nbytes = math.prod(w.shape) * (4 if w.dtype == "float32" else 2)
            if w.offset + nbytes > c.size_bytes:
                return f"{label} ends at byte {w.offset + nbytes}, beyond the graph's {c.size_bytes} bytes"
        if c.memory is not None:
            inputs = {s.name for s in c.inputs}
            rows = [s.rows_input for s in c.memory.attention] + [c.memory.activation_rows_input] * bool(
                c.memory.activation_rows_input)
            if any(r not in inputs for r in rows):
                return f"{name} memory model names an input the graph does not have"
            if any(s.heads < 1 for s in c.memory.attention):
                return f"{name} memory model has an attention with no heads"
            floats = [v for s in c.memory.attention for v in (s.rows_per_row, *s.query, *s.key)] + [*c.memory.activation]
            if any(v < 0 for v in floats):
                return f"{name} memory model has a negative coefficient"
        if c.flops is not None and c.flops.rows_input not in {s.name for s in c.inputs}:
            return f"{name} FLOP model names an input the graph does not have"
        if any(v.tolerance < 0 for v in c.validation):
            return f"{name} validation has a negative tolerance"
    model = m.model
    for e in model.encoders:  # each encoder's spare rows take its part of an embedding's vectors
        text = m.components.get(e.component)
        table = text.weights.get("embeddings.token_embedding") if text is not None else None
        if table is not None and table.shape != (model.vocab_size + model.embedding_slots, e.hidden_size):
            return (f"vocab_size {model.vocab_size} + embedding_slots {model.embedding_slots} rows of text_hidden_size "
                    f"{e.hidden_size}, but the text encoder's token table is {table.shape[0]} x {table.shape[1]}")
        if table is None and model.embedding_slots:
            return f"embedding_slots = {model.embedding_slots}, but the text encoder records no token table"
    return None


def _tensorrt_problem(m) -> str | None:
    b = m.tensorrt
    if b is None:
        return None
    if not 0 <= b.opt_level <= 5:
        return f"tensorrt.opt_level = {b.opt_level} (0..5)"
    if b.workspace_gb is not None and not b.workspace_gb > 0:
        return f"tensorrt.workspace_gb = {b.workspace_gb} (positive)"
    for name, e in b.engines.items():
        if name not in m.components:
            return f"an engine for {name!r}, which is no component"
        problem = _plain_name(f"{name} engine file", e.file)
        if problem:
            return problem
        if not _SHA256.match(e.sha256):
            return f"{name} engine sha256 {e.sha256!r} (64 hex digits)"
        if min(e.size_bytes, e.workspace_bytes, e.device_memory_bytes) < 0:
            return f"{name} engine sizes (negative bytes)"
        inputs = {s.name for s in m.components[name].inputs}
        for input_name, shapes in e.profile.items():
            if input_name not in inputs or len(shapes) != 3 or len({len(s) for s in shapes}) != 1:
                return f"{name} engine profile of {input_name!r}"
            if not all(lo <= opt <= hi <= MAX_DIM for lo, opt, hi in zip(*shapes)):
                return f"{name} engine profile of {input_name!r} {shapes} (min <= opt <= max)"
    for name in b.verification:
        if name not in m.components:
            return f"a verification of {name!r}, which is no component"
    e2e = b.end_to_end
    if e2e is not None and min(e2e.width, e2e.height, e2e.batch, e2e.steps) < 1:
        return "tensorrt.end_to_end has a size, batch or step count below 1"
    return None


def folder_problem(m, folder: Path) -> str | None:
    """Why the files manifest ``m`` names cannot be read inside ``folder``: a name (or a symlink on its way, or one
    in the tokenizer's or scheduler's folder) that leads outside it. Files that are missing are not this check's
    business (``sdtrt.integrity`` names them)."""
    from sdtrt.manifest import MANIFEST_NAME

    folder = Path(folder)
    try:
        root = folder.resolve()
    except (OSError, RuntimeError) as ex:
        return f"{folder} cannot be resolved ({ex})"
    names = [("manifest.json", MANIFEST_NAME), ("tokenizer_dir", m.tokenizer_dir),
             ("scheduler_config", m.scheduler_config),
             *((f"{e.component} tokenizer", e.tokenizer) for e in m.model.text_encoders)]
    for name, c in m.components.items():
        names += [(f"{name} file", f) for f in (c.file, *c.external_data)]
    if m.tensorrt is not None:
        names += [(f"{name} engine", e.file) for name, e in m.tensorrt.engines.items()]
        # a record only (nothing opens the cache through it); builds before issue 22 wrote an absolute path, which
        # stays valid when the folder moves: only a relative name must stay inside
        cache = m.tensorrt.timing_cache
        if cache and not PurePosixPath(cache).is_absolute():
            names.append(("tensorrt.timing_cache", cache))
    problem = _outside(folder, root, names)
    if problem:
        return problem
    inner = []  # what the runtime opens in the tokenizer's and scheduler's folders by its own names
    tokenizers = {m.tokenizer_dir, *(e.tokenizer for e in m.model.text_encoders)}
    for subdir in sorted(tokenizers | {str(PurePosixPath(m.scheduler_config).parent)} - {"."}):
        try:
            inner += [(f"{subdir}/", f"{subdir}/{e.name}") for e in (folder / subdir).iterdir()]
        except OSError:
            pass
    return _outside(folder, root, inner)


def _outside(folder: Path, root: Path, names: list[tuple[str, str]]) -> str | None:
    for label, name in names:
        try:
            target = (folder / name).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return f"{label} {name!r} cannot be resolved (a symlink loop?)"
        if target != root and root not in target.parents:
            return f"{label} {name!r} leads outside the engine folder (to {target})"
    return None
