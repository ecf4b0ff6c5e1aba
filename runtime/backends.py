"""Engine backends behind one small interface: named arrays in, named arrays out.

I/O is checked once, at load (names and dtypes against the manifest) and once per generation
(shapes against the manifest's ranges, ``check_shapes``); ``run`` itself checks nothing, because it
sits in the per-step loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from sdtrt.errors import ManifestError, SdtrtError
from sdtrt.integrity import folder_files, verify_files
from sdtrt.manifest import CONTROLNET_PREFIX, Component, resolve_shape

# openvino: the CPU plugin of OpenVINO over the same ONNX graphs (an extra: pip install 'sdtrt[openvino]')
BACKENDS = ("auto", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "openvino")


class BackendError(SdtrtError):
    """A backend cannot be used here (missing package, no GPU, engine mismatch)."""


class DeviceMemoryError(BackendError):
    """The GPU has not enough free memory for what was asked."""


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


def output_shapes(component: Component, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Each output's shape, from the values its named dimensions take in the given input shapes."""
    dims: dict[str, int] = {}
    for spec in component.inputs:
        if spec.name in input_shapes:
            dims.update({d: int(n) for d, n in zip(spec.shape, input_shapes[spec.name]) if isinstance(d, str)})
    return {spec.name: resolve_shape(spec.shape, dims) for spec in component.outputs}


