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


def weight_map(module, prefix: str, path: Path) -> dict[str, WeightEntry]:
    """module path -> entry for every weight of ``module`` (parameters named ``prefix.<path>.weight``) that the
    graph at ``path`` (saved with external data) holds, as is or transposed."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    located = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL or init.data_type not in _ONNX_DTYPES:
            continue
        info = {e.key: e.value for e in init.external_data}
        located[init.name] = (info["location"], int(info.get("offset", 0)), int(info["length"]),
                              _ONNX_DTYPES[init.data_type], tuple(int(d) for d in init.dims))
    dtypes = {v[3] for v in located.values()}
    by_digest: dict[str, list[str]] = {}
    opened: dict[str, np.memmap] = {}
    for name, (location, offset, length, dtype, dims) in located.items():
        if len(dims) < 2:
            continue
        raw = opened.setdefault(location, np.memmap(path.parent / location, np.uint8, "r"))
        by_digest.setdefault(hashlib.sha1(raw[offset:offset + length].tobytes()).hexdigest(), []).append(name)
    entries: dict[str, WeightEntry] = {}
    for pname, param in module.named_parameters():
        if not pname.startswith(prefix + ".") or not pname.endswith(".weight") or param.dim() < 2:
            continue
        value = param.detach().float().numpy()
        for dtype in dtypes:
            forms = [(value, False)] + ([(value.T, True)] if value.ndim == 2 else [])
            hit = next(((by_digest[d][0], t) for v, t in forms if (d := _digest(_as(v, dtype))) in by_digest), None)
            if hit is not None:
                name, transposed = hit
                location, offset, length, dt, dims = located[name]
                entries[pname[len(prefix) + 1:-len(".weight")]] = WeightEntry(
                    initializer=name, transposed=transposed, file=location, offset=offset, dtype=dt, shape=dims)
                break
    return entries
