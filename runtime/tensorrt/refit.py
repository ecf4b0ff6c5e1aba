"""Refitting a ``--refittable`` engine with new weights (LoRAs, textual-inversion rows) the way TensorRT accepts it.

Written against ``NvInferRuntime.h``'s ``IRefitter`` and the Python binding's docstrings (TensorRT 10.x/11.x), and
NVIDIA's ``demo/Diffusion/demo_diffusion/engine.py`` (``Engine.refit``):

- every weight is checked against ``get_weights_prototype(name)`` (dtype and element count: what
  ``set_named_weights`` compares) and converted to the engine's dtype before it is set;
- TensorRT reports as *missing* every weight it combined at build with one that is set (a Linear's MatMul weight
  with its bias, fused Q/K/V projections, a convolution with its bias), and ``refit_cuda_engine`` returns False
  while any is missing. As NVIDIA's demo does (``for name in refitter.get_missing_weights(): ...``), every missing
  name is supplied from its base value (read from the ONNX graph, ``runtime.lora.base_weight``), until none is;
- ``refit_cuda_engine`` returning False "may have refitted a subset of weights" (binding docstring): every weight of
  the attempt then counts as touched, so the next refit writes all of them, from the base or the new values.

At load, the mapped weights (``Component.weights``) are compared with ``get_all_weights()``: those TensorRT cannot
refit (folded away at build) are named, and a refit that needs one is refused before anything changes.
"""

from __future__ import annotations

import logging

import numpy as np

from sdtrt.runtime.backends import BackendError
from sdtrt.runtime.tensorrt import api

log = logging.getLogger("sdtrt")
MAX_ROUNDS = 8  # rounds of supplying missing weights; each round's set is new, so a real engine needs one or two


def numpy_dtypes(trt) -> dict:
    """TensorRT ``DataType`` -> NumPy dtype, for the types sdtrt's graphs use (NvInferRuntimeBase.h's DataType)."""
    return {trt.DataType.FLOAT: np.dtype(np.float32), trt.DataType.HALF: np.dtype(np.float16),
            trt.DataType.INT32: np.dtype(np.int32), trt.DataType.INT64: np.dtype(np.int64),
            trt.DataType.INT8: np.dtype(np.int8), trt.DataType.UINT8: np.dtype(np.uint8),
            trt.DataType.BOOL: np.dtype(np.bool_)}


def unrefittable(engine, names) -> list[str]:
    """Of ``names`` (initializers), those ``engine``'s refitter cannot set (``get_all_weights``), sorted."""
    trt = engine.trt
    refitter = trt.Refitter(engine.engine, api.logger(trt))
    available = set(refitter.get_all_weights())
    return sorted(set(names) - available)


class Refit:
    """One engine's refit state: which weights differ from the graph's own (``touched``)."""

    def __init__(self, engine, base_weight):
        self.owner = engine  # the TrtEngine refitted
        self.base_weight = base_weight  # initializer name -> its base value (NumPy)
        self.touched: set[str] = set()  # weights that may hold something other than their base value
        self.unrefittable: set[str] = set()  # mapped weights TensorRT cannot refit (checked at load)

    def apply(self, initializers: dict[str, np.ndarray]) -> None:
        """Set ``initializers``; every other weight an earlier refit touched goes back to its base value."""
        e = self.owner
        blocked = sorted(set(initializers) & self.unrefittable)
        if blocked:
            raise BackendError(f"{e.label}: TensorRT cannot refit {', '.join(blocked[:3])}"
                               + (f" and {len(blocked) - 3} more" if len(blocked) > 3 else "")
                               + " (folded into other layers at build); fuse these LoRAs at export instead "
                               "(`sdtrt export MODEL --lora FILE:SCALE`)")
        values = dict(initializers)
        for name in self.touched - set(values):
            values[name] = self.base_weight(name)
        e.memory.sync()  # refit_cuda_engine: "the behavior is undefined if the engine has pending enqueued work"
        trt = e.trt  # (named `trt`: the API-contract test checks every trt.X against the real bindings)
        refitter = trt.Refitter(e.engine, api.logger(trt))
        dtypes = numpy_dtypes(trt)
        keep = []  # the arrays behind trt.Weights stay alive until refit_cuda_engine returns
        self.touched |= set(values)  # from here on, any subset of these may change
        for name, array in values.items():
            self._set(refitter, dtypes, name, array, keep)
        supplied = set(values)
        for _ in range(MAX_ROUNDS):
            missing = [n for n in refitter.get_missing_weights() if n not in supplied]
            if not missing:
                break
            unnamed = [n for n in missing if not n]
            if unnamed:
                raise BackendError(f"TensorRT needs unnamed weights to refit {e.label}, which cannot be supplied; "
                                   "fuse LoRAs at export instead (`sdtrt export MODEL --lora FILE:SCALE`)")
            for name in missing:  # combined at build with a weight set above: supply its own value
                self.touched.add(name)
                self._set(refitter, dtypes, name, self.base_weight(name), keep)
                supplied.add(name)
        still = list(refitter.get_missing_weights())
        if still:
            raise BackendError(f"TensorRT could not refit {e.label}: weights still missing after supplying them "
                               f"({', '.join(still[:3])})")
        if not refitter.refit_cuda_engine():
            raise BackendError(f"TensorRT could not refit {e.label} (see the TensorRT log above); some of its weights "
                               "may have changed")
        self.touched = set(initializers)  # everything else of the attempt was set to its base value

    def _set(self, refitter, dtypes: dict, name: str, array: np.ndarray, keep: list) -> None:
        proto = refitter.get_weights_prototype(name)
        if int(proto.size) < 0:
            raise BackendError(f"{self.owner.label}: {name} is not a refittable weight of this engine")
        dtype = dtypes.get(proto.dtype)
        if dtype is None:
            raise BackendError(f"{self.owner.label}: {name} is {getattr(proto.dtype, 'name', proto.dtype)} in the "
                               "engine, which sdtrt cannot write")
        array = np.ascontiguousarray(array, dtype)
        if array.size != int(proto.size):
            raise BackendError(f"{self.owner.label}: {name} has {array.size} values, the engine's has "
                               f"{int(proto.size)}: these weights belong to another model")
        if dtype.kind == "f" and not np.isfinite(array).all():
            raise BackendError(f"{self.owner.label}: {name} is not finite in {dtype} (lower the LoRA scales)")
        keep.append(array)
        trt = self.owner.trt
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise BackendError(f"TensorRT refused new weights for {name} in {self.owner.label}")


def refittable_graphs(manifest) -> tuple[str, ...]:
    """The graphs ``sdtrt build --refittable`` builds with REFIT: those LoRAs and embeddings change at generation time
    (``runtime.lora_names.targets``: the U-Net and every text encoder the manifest lists, SDXL's text_encoder_2 too) and
    whose weights the export mapped (``Component.weights``); nothing here names a graph."""
    from sdtrt.runtime.lora_names import targets

    return tuple(t.graph for t in targets(manifest.model)
                 if t.graph in manifest.components and manifest.components[t.graph].weights)
