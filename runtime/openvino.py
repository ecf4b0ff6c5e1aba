"""OpenVINO on the CPU over the same exported ONNX graphs: ``--backend openvino`` (``pip install 'sdtrt[openvino]'``).

The engines have ``OrtEngine``'s interface (``run``, ``input_dtype``, ``override``): the pipeline runs its NumPy host
loop over them (no device loop). Each graph is read from its ``.onnx`` file (external data included) and compiled
once for the CPU with its dynamic dimensions, so every size and batch of the manifest's ranges runs on one compiled
model. Names and dtypes are checked against the manifest once, at load.

Precision: OpenVINO's own choice by default (its CPU plugin computes in bf16 on CPUs with AVX512_BF16 or AMX, in f32
elsewhere); ``SDTRT_OPENVINO_PRECISION=f32`` (or ``precision="f32"``) forces f32. The precision that ran is in the
backend's name (``Pipeline.backend_name``: "openvino (CPU, f32)") and in ``details``.

Compiled models are cached (OpenVINO's ``CACHE_DIR``) in ``<engine folder>/.sdtrt-openvino/``, one folder per graph
keyed by the manifest's sha256 of the graph and its external data: OpenVINO keys a cache entry read from a file by
its path and options, not by the external data's content (a re-export that changes only ``unet.onnx.data`` would
load the old blob), so the key must come from here. Entries of other keys of the same graph are deleted.
``SDTRT_OPENVINO_CACHE``: another folder for the cache, or ``off``. A read-only engine folder runs without one.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from sdtrt.manifest import Component
from sdtrt.runtime.backends import BackendError
from sdtrt.runtime.cache_keys import graph_key, other_keys

log = logging.getLogger("sdtrt")

PRECISIONS = ("auto", "f32", "bf16", "f16")  # auto: the CPU plugin's own (bf16 where the CPU has it, else f32)
PRECISION_ENV = "SDTRT_OPENVINO_PRECISION"
CACHE_ENV = "SDTRT_OPENVINO_CACHE"
CACHE_NAME = ".sdtrt-openvino"
_DTYPES = {"f32": "float32", "f16": "float16", "i32": "int32", "i64": "int64"}


def import_openvino():
    """The openvino module, or a BackendError saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise BackendError("the openvino backend needs OpenVINO: pip install 'sdtrt[openvino]'") from None
    return openvino


def describe_openvino() -> str | None:
    """"openvino 2026.4.1 (CPU: f32)" (the precision the CPU plugin picks by itself here), or None without OpenVINO
    or its CPU plugin."""
    try:
        ov = import_openvino()
        core = ov.Core()
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # BackendError (no package), or a CPU plugin that cannot start
        return None
    return f"openvino {ov.get_version().split('-')[0]} (CPU: {'bf16' if 'BF16' in caps else 'f32'})"


def precision_from_env(precision: str | None = None) -> str:
    """``precision``, else ``$SDTRT_OPENVINO_PRECISION``, else "auto"; checked against ``PRECISIONS``."""
    value = precision if precision is not None else (os.environ.get(PRECISION_ENV) or "auto")
    value = value.strip().lower()
    if value not in PRECISIONS:
        source = "precision" if precision is not None else PRECISION_ENV
        raise BackendError(f"{source}={value!r}: choose one of {', '.join(PRECISIONS)}")
    return value


def cache_root(folder: Path) -> Path | None:
    """Where compiled models are cached: ``$SDTRT_OPENVINO_CACHE`` (``off``, ``0`` or empty: nowhere), else the engine
    folder's ``.sdtrt-openvino``; None when that cannot be made (a read-only folder)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    root = Path(value).expanduser() if value else Path(folder) / CACHE_NAME
    try:
        root.mkdir(exist_ok=True, parents=value is not None)
    except OSError as ex:
        log.info("no OpenVINO cache (cannot make %s: %s)", root, ex.strerror or ex)
        return None
    return root if os.access(root, os.W_OK) else None


def graph_cache(root: Path | None, name: str, component: Component, prune: bool = True) -> Path | None:
    """This graph's cache folder, keyed by the sha256 of the graph and of its external data (the manifest's, verified
    at load); with ``prune``, other keys' folders of the same graph are deleted (a re-export's leftovers). Not in a
    cache shared by several engine folders (``$SDTRT_OPENVINO_CACHE``): there another key is another model's."""
    if root is None:
        return None
    key = graph_key(component)
    folder = root / f"{name}-{key}"
    for old in other_keys(root, name, key) if prune else ():
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    try:
        folder.mkdir(exist_ok=True)
    except OSError:
        return None
    return folder


