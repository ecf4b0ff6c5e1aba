"""LoRAs applied at generation time, torch-free: no re-export, no rebuild (Hu et al. 2021; kohya's sd-scripts and
diffusers' PEFT layout).

A LoRA file is read with safetensors' NumPy API and its keys are resolved in NumPy against the export's weight
map (``Component.weights``: module path -> initializer, transposed or not, and where its bytes are), so no torch
and no diffusers key converter is needed: both formats name layers by diffusers' module paths —

- diffusers/PEFT (``save_lora_weights``): ``unet.<path>.lora_A.weight`` / ``lora_B``, ``text_encoder.<path>…``;
  alpha = rank unless the file's metadata or an ``.alpha`` tensor says otherwise;
- kohya/A1111: ``lora_unet_<path with _>.lora_down.weight`` / ``lora_up`` and ``.alpha``, ``lora_te_…`` for the
  text encoder (its paths under ``text_model``); SDXL's ``lora_te1_…``/``lora_te2_…`` and U-Net paths of the original
  (SGM) U-Net, ``input_blocks_4_1_…`` (``sgm_names``).

Which graphs a LoRA changes and how files name them comes from the manifest (``targets``): the U-Net and each text
encoder, by its name in diffusers' pipeline (``text_encoder``, ``text_encoder_2``).

Each layer's update is ``scale * alpha / rank * up @ down`` (a convolution's kernels flattened), added to the
**base** weight read from the graph's external data every time: switching LoRAs never accumulates (the trap of
TensorRT issue 3628, refitting A, B, then A again).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdtrt.errors import UsageError
from sdtrt.runtime.lora_names import Target, sgm_names, targets  # noqa: F401  (targets, sgm_names: the LoRA API)

PICKLED = (".ckpt", ".pt", ".pth", ".bin")
# SDXL textual-inversion files (A1111's and diffusers' readers): each encoder's vectors, by its name in diffusers
EMBEDDING_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
_A1111_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::([^>]*))?>")


@dataclass(frozen=True)
class Layer:
    graph: str  # the graph it changes (a Target's)
    path: str  # module path in the export's weight map
    down: np.ndarray  # (r, in, ...) float32
    up: np.ndarray  # (out, r, ...) float32
    alpha: float


def parse_spec(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` -> (file, scale)."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            path, scale = head, float(tail)
        except ValueError:
            named = Path(head).expanduser()
            if head.strip() and not Path(text).expanduser().exists() and (
                    named.is_file() or named.suffix.lower() in (".safetensors", *PICKLED)):
                raise UsageError(f"--lora {text!r}: the scale {tail!r} is not a number (FILE[:SCALE])") from None
    if not path.strip():
        raise UsageError(f"--lora {text!r}: no file")
    if not math.isfinite(scale):
        raise UsageError(f"LoRA scale must be finite, got {scale} ({text})")
    return path, scale


def prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's ``<lora:name:weight>`` tags taken out of a prompt: (the prompt without them, [(name, weight)])."""
    found = []
    for m in _A1111_TAG.finditer(prompt):
        weight = m.group(2)
        try:
            value = float(weight) if weight not in (None, "") else 1.0
        except ValueError:
            raise UsageError(f"<lora:{m.group(1)}:{weight}>: the weight must be a number") from None
        if not math.isfinite(value):
            raise UsageError(f"<lora:{m.group(1)}:{weight}>: the weight must be finite")
        unet = m.group(3)
        if unet not in (None, "") and unet.strip() != (weight or "").strip():
            raise UsageError(f"{m.group(0)}: separate text-encoder and U-Net weights are not supported; give one "
                             "weight")
        name = m.group(1).strip()
        if "/" in name or "\\" in name or name in ("", ".", "..") or name.startswith("."):
            raise UsageError(f"{m.group(0)}: a LoRA name is a file name in the LoRA folder, without a path")
        found.append((name, value))
    return _A1111_TAG.sub("", prompt), found