class EngineSet(dict):
    """name -> engine, plus what the engines share (a TensorRT session); ``close()`` frees all of it."""

    def __init__(self, *args, resources: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resources = list(resources or [])

    def reserve(self, plan: dict[str, dict[str, tuple[int, ...]]]) -> None:
        """Tell engines that size memory per shape (TensorRT) every input shape of a coming generation at once."""
        for name, shapes in plan.items():
            reserve = getattr(self.get(name), "reserve", None)
            if reserve is not None:
                reserve(shapes)

    def close(self) -> None:
        """Close every engine, then the shared resources, even when one close fails (a sticky CUDA error): the first
        error is raised after all were tried, so the stream and the shared memory are never left behind."""
        closers = [e.close for e in self.values() if getattr(e, "close", None) is not None]
        closers += [r.close for r in self.resources]
        self.resources = []
        self.clear()
        from sdtrt.runtime.device_loop import attempt_all

        attempt_all(closers)


class OrtEngine:
    """ONNX Runtime session over one exported graph (CPU, or CUDA with IO binding).

    Also a ``device_loop.Launcher``: with raw device pointers bound through the IO binding, the
    denoising loop keeps latents and model outputs on the device (``OrtMemory``)."""

    def __init__(self, path: Path, component: Component, provider: str = "CPUExecutionProvider", threads: int = 0,
                 cache: bool = False, save_missing: bool = True):
        self.path, self.threads, self.component, self.provider = path, threads, component, provider
        # the CPU provider runs the graph with its attention fused (``ort_graphs``): the score matrices are never
        # materialised. The CUDA provider runs the graph as exported (its fused kernels are not tested here).
        # ``cache``: ONNX Runtime's optimized graph is saved in the folder and loaded from there (``ort_cache``);
        # ``save_missing=False``: only read it (``load_engines`` has tried to write every missing entry already)
        self.fused = provider == "CPUExecutionProvider"
        self.cache = cache and self.fused
        self.save_missing = save_missing
        self.saved_now = False  # this load wrote the cache entry it runs
        self.session, self.fused_attention, self.cached = self._open()
        self._dtypes = {}
        self._output_names = [o.name for o in self.session.get_outputs()]
        declared = {s.name: s.dtype for s in component.inputs + component.outputs}
        graph_names = {a.name for a in list(self.session.get_inputs()) + list(self.session.get_outputs())}
        for name in declared:
            if name not in graph_names:
                raise BackendError(f"{path.name} has no tensor {name!r}, which manifest.json lists; re-export the model")
        for arg in list(self.session.get_inputs()) + list(self.session.get_outputs()):
            dtype = _ORT_TYPES.get(arg.type)
            if arg.name not in declared:
                raise BackendError(f"{path.name} has a tensor {arg.name!r} that manifest.json does not list; "
                                   "re-export the model")
            if declared.get(arg.name) != dtype:
                raise BackendError(f"{path.name}: {arg.name} is {arg.type} in the graph but the manifest says "
                                   f"{declared.get(arg.name)}; re-export the model")
            self._dtypes[arg.name] = np.dtype(dtype)
        self._cuda = provider == "CUDAExecutionProvider"
        self._binding = self.session.io_binding() if self._cuda else None  # one per engine, rebound per call
        self._rebind = False  # an override is making a new session, and the binding must follow it
        self._device = ("cuda", 0) if self._cuda else ("cpu", 0)
        self._shapes = {s.name: tuple(s.shape) for s in component.inputs + component.outputs
                        if all(isinstance(d, int) for d in s.shape)}
        self._ptrs: dict[str, int] = {}

    def _open(self, initializers: dict[str, np.ndarray] | None = None):
        """(session, attentions fused, runs ONNX Runtime's saved optimized graph). Where caching, a missing cache entry
        is made first (``save_optimized``) and the session opened over it; ``initializers`` (a LoRA's) are never
        cached: the saved graph's weights are laid out anew and renamed, so they are set on the graph as exported."""
        entry = cache_entry(self.path.parent, self.component) if self.cache and not initializers else None
        if entry is not None:
            if entry.read() is None and self.save_missing:
                self.saved_now = save_optimized(entry, self.path, self.component, self.provider, self.threads)
            record = entry.read()
            if record is not None:
                try:
                    return self._session(entry.graph, self.provider, self.threads, {}, optimized=True), \
                        int(record["fused_attention"]), True
                except (BackendError, KeyError, TypeError, ValueError):
                    entry.remove()  # stale or damaged: the graph as exported instead, made anew next time
                    self.saved_now = False
        graph, count = fused_graph(self.path) if self.fused else (None, 0)
        return self._session(self.path, self.provider, self.threads, initializers or {}, graph), count, False

    @staticmethod
    def _session(path: Path, provider: str, threads: int, initializers: dict[str, np.ndarray],
                 graph: bytes | None = None, optimized: bool = False, save=None):
        """An ONNX Runtime session over ``path`` (or ``graph``, its rewrite for ONNX Runtime, whose external data is
        ``path``'s), with ``initializers`` overriding the graph's (LoRAs); the file is not rewritten. ``optimized``:
        ``path`` is a graph ONNX Runtime optimized and saved (``ort_cache``), loaded as it is; ``save``: (cache entry,
        temporary folder) to save the optimized graph into."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if optimized:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if save is not None:
            save[0].options(opts, save[1])
        if threads:
            opts.intra_op_num_threads = threads
        # add_external_initializers, not add_initializer: with every graph optimisation on, ONNX Runtime lays out
        # (pre-packs) convolution weights before add_initializer's values replace them, and the U-Net silently keeps
        # its base weights there; the external-initializer values are in place when the graph is loaded
        values = [ort.OrtValue.ortvalue_from_numpy(array) for array in initializers.values()]
        if values:
            opts.add_external_initializers(list(initializers), values)
        if graph is not None:  # the weights stay in the folder's external data files
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        try:
            session = ort.InferenceSession(str(path) if graph is None else graph, sess_options=opts,
                                           providers=[provider])
        except Exception as ex:  # onnxruntime raises its own untyped errors for unreadable graphs
            raise BackendError(f"cannot load {path.name} with onnxruntime: {_first_line(ex)}") from None
        session._sdtrt_initializers = values  # alive as long as the session
        return session

    def override(self, initializers: dict[str, np.ndarray]) -> None:
        """Re-create the session with these initializers instead of the graph's (none: the graph's own weights). The
        old session goes first: two sessions of an SDXL U-Net (ONNX Runtime CPU holds FP32 copies of its fp16
        weights, 10 GB each) do not fit beside the rest in 24 GB. If the new one fails, the caller restores the
        graph's own weights (``AdapterMixin._restore_base``)."""
        # the IO binding holds the old session too; it is made again for the new one (also after a failed try, when
        # the restore comes here once more)
        self._rebind = self._rebind or self._binding is not None
        self.session = self._binding = None
        self.session, _, self.cached = self._open(initializers)
        if self._rebind:
            self._binding, self._rebind = self.session.io_binding(), False

    def input_dtype(self, name: str) -> np.dtype:
        return self._dtypes[name]

    dtype = input_dtype

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._cuda:
            return dict(zip(self._output_names, self.session.run(self._output_names, feeds)))
        binding = self._binding
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu()))

    # -- Launcher (device loop) ------------------------------------------------------------------------
    def set_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Shapes of the device loop's tensors; output shapes follow from the named dimensions."""
        self._shapes.update({n: tuple(s) for n, s in shapes.items()})
        self._shapes.update(output_shapes(self.component, self._shapes))
        if self._binding is None:
            self._binding = self.session.io_binding()

    def bind(self, name: str, ptr: int) -> None:
        self._ptrs[name] = ptr

    def launch(self) -> None:
        binding, (device, index) = self._binding, self._device
        for arg in self.session.get_inputs():
            binding.bind_input(arg.name, device, index, self._dtypes[arg.name], self._shapes[arg.name], self._ptrs[arg.name])
        for name in self._output_names:
            binding.bind_output(name, device, index, self._dtypes[name], self._shapes[name], self._ptrs[name])
        self.session.run_with_iobinding(binding)