class OpenVinoEngine:
    """One exported graph compiled by OpenVINO for the CPU (``core``: the ``openvino.Core`` shared by a folder's
    engines; ``cache``: its compiled-model cache folder, None for none)."""

    def __init__(self, path: Path, component: Component, threads: int = 0, precision: str | None = None,
                 cache: Path | None = None, core=None):
        ov = import_openvino()
        self.path, self.component, self.threads, self.cache = Path(path), component, threads, cache
        self.core = core if core is not None else ov.Core()
        self.requested_precision = precision_from_env(precision)
        self.compiled = self._compile(str(self.path), cache)
        self._dtypes: dict[str, np.dtype] = {}
        declared = {s.name: s.dtype for s in component.inputs + component.outputs}
        ports = {}
        for port in list(self.compiled.inputs) + list(self.compiled.outputs):
            names = port.get_names() & declared.keys()
            if not names:
                raise BackendError(f"{self.path.name} has a tensor {port.get_any_name()!r} that manifest.json does not "
                                   "list; re-export the model")
            ports[names.pop()] = port
        for name, dtype in declared.items():
            if name not in ports:
                raise BackendError(f"{self.path.name} has no tensor {name!r}, which manifest.json lists; re-export the "
                                   "model")
            graph = _DTYPES.get(ports[name].get_element_type().get_type_name(), str(ports[name].get_element_type()))
            if graph != dtype:
                raise BackendError(f"{self.path.name}: {name} is {graph} in the graph but the manifest says {dtype}; "
                                   "re-export the model")
            self._dtypes[name] = np.dtype(dtype)
        out_names = {s.name for s in component.outputs}
        self._output_names = [next(iter(p.get_names() & out_names)) for p in self.compiled.outputs]
        self._request = self.compiled.create_infer_request()
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.provider = f"openvino (CPU, {self.precision})"  # Pipeline.backend_name

    def _compile(self, model, cache: Path | None):
        """Compile a graph file or an ``openvino.Model`` for the CPU; BackendError with OpenVINO's first line."""
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        if self.requested_precision != "auto":
            config["INFERENCE_PRECISION_HINT"] = self.requested_precision
        if cache is not None:
            config["CACHE_DIR"] = str(cache)
        try:
            return self.core.compile_model(model, "CPU", config)
        except Exception as ex:  # OpenVINO raises RuntimeError with its own multi-line text
            first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
            raise BackendError(f"cannot load {self.path.name} with openvino: {first}") from None

    @property
    def details(self) -> dict:
        """What ran, for benchmarks: OpenVINO's version, the CPU and its capabilities, the precision and threads."""
        ov = import_openvino()
        return {"openvino": ov.get_version(), "device": self.core.get_property("CPU", "FULL_DEVICE_NAME"),
                "optimization_capabilities": list(self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
                "requested_precision": self.requested_precision, "inference_precision": self.precision,
                "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")), "cache": self.cache is not None}

    def input_dtype(self, name: str) -> np.dtype:
        return self._dtypes[name]

    dtype = input_dtype

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # outputs are copied out of the request (share_outputs is off): the loop keeps them past the next call
        result = self._request.infer(feeds, share_inputs=True)
        return {name: result[i] for i, name in enumerate(self._output_names)}

    def override(self, initializers: dict[str, np.ndarray]) -> None:
        """Compile the graph again with these initializers instead of its own (LoRAs, embeddings; none: the graph's own
        weights). OpenVINO cannot swap the weights of a compiled model, so the graph is read again, the constants
        named by the initializers are replaced, and the result compiled (uncached: one compile per LoRA set, as long as
        ONNX Runtime's session re-creation). The old compiled model goes first (memory)."""
        self._request = self.compiled = None
        if not initializers:
            self.compiled = self._compile(str(self.path), self.cache)
        else:
            self.compiled = self._compile(self._replaced(initializers), None)
        self._request = self.compiled.create_infer_request()

    def _replaced(self, initializers: dict[str, np.ndarray]):
        ov = import_openvino()
        try:
            model = self.core.read_model(str(self.path))
        except Exception as ex:
            raise BackendError(f"cannot read {self.path.name} with openvino: {str(ex).strip()[:200]}") from None
        left = dict(initializers)
        for op in model.get_ops():
            if op.get_type_name() != "Constant" or op.get_friendly_name() not in left:
                continue
            name = op.get_friendly_name()
            value = np.ascontiguousarray(left.pop(name))
            shape, dtype = tuple(op.get_output_shape(0)), _DTYPES.get(op.get_element_type().get_type_name())
            if value.shape != shape or value.dtype != np.dtype(dtype or "float32"):
                raise BackendError(f"{self.path.name}: new weight {name} is {value.dtype}{list(value.shape)}, the "
                                   f"graph's is {dtype}{list(shape)}")
            new = ov.op.Constant(value, shared_memory=False)
            new.set_friendly_name(name)
            op.output(0).replace(new.output(0))
        if left:
            raise BackendError(f"{self.path.name} has no weight {next(iter(left))!r} for openvino to replace"
                               + (f" (and {len(left) - 1} more)" if len(left) > 1 else "") + "; re-export the model")
        return model

    def close(self) -> None:
        self._request = self.compiled = None


def load_openvino_engines(folder: Path, manifest, names: list[str], threads: int = 0, precision: str | None = None):
    """OpenVINO engines for the graphs ``names`` of ``folder`` (already checked against the manifest), sharing one
    ``openvino.Core``."""
    from sdtrt.runtime.backends import EngineSet

    ov = import_openvino()
    precision = precision_from_env(precision)
    core = ov.Core()
    root = cache_root(folder)
    engines = EngineSet()
    try:
        for name in names:
            component = manifest.components[name]
            engines[name] = OpenVinoEngine(Path(folder) / component.file, component, threads, precision,
                                           graph_cache(root, name, component, prune=not os.environ.get(CACHE_ENV)),
                                           core)
    except BaseException:
        engines.close()
        raise
    return engines
