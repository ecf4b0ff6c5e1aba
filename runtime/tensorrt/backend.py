"""TensorRT backend: engines on CUDA buffers, and the denoising loop entirely on the device.

- One device-memory block, sized by the largest context's need, is shared by every execution context
  (they run one after another on one stream), which keeps VRAM down.
- The loop runs the U-Net engine and the sampler-update engine back to back. The ring of states and
  model outputs is passed by address (``set_tensor_address``), all per-step timesteps, coefficient rows
  and noise are uploaded before the loop, so a step needs no host work and no synchronisation.
- For a fixed shape and step count the whole loop is captured once as a CUDA graph and replayed;
  a new shape re-captures. The result comes back through pinned host memory.

Engines are refused, with the command that fixes it, when they were built for another TensorRT
version or GPU, when a file is corrupt, or when a shape is outside the engine's profile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdtrt.manifest import Component, Manifest, TensorSpec
from sdtrt.runtime.backends import BackendError, ShapeError
from sdtrt.runtime.samplers import OUTPUT_DEPTH, STATE_DEPTH, SamplerTable, coefficient_row
from sdtrt.runtime.tensorrt import api


class Device:
    """The CUDA stream, allocations and copies one pipeline uses (cuda-python's runtime API)."""

    def __init__(self, cudart):
        self.cudart = cudart
        self.stream = api.check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")

    def malloc(self, nbytes: int) -> int:
        return int(api.check(self.cudart, self.cudart.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        api.check(self.cudart, self.cudart.cudaFree(ptr), "cudaFree")

    def pinned(self, shape, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = api.check(self.cudart, self.cudart.cudaMallocHost(nbytes), "cudaMallocHost")
        buf = (np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * nbytes).from_address(int(ptr))))
        return buf.view(dtype).reshape(shape)

    def free_pinned(self, array: np.ndarray) -> None:
        api.check(self.cudart, self.cudart.cudaFreeHost(array.ctypes.data), "cudaFreeHost")

    def upload(self, dst: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        api.check(self.cudart, self.cudart.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes,
                                                           self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream),
                  "cudaMemcpyAsync")

    def download(self, out: np.ndarray, src: int) -> None:
        api.check(self.cudart, self.cudart.cudaMemcpyAsync(out.ctypes.data, src, out.nbytes,
                                                           self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream),
                  "cudaMemcpyAsync")

    def zero(self, ptr: int, nbytes: int) -> None:
        api.check(self.cudart, self.cudart.cudaMemsetAsync(ptr, 0, nbytes, self.stream), "cudaMemsetAsync")

    def sync(self) -> None:
        api.check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


def profile_component(component: Component, profile: dict[str, tuple]) -> Component:
    """The component with its input ranges narrowed to what the engine's profile accepts."""
    inputs = []
    for spec in component.inputs:
        if spec.name in profile:
            lo, _, hi = profile[spec.name]
            spec = TensorSpec(spec.name, spec.dtype, spec.shape, tuple(lo), tuple(hi))
        inputs.append(spec)
    return Component(**{**component.__dict__, "inputs": tuple(inputs)})


def set_shape(context, name: str, shape: tuple, engine_name: str) -> None:
    if not context.set_input_shape(name, tuple(shape)):
        raise ShapeError(f"{engine_name}: {name} shape {tuple(shape)} is outside the engine profile "
                         "(rebuild with `sdtrt build --size/--batch`)")


class TrtEngine:
    """One deserialized engine and its execution context (host arrays in and out, for the one-shot graphs)."""

    range_label = "engine profile (rebuild with `sdtrt build --size/--batch`)"

    def __init__(self, trt, runtime, device: Device, path: Path, component: Component, profile):
        self.trt, self.device, self.path = trt, device, path
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
        self.context = None
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (ptr, capacity bytes)
        self._host: dict[str, np.ndarray] = {}

    @property
    def device_memory_size(self) -> int:
        return int(self.engine.device_memory_size_v2)

    def attach(self, memory: int, size: int) -> None:
        """Create the context on the shared device-memory block."""
        self.context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.context.set_device_memory(memory, size)

    def input_dtype(self, name: str) -> np.dtype:
        return self._dtypes[name]

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if cap < nbytes:
            if ptr:
                self.device.free(ptr)
            ptr, cap = self.device.malloc(nbytes), nbytes
            self._buffers[name] = (ptr, cap)
        return ptr

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ctx = self.context
        for name, value in feeds.items():
            ptr = self._buffer(name, value.nbytes)
            self.device.upload(ptr, value)
            set_shape(ctx, name, value.shape, self.path.name)
            ctx.set_tensor_address(name, ptr)
        outputs = {}
        for spec in self.component.outputs:
            shape = tuple(ctx.get_tensor_shape(spec.name))
            host = self._host.get(spec.name)
            if host is None or host.shape != shape:
                if host is not None:
                    self.device.free_pinned(host)
                host = self._host[spec.name] = self.device.pinned(shape, self._dtypes[spec.name])
            ptr = self._buffer(spec.name, host.nbytes)
            ctx.set_tensor_address(spec.name, ptr)
            outputs[spec.name] = (host, ptr)
        if not ctx.execute_async_v3(self.device.stream):
            raise BackendError(f"TensorRT failed to run {self.path.name}")
        for host, ptr in outputs.values():
            self.device.download(host, ptr)
        self.device.sync()
        return {name: host.copy() for name, (host, _) in outputs.items()}


class DeviceLoop:
    """U-Net + sampler update on the device for a whole generation (see the module docstring)."""

    def __init__(self, device: Device, unet: TrtEngine, update: TrtEngine, use_cuda_graph: bool = True):
        self.device, self.unet, self.update = device, unet, update
        self.use_cuda_graph = use_cuda_graph
        self._key = None
        self._graph_exec = None
        self._allocated: list[int] = []  # this loop's device buffers, freed when the shape changes
        self.result: np.ndarray | None = None
        self.captures = 0  # how many times a CUDA graph was captured (tests and benchmarks read it)

    def _setup(self, shape: tuple[int, ...], text_shape: tuple[int, ...], steps: int) -> None:
        d = self.device
        for ptr in self._allocated:
            d.free(ptr)
        if self.result is not None:
            d.free_pinned(self.result)
        n = int(np.prod(shape))
        self.n32 = n * 4
        out_dtype = self.unet.input_dtype("noise_pred")
        in_dtype = self.unet.input_dtype("latents")
        self.states = [d.malloc(self.n32) for _ in range(STATE_DEPTH + 1)]  # ring: s_i at i % 5, fp32
        self.outputs = [d.malloc(n * out_dtype.itemsize) for _ in range(OUTPUT_DEPTH)]  # ring: m_i at i % 5
        self.unet_in = d.malloc(n * in_dtype.itemsize)
        self.noise_all = d.malloc(self.n32 * steps)  # (S, B, C, h, w)
        self.zero_noise = d.malloc(self.n32)
        self.coefs_all = d.malloc(steps * (STATE_DEPTH + OUTPUT_DEPTH + 1) * 4)  # (S, 10)
        self.timesteps = d.malloc(steps * 4)  # (S,)
        self.guidance = d.malloc(4)
        self.embeddings = d.malloc(int(np.prod(text_shape)) * self.unet.input_dtype("encoder_hidden_states").itemsize)
        self._allocated = [*self.states, *self.outputs, self.unet_in, self.noise_all, self.zero_noise, self.coefs_all,
                           self.timesteps, self.guidance, self.embeddings]
        self.result = d.pinned(shape, np.float32)
        for ctx, shapes in ((self.unet.context, {"latents": shape, "encoder_hidden_states": text_shape,
                                                  "timestep": (1,), "guidance_scale": (1,)}),
                            (self.update.context, {s.name: shape for s in self.update.component.inputs if s.name != "coefs"})):
            for name, value in shapes.items():
                set_shape(ctx, name, value, "unet" if ctx is self.unet.context else "sampler_update")
        set_shape(self.update.context, "coefs", (STATE_DEPTH + OUTPUT_DEPTH + 1,), "sampler_update")
        self._graph_exec = None

    def _enqueue_loop(self, steps: int, stochastic: bool) -> None:
        """Every step's two engine launches; no host synchronisation anywhere in here."""
        u, up, stream = self.unet.context, self.update.context, self.device.stream
        ring = STATE_DEPTH + 1
        u.set_tensor_address("latents", self.unet_in)
        u.set_tensor_address("encoder_hidden_states", self.embeddings)
        u.set_tensor_address("guidance_scale", self.guidance)
        up.set_tensor_address("next_latents", self.unet_in)
        for i in range(steps):
            u.set_tensor_address("timestep", self.timesteps + 4 * i)
            u.set_tensor_address("noise_pred", self.outputs[i % OUTPUT_DEPTH])
            u.execute_async_v3(stream)
            for j in range(STATE_DEPTH):
                up.set_tensor_address(f"state_{j}", self.states[(i - j) % ring])
            for j in range(OUTPUT_DEPTH):
                up.set_tensor_address(f"model_output_{j}", self.outputs[(i - j) % OUTPUT_DEPTH])
            up.set_tensor_address("noise", self.noise_all + self.n32 * i if stochastic else self.zero_noise)
            up.set_tensor_address("coefs", self.coefs_all + 4 * (STATE_DEPTH + OUTPUT_DEPTH + 1) * i)
            up.set_tensor_address("next_state", self.states[(i + 1) % ring])
            up.execute_async_v3(stream)

    def run(self, table: SamplerTable, state0: np.ndarray, embeddings: np.ndarray, guidance: float,
            noises: np.ndarray | None) -> np.ndarray:
        d, cudart = self.device, self.device.cudart
        steps = table.num_steps
        key = (state0.shape, embeddings.shape, steps, table.stochastic)
        if key != self._key:
            self._setup(state0.shape, embeddings.shape, steps)
            self._key = key
        for ptr in self.states:  # history beyond step 0 has coefficient 0, but 0 * NaN is NaN
            d.zero(ptr, self.n32)
        d.zero(self.zero_noise, self.n32)
        d.upload(self.states[0], state0.astype(np.float32))
        d.upload(self.unet_in, state0.astype(self.unet.input_dtype("latents")))
        d.upload(self.embeddings, embeddings)
        d.upload(self.guidance, np.array([guidance], np.float32))
        d.upload(self.timesteps, table.timesteps.astype(np.float32))
        d.upload(self.coefs_all, np.stack([coefficient_row(table, i) for i in range(steps)]))
        if table.stochastic:
            d.upload(self.noise_all, noises)
        if self._graph_exec is not None:
            api.check(cudart, cudart.cudaGraphLaunch(self._graph_exec, d.stream), "cudaGraphLaunch")
        else:
            # First run of a shape runs eagerly (TensorRT's lazy set-up must not happen inside a capture),
            # then the loop is captured for the next runs.
            self._enqueue_loop(steps, table.stochastic)
            if self.use_cuda_graph:
                api.check(cudart, cudart.cudaStreamBeginCapture(
                    d.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture")
                self._enqueue_loop(steps, table.stochastic)
                graph = api.check(cudart, cudart.cudaStreamEndCapture(d.stream), "cudaStreamEndCapture")
                self._graph_exec = api.check(cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
                self.captures += 1
        d.download(self.result, self.states[steps % (STATE_DEPTH + 1)])
        d.sync()
        return self.result.copy()


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


def load_trt_engines(folder: Path, manifest: Manifest, trt=None, cudart=None, use_cuda_graph: bool = True) -> dict:
    trt = trt or api.import_tensorrt()
    cudart = cudart or api.import_cudart()
    device_info = api.device_info(cudart)
    check_fingerprint(manifest, trt, device_info, folder)
    device = Device(cudart)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engines = {}
    for name, built in manifest.tensorrt.engines.items():
        engines[name] = TrtEngine(trt, runtime, device, Path(folder) / built.file, manifest.components[name], built.profile)
    missing = {"text_encoder", "unet", "vae_decoder", "sampler_update"} - set(engines)
    if missing:
        raise BackendError(f"engines missing for {', '.join(sorted(missing))}: rebuild with `sdtrt build {folder}`")
    size = max(e.device_memory_size for e in engines.values())
    shared = device.malloc(size)
    for e in engines.values():
        e.attach(shared, size)
    update = engines.pop("sampler_update")
    engines["unet"].device_loop = DeviceLoop(device, engines["unet"], update, use_cuda_graph)
    return engines