def network_name(name: str) -> str:
    """A LoRA's or embedding's name as A1111 writes it in "Lora hashes"/"TI hashes": without ',' and ':'."""
    return name.replace(",", "").replace(":", "").strip()


_DIGESTS: dict[tuple, str] = {}


def file_digest(path, kind: str = "file") -> str:
    """The SHA-256 (hex) A1111 identifies a file by, cached per file version (path, mtime, size): ``"lora"``,
    A1111's LoRA hash (``hashes.sha256(..., use_addnet_hash=True)``, kohya's ``addnet_hash_safetensors``): the
    tensor data after a .safetensors header, so that editing the metadata keeps it; ``"file"``: the whole file, as
    A1111 hashes embeddings and checkpoints."""
    import hashlib

    p = Path(path).expanduser()
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size, kind)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            if kind == "lora" and p.suffix.lower() == ".safetensors":
                f.seek(8 + int.from_bytes(f.read(8), "little"))
            while block := f.read(1 << 22):
                h.update(block)
        if len(_DIGESTS) >= 256:
            _DIGESTS.pop(next(iter(_DIGESTS)))
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def lora_matches(path, short: str) -> bool:
    """Whether the LoRA file at ``path`` is the one a "Lora hashes" entry ``short`` names: A1111's hash of it, its
    whole-file SHA-256 (sdtrt before it wrote A1111's, and fused LoRAs in a manifest), or the hash its metadata
    claims (``sshs_model_hash``, which A1111 prefers when a file has it)."""
    short = short.lower()
    if file_digest(path, "lora").startswith(short) or file_digest(path, "file").startswith(short):
        return True
    try:
        from safetensors import safe_open

        with safe_open(str(Path(path).expanduser()), "np") as fh:
            claimed = (fh.metadata() or {}).get("sshs_model_hash", "")
    except Exception:  # noqa: BLE001  (not a safetensors file: read_lora says so when it is applied)
        return False
    return bool(claimed) and claimed.lower().startswith(short)


def collect_tags(texts) -> tuple[list[str], dict[str, float]]:
    """The ``<lora:name:weight>`` tags of a generation's prompts and negative prompts, as it applies them: the texts
    without their tags, and name -> weight in order of first mention (the same name again: the first weight)."""
    found: dict[str, float] = {}
    stripped = []
    for text in texts:
        rest, tags = prompt_loras(text)
        stripped.append(rest)
        for name, weight in tags:
            found.setdefault(name, weight)
    return stripped, found