def attention_mode() -> str:
    """``SDTRT_ORT_ATTENTION``: "fused" (default) or "unfused"."""
    import os

    mode = os.environ.get("SDTRT_ORT_ATTENTION", "fused")
    if mode not in ("fused", "unfused"):
        raise BackendError(f"SDTRT_ORT_ATTENTION must be fused or unfused, not {mode!r}")
    return mode


def cache_entry(folder: Path, component):
    """The ``ort_cache.Entry`` of ``component``'s graph in ``folder`` (fused or not, as ``SDTRT_ORT_ATTENTION`` says)."""
    from sdtrt.runtime.ort_cache import Entry

    return Entry(Path(folder), component, attention_mode() == "fused")


def save_optimized(entry, path: Path, component, provider: str = "CPUExecutionProvider", threads: int = 0) -> bool:
    """Write ``entry`` (``ort_cache``): ONNX Runtime optimizes ``path``'s graph (attention fused) with every
    optimisation on and saves the result, and that session is dropped. Its saving session holds more than a session
    over the saved graph (SDXL's fp16 U-Net here: 19.6 GB, against 8.8 GB loaded from the entry), so callers open
    the entry afterwards, and ``load_engines`` writes every missing entry before it loads any graph. False (nothing
    written, the reason logged) when the folder has no room or the graph does not load; the caller then loads the
    graph as exported, which reports a graph that cannot load."""
    import shutil

    graph, count = fused_graph(path) if provider == "CPUExecutionProvider" else (None, 0)
    need = 2.2 * sum(p.stat().st_size for p in [path] + [path.parent / f for f in component.external_data])
    tmp = entry.start(int(need))
    if tmp is None:
        return False
    try:
        session = OrtEngine._session(path, provider, threads, {}, graph, save=(entry, tmp))
    except BackendError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    except BaseException:  # Ctrl-C, out of memory: a live process's folder would never be removed by others
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del session
    return entry.commit(tmp, {"fused_attention": count, "source": path.name})


def fused_graph(path: Path) -> tuple[bytes | None, int]:
    """``ort_graphs.ort_graph`` (the graph with its attention fused, and how many were), with its failures as
    BackendError; ``SDTRT_ORT_ATTENTION=unfused`` in the environment runs the graph as exported (a comparison, or a
    workaround should a fused graph misbehave)."""
    if attention_mode() == "unfused":
        return None, 0
    from sdtrt.runtime.ort_graphs import ort_graph

    try:
        return ort_graph(path)
    except Exception as ex:  # onnx raises its own untyped errors for unreadable graphs
        raise BackendError(f"cannot load {path.name}: {_first_line(ex)}") from None


def _first_line(ex: Exception) -> str:
    """An untyped library error as one line: its message's first line, or its type."""
    return str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__


