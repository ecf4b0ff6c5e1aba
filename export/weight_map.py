"""Which ONNX initializer holds which model weight: what a LoRA applied at generation time needs to know.

torch.onnx names an initializer after its parameter when the graph uses it as is (``unet.….proj_in.weight``,
Gemm/Conv), but a Linear layer lowered to MatMul carries the transposed weight under a generated name
(``onnx::MatMul_1234``). So the map is found by value: each weight of two or more dimensions, as the graph
stores it (its dtype; transposed for a matrix), is hashed and looked up among the initializers' bytes. The map
says, per module path (``down_blocks.0.attentions.0.proj_in``, as diffusers and kohya name layers), the
initializer, whether it is transposed, and where its bytes are in the graph's external data file, so the
torch-free runtime reads the base weights with ``np.memmap`` and adds a LoRA's low-rank update to them.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from sdtrt.manifest import WeightEntry

_ONNX_DTYPES = {1: "float32", 10: "float16"}


def _as(value: np.ndarray, dtype: str) -> np.ndarray:
    """``value`` as the exported graph stores it: fp16 through onnxruntime's converter, which moves values below its
    smallest positive fp16 to it rather than rounding them as NumPy does."""
    if dtype == "float16":
        from onnxruntime.transformers.float16 import convert_np_to_float16

        return convert_np_to_float16(np.ascontiguousarray(value))
    return value.astype(dtype)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def weight_digests(module, prefix: str, dtype: str) -> list[tuple[str, list[tuple[str, bool]]]]:
    """(module path, [(digest, transposed), ...]) for every weight of two or more dimensions of ``module``
    (parameters named ``prefix.<path>.weight``): the digests of the weight as a graph of ``dtype`` stores it, as is
    and (a matrix) transposed. Taken before the export frees the module's weights (``locate_weights`` finds them
    in the written graph)."""
    out = []
    for pname, param in module.named_parameters():
        if not pname.startswith(prefix + ".") or not pname.endswith(".weight") or param.dim() < 2:
            continue
        value = param.detach().float().numpy()
        forms = [(value, False)] + ([(value.T, True)] if value.ndim == 2 else [])
        out.append((pname[len(prefix) + 1:-len(".weight")], [(_digest(_as(v, dtype)), t) for v, t in forms]))
    return out


def locate_weights(digests: list[tuple[str, list[tuple[str, bool]]]], path: Path) -> dict[str, WeightEntry]:
    """module path -> entry for every weight of ``digests`` that the graph at ``path`` (saved with external data)
    holds, as is or transposed (the first initializer of the same bytes)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    located: dict[str, WeightEntry] = {}  # digest -> the first initializer holding those bytes
    opened: dict[str, np.memmap] = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL or init.data_type not in _ONNX_DTYPES or len(init.dims) < 2:
            continue
        info = {e.key: e.value for e in init.external_data}
        location, offset, length = info["location"], int(info.get("offset", 0)), int(info["length"])
        raw = opened.setdefault(location, np.memmap(path.parent / location, np.uint8, "r"))
        located.setdefault(hashlib.sha1(raw[offset:offset + length].tobytes()).hexdigest(), WeightEntry(
            initializer=init.name, transposed=False, file=location, offset=offset, dtype=_ONNX_DTYPES[init.data_type],
            shape=tuple(int(d) for d in init.dims)))
    entries: dict[str, WeightEntry] = {}
    for name, forms in digests:
        hit = next(((located[d], t) for d, t in forms if d in located), None)
        if hit is not None:
            entries[name] = replace(hit[0], transposed=hit[1])
    return entries
