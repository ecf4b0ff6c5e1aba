"""TensorRT backend: engines on CUDA buffers, and the denoising loop entirely on the device.

Follows trtexec's inference code (``samples/common/sampleInference.cpp``) and the rules of
``NvInferRuntime.h``:

- one stream (non-blocking, so nothing on the legacy default stream can break a capture);
- one device-memory block shared by every execution context (they run one after another on that
  stream), sized by what the shapes in use need (``update_device_memory_size_for_shapes``), grown
  when a larger shape comes, never sized for the profile maximum up front;
- every ``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3`` return is checked: a
  refused address keeps the old one, which would silently reuse step 0's inputs;
- engine I/O is checked once, at load, against the manifest: every tensor's dtype (``get_tensor_dtype``), location
  (``get_tensor_location``: DEVICE), format (``get_tensor_format``: LINEAR, the only layout sdtrt writes),
  ``is_shape_inference_io`` (false) and static dimensions; nothing is checked in the per-step loop;
- ``set_input_shape`` and ``set_device_memory`` are called only when the value changes, so a captured graph never
  replays against a context whose state moved since the capture;
- the denoising loop is ``runtime.device_loop.DeviceLoop`` with the CUDA graphs of ``cuda.CudaGraphs`` (eager
  first, captured when a shape comes again, replayed after);
- refits (LoRAs, embeddings) are ``refit.Refit``;
- ``close()`` (or ``with``) frees contexts, graphs, buffers, pinned memory, the shared block and the stream, and
  goes on past a failed call (a sticky CUDA error) so nothing is left behind.

Engines are refused, with the command that fixes it, when they were built for another TensorRT
version or GPU, when a file is corrupt, or when a shape is outside the engine's profile.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sdtrt.manifest import Component, Manifest, TensorSpec
from sdtrt.integrity import FileEntry
from sdtrt.runtime.backends import BackendError, EngineSet, ShapeError, check_integrity, controlnets
from sdtrt.runtime.device_loop import DeviceLoop, aligned, attempt_all, update_shapes
from sdtrt.runtime.tensorrt import api
from sdtrt.runtime.tensorrt.refit import refittable_graphs
from sdtrt.runtime.tensorrt.cuda import CudaGraphs, CudaMemory
from sdtrt.runtime.tensorrt.refit import Refit, numpy_dtypes, unrefittable

__all__ = ["CudaGraphs", "CudaMemory", "SharedContextMemory", "TrtEngine", "TrtSession", "load_trt_engines"]

log = logging.getLogger("sdtrt")
REQUIRED = ("text_encoder", "unet", "vae_encoder", "vae_decoder", "sampler_update")


class SharedContextMemory:
    """One device-memory block for every execution context, grown to the largest need seen so far.

    ``generation`` increases whenever the block moves, so a captured graph that points into the old
    block is re-captured."""

    def __init__(self, memory: CudaMemory):
        self.memory = memory
        self.ptr, self.size, self.generation = 0, 0, 0
        self.contexts: list = []
        self.attached: dict[int, tuple[int, int]] = {}  # id(context) -> the (ptr, size) it was given

    def fit(self, engine: "TrtEngine") -> None:
        """Size the block for ``engine``'s context at its current input shapes, and attach it."""
        ctx = engine.context
        need = int(ctx.update_device_memory_size_for_shapes())
        if need <= 0:  # 0 means TensorRT could not compute it: take the profile's bound
            need = int(engine.engine.get_device_memory_size_for_profile_v2(0))
        if need > self.size:
            new = self.memory.malloc(need)  # first: if it fails, the contexts keep the old block
            old, self.ptr, self.size = self.ptr, new, aligned(need)
            self.generation += 1
            for other in self.contexts:
                self._attach(other)
            if old:
                self.memory.sync()  # nothing may still run in the old block
                self.memory.free(old)
        if ctx not in self.contexts:
            self.contexts.append(ctx)
        self._attach(ctx)

    def _attach(self, ctx) -> None:
        """``set_device_memory`` only when the block differs from the context's: a captured graph holds the
        context's state at capture, so nothing about it may move while the graph is replayed."""
        if self.attached.get(id(ctx)) != (self.ptr, self.size):
            ctx.set_device_memory(self.ptr, self.size)
            self.attached[id(ctx)] = (self.ptr, self.size)


def profile_component(component: Component, profile: dict[str, tuple]) -> Component:
    """The component with its input ranges narrowed to what the engine's profile accepts."""
    inputs = []
    for spec in component.inputs:
        if spec.name in profile:
            lo, _, hi = profile[spec.name]
            spec = TensorSpec(spec.name, spec.dtype, spec.shape, tuple(lo), tuple(hi))
        inputs.append(spec)
    return Component(**{**component.__dict__, "inputs": tuple(inputs)})