def read_lora(path: Path, weights: dict[str, dict], graphs: tuple[Target, ...], allow_pickle: bool = False) \
        -> list[Layer]:
    """The layers of the LoRA at ``path`` resolved against ``weights`` (graph -> module path -> entry) of the graphs
    ``graphs`` (``targets``); a UsageError naming how many matched when not all do (a layer of a graph this model
    has not, e.g. ``lora_te2_`` on SD 1.x, counts as unmatched: nothing is applied in part)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"LoRA file {path} does not exist" if not path.exists() else f"LoRA {path} is not a file")
    if path.suffix.lower() in PICKLED:
        raise UsageError(f"LoRA {path} is pickled ({path.suffix}): only .safetensors LoRAs are read at generation time")
    tensors, metadata = read_safetensors(path, "LoRA")
    kohya = {t.graph: {p.replace(".", "_"): p for p in weights.get(t.graph, {})} for t in graphs}
    if "unet" in kohya:  # SDXL LoRAs of kohya's sd-scripts name the original U-Net's modules
        kohya["unet"] |= {sgm.replace(".", "_"): p for p, sgm in sgm_names(weights.get("unet", {})).items()}
    configs = _metadata_configs(metadata, graphs)
    unsupported = [k for k in tensors if any(x in k for x in (".dora_scale", "lora_magnitude_vector", ".lora_mid.",
                                                              ".hada_", ".lokr_"))]
    if unsupported:
        raise UsageError(f"LoRA {path.name} has DoRA or LyCORIS layers ({unsupported[0]}), which generation-time "
                         "LoRAs do not apply: fuse it at export (`sdtrt export MODEL --lora FILE`)")
    layers, unmatched, total = [], [], 0
    for key in sorted(tensors):
        if not key.endswith(".weight") or not (".lora_down." in key or ".lora_A." in key):
            continue
        total += 1
        found = _split(key, graphs)
        if found is None:  # a graph this model has not (another family's text encoder)
            unmatched.append(key.rsplit(".lora_", 1)[0])
            continue
        graph, module, style = found
        path_ = module if style == "peft" else kohya.get(graph, {}).get(module)
        if path_ is not None and path_.removeprefix("text_model.") in weights.get(graph, {}):
            path_ = path_.removeprefix("text_model.")
        up_key = key.replace("lora_A", "lora_B") if style == "peft" else key.replace("lora_down", "lora_up")
        if path_ not in weights.get(graph, {}) or up_key not in tensors:
            unmatched.append(module)
            continue
        down, up = tensors[key].astype(np.float32), tensors[up_key].astype(np.float32)
        alpha_key = key.rsplit(".lora_", 1)[0] + ".alpha"
        alpha = float(tensors[alpha_key]) if alpha_key in tensors else \
            _alpha(configs.get(graph, {}), module, down.shape[0])
        entry = weights[graph][path_]
        if _delta_shape(down, up) != tuple(entry.shape if not entry.transposed else entry.shape[::-1]):
            unmatched.append(module)
            continue
        layers.append(Layer(graph, path_, down, up, alpha))
    if total == 0:
        old = any(".lora.down.weight" in k for k in tensors)
        raise UsageError(f"{path} holds no LoRA layers (no lora_down/lora_A weights): "
                         + ("diffusers' old attention-processor format is read at export only (`sdtrt export "
                            "--lora`)" if old else "not a LoRA"))
    if unmatched:
        raise UsageError(f"LoRA {path.name}: {total - len(unmatched)} of its {total} layers match this model's (first "
                         f"unmatched: {unmatched[0]}): it was made for another base model")
    return layers


def read_safetensors(path: Path, what: str) -> tuple[dict[str, np.ndarray], dict]:
    """Every tensor of a .safetensors file as NumPy (float32 for bfloat16), and its metadata.

    safetensors' NumPy API reads every dtype NumPy has; bfloat16, common in LoRAs trained in bf16, NumPy has not, so
    those tensors are read here from the file's own layout (an 8-byte header length, a JSON header of dtype, shape
    and byte offsets, then the data) and widened exactly: a bfloat16 is the top half of a float32."""
    from safetensors import safe_open

    tensors, bf16 = {}, []
    try:
        with safe_open(str(path), "np") as fh:
            metadata = fh.metadata() or {}
            for key in fh.keys():
                try:
                    tensors[key] = fh.get_tensor(key)
                except TypeError:  # "data type 'bfloat16' not understood"
                    bf16.append(key)
        if bf16:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            raw = np.memmap(path, np.uint8, "r", offset=8 + size)
            for key in bf16:
                info = header[key]
                if info.get("dtype") != "BF16":
                    raise TypeError(f"{key} has dtype {info.get('dtype')}")
                start, end = info["data_offsets"]
                half = raw[start:end].view(np.uint16).astype(np.uint32) << 16
                tensors[key] = half.view(np.float32).reshape(info["shape"])
    except Exception as ex:  # noqa: BLE001  (safetensors raises its own untyped errors for broken files)
        raise UsageError(f"{what} {path} is not a readable safetensors file ({str(ex).splitlines()[0][:200]})") \
            from None
    return tensors, metadata


def _split(key: str, graphs: tuple[Target, ...]):
    """(graph, module, style) of a LoRA down/A weight key, or None when no graph of this model has its prefix."""
    for t in graphs:
        if key.startswith(t.name + ".") and ".lora_A." in key:
            return t.graph, key[len(t.name) + 1:].rpartition(".lora_")[0], "peft"
        for prefix in t.kohya:
            if key.startswith(prefix) and ".lora_down." in key:
                module = key[len(prefix):].rpartition(".lora_")[0]
                if t.graph != "unet":
                    module = module.removeprefix("text_model_")
                return t.graph, module, "kohya"
    return None


def _metadata_configs(metadata: dict, graphs: tuple[Target, ...]) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata``: the LoraConfig of each component (by its diffusers name), stored flat
    (``unet.lora_alpha``) or nested (``{"unet": {...}}``) -> graph -> config."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, dict] = {}
    for t in graphs:
        name = t.name
        config = dict(data.get(name) or {}) if isinstance(data.get(name), dict) else {}
        config |= {k[len(name) + 1:]: v for k, v in data.items() if k.startswith(name + ".")}
        if config:
            out[t.graph] = config
    return out


def _alpha(config: dict, module: str, rank: int) -> float:
    """The effective alpha of a layer under a PEFT LoraConfig: alpha_pattern (a key that ends the module path) over
    lora_alpha (default: the rank); rsLoRA's alpha / sqrt(r) expressed as an alpha over r."""
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = float(value)
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # scale alpha / sqrt(r) = (alpha sqrt(r)) / r
    return alpha


