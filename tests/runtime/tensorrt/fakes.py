"""Fakes of the TensorRT and cuda-python objects sdtrt touches, as strict as the real ones.

Class, method and parameter names mirror the real bindings (test_api_contract checks them against
tensorrt 10.x/11.x and cuda-bindings 12.x/13.x), so the fakes cannot drift from the real API. Unlike
mocks, the fake engines compute: a "plan" names its ONNX file, and an execution context reads its
inputs from simulated device memory at the addresses it was given, runs the graph in ONNX Runtime and
writes the outputs back.

The rules the fakes enforce are the ones a real GPU enforces (NvInferRuntime.h, the CUDA runtime
documentation, trtexec's sampleInference.cpp), because a kinder fake hides exactly the bugs that give
a user a NaN image on their first run:
- device memory from ``cudaMalloc`` is garbage (every byte 0xFF: NaN in fp16 and fp32), never zeros;
- ``set_tensor_address`` refuses a pointer that is not 256-byte aligned (returns False, keeps the old one);
- ``execute_async_v3`` returns False when an address or a dynamic shape is unset, when the context has
  no device memory or too little for its shapes, or (during a capture) when the shape never ran
  eagerly; a failed enqueue inside a capture invalidates it;
- during stream capture, ``cudaMalloc``/``cudaFree``/``cudaMallocHost``, a stream synchronisation and a
  copy to or from pageable host memory fail with cudaErrorStreamCaptureUnsupported and invalidate the
  capture; ending an invalidated capture gives cudaErrorStreamCaptureInvalidated and no graph;
- work on a stream runs when the host waits for it (``cudaStreamSynchronize``, ``cudaFree``, a copy into
  pageable memory), not when it is issued: a result read before a synchronisation is stale;
- ``cudaMalloc`` fails with cudaErrorMemoryAllocation beyond ``memory_limit``;
- streams, graphs, graph execs, device and pinned allocations are counted, so leaks show;
- a TensorRT context scribbles over its device-memory block when it runs, as real kernels do;
- a timing cache carries the TensorRT version and compute capability it was made with and is
  refused (``set_timing_cache`` returns False) on another; garbage bytes give no cache at all;
- a captured graph holds what it captured: the engine's weights at capture (a refit after it is not seen by a
  replay), and it may only be replayed while every context it launched keeps the input shapes and device memory
  it had at capture (``set_input_shape`` / ``set_device_memory`` since then: AssertionError, undefined on a GPU);
- the refitter refuses names outside the engine's refittable weights (``get_all_weights``) and weights whose
  dtype or count differ from ``get_weights_prototype``; weights combined at build (a Conv or Gemm with its bias, a
  MatMul with the Add of its bias, MatMuls reading the same input: fused Q/K/V) are refitted together, and every
  unsupplied member of a group with a supplied one is reported by ``get_missing_weights``; ``refit_cuda_engine``
  with weights missing applies a random subset of what was set and returns False ("a subset of weights may have
  been refitted");
- engine tensors carry a dtype, a location and a format (``get_tensor_dtype``/``location``/``format``);
- ``sticky_error`` makes every CUDA call fail as after an illegal address; frees still release what they name
  (a dying context takes its memory with it), so a close path that stops early shows as a leak.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from tests.runtime.tensorrt.fake_cuda import FAKED_CUDART, GARBAGE, FakeCudart, _Enum  # noqa: F401  (re-exported)

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}


# ---- tensorrt --------------------------------------------------------------------------------------------

CURRENT: dict = {"cudart": None, "version": "10.16.1.11",  # the fake GPU and TensorRT a test runs on
           "folded": set()}  # initializers a build folds away (not refittable), a test control


class _Severity:
    WARNING = _Enum(2, "WARNING")


class Logger:
    WARNING = _Severity.WARNING
    made = 0  # loggers made (a test control: one per process)

    def __init__(self, min_severity=_Severity.WARNING):
        self.min_severity = min_severity
        Logger.made += 1


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = _Enum(1, "STRONGLY_TYPED")


class BuilderFlag:
    REFIT = _Enum(5, "REFIT")


class DataType:
    FLOAT = _Enum(0, "FLOAT")
    HALF = _Enum(1, "HALF")
    INT8 = _Enum(2, "INT8")
    INT32 = _Enum(3, "INT32")
    BOOL = _Enum(4, "BOOL")
    UINT8 = _Enum(5, "UINT8")
    INT64 = _Enum(8, "INT64")


_TRT_OF_NUMPY = {np.dtype(np.float32): DataType.FLOAT, np.dtype(np.float16): DataType.HALF,
                 np.dtype(np.int8): DataType.INT8, np.dtype(np.int32): DataType.INT32, np.dtype(np.bool_): DataType.BOOL,
                 np.dtype(np.uint8): DataType.UINT8, np.dtype(np.int64): DataType.INT64}


class TensorLocation:
    DEVICE = _Enum(0, "DEVICE")
    HOST = _Enum(1, "HOST")


class TensorFormat:
    LINEAR = _Enum(0, "LINEAR")
    CHW32 = _Enum(3, "CHW32")
    HWC8 = _Enum(4, "HWC8")


class Weights:
    """Host weights handed to TensorRT (the real class wraps a NumPy array without copying; a dtype TensorRT has no
    DataType for, such as float64, is refused)."""

    def __init__(self, a):
        self.array = np.asarray(a)
        if self.array.dtype not in _TRT_OF_NUMPY:
            raise TypeError(f"Unsupported numpy data type: {self.array.dtype}")
        self._dtype, self._size = _TRT_OF_NUMPY[self.array.dtype], int(self.array.size)

    @classmethod
    def _prototype(cls, dtype, size):
        w = cls.__new__(cls)
        w.array, w._dtype, w._size = None, dtype, int(size)
        return w

    @property
    def dtype(self):
        return self._dtype

    @property
    def size(self):
        return self._size

    @property
    def nbytes(self):
        return 0 if self.array is None else int(self.array.nbytes)


class Refitter:
    """TensorRT's refitter on the fake engine, as strict as TensorRT (see the module docstring): weights not set keep
    their current (possibly earlier-refitted) values."""

    _rng = np.random.default_rng(0)  # which subset a refit with weights missing applies

    def __init__(self, engine, logger):
        self.engine, self.pending = engine, {}

    def get_all_weights(self):
        return sorted(self.engine._refittable())

    def get_weights_prototype(self, weights_name):
        current = self.engine._weights().get(weights_name) if weights_name in self.engine._refittable() else None
        if current is None:
            return Weights._prototype(DataType.FLOAT, -1)
        return Weights._prototype(_TRT_OF_NUMPY[current.dtype], current.size)

    def set_named_weights(self, name, weights):
        proto = self.get_weights_prototype(name)
        if proto.size < 0 or weights.size != proto.size or weights.dtype != proto.dtype:
            return False  # not a refittable weight of this engine, or of another count or type
        shape = self.engine._weights()[name].shape
        self.pending[name] = weights.array.reshape(shape).copy()  # TensorRT copies at refit; the fake at once
        return True

    def get_missing_weights(self):
        groups = self.engine._refit_groups()
        missing = set()
        for name in self.pending:
            missing |= groups.get(name, {name}) - set(self.pending)
        return sorted(missing)

    def refit_cuda_engine(self):
        if not self.engine.plan.get("refittable"):
            return False  # "engine is not refittable" in TensorRT's log
        if self.get_missing_weights():
            names = sorted(self.pending)
            subset = [n for n in names if Refitter._rng.random() < 0.5] or names[:1]
            self.engine._refit({n: self.pending[n] for n in subset})  # "a subset of weights may have been refitted"
            return False
        self.engine._refit(self.pending)
        self.pending = {}
        return True


class MemoryPoolType:
    WORKSPACE = _Enum(0, "WORKSPACE")


class ExecutionContextAllocationStrategy:
    STATIC = _Enum(0, "STATIC")
    ON_PROFILE_CHANGE = _Enum(1, "ON_PROFILE_CHANGE")
    USER_MANAGED = _Enum(2, "USER_MANAGED")


class INetworkDefinition:
    def __init__(self, flags):
        self.flags = flags
        self.onnx: str | None = None


class OnnxParser:
    def __init__(self, network, logger):
        self.network = network
        self.errors: list[str] = []

    def parse_from_file(self, model):
        import onnx

        try:
            onnx.load(model, load_external_data=False)
        except Exception as ex:  # a real parser also just reports errors
            self.errors.append(f"cannot parse {model}: {type(ex).__name__}")
            return False
        self.network.onnx = model
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, index):
        return self.errors[index]


class IOptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, input, min, opt, max):
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


def _device_tag() -> dict:
    cudart = CURRENT["cudart"]
    return {"trt": CURRENT["version"], "cc": f"{cudart.prop.major}{cudart.prop.minor}" if cudart else "?"}


class ITimingCache:
    _MAGIC = b"FAKE-TRT-TIMING-CACHE\n"

    def __init__(self, header: dict, entries: list):
        self.header, self.entries = header, entries

    def serialize(self):
        return self._MAGIC + json.dumps({"header": self.header, "entries": self.entries}).encode()


class IBuilderConfig:
    def __init__(self):
        self.pools: dict = {}
        self.builder_optimization_level = 3
        self.profiles: list[IOptimizationProfile] = []
        self.cache: ITimingCache | None = None
        self.flags: set = set()

    def set_flag(self, flag):
        self.flags.add(int(flag))

    def set_memory_pool_limit(self, pool, pool_size):
        self.pools[pool] = pool_size

    def get_memory_pool_limit(self, pool):
        cudart = CURRENT["cudart"]
        return self.pools.get(pool, cudart.prop.totalGlobalMem if cudart else 0)  # default: all of the GPU's memory

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache):
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache(_device_tag(), [])
        if not data.startswith(ITimingCache._MAGIC):
            return None  # not a timing cache: TensorRT logs an error and returns nothing
        body = json.loads(data[len(ITimingCache._MAGIC):])
        return ITimingCache(body["header"], body["entries"])

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.header != _device_tag() and not ignore_mismatch:
            return False  # made on another GPU or TensorRT version
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    fail_on: set[str] = set()  # ONNX file names whose build "fails" (returns None, as TensorRT does)
    wrong: set[str] = set()  # ONNX file names whose engine computes a wrong result (for verification tests)
    built: list[dict] = []

    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        return INetworkDefinition(flags)

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        name = Path(network.onnx).name
        if name in self.fail_on:
            return None
        if config.cache is not None:
            config.cache.entries.append(name)  # the build "learns" timings
        plan = {"onnx": network.onnx, "strongly_typed": bool(network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))),
                "profile": {k: [list(s) for s in v] for k, v in config.profiles[0].shapes.items()},
                "opt_level": config.builder_optimization_level, "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
                "version": CURRENT["version"], "wrong": name in self.wrong, "cached": config.cache is not None,
                "refittable": int(BuilderFlag.REFIT) in config.flags}
        Builder.built.append(plan)
        return json.dumps(plan).encode()


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        try:
            plan = json.loads(bytes(serialized_engine))
        except (ValueError, UnicodeDecodeError):
            return None  # TensorRT logs and returns None for a corrupt plan
        if plan.get("version") != CURRENT["version"]:
            return None  # a plan of another TensorRT version does not deserialize
        return ICudaEngine(plan)


_SESSIONS: "OrderedDict[tuple, object]" = OrderedDict()


def _session_of(onnx_path: str):
    """One ONNX Runtime session per graph file and version for the whole test run (sessions are stateless between
    runs, and a refit makes its own): creating them was most of the fake GPU tests' time."""
    import onnxruntime as ort

    path = Path(onnx_path).resolve()
    files = [path, *sorted(path.parent.glob(path.name + ".*"))]  # the graph and its external data
    key = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    if key in _SESSIONS:
        _SESSIONS.move_to_end(key)
    else:
        _SESSIONS[key] = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        while len(_SESSIONS) > 48:
            _SESSIONS.popitem(last=False)
    return _SESSIONS[key]


