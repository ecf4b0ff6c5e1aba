"""Fakes of the TensorRT and cuda-python objects sdtrt touches.

Class, method and parameter names mirror the real bindings (test_api_contract checks them against
tensorrt 10.x and 11.x), so the fake cannot drift from the real API. Unlike a mock, the fake engines
compute: a "plan" names its ONNX file, and an execution context reads its inputs from simulated device
memory at the addresses it was given, runs the graph in ONNX Runtime and writes the outputs back.
CUDA-graph capture records launches instead of running them, and a graph launch replays them, so
tests check addressing and capture numerically.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}


# ---- cuda-python runtime ---------------------------------------------------------------------------------

class _Enum(int):
    def __new__(cls, value, name):
        obj = int.__new__(cls, value)
        obj.name = name
        return obj


class FakeCudart:
    class cudaError_t:
        cudaSuccess = _Enum(0, "cudaSuccess")
        cudaErrorNoDevice = _Enum(100, "cudaErrorNoDevice")

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = _Enum(1, "cudaMemcpyHostToDevice")
        cudaMemcpyDeviceToHost = _Enum(2, "cudaMemcpyDeviceToHost")

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeGlobal = _Enum(0, "cudaStreamCaptureModeGlobal")
        cudaStreamCaptureModeThreadLocal = _Enum(1, "cudaStreamCaptureModeThreadLocal")

    @dataclass
    class cudaDeviceProp:
        name: bytes
        major: int
        minor: int
        totalGlobalMem: int

    def __init__(self, name="NVIDIA H100 80GB HBM3", major=9, minor=0, devices=1):
        self.prop = self.cudaDeviceProp(name.encode(), major, minor, 80 * 2**30)
        self.devices = devices
        self._allocs: dict[int, np.ndarray] = {}
        self._next = 1 << 40
        self._pinned: list[np.ndarray] = []
        self.capture: list | None = None
        self.log: list[str] = []  # what ran, in order: "exec:<engine>", "memcpy", "graph", ...
        self.bytes_allocated = 0  # live device bytes

    ok = property(lambda self: self.cudaError_t.cudaSuccess)

    # device memory
    def cudaMalloc(self, size):
        ptr = self._next
        self._allocs[ptr] = np.zeros(int(size), np.uint8)
        self._next += (int(size) + 4095) // 4096 * 4096 + 4096
        self.bytes_allocated += int(size)
        return self.ok, ptr

    def cudaFree(self, devPtr):
        arr = self._allocs.pop(devPtr)  # KeyError: freeing what was never allocated
        self.bytes_allocated -= arr.size
        return (self.ok,)

    def cudaFreeHost(self, ptr):
        self._pinned = [b for b in self._pinned if b.ctypes.data != ptr]
        return (self.ok,)

    def cudaMallocHost(self, size):
        buf = np.zeros(int(size), np.uint8)
        self._pinned.append(buf)
        return self.ok, buf.ctypes.data

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        """Bytes [ptr, ptr + nbytes) of simulated device memory (a writable view)."""
        for base, arr in self._allocs.items():
            if base <= ptr and ptr + nbytes <= base + arr.size:
                return arr[ptr - base: ptr - base + nbytes]
        raise AssertionError(f"access to unallocated device memory {ptr:#x} (+{nbytes})")

    def _run(self, op):
        if self.capture is not None:
            self.capture.append(op)
        else:
            op()

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        def op():
            self.log.append("memcpy")
            if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
                ctypes.memmove(self.view(dst, count).ctypes.data, src, count)
            else:
                ctypes.memmove(dst, self.view(src, count).ctypes.data, count)
        self._run(op)
        return (self.ok,)

    def cudaMemsetAsync(self, devPtr, value, count, stream):
        self._run(lambda: self.view(devPtr, count).fill(value))
        return (self.ok,)

    # streams, graphs, devices
    def cudaStreamCreate(self):
        return self.ok, 7

    def cudaStreamSynchronize(self, stream):
        self.log.append("sync")
        return (self.ok,)

    def cudaStreamBeginCapture(self, stream, mode):
        assert self.capture is None, "nested capture"
        self.capture = []
        return (self.ok,)

    def cudaStreamEndCapture(self, stream):
        ops, self.capture = self.capture, None
        return self.ok, ops

    def cudaGraphInstantiate(self, graph, flags):
        return self.ok, list(graph)

    def cudaGraphLaunch(self, graphExec, stream):
        self.log.append("graph")
        for op in graphExec:
            op()
        return (self.ok,)

    def cudaGetDeviceCount(self):
        if not self.devices:
            return self.cudaError_t.cudaErrorNoDevice, 0
        return self.ok, self.devices

    def cudaGetDeviceProperties(self, device):
        return self.ok, self.prop


# ---- tensorrt --------------------------------------------------------------------------------------------

class _Severity:
    WARNING = _Enum(2, "WARNING")


class Logger:
    WARNING = _Severity.WARNING

    def __init__(self, min_severity=_Severity.WARNING):
        self.min_severity = min_severity


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = _Enum(1, "STRONGLY_TYPED")


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


class ITimingCache:
    def __init__(self, data: bytes):
        self.entries = json.loads(data) if data else []

    def serialize(self):
        return json.dumps(self.entries).encode()


class IBuilderConfig:
    def __init__(self):
        self.pools: dict = {}
        self.builder_optimization_level = 3
        self.profiles: list[IOptimizationProfile] = []
        self.cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool, pool_size):
        self.pools[pool] = pool_size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache):
        return ITimingCache(bytes(serialized_timing_cache))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    fail_on: set[str] = set()  # ONNX file names whose build "fails" (returns None, as TensorRT does)
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
        if Path(network.onnx).name in self.fail_on:
            return None
        config.cache.entries.append(Path(network.onnx).name)  # the build "learns" timings
        plan = {"onnx": network.onnx, "strongly_typed": bool(network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))),
                "profile": {k: [list(s) for s in v] for k, v in config.profiles[0].shapes.items()},
                "opt_level": config.builder_optimization_level, "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
                "version": __version__}
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
        return ICudaEngine(plan)


class ICudaEngine:
    def __init__(self, plan):
        import onnxruntime as ort

        self.plan = plan
        self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self.name = Path(plan["onnx"]).stem
        # deterministic and different per engine, so "one block sized by the largest" is testable
        self._memory = 1000 * (1 + len(self.session.get_inputs())) + Path(plan["onnx"]).stat().st_size % 997

    @property
    def num_io_tensors(self):
        return len(self._inputs) + len(self._outputs)

    def get_tensor_name(self, index):
        return (list(self._inputs) + self._outputs)[index]

    @property
    def device_memory_size_v2(self):
        return self._memory

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        return IExecutionContext(self, strategy)


class IExecutionContext:
    cudart: FakeCudart  # set by the test

    def __init__(self, engine, strategy):
        self.engine, self.strategy = engine, strategy
        self.memory: tuple[int, int] | None = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self._out_shapes: dict = {}

    def set_device_memory(self, memory, size):
        assert self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED
        assert size >= self.engine.device_memory_size_v2
        self.memory = (memory, size)

    def set_input_shape(self, name, shape):
        if name not in self.engine._inputs:
            return False
        lo, _, hi = self.engine.plan["profile"].get(name, (shape, None, shape))
        if any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi)) or len(shape) != len(lo):
            return False  # outside the profile, as TensorRT reports
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, memory):
        self.addresses[name] = int(memory)
        return True

    def _input_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        return tuple(self.engine._inputs[name].shape)  # static input

    def get_tensor_shape(self, name):
        key = tuple(self._input_shape(n) for n in self.engine._inputs)
        if key not in self._out_shapes:
            zeros = {n: np.zeros(self._input_shape(n), ORT_DTYPES[i.type]) for n, i in self.engine._inputs.items()}
            outs = self.engine.session.run(None, zeros)
            self._out_shapes[key] = dict(zip(self.engine._outputs, (o.shape for o in outs)))
        return self._out_shapes[key][name]

    def execute_async_v3(self, stream_handle):
        assert self.memory is not None, "context has no device memory"
        cudart = self.cudart
        # what a launch captures: the addresses and shapes at enqueue time
        addresses, shapes = dict(self.addresses), {n: self._input_shape(n) for n in self.engine._inputs}

        def op():
            cudart.log.append(f"exec:{self.engine.name}")
            feeds = {}
            for n, info in self.engine._inputs.items():
                dtype = np.dtype(ORT_DTYPES[info.type])
                count = int(np.prod(shapes[n])) * dtype.itemsize
                feeds[n] = cudart.view(addresses[n], count).view(dtype).reshape(shapes[n]).copy()
            for n, value in zip(self.engine._outputs, self.engine.session.run(None, feeds)):
                cudart.view(addresses[n], value.nbytes)[:] = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
        cudart._run(op)
        return True


__version__ = "10.16.1.11"


def fake_tensorrt(version: str = "10.16.1.11"):
    """A module-like namespace with the fake classes and the given version."""
    import types

    module = types.ModuleType("tensorrt")
    for name in ("Logger", "NetworkDefinitionCreationFlag", "MemoryPoolType", "ExecutionContextAllocationStrategy",
                 "Builder", "OnnxParser", "Runtime", "IBuilderConfig", "IOptimizationProfile", "ITimingCache",
                 "ICudaEngine", "IExecutionContext", "INetworkDefinition"):
        setattr(module, name, globals()[name])
    module.__version__ = version
    global __version__
    __version__ = version
    Builder.fail_on = set()
    Builder.built = []
    return module


FAKED_CLASSES = ("Logger", "NetworkDefinitionCreationFlag", "MemoryPoolType", "ExecutionContextAllocationStrategy",
                 "Builder", "OnnxParser", "Runtime", "IBuilderConfig", "IOptimizationProfile", "ITimingCache",
                 "ICudaEngine", "IExecutionContext")