def _delta_shape(down: np.ndarray, up: np.ndarray) -> tuple[int, ...]:
    if down.ndim == 2:
        return (up.shape[0], down.shape[1])
    return (up.shape[0], down.shape[1], *down.shape[2:])


def delta(layer: Layer) -> np.ndarray:
    """alpha / rank * up @ down, in the layer's weight shape (float32)."""
    rank = layer.down.shape[0]
    up = layer.up.reshape(layer.up.shape[0], rank)
    down = layer.down.reshape(rank, -1)
    return (layer.alpha / rank) * (up @ down).reshape(_delta_shape(layer.down, layer.up))


def base_weight(folder: Path, entry) -> np.ndarray:
    """The graph's own value of a weight: a writable copy, in the graph's dtype and layout. ``entry`` is a mapped
    weight (``manifest.WeightEntry``, read from its external data file where the export recorded it), or
    ``(graph file, initializer name)`` for any initializer of an ONNX graph in ``folder`` (any rank, biases
    included; its bytes in external data or inside the .onnx itself), which a refit needs for every weight TensorRT
    combined with a changed one."""
    if isinstance(entry, tuple):
        graph, name = entry
        found = onnx_initializers(Path(folder) / graph).get(name)
        if found is None:
            raise UsageError(f"{graph} has no initializer {name!r}: the engine and the exported graph disagree "
                             f"(rebuild the engines with `sdtrt build {folder}`)")
        entry = found
    raw = np.memmap(Path(folder) / entry.file, np.uint8, "r")
    n = int(np.prod(entry.shape)) * np.dtype(entry.dtype).itemsize
    return np.array(raw[entry.offset:entry.offset + n].view(entry.dtype).reshape(entry.shape))


# ONNX TensorProto.DataType -> NumPy, for the types whose bytes are stored little-endian as they are
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
                11: "float64"}
_INDEX: dict[tuple, dict] = {}


def onnx_initializers(path: Path) -> dict:
    """Every initializer of the ONNX graph at ``path`` -> a ``manifest.WeightEntry`` saying where its bytes are, read
    from the protobuf itself (no onnx package: the runtime does not depend on it). onnx.proto3: ModelProto.graph = 7,
    GraphProto.initializer = 5; TensorProto dims = 1, data_type = 2, float_data = 4 (packed), name = 8,
    raw_data = 9, double_data = 10 (packed), external_data = 13 (location/offset/length), data_location = 14.
    Cached per file and modification time."""
    import mmap

    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _INDEX:
        return _INDEX[key]
    out = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for num, start, end in _fields(buf, 0, len(buf)):
            if num != 7 or end is None:
                continue
            for gnum, gstart, gend in _fields(buf, start, end):
                if gnum == 5 and gend is not None:
                    name, entry = _tensor_entry(buf, gstart, gend, path.name)
                    if entry is not None:
                        out[name] = entry
    _INDEX[key] = out
    return out


