"""TensorRT backend: engines on CUDA buffers, and the denoising loop entirely on the device.

Follows trtexec's inference code (``samples/common/sampleInference.cpp``) and the rules of
``NvInferRuntime.h``:

- one stream (non-blocking, so nothing on the legacy default stream can break a capture);
- one device-memory block shared by every execution context (they run one after another on that
  stream), sized by what the shapes in use need (``update_device_memory_size_for_shapes``), grown
  when a larger shape comes, never sized for the profile maximum up front;
- every ``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3`` return is checked: a
  refused address keeps the old one, which would silently reuse step 0's inputs;
- the denoising loop is ``runtime.device_loop.DeviceLoop``; each shape runs once eagerly (TensorRT sets
  up lazily), then is captured as a CUDA graph and replayed. A capture that fails is ended, its graph
  destroyed, a warning given once, and that shape runs without a graph (trtexec's ``endCaptureOnError``);
- ``close()`` (or ``with``) frees contexts, graphs, buffers, pinned memory, the shared block and the stream.

Engines are refused, with the command that fixes it, when they were built for another TensorRT
version or GPU, when a file is corrupt, or when a shape is outside the engine's profile.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sdtrt.manifest import Component, Manifest, TensorSpec
from sdtrt.integrity import FileEntry
from sdtrt.runtime.backends import (BackendError, DeviceMemoryError, EngineSet, ShapeError, check_integrity,
                                    controlnets)
from sdtrt.runtime.device_loop import DeviceLoop, aligned, update_shapes
from sdtrt.runtime.tensorrt import api
from sdtrt.runtime.tensorrt.build import REFITTABLE

log = logging.getLogger("sdtrt")
REQUIRED = ("text_encoder", "unet", "vae_encoder", "vae_decoder", "sampler_update")


class CudaMemory:
    """The stream, allocations and copies of one backend instance (cuda-python's runtime API).

    Counts what it holds, so ``close()`` can free everything and tests can see leaks."""

    def __init__(self, cudart):
        self.cudart = cudart
        self.stream = api.check(cudart, cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
                                "cudaStreamCreateWithFlags")
        self.live: dict[int, int] = {}  # device pointer -> bytes
        self.pinned_live: dict[int, int] = {}

    def _call(self, result, what: str):
        return api.check(self.cudart, result, what)

    def malloc(self, nbytes: int) -> int:
        nbytes = max(aligned(nbytes), 256)
        err, ptr = self.cudart.cudaMalloc(nbytes)
        if err == self.cudart.cudaError_t.cudaErrorMemoryAllocation:
            free = self.free_bytes()
            raise DeviceMemoryError(f"not enough GPU memory: {nbytes / 2**30:.2f} GiB more are needed, "
                                    f"{free / 2**30:.2f} GiB are free; use a smaller size or batch, or free the GPU")
        ptr = int(self._call((err, ptr), f"cudaMalloc({nbytes} bytes)"))
        self.live[ptr] = nbytes
        return ptr

    def free(self, ptr: int) -> None:
        if self.live.pop(ptr, None) is not None:
            self._call(self.cudart.cudaFree(ptr), "cudaFree")

    def free_bytes(self) -> int:
        err, free, _total = self.cudart.cudaMemGetInfo()
        return int(free) if err == self.cudart.cudaError_t.cudaSuccess else 0

    def host(self, shape, dtype) -> np.ndarray:
        """A page-locked host array (device-to-host copies into pageable memory are synchronous)."""
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        ptr = int(self._call(self.cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        self.pinned_live[ptr] = nbytes
        buf = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * nbytes).from_address(ptr))
        return buf[: int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def free_host(self, array: np.ndarray) -> None:
        ptr = int(array.ctypes.data)
        if self.pinned_live.pop(ptr, None) is not None:
            self._call(self.cudart.cudaFreeHost(ptr), "cudaFreeHost")

    def upload(self, ptr: int, array: np.ndarray) -> None:
        # From pageable memory: the copy is staged before this returns, so ``array`` may go away.
        array = np.ascontiguousarray(array)
        if array.nbytes > self.live.get(ptr, 0):
            raise BackendError(f"internal error: upload of {array.nbytes} bytes into a buffer of {self.live.get(ptr, 0)}")
        self._call(self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream),
                   "cudaMemcpyAsync (upload)")

    def download(self, out: np.ndarray, ptr: int) -> None:
        self._call(self.cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream),
                   "cudaMemcpyAsync (download)")

    def zero(self, ptr: int, nbytes: int) -> None:
        self._call(self.cudart.cudaMemsetAsync(ptr, 0, nbytes, self.stream), "cudaMemsetAsync")

    def barrier(self) -> None:
        pass  # uploads and launches share one stream: already ordered

    def sync(self) -> None:
        self._call(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Free everything; keeps going past a failed call so one error does not leak the rest."""
        if self.stream is None:
            return
        cudart, stream = self.cudart, self.stream
        self.stream = None
        cudart.cudaStreamSynchronize(stream)  # nothing may still use what is freed below
        for ptr in list(self.live):
            self.live.pop(ptr)
            cudart.cudaFree(ptr)
        for ptr in list(self.pinned_live):
            self.pinned_live.pop(ptr)
            cudart.cudaFreeHost(ptr)
        cudart.cudaStreamDestroy(stream)


class CudaGraphs:
    """Capture the enqueued loop once per key and replay it; one graph exists at a time.

    The first run of a key is eager (TensorRT's lazy set-up must not happen inside a capture); the
    capture follows in the same call and is replayed from the next call on."""

    def __init__(self, memory: CudaMemory, enabled: bool = True):
        self.memory, self.cudart, self.enabled = memory, memory.cudart, enabled
        self.exec = None
        self.key = None
        self.captures = 0  # successful captures (tests and benchmarks read it)
        self.failed: set = set()  # keys whose capture failed: they run eagerly
        self._warned = False

    def reset(self) -> None:
        if self.exec is not None:
            api.check(self.cudart, self.cudart.cudaGraphExecDestroy(self.exec), "cudaGraphExecDestroy")
            self.exec, self.key = None, None

    def run(self, key, enqueue) -> None:
        cudart, stream = self.cudart, self.memory.stream
        if self.exec is not None and self.key == key:
            api.check(cudart, cudart.cudaGraphLaunch(self.exec, stream), "cudaGraphLaunch")
            return
        enqueue()
        if self.enabled and key not in self.failed:
            self.reset()
            self._capture(key, enqueue)

    def _capture(self, key, enqueue) -> None:
        cudart, stream = self.cudart, self.memory.stream
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        api.check(cudart, cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        problem = None
        try:
            enqueue()
        except BackendError as ex:  # a refused launch: the captured graph must not be used
            problem = str(ex)
        except BaseException:
            _, graph = cudart.cudaStreamEndCapture(stream)  # leave the stream usable, then re-raise
            if graph is not None:
                cudart.cudaGraphDestroy(graph)
            raise
        err, graph = cudart.cudaStreamEndCapture(stream)  # always end the capture, even after a failure
        if err != cudart.cudaError_t.cudaSuccess:
            problem = problem or api.error_name(cudart, err)
        elif problem is None:
            err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
            if err == cudart.cudaError_t.cudaSuccess:
                self.exec, self.key = graph_exec, key
                self.captures += 1
            else:
                problem = f"cudaGraphInstantiate: {api.error_name(cudart, err)}"
        if graph is not None:  # cuda-python gives None with an error; the exec keeps what it needs
            api.check(cudart, cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
        if problem is not None:
            self.failed.add(key)
            if not self._warned:
                log.warning("CUDA graph capture failed (%s); this shape runs without a CUDA graph", problem)
                self._warned = True


class SharedContextMemory:
    """One device-memory block for every execution context, grown to the largest need seen so far.

    ``generation`` increases whenever the block moves, so a captured graph that points into the old
    block is re-captured."""

    def __init__(self, memory: CudaMemory):
        self.memory = memory
        self.ptr, self.size, self.generation = 0, 0, 0
        self.contexts: list = []

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
                other.set_device_memory(self.ptr, self.size)
            if old:
                self.memory.sync()  # nothing may still run in the old block
                self.memory.free(old)
        if ctx not in self.contexts:
            self.contexts.append(ctx)
        ctx.set_device_memory(self.ptr, self.size)


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
        self._dtypes = {s.name: np.dtype(s.dtype) for s in component.inputs + component.outputs}
        self._dynamic = {s.name for s in component.inputs if not all(isinstance(d, int) for d in s.shape)}
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {path.name}")
        self.stream = int(memory.stream)
        self._overridden: set[str] = set()  # initializers refitted away from the graph's own weights
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (ptr, capacity bytes)
        self._host: dict[str, np.ndarray] = {}

    # -- Launcher (device loop) ------------------------------------------------------------------------
    def dtype(self, name: str) -> np.dtype:
        return self._dtypes[name]

    input_dtype = dtype

    def set_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if name in self._dynamic and not self.context.set_input_shape(name, tuple(int(d) for d in shape)):
                raise ShapeError(f"{self.label}: {name} shape {tuple(shape)} is outside the engine profile "
                                 "(rebuild with `sdtrt build --size/--batch`)")
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
        """Refit the engine with these weights; weights an earlier override changed and this one does not go back to
        the graph's own (read from its external data). Every weight is set from the base plus deltas, never on top
        of the previous refit (TensorRT issue 3628: A, B, then A again must be A)."""
        if not getattr(self, "refittable", False):
            raise BackendError(f"{self.label} was not built refittable: LoRAs and embeddings need `sdtrt build "
                               f"{self.path.parent} --refittable` (or fuse LoRAs at export)")
        values = dict(initializers)
        for name in self._overridden - set(values):  # back to the base weight
            values[name] = self._base_weight(name)
        self.memory.sync()  # nothing may run on the old weights while they change
        trt = self.trt  # (named `trt`: the API-contract test checks every trt.X against the real bindings)
        refitter = trt.Refitter(self.engine, trt.Logger(trt.Logger.WARNING))
        weights = []  # alive until refit_cuda_engine returns
        for name, array in values.items():
            weights.append(trt.Weights(np.ascontiguousarray(array)))
            if not refitter.set_named_weights(name, weights[-1]):
                raise BackendError(f"TensorRT refused new weights for {name} in {self.label} (shape or type differs?)")
        if not refitter.refit_cuda_engine():
            missing = list(refitter.get_missing_weights())
            raise BackendError(f"TensorRT could not refit {self.label}"
                               + (f": weights missing for {', '.join(missing[:3])}" if missing else ""))
        self._overridden = set(initializers)
        loop = getattr(self, "device_loop", None)
        if loop is not None and loop.graphs is not None:
            loop.graphs.reset()  # captured launches are re-captured on the new weights

    def _base_weight(self, initializer: str) -> np.ndarray:
        from sdtrt.runtime.lora import base_weight

        for entry in self.component.weights.values():
            if entry.initializer == initializer:
                return base_weight(self.path.parent, entry)
        raise BackendError(f"{self.label}: no base weight recorded for {initializer}")

    def close(self) -> None:
        loop = getattr(self, "device_loop", None)
        try:
            if loop is not None:
                loop.close()
            for ptr, _ in self._buffers.values():
                self.memory.free(ptr)
            for host in self._host.values():
                self.memory.free_host(host)
        finally:  # whatever failed above, the session's close() frees the rest
            self._buffers, self._host = {}, {}
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


class TrtSession:
    """What the engines of one folder share: TensorRT runtime, stream, shared context memory."""

    def __init__(self, trt, cudart):
        self.trt, self.cudart = trt, cudart
        self.memory = CudaMemory(cudart)
        self.shared = SharedContextMemory(self.memory)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines: list[TrtEngine] = []

    def load(self, path: Path, component: Component, profile) -> TrtEngine:
        engine = TrtEngine(self.trt, self.runtime, self.memory, self.shared, path, component, profile)
        self.engines.append(engine)
        return engine

    def close(self) -> None:
        if self.memory.stream is None:
            return
        try:
            self.memory.sync()
            self.shared.contexts = []  # contexts go before their engines
            for engine in self.engines:
                engine.close()
        finally:
            self.engines = []
            self.shared.ptr = self.shared.size = 0
            self.memory.close()  # frees the shared block and anything left


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
    try:
        for name, built in manifest.tensorrt.engines.items():
            path = Path(folder) / (files or {}).get(name, built.file)
            engines[name] = session.load(path, manifest.components[name], built.profile)
            engines[name].refittable = manifest.tensorrt.refittable and name in REFITTABLE
    except BaseException:
        session.close()
        raise
    update = engines.pop("sampler_update")
    engines["unet"].device_loop = TrtDeviceLoop(session.memory, session.shared, engines["unet"], update, use_cuda_graph,
                                                controlnets(engines))
    return engines
