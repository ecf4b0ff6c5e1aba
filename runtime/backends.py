"""Engine backends behind one small interface: named arrays in, named arrays out.

I/O is checked once, at load (names and dtypes against the manifest) and once per generation
(shapes against the manifest's ranges, ``check_shapes``); ``run`` itself checks nothing, because it
sits in the per-step loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from sdtrt.errors import SdtrtError
from sdtrt.manifest import Component

BACKENDS = ("auto", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")


class BackendError(SdtrtError):
    """A backend cannot be used here (missing package, no GPU, engine mismatch)."""


class ShapeError(SdtrtError):
    """An input shape is outside what the engine was exported or built for."""


class Engine(Protocol):
    component: Component

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def check_shapes(name: str, engine, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise ShapeError naming the allowed range if any input shape is outside the engine's."""
    label = getattr(engine, "range_label", "exported range")
    for spec in engine.component.inputs:
        if spec.name in shapes:
            problem = spec.check_shape(tuple(shapes[spec.name]), label)
            if problem:
                raise ShapeError(f"{name}: {problem}")


class OrtEngine:
    """ONNX Runtime session over one exported graph (CPU, or CUDA with IO binding)."""

    def __init__(self, path: Path, component: Component, provider: str = "CPUExecutionProvider", threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
        except Exception as ex:  # onnxruntime raises its own untyped errors for unreadable graphs
            first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
            raise BackendError(f"cannot load {path.name} with onnxruntime: {first}") from None
        self.component = component
        self.provider = provider
        self._dtypes = {}
        self._output_names = [o.name for o in self.session.get_outputs()]
        declared = {s.name: s.dtype for s in component.inputs + component.outputs}
        for arg in list(self.session.get_inputs()) + list(self.session.get_outputs()):
            dtype = _ORT_TYPES.get(arg.type)
            if declared.get(arg.name) != dtype:
                raise BackendError(f"{path.name}: {arg.name} is {arg.type} in the graph but the manifest says "
                                   f"{declared.get(arg.name)}; re-export the model")
            self._dtypes[arg.name] = np.dtype(dtype)
        self._cuda = provider == "CUDAExecutionProvider"

    def input_dtype(self, name: str) -> np.dtype:
        return self._dtypes[name]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._cuda:
            return dict(zip(self._output_names, self.session.run(self._output_names, feeds)))
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu()))


_ORT_TYPES = {"tensor(float16)": "float16", "tensor(float)": "float32", "tensor(int32)": "int32",
              "tensor(int64)": "int64"}


def ort_provider(backend: str) -> str:
    """Pick the ONNX Runtime execution provider for ``backend``; raise if it is not available here."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if backend in ("onnxruntime-cuda",):
        if "CUDAExecutionProvider" not in available:
            raise BackendError("onnxruntime-cuda needs onnxruntime-gpu and an NVIDIA GPU "
                               "(pip install onnxruntime-gpu); this onnxruntime has " + ", ".join(available))
        return "CUDAExecutionProvider"
    if backend in ("auto", "onnxruntime") and "CUDAExecutionProvider" in available and _has_cuda_device():
        return "CUDAExecutionProvider"
    return "CPUExecutionProvider"


def _has_cuda_device() -> bool:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return True  # onnxruntime-gpu installed without cuda-python: let ORT decide
    err, count = cudart.cudaGetDeviceCount()
    return err == cudart.cudaError_t.cudaSuccess and count > 0


def available_backends() -> list[str]:
    """Backends usable on this machine, best first."""
    import onnxruntime as ort

    found = []
    try:
        from sdtrt.runtime.tensorrt import api

        info = api.device_info(api.import_cudart())
        found.append(f"tensorrt {api.trt_version(api.import_tensorrt())} on {info.name} (after `sdtrt build`)")
    except BackendError:
        pass
    if "CUDAExecutionProvider" in ort.get_available_providers() and _has_cuda_device():
        found.append("onnxruntime-cuda")
    found.append("onnxruntime-cpu")
    return found


def load_engines(folder: Path, manifest, backend: str = "auto", threads: int = 0) -> dict[str, Engine]:
    """Engines for every graph. ``auto`` prefers TensorRT where the folder has engines and they load."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "tensorrt" or (backend == "auto" and manifest.tensorrt is not None):
        from sdtrt.runtime.tensorrt.backend import load_trt_engines

        try:
            return load_trt_engines(Path(folder), manifest)
        except BackendError:
            if backend == "tensorrt":
                raise
            # auto: engines for another GPU/version, or no TensorRT here; ONNX Runtime still works
    provider = ort_provider(backend)
    engines = {}
    for name, component in manifest.components.items():
        if name == "sampler_update":  # only device loops use it; on the host the update is NumPy
            continue
        path = Path(folder) / component.file
        if not path.is_file():
            raise BackendError(f"{path} is missing (listed in manifest.json)")
        engines[name] = OrtEngine(path, component, provider, threads)
    return engines