def _tensor_entry(buf, start: int, end: int, graph_file: str):
    from sdtrt.manifest import WeightEntry

    dims, dtype, name, data, external, location = [], 0, "", None, {}, 0
    for num, s, e in _fields(buf, start, end):
        if num == 1:
            if e is None:
                dims.append(s)
            else:  # packed
                i = s
                while i < e:
                    d, i = _varint(buf, i)
                    dims.append(d)
        elif num == 2 and e is None:
            dtype = s
        elif num == 8 and e is not None:
            name = bytes(buf[s:e]).decode()
        elif num in (4, 9, 10) and e is not None:  # raw_data, or packed fixed-width float/double data
            data = (s, e)
        elif num == 13 and e is not None:
            kv = {k: v for k, v in _string_pairs(buf, s, e)}
            external[kv.get("key", "")] = kv.get("value", "")
        elif num == 14 and e is None:
            location = s
    np_dtype = _ONNX_DTYPES.get(dtype)
    if np_dtype is None:
        return name, None
    if location == 1:  # EXTERNAL
        return name, WeightEntry(name, False, external["location"], int(external.get("offset", 0)), np_dtype,
                                 tuple(dims))
    if data is None:
        return name, None  # stored as varints (int32_data / int64_data): not read here
    return name, WeightEntry(name, False, graph_file, data[0], np_dtype, tuple(dims))


def _string_pairs(buf, start: int, end: int):
    """StringStringEntryProto: key = 1, value = 2."""
    for num, s, e in _fields(buf, start, end):
        if e is not None:
            yield ("key" if num == 1 else "value"), bytes(buf[s:e]).decode()


def _varint(buf, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, value or start, None or end) of each protobuf field in buf[start:end]."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield num, value, None
        elif wire == 2:
            n, i = _varint(buf, i)
            yield num, i, i + n
            i += n
        elif wire == 1:
            yield num, i, i + 8
            i += 8
        elif wire == 5:
            yield num, i, i + 4
            i += 4
        else:
            raise UsageError(f"not an ONNX graph (protobuf wire type {wire})")


def updated_weights(folder: Path, component, graph: str, loras: list[tuple[list[Layer], float]]) -> dict[str, np.ndarray]:
    """initializer -> base + sum of scale x delta, in the graph's dtype and layout, for every layer the LoRAs touch."""
    sums: dict[str, np.ndarray] = {}
    for layers, scale in loras:
        for layer in layers:
            if layer.graph == graph:
                d = scale * delta(layer)
                sums[layer.path] = sums.get(layer.path, 0) + d
    out = {}
    for path_, d in sums.items():
        entry = component.weights[path_]
        new = base_weight(folder, entry).astype(np.float32) + (d.T if entry.transposed else d)
        if not np.isfinite(new).all() or (entry.dtype == "float16" and np.abs(new).max() > 65504):
            raise UsageError(f"the LoRA scales make {graph} weight {path_} non-finite in {entry.dtype}: lower them")
        out[entry.initializer] = np.ascontiguousarray(new.astype(entry.dtype))
    return out