class TrtEngine:
    """One deserialized engine and its execution context; also the device loop's launcher for it."""

    range_label = "engine profile (rebuild with `sdtrt build --size/--batch`)"

    def __init__(self, trt, runtime, memory: CudaMemory, shared: SharedContextMemory, path: Path,
                 component: Component, profile):
        self.trt, self.memory, self.shared, self.path = trt, memory, shared, path
        self.label = path.name
        try:
            data = path.read_bytes()
        except OSError as ex:
            raise BackendError(f"cannot read engine {path}: {ex.strerror}") from None
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BackendError(f"engine {path.name} is corrupt or not a TensorRT engine for this version; "
                               f"rebuild it with `sdtrt build {path.parent}`")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        declared = {s.name for s in component.inputs + component.outputs}
        if names != declared:
            raise BackendError(f"engine {path.name} has tensors {sorted(names)}, the manifest says {sorted(declared)}; "
                               f"rebuild it with `sdtrt build {path.parent}`")
        self.component = profile_component(component, profile)
        self._dtypes = check_io(trt, self.engine, component, path)
        self._dynamic = {s.name for s in component.inputs if not all(isinstance(d, int) for d in s.shape)}
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {path.name}")
        self.stream = int(memory.stream)
        self._shapes: dict[str, tuple[int, ...]] = {}  # the input shapes the context holds (set_input_shape)
        self.refit = Refit(self, self._base_weight)
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (ptr, capacity bytes)
        self._host: dict[str, np.ndarray] = {}

    # -- Launcher (device loop) ------------------------------------------------------------------------
    def dtype(self, name: str) -> np.dtype:
        return self._dtypes[name]

    input_dtype = dtype

    def set_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Set the dynamic input shapes that changed (only those: a captured graph must not replay against a
        context whose shapes were set again), then fit the shared block to them."""
        for name, shape in shapes.items():
            shape = tuple(int(d) for d in shape)
            if name not in self._dynamic or self._shapes.get(name) == shape:
                continue
            self._shapes.pop(name, None)  # unknown until TensorRT accepts it
            if not self.context.set_input_shape(name, shape):
                raise ShapeError(f"{self.label}: {name} shape {shape} is outside the engine profile "
                                 "(rebuild with `sdtrt build --size/--batch`)")
            self._shapes[name] = shape
        self.shared.fit(self)

    def bind(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, int(ptr)):
            raise BackendError(f"TensorRT refused the address {int(ptr):#x} of {name} in {self.label} "
                               "(device pointers must be 256-byte aligned)")

    def launch(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise BackendError(f"TensorRT failed to enqueue {self.label} (see the TensorRT log above)")

    # -- one-shot use (text encoder, VAE) --------------------------------------------------------------
    def _buffer(self, name: str, nbytes: int) -> int:
        old, cap = self._buffers.get(name, (0, 0))
        if cap >= nbytes:
            return old
        ptr = self.memory.malloc(nbytes)  # first: if it fails, the old buffer stays valid
        self._buffers[name] = (ptr, aligned(nbytes))
        if old:
            self.memory.sync()
            self.memory.free(old)
        return ptr

    def reserve(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Size the shared context memory for a generation at these shapes before anything runs in it, so a
        later, larger engine does not move the block under a captured loop."""
        self.set_shapes(shapes)
        loop = getattr(self, "device_loop", None)
        if loop is not None and "latents" in shapes:
            loop.update.set_shapes(update_shapes(shapes["latents"]))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # in the engine's dtypes, as ONNX Runtime's path casts (an int64 id fed to an int32 input is not its bytes)
        feeds = {name: np.ascontiguousarray(value, self._dtypes[name]) for name, value in feeds.items()}
        self.set_shapes({name: value.shape for name, value in feeds.items()})
        for name, value in feeds.items():
            ptr = self._buffer(name, value.nbytes)
            self.memory.upload(ptr, value)
            self.bind(name, ptr)
        outputs = {}
        for spec in self.component.outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            host = self._host.get(spec.name)
            if host is None or host.shape != shape:
                if host is not None:
                    self.memory.sync()
                    self.memory.free_host(host)
                host = self._host[spec.name] = self.memory.host(shape, self._dtypes[spec.name])
            ptr = self._buffer(spec.name, host.nbytes)
            self.bind(spec.name, ptr)
            outputs[spec.name] = (host, ptr)
        self.launch()
        for host, ptr in outputs.values():
            self.memory.download(host, ptr)
        self.memory.sync()
        return {name: host.copy() for name, (host, _) in outputs.items()}

    def override(self, initializers: dict[str, np.ndarray]) -> None:
        """Refit the engine with these weights (``refit.Refit``); weights an earlier override changed and this one does
        not go back to the graph's own. Every weight is set from the base plus deltas, never on top of the previous
        refit (TensorRT issue 3628: A, B, then A again must be A). A failed refit raises with every weight of the
        attempt counted as changed; the caller restores the base."""
        if not getattr(self, "refittable", False):
            raise BackendError(f"{self.label} was not built refittable: LoRAs and embeddings need `sdtrt build "
                               f"{self.path.parent} --refittable` (or fuse LoRAs at export)")
        try:
            self.refit.apply(initializers)
        finally:  # even a failed refit may have changed weights under a captured graph: capture again
            loop = getattr(self, "device_loop", None)
            if loop is not None and loop.graphs is not None:
                loop.graphs.reset()

    def _base_weight(self, initializer: str) -> np.ndarray:
        """The graph's own value of any initializer: a mapped weight from where the export recorded it, any other
        (a bias, a fused projection's partner) read from the ONNX graph."""
        from sdtrt.runtime.lora import base_weight

        for entry in self.component.weights.values():
            if entry.initializer == initializer:
                return base_weight(self.path.parent, entry)
        return base_weight(self.path.parent, (self.component.file, initializer))

    def close(self) -> None:
        """Free what this engine holds; every free is attempted even when one fails (a sticky CUDA error), and the
        session's close() frees whatever is left."""
        loop = getattr(self, "device_loop", None)
        buffers, hosts = [p for p, _ in self._buffers.values()], list(self._host.values())
        self._buffers, self._host = {}, {}
        try:
            attempt_all(([loop.close] if loop is not None else [])
                        + [lambda p=p: self.memory.free(p) for p in buffers]
                        + [lambda h=h: self.memory.free_host(h) for h in hosts])
        finally:
            self.context = None
            self.engine = None