class ICudaEngine:
    def __init__(self, plan):
        self.plan = plan
        self.session = _session_of(plan["onnx"])
        self.refitted: dict[str, np.ndarray] = {}  # weights refitted away from the ONNX's
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self.name = Path(plan["onnx"]).stem
        # Activation memory grows with the input sizes and differs per engine, so "one block sized for the
        # shapes in use" is testable.
        self._base = 4096 * (1 + len(self._inputs)) + Path(plan["onnx"]).stat().st_size % 997

    def _memory_for(self, shapes: dict[str, tuple]) -> int:
        # a VAE decoder's activations (full-resolution convolutions) dwarf the U-Net's, as in Stable Diffusion
        per_element = 64 if self.name.startswith("vae") else 2
        return self._base + per_element * sum(int(np.prod(s)) for s in shapes.values())

    def _weights(self) -> dict[str, np.ndarray]:
        """The engine's current weights by name (the ONNX's, or refitted)."""
        import onnx
        from onnx import numpy_helper

        if not hasattr(self, "_onnx_weights"):
            model = onnx.load(self.plan["onnx"])
            self._onnx_weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        return {**self._onnx_weights, **self.refitted}

    def _refittable(self) -> set[str]:
        """Weights a refitter can set: the float initializers of rank 1 or more, less those the build folded."""
        return {n for n, w in self._weights().items() if w.dtype.kind == "f" and w.ndim >= 1} - set(CURRENT["folded"])

    def _refit_groups(self) -> dict[str, set[str]]:
        """Initializer -> the weights TensorRT combined it with at build (itself included): a Conv/Gemm's weight and
        bias, a MatMul's weight and the initializer of the Add after it, and MatMuls reading the same tensor (fused
        Q/K/V projections), with their biases."""
        if hasattr(self, "_groups"):
            return self._groups
        import onnx

        graph = onnx.load(self.plan["onnx"], load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        parent: dict[str, str] = {}

        def find(x):
            while parent.setdefault(x, x) != x:
                x = parent[x]
            return x

        def union(names):
            names = [n for n in names if n in inits]
            for a, b in zip(names, names[1:]):
                parent[find(a)] = find(b)

        consumers: dict[str, list] = {}
        for node in graph.node:
            for x in node.input:
                consumers.setdefault(x, []).append(node)
        by_input: dict[str, list[str]] = {}
        for node in graph.node:
            if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
                union(list(node.input[1:]))
            elif node.op_type == "MatMul" and node.input[1] in inits:
                members = [node.input[1]] + [x for c in consumers.get(node.output[0], []) if c.op_type == "Add"
                                             for x in c.input if x in inits]
                union(members)
                by_input.setdefault(node.input[0], []).append(node.input[1])
        for weights in by_input.values():
            union(weights)
        groups: dict[str, set[str]] = {}
        for name in parent:
            groups.setdefault(find(name), set()).add(name)
        self._groups = {name: groups[find(name)] for name in parent}
        return self._groups

    def _refit(self, values: dict) -> None:
        import onnxruntime as ort

        import onnx
        from onnx import numpy_helper

        self.refitted.update(values)
        model = onnx.load(self.plan["onnx"])
        for init in model.graph.initializer:
            if init.name in self.refitted:
                init.CopyFrom(numpy_helper.from_array(self.refitted[init.name], init.name))
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    @property
    def num_io_tensors(self):
        return len(self._inputs) + len(self._outputs)

    def get_tensor_name(self, index):
        return (list(self._inputs) + self._outputs)[index]

    def _ort_type(self, name):
        if name in self._inputs:
            return self._inputs[name].type
        return {o.name: o.type for o in self.session.get_outputs()}[name]

    def get_tensor_dtype(self, name):
        return _TRT_OF_NUMPY[np.dtype(ORT_DTYPES[self._ort_type(name)])]

    def get_tensor_location(self, name):
        return TensorLocation.DEVICE

    def get_tensor_format(self, name):
        return TensorFormat.LINEAR

    def is_shape_inference_io(self, name):
        return False

    def get_tensor_shape(self, name):
        """-1 for a dimension the profile leaves dynamic (a static build pins every input dimension)."""
        if name in self._inputs:
            profile = self.plan["profile"].get(name)
            dims = self._inputs[name].shape
            if profile is not None:
                lo, _, hi = profile
                return tuple(int(a) if a == b else -1 for a, b in zip(lo, hi))
            return tuple(d if isinstance(d, int) else -1 for d in dims)
        shape = {o.name: o.shape for o in self.session.get_outputs()}[name]
        return tuple(d if isinstance(d, int) else -1 for d in shape)

    def _max_shapes(self):
        return {n: tuple(self.plan["profile"][n][2]) if n in self.plan["profile"] else tuple(i.shape)
                for n, i in self._inputs.items()}

    @property
    def device_memory_size_v2(self):
        return self._memory_for(self._max_shapes())

    def get_device_memory_size_for_profile_v2(self, profile_index):
        return self._memory_for(self._max_shapes())

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        return IExecutionContext(self, strategy)


class IExecutionContext:
    def __init__(self, engine, strategy):
        self.engine, self.strategy = engine, strategy
        self.memory: tuple[int, int] | None = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self._out_shapes: dict = {}
        self._eager: set = set()  # shape sets that ran outside a capture (TensorRT's lazy set-up is done)
        self.epoch = 0  # bumped by set_input_shape and set_device_memory

    @property
    def cudart(self) -> FakeCudart:
        return CURRENT["cudart"]

    def set_device_memory(self, memory, size):
        assert self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED
        self.memory = (int(memory), int(size))
        self.epoch += 1  # the context's state moved: a graph captured before must not be replayed

    def _dynamic(self):
        return [n for n, i in self.engine._inputs.items() if any(not isinstance(d, int) for d in i.shape)]

    def set_input_shape(self, name, shape):
        if name not in self.engine._inputs:
            return False
        lo, _, hi = self.engine.plan["profile"].get(name, (shape, None, shape))
        if len(shape) != len(lo) or any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi)):
            return False  # outside the profile, as TensorRT reports
        self.shapes[name] = tuple(int(d) for d in shape)
        self.epoch += 1  # TensorRT re-derives shape-dependent state: a graph captured before is stale
        return True

    def set_tensor_address(self, name, memory):
        if name not in self.engine._inputs and name not in self.engine._outputs:
            return False
        if int(memory) % 256:
            return False  # "The pointer must have at least 256-byte alignment"; the old address stays
        self.addresses[name] = int(memory)
        return True

    def _input_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        return tuple(self.engine._inputs[name].shape)  # static input

    def _all_shapes(self):
        return {n: self._input_shape(n) for n in self.engine._inputs}

    def update_device_memory_size_for_shapes(self):
        if any(n not in self.shapes for n in self._dynamic()):
            return 0
        return self.engine._memory_for(self._all_shapes())

    def get_tensor_shape(self, name):
        key = tuple(self._input_shape(n) for n in self.engine._inputs)
        if key not in self._out_shapes:
            zeros = {n: np.zeros(self._input_shape(n), ORT_DTYPES[i.type]) for n, i in self.engine._inputs.items()}
            outs = self.engine.session.run(None, zeros)
            self._out_shapes[key] = dict(zip(self.engine._outputs, (o.shape for o in outs)))
        return self._out_shapes[key][name]

    def _refuse(self, why: str) -> bool:
        cudart = self.cudart
        cudart.log.append(f"enqueue-refused:{self.engine.name}:{why}")
        if cudart.capture is not None:
            cudart.capture["invalid"] = cudart.capture["invalid"] or f"enqueue failed ({why})"
        return False

    def execute_async_v3(self, stream_handle):
        cudart = self.cudart
        if any(n not in self.shapes for n in self._dynamic()):
            return self._refuse("input shape unset")
        shapes = self._all_shapes()
        if self.memory is None:
            return self._refuse("no device memory")
        mem_ptr, mem_size = self.memory
        need = self.engine._memory_for(shapes)
        if mem_size < need:
            return self._refuse(f"device memory {mem_size} < {need} needed for these shapes")
        for n in list(self.engine._inputs) + self.engine._outputs:
            if n not in self.addresses:
                return self._refuse(f"address of {n} unset")
        key = tuple(sorted(shapes.items()))
        if cudart.capture is not None and key not in self._eager:
            return self._refuse("first run of these shapes inside a capture (TensorRT sets up lazily)")
        if cudart.capture is None:
            self._eager.add(key)
        addresses = dict(self.addresses)  # what a launch captures: the addresses at enqueue time
        session = self.engine.session  # and the weights: a refit after a capture is not seen by its replays
        wrong = self.engine.plan.get("wrong", False)

        def op():
            cudart.log.append(f"exec:{self.engine.name}")
            cudart.view(mem_ptr, need)[:] = GARBAGE  # kernels use their activation memory
            feeds = {}
            for n, info in self.engine._inputs.items():
                dtype = np.dtype(ORT_DTYPES[info.type])
                count = int(np.prod(shapes[n])) * dtype.itemsize
                feeds[n] = cudart.view(addresses[n], count).view(dtype).reshape(shapes[n]).copy()
            for n, value in zip(self.engine._outputs, session.run(None, feeds)):
                if wrong:
                    value = (value * 1.25).astype(value.dtype)
                cudart.view(addresses[n], value.nbytes)[:] = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
        if cudart.capture is not None:
            epoch = self.epoch

            def check():
                assert self.epoch == epoch, (f"a CUDA graph replayed {self.engine.name}'s launch after set_input_shape or "
                                             "set_device_memory changed its context since the capture (undefined on a GPU)")
            op.check = check
        cudart._run(op)
        return True


def fake_tensorrt(version: str = "10.16.1.11", cudart: FakeCudart | None = None):
    """A module-like namespace with the fake classes and the given version, on the given fake GPU."""
    import types

    module = types.ModuleType("tensorrt")
    for name in FAKED_CLASSES + ("INetworkDefinition",):
        setattr(module, name, globals()[name])
    module.__version__ = version
    CURRENT["version"] = version
    CURRENT["cudart"] = cudart
    CURRENT["folded"] = set()
    Logger.made = 0
    Builder.fail_on = set()
    Builder.wrong = set()
    Builder.built = []
    return module


FAKED_CLASSES = ("Logger", "NetworkDefinitionCreationFlag", "MemoryPoolType", "ExecutionContextAllocationStrategy",
                 "Builder", "OnnxParser", "Runtime", "IBuilderConfig", "IOptimizationProfile", "ITimingCache",
                 "ICudaEngine", "IExecutionContext", "BuilderFlag", "Weights", "Refitter", "DataType",
                 "TensorLocation", "TensorFormat")