def read_embedding(path: Path, token: str | None, model) -> tuple[str, dict[str, np.ndarray]]:
    """A textual-inversion embedding (Gal et al. 2022): (its token, graph -> vectors (n, D) float32 for each text
    encoder of ``model`` (``manifest.ModelInfo``)). Formats: diffusers' ``learned_embeds.safetensors`` ({token:
    (D,) or (n, D)}) and A1111's ``embeddings/NAME.safetensors`` ({"emb_params": (n, D)}, token = the file's name),
    for a model with one text encoder; SDXL's {"clip_l": (n, 768), "clip_g": (n, 1280)}, one tensor per encoder by
    its diffusers name (``EMBEDDING_KEYS``; token = the file's name), as A1111 reads them and diffusers'
    ``load_textual_inversion`` is given them (clip_l into text_encoder, clip_g into text_encoder_2). An encoder the
    model has not is skipped (the SDXL refiner takes clip_g only); a one-encoder embedding on a model with several
    is refused, as is an SDXL file on an SD 1.x/2.x model (A1111 skips both: their width is not the model's)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"embedding file {path} does not exist" if not path.exists() else f"embedding {path} is not a "
                         "file")
    if path.suffix.lower() in PICKLED:
        raise UsageError(f"embedding {path} is pickled ({path.suffix}): only .safetensors embeddings are read (pickles "
                         "can run arbitrary code; convert it with A1111 or diffusers)")
    tensors, _ = read_safetensors(path, "embedding")
    encoders = model.encoders
    widths = " + ".join(str(e.hidden_size) for e in encoders)
    if set(tensors) & set(EMBEDDING_KEYS) and not model.text_encoders:
        raise UsageError(f"embedding {path.name} is an SDXL embedding ({', '.join(sorted(tensors))}); this model has "
                         f"one text encoder ({widths} wide): it was made for another base model")
    if set(tensors) & set(EMBEDDING_KEYS):
        loaded, found = path.stem, {}
        for e in encoders:
            key = next((k for k, name in EMBEDDING_KEYS.items() if name == e.lora_name and k in tensors), None)
            if key is None:
                raise UsageError(f"embedding {path.name} holds {', '.join(sorted(tensors))}; this model's "
                                 f"{e.lora_name} needs its own vectors "
                                 f"({'/'.join(k for k, n in EMBEDDING_KEYS.items() if n == e.lora_name) or '?'}): "
                                 "it was made for another base model")
            found[e.component] = tensors[key]
    elif len(encoders) > 1:
        width = np.asarray(next(iter(tensors.values()))).shape[-1] if tensors else 0
        raise UsageError(f"embedding {path.name} is a one-text-encoder embedding ({width}-wide vectors); this model has "
                         f"{len(encoders)} text encoders ({widths} wide) and needs one vector set per encoder "
                         f"({', '.join(EMBEDDING_KEYS)}): it was made for another base model")
    elif "emb_params" in tensors:
        loaded, found = path.stem, {encoders[0].component: tensors["emb_params"]}
    elif len(tensors) == 1:
        loaded, vectors = next(iter(tensors.items()))
        found = {encoders[0].component: vectors}
    else:
        raise UsageError(f"{path} is not a textual-inversion embedding (one tensor, or A1111's emb_params; it has "
                         f"{len(tensors)}: {', '.join(list(tensors)[:3])})")
    out = {}
    for e in encoders:
        vectors = np.asarray(found[e.component])
        vectors = vectors.astype(np.float32).reshape(-1, vectors.shape[-1] if vectors.ndim else 1)  # (n, D)
        if vectors.shape[1] != e.hidden_size:
            which = f" for {e.lora_name}" if len(encoders) > 1 else ""
            raise UsageError(f"embedding {path.name} has {vectors.shape[1]}-wide vectors{which}; this model's text "
                             f"encoder takes {e.hidden_size}: it was made for another base model")
        if not np.isfinite(vectors).all():
            raise UsageError(f"embedding {path.name} holds NaN/Inf")
        out[e.component] = vectors
    if len({len(v) for v in out.values()}) > 1:
        raise UsageError(f"embedding {path.name} has {' and '.join(str(len(v)) for v in out.values())} vectors for "
                         "its text encoders: one token needs as many in each")
    return token or loaded, out


def expand_prompt(prompt: str, found: set[str], vectors: dict[str, int]) -> str:
    """diffusers' ``maybe_convert_prompt``: each embedding token the prompt holds (``found``, as the tokenizer split
    it) becomes ``token token_1 … token_(n-1)`` for an n-vector embedding. The tokenizer matches added tokens in the
    lower-cased text, so the prompt is searched without regard to case too: "easynegative" expands as
    "EasyNegative" does (A1111 reads every vector of an embedding however its name is cased)."""
    for token in found:
        n = vectors.get(token, 1)
        if n > 1:
            tail = " ".join(f"{token}_{i}" for i in range(1, n))
            prompt = re.sub(re.escape(token), lambda m: f"{m.group(0)} {tail}", prompt, flags=re.IGNORECASE)
    return prompt