class TrtDeviceLoop(DeviceLoop):
    """The shared device loop with a CUDA graph per shape, re-set up when the shared block moves."""

    def __init__(self, memory: CudaMemory, shared: SharedContextMemory, unet: TrtEngine, update: TrtEngine,
                 use_cuda_graph: bool = True, controlnets: dict[str, TrtEngine] | None = None):
        super().__init__(memory, unet, update, CudaGraphs(memory, use_cuda_graph), controlnets=controlnets)
        self.shared = shared

    def generation(self) -> int:
        # A VAE or text-encoder run may have grown (moved) the shared block since the last set-up.
        return self.shared.generation


def check_io(trt, cuda_engine, component: Component, path: Path) -> dict[str, np.dtype]:
    """Every I/O tensor of ``cuda_engine`` (an ICudaEngine) as the manifest declares it, checked once at load:
    dtype (``get_tensor_dtype``), location (``get_tensor_location`` == DEVICE: sdtrt binds device pointers), format
    (``get_tensor_format`` == LINEAR: the row-major layout sdtrt reads and writes), not a shape-inference tensor
    (``is_shape_inference_io``), and every dimension static in both equal (``get_tensor_shape``; -1 marks a dynamic
    one). NvInferRuntime.h's ICudaEngine getters; trtexec's ``sampleInference.cpp`` allocates by the same getters.
    Returns name -> NumPy dtype."""
    dtypes = numpy_dtypes(trt)
    out = {}
    rebuild = f"rebuild it with `sdtrt build {path.parent}`"
    for spec in component.inputs + component.outputs:
        name, want = spec.name, np.dtype(spec.dtype)
        got = cuda_engine.get_tensor_dtype(name)
        if dtypes.get(got) != want:
            raise BackendError(f"engine {path.name}: {name} is {getattr(got, 'name', got)} in the engine, the manifest "
                               f"says {want}; {rebuild}")
        if cuda_engine.get_tensor_location(name) != trt.TensorLocation.DEVICE:
            raise BackendError(f"engine {path.name}: {name} lives in host memory in the engine; sdtrt binds device "
                               f"memory ({rebuild})")
        fmt = cuda_engine.get_tensor_format(name)
        if fmt != trt.TensorFormat.LINEAR:
            raise BackendError(f"engine {path.name}: {name} has the {getattr(fmt, 'name', fmt)} layout in the engine; "
                               f"sdtrt reads and writes LINEAR (row-major) tensors ({rebuild})")
        if cuda_engine.is_shape_inference_io(name):
            raise BackendError(f"engine {path.name}: {name} is a shape tensor in the engine (read on the host); "
                               f"sdtrt binds only execution tensors ({rebuild})")
        dims = tuple(int(d) for d in cuda_engine.get_tensor_shape(name))
        if len(dims) != len(spec.shape) or any(isinstance(m, int) and d not in (-1, m) for d, m in zip(dims, spec.shape)):
            raise BackendError(f"engine {path.name}: {name} has shape {dims} in the engine, the manifest says "
                               f"{tuple(spec.shape)}; {rebuild}")
        out[name] = want
    return out