class OrtMemory:
    """Device buffers as ONNX Runtime OrtValues ('cuda', or 'cpu' where tests run the device loop)."""

    def __init__(self, device: str = "cuda", device_id: int = 0):
        self.device, self.device_id = device, device_id
        self.live: dict[int, object] = {}  # pointer -> OrtValue that owns it

    def malloc(self, nbytes: int) -> int:
        import onnxruntime as ort

        value = ort.OrtValue.ortvalue_from_shape_and_type([max(int(nbytes), 1)], np.uint8, self.device, self.device_id)
        ptr = int(value.data_ptr())
        self.live[ptr] = value
        return ptr

    def free(self, ptr: int) -> None:
        del self.live[ptr]

    def upload(self, ptr: int, array: np.ndarray) -> None:
        value = self.live[ptr]
        data = np.zeros(value.shape()[0], np.uint8)
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        data[: raw.size] = raw
        value.update_inplace(data)

    def download(self, out: np.ndarray, ptr: int) -> None:
        raw = self.live[ptr].numpy()
        out.reshape(-1).view(np.uint8)[:] = raw[: out.nbytes]

    def zero(self, ptr: int, nbytes: int) -> None:
        self.upload(ptr, np.zeros(0, np.uint8))

    def barrier(self) -> None:
        """Make the uploads visible to the next launch. ``update_inplace`` copies with cudaMemcpy on the legacy
        stream, which may return before the data lands, and ONNX Runtime computes on a stream of its own."""
        if self.device == "cuda":
            cuda_context_synchronize()

    def sync(self) -> None:
        pass  # run_with_iobinding returns when the outputs are written

    def host(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def free_host(self, array: np.ndarray) -> None:
        pass

    def close(self) -> None:
        self.live.clear()


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
    """True only when the NVIDIA driver itself reports a device (libcuda through ctypes): cuda-python is not
    asked, since a cuda-python 13 on a CUDA 12 driver says "no device" where onnxruntime-gpu works."""
    return cuda_driver_device_count() > 0


def cuda_driver_device_count() -> int:
    """Devices the NVIDIA driver reports (through ctypes, no cuda-python needed); 0 without a driver."""
    return cuda_driver_info()[1]


def cuda_context_synchronize() -> None:
    """Wait for all work in this thread's CUDA context (cuCtxSynchronize); nothing without a driver or context."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1").cuCtxSynchronize()
    except OSError:
        pass


def cuda_driver_info() -> tuple[int, int]:
    """(driver CUDA version as 12040 for 12.4, device count) from libcuda itself; (0, 0) without a driver."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, 0
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return 0, 0
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return version.value, 0
    return version.value, count.value


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
    from sdtrt.runtime.openvino import describe_openvino

    found += [d for d in (describe_openvino(),) if d]
    return found


def controlnets(engines: dict) -> dict:
    """The ControlNet engines among ``engines`` (component name -> engine), for the device loop."""
    return {name: e for name, e in engines.items() if name.startswith(CONTROLNET_PREFIX)}


def check_integrity(folder: Path, entries, fix: str) -> None:
    """Refuse files that are not the ones the manifest describes (see ``sdtrt.integrity``)."""
    problems = verify_files(Path(folder), entries)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ManifestError(f"{problems[0]}{more}; {fix}")


def load_engines(folder: Path, manifest, backend: str = "auto", threads: int = 0,
                 device_loop: bool | None = None) -> EngineSet:
    """Engines for every graph. ``auto`` prefers TensorRT where the folder has engines and they load.

    ``device_loop``: run the denoising loop with the sampler-update graph and IO binding, states on the
    device (default: on ONNX Runtime's CUDA provider; on the CPU the NumPy loop is used)."""
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
    if backend == "openvino":
        return _load_openvino(Path(folder), manifest, threads, device_loop)
    provider = ort_provider(backend)
    on_device = provider == "CUDAExecutionProvider" if device_loop is None else device_loop
    names = [n for n in manifest.components if n != "sampler_update" or on_device]  # on the host the update is NumPy
    check_graph_files(folder, manifest, names)
    if provider == "CPUExecutionProvider":  # missing cache entries first, one at a time, before any graph is loaded
        for name in names:
            c = manifest.components[name]
            entry = cache_entry(folder, c)
            if entry.read() is None:
                save_optimized(entry, Path(folder) / c.file, c, provider, threads)
    engines = EngineSet()
    for name in names:  # a save that failed above is not tried again beside the loaded graphs
        engines[name] = OrtEngine(Path(folder) / manifest.components[name].file, manifest.components[name], provider,
                                  threads, cache=True, save_missing=False)
    if on_device:
        from sdtrt.runtime.device_loop import DeviceLoop

        update = engines.pop("sampler_update", None)
        if update is None:
            raise BackendError(f"{folder} has no sampler_update graph for the device loop; re-export the model")
        memory = OrtMemory("cuda" if provider == "CUDAExecutionProvider" else "cpu")
        engines["unet"].device_loop = DeviceLoop(memory, engines["unet"], update, controlnets=controlnets(engines))
        engines.resources.append(memory)
    return engines


def check_graph_files(folder: Path, manifest, names: list[str]) -> None:
    """Refuse graphs ``names`` of ``folder`` that are missing, not regular files, or not the manifest's."""
    for name in names:
        path = Path(folder) / manifest.components[name].file
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "is missing"
            raise BackendError(f"{path} {what} (listed in manifest.json as the {name} graph)")
    check_integrity(folder, folder_files(manifest, components=tuple(names)), "re-export the model")


def _load_openvino(folder: Path, manifest, threads: int, device_loop: bool | None) -> EngineSet:
    """OpenVINO engines for every graph but the sampler update: the NumPy host loop runs over them."""
    from sdtrt.runtime.openvino import import_openvino, load_openvino_engines

    if device_loop:
        raise BackendError("the openvino backend runs the host loop: the device loop needs ONNX Runtime or TensorRT")
    import_openvino()  # the install hint before any file is read
    names = [n for n in manifest.components if n != "sampler_update"]
    check_graph_files(folder, manifest, names)
    return load_openvino_engines(folder, manifest, names, threads)