def check_fingerprint(manifest: Manifest, trt, device: api.DeviceInfo, folder: Path) -> None:
    build = manifest.tensorrt
    rebuild = f"rebuild them here with `sdtrt build {folder}`"
    if build is None:
        raise BackendError(f"{folder} has no TensorRT engines: run `sdtrt build {folder}` on this machine")
    version = api.trt_version(trt)
    if build.version != version:
        raise BackendError(f"engines in {folder} were built with TensorRT {build.version}, this is TensorRT {version}; {rebuild}")
    if build.compute_capability != device.compute_capability:
        raise BackendError(f"engines in {folder} were built for {build.gpu} (sm_{build.compute_capability}), "
                           f"this GPU is {device.name} (sm_{device.compute_capability}); {rebuild}")


def check_refittable(engine: TrtEngine, component: Component) -> None:
    """At load of a refittable engine: the mapped weights (what LoRAs and embeddings change) TensorRT cannot refit,
    named once here and refused by any refit that needs them (``get_all_weights``)."""
    mapped = {e.initializer for e in component.weights.values()}
    blocked = unrefittable(engine, mapped)
    engine.refit.unrefittable = set(blocked)
    if blocked:
        log.warning("%s: %d of its %d LoRA-mapped weights are not refittable in this engine (folded at build): %s%s; "
                    "LoRAs that touch them are refused", engine.label, len(blocked), len(mapped), ", ".join(blocked[:3]),
                    " ..." if len(blocked) > 3 else "")


class TrtSession:
    """What the engines of one folder share: TensorRT runtime, stream, shared context memory."""

    def __init__(self, trt, cudart):
        self.trt, self.cudart = trt, cudart
        self.memory = CudaMemory(cudart)
        self.shared = SharedContextMemory(self.memory)
        self.runtime = trt.Runtime(api.logger(trt))
        self.engines: list[TrtEngine] = []

    def load(self, path: Path, component: Component, profile) -> TrtEngine:
        engine = TrtEngine(self.trt, self.runtime, self.memory, self.shared, path, component, profile)
        self.engines.append(engine)
        return engine

    def close(self) -> None:
        if self.memory.stream is None:
            return
        engines, self.engines = self.engines, []
        self.shared.contexts, self.shared.attached = [], {}  # contexts go before their engines
        try:
            attempt_all([self.memory.sync] + [engine.close for engine in engines])
        finally:
            self.shared.ptr = self.shared.size = 0
            self.memory.close()  # frees the shared block and anything left; never raises


def load_trt_engines(folder: Path, manifest: Manifest, trt=None, cudart=None, use_cuda_graph: bool = True,
                     files: dict[str, str] | None = None) -> EngineSet:
    """Engines of ``folder`` for the pipeline; ``files`` overrides engine file names (build's verification)."""
    trt = trt or api.import_tensorrt()
    api.check_tensorrt_version(trt)
    cudart = cudart or api.import_cudart()
    device_info = api.device_info(cudart)
    check_fingerprint(manifest, trt, device_info, folder)
    missing = set(REQUIRED) - set(manifest.tensorrt.engines)
    if missing:
        raise BackendError(f"engines missing for {', '.join(sorted(missing))}: rebuild with `sdtrt build {folder}`")
    if files is None:  # (build's verification loads engines it has just hashed)
        check_integrity(folder, [FileEntry(e.file, e.sha256, e.size_bytes) for e in manifest.tensorrt.engines.values()],
                        f"rebuild with `sdtrt build {folder}`")
    session = TrtSession(trt, cudart)
    engines = EngineSet(resources=[session])
    refittable = frozenset(refittable_graphs(manifest)) if manifest.tensorrt.refittable else frozenset()
    try:
        for name, built in manifest.tensorrt.engines.items():
            path = Path(folder) / (files or {}).get(name, built.file)
            engines[name] = session.load(path, manifest.components[name], built.profile)
            engines[name].refittable = name in refittable
            if engines[name].refittable:
                check_refittable(engines[name], manifest.components[name])
    except BaseException:
        session.close()
        raise
    update = engines.pop("sampler_update")
    engines["unet"].device_loop = TrtDeviceLoop(session.memory, session.shared, engines["unet"], update, use_cuda_graph,
                                                controlnets(engines))
    return engines
