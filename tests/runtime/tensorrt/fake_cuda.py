"""The fake of cuda-python's runtime API (``cuda.bindings.runtime``) behind the TensorRT fakes (``fakes.py``): device
memory, streams, captures and graphs, with the rules a real GPU enforces (listed in ``fakes.py``'s docstring).
Split out of ``fakes.py``; ``fakes`` re-exports every name, so tests keep using ``fakes.FakeCudart``."""

from __future__ import annotations

import ctypes
import inspect
from dataclasses import dataclass

import numpy as np

GARBAGE = 0xFF  # what fresh device memory holds here: NaN as fp16 and as fp32

# ---- cuda-python runtime ---------------------------------------------------------------------------------

class _Enum(int):
    def __new__(cls, value, name):
        obj = int.__new__(cls, value)
        obj.name = name
        return obj

    def __repr__(self):
        return f"<{self.name}: {int(self)}>"


class FakeCudart:
    class cudaError_t:
        cudaSuccess = _Enum(0, "cudaSuccess")
        cudaErrorIllegalAddress = _Enum(700, "cudaErrorIllegalAddress")
        cudaErrorInvalidValue = _Enum(1, "cudaErrorInvalidValue")
        cudaErrorMemoryAllocation = _Enum(2, "cudaErrorMemoryAllocation")
        cudaErrorInsufficientDriver = _Enum(35, "cudaErrorInsufficientDriver")
        cudaErrorNoDevice = _Enum(100, "cudaErrorNoDevice")
        cudaErrorStreamCaptureUnsupported = _Enum(900, "cudaErrorStreamCaptureUnsupported")
        cudaErrorStreamCaptureInvalidated = _Enum(901, "cudaErrorStreamCaptureInvalidated")

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = _Enum(1, "cudaMemcpyHostToDevice")
        cudaMemcpyDeviceToHost = _Enum(2, "cudaMemcpyDeviceToHost")

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeGlobal = _Enum(0, "cudaStreamCaptureModeGlobal")
        cudaStreamCaptureModeThreadLocal = _Enum(1, "cudaStreamCaptureModeThreadLocal")
        cudaStreamCaptureModeRelaxed = _Enum(2, "cudaStreamCaptureModeRelaxed")

    cudaStreamNonBlocking = 1

    @dataclass
    class cudaDeviceProp:
        name: bytes
        major: int
        minor: int
        totalGlobalMem: int

    def __init__(self, name="NVIDIA H100 80GB HBM3", major=9, minor=0, devices=1, driver=12090, runtime=12090,
                 total_memory=80 * 2**30, memory_limit: int | None = None):
        self.prop = self.cudaDeviceProp(name.encode(), major, minor, total_memory)
        self.devices, self.driver, self.runtime = devices, driver, runtime
        self.memory_limit = memory_limit if memory_limit is not None else total_memory
        self.pending: list = []  # work issued to the stream and not yet run
        self._allocs: dict[int, np.ndarray] = {}
        self._next = 1 << 40
        self._pinned: dict[int, np.ndarray] = {}
        self.streams: set[int] = set()
        self.graphs: dict[int, list] = {}  # live cudaGraph_t handles
        self.execs: dict[int, list] = {}  # live cudaGraphExec_t handles
        self._handle = 1000
        self.capture: dict | None = None  # {"stream", "mode", "ops", "invalid"}
        self.log: list[str] = []  # what ran, in order: "exec:<engine>", "memcpy", "sync", "graph", ...
        self.sticky_error = None  # an error every call returns from now on (cudaErrorIllegalAddress)

    ok = property(lambda self: self.cudaError_t.cudaSuccess)

    @property
    def bytes_allocated(self) -> int:
        return sum(a.size for a in self._allocs.values())

    def live(self) -> dict[str, int]:
        """Everything a program must give back: tests check it returns to zero."""
        return {"device allocations": len(self._allocs), "pinned allocations": len(self._pinned),
                "streams": len(self.streams), "graphs": len(self.graphs), "graph execs": len(self.execs)}

    def _new_handle(self) -> int:
        self._handle += 1
        return self._handle

    # capture rules
    def _unsafe_in_capture(self, what: str):
        """An API call CUDA forbids while a stream is capturing: it fails and invalidates the capture."""
        if self.capture is None or self.capture["mode"] == self.cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed \
                and what.startswith("cudaMalloc"):
            return None
        self.capture["invalid"] = self.capture["invalid"] or what
        self.log.append(f"capture-invalidated:{what}")
        return self.cudaError_t.cudaErrorStreamCaptureUnsupported

    def _run(self, op):
        if self.capture is not None:
            self.capture["ops"].append(op)
        else:
            self.pending.append(op)

    def _drain(self):
        """The host waits for the stream: everything issued so far runs, in order."""
        ops, self.pending = self.pending, []
        for op in ops:
            op()

    def _sticky(self, release=None):
        """After a sticky error every call fails; what a free names is still released (the context dies with it)."""
        if self.sticky_error is None:
            return None
        if release is not None:
            release()
        return self.sticky_error

    # device memory
    def cudaMalloc(self, size):
        if err := self._sticky():
            return err, None
        if err := self._unsafe_in_capture("cudaMalloc"):
            return err, None
        if self.bytes_allocated + int(size) > self.memory_limit:
            return self.cudaError_t.cudaErrorMemoryAllocation, None
        ptr = self._next
        self._allocs[ptr] = np.full(int(size), GARBAGE, np.uint8)
        self._next += (int(size) + 4095) // 4096 * 4096 + 4096  # 512-byte (and more) aligned, as cudaMalloc
        return self.ok, ptr

    def cudaFree(self, devPtr):
        if err := self._sticky(lambda: self._allocs.pop(int(devPtr), None)):
            return (err,)
        if err := self._unsafe_in_capture("cudaFree"):
            return (err,)
        if int(devPtr) not in self._allocs:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        self._drain()  # cudaFree synchronises the device
        del self._allocs[int(devPtr)]
        return (self.ok,)

    def cudaMallocHost(self, size):
        if err := self._unsafe_in_capture("cudaMallocHost"):
            return err, None
        buf = np.full(max(int(size), 1), GARBAGE, np.uint8)
        self._pinned[buf.ctypes.data] = buf
        return self.ok, buf.ctypes.data

    def cudaFreeHost(self, ptr):
        if err := self._sticky(lambda: self._pinned.pop(int(ptr), None)):
            return (err,)
        if err := self._unsafe_in_capture("cudaFreeHost"):
            return (err,)
        if int(ptr) not in self._pinned:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        self._drain()
        del self._pinned[int(ptr)]
        return (self.ok,)

    def cudaMemGetInfo(self):
        return self.ok, min(self.memory_limit, self.prop.totalGlobalMem) - self.bytes_allocated, self.prop.totalGlobalMem

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        """Bytes [ptr, ptr + nbytes) of simulated device memory (a writable view)."""
        for base, arr in self._allocs.items():
            if base <= ptr and ptr + nbytes <= base + arr.size:
                return arr[ptr - base: ptr - base + nbytes]
        raise AssertionError(f"access to unallocated device memory {ptr:#x} (+{nbytes}): an illegal address on a GPU")

    def _pinned_range(self, ptr: int, nbytes: int) -> bool:
        return any(base <= ptr and ptr + nbytes <= base + arr.size for base, arr in self._pinned.items())

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        if err := self._sticky():
            return (err,)
        host = src if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else dst
        if not self._pinned_range(int(host), int(count)) and (err := self._unsafe_in_capture("pageable cudaMemcpyAsync")):
            return (err,)
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice and not self._pinned_range(int(host), int(count)):
            staged = bytes((ctypes.c_char * int(count)).from_address(int(src)))  # pageable: copied before return
            src_bytes = lambda: staged  # noqa: E731
        else:
            src_bytes = lambda: bytes((ctypes.c_char * int(count)).from_address(int(src)))  # noqa: E731

        def op():
            self.log.append("memcpy")
            if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
                self.view(int(dst), int(count))[:] = np.frombuffer(src_bytes(), np.uint8)
            else:
                ctypes.memmove(int(dst), self.view(int(src), int(count)).ctypes.data, int(count))
        self._run(op)
        if kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost and not self._pinned_range(int(host), int(count)) \
                and self.capture is None:
            self._drain()  # into pageable memory the copy is synchronous
        return (self.ok,)

    def cudaMemsetAsync(self, devPtr, value, count, stream):
        if err := self._sticky():
            return (err,)
        self.view(int(devPtr), int(count))  # an invalid pointer fails at the call
        self._run(lambda: self.view(int(devPtr), int(count)).fill(value))
        return (self.ok,)

    # streams and graphs
    def cudaStreamCreate(self):
        return self.cudaStreamCreateWithFlags(0)

    def cudaStreamCreateWithFlags(self, flags):
        handle = self._new_handle()
        self.streams.add(handle)
        return self.ok, handle

    def cudaStreamDestroy(self, stream):
        if err := self._sticky(lambda: self.streams.discard(int(stream))):
            return (err,)
        if int(stream) not in self.streams:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        self._drain()  # the work already issued still completes
        self.streams.discard(int(stream))
        return (self.ok,)

    def cudaStreamSynchronize(self, stream):
        if err := self._sticky():
            return (err,)
        if err := self._unsafe_in_capture("cudaStreamSynchronize"):
            return (err,)
        self._drain()
        self.log.append("sync")
        return (self.ok,)

    def cudaStreamBeginCapture(self, stream, mode):
        assert self.capture is None, "nested capture"
        assert int(stream) in self.streams, "capture on an unknown stream"
        self.capture = {"stream": int(stream), "mode": mode, "ops": [], "invalid": None}
        self.log.append("begin-capture")
        return (self.ok,)

    def cudaStreamEndCapture(self, stream):
        capture, self.capture = self.capture, None
        if capture is None:
            return self.cudaError_t.cudaErrorInvalidValue, None
        if capture["invalid"]:
            return self.cudaError_t.cudaErrorStreamCaptureInvalidated, None
        handle = self._new_handle()
        self.graphs[handle] = capture["ops"]
        return self.ok, handle

    def cudaGraphInstantiate(self, graph, flags):
        if int(graph) not in self.graphs:
            return self.cudaError_t.cudaErrorInvalidValue, None
        handle = self._new_handle()
        self.execs[handle] = list(self.graphs[int(graph)])
        return self.ok, handle

    def cudaGraphLaunch(self, graphExec, stream):
        if err := self._sticky():
            return (err,)
        if int(graphExec) not in self.execs:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        for op in self.execs[int(graphExec)]:
            check = getattr(op, "check", None)
            if check is not None:
                check()  # a context the graph launches must be as it was at capture
        self.log.append("graph")
        self.pending.extend(self.execs[int(graphExec)])
        return (self.ok,)

    def cudaGraphDestroy(self, graph):
        if self.graphs.pop(int(graph), None) is None:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        return (self.ok,)

    def cudaGraphExecDestroy(self, graphExec):
        if err := self._sticky(lambda: self.execs.pop(int(graphExec), None)):
            return (err,)
        if self.execs.pop(int(graphExec), None) is None:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        return (self.ok,)

    def cudaGetLastError(self):
        self.log.append("get-last-error")
        return (self.sticky_error or self.ok,)

    # devices and versions
    def cudaGetDeviceCount(self):
        if not self.driver:
            return self.cudaError_t.cudaErrorInsufficientDriver, None
        if not self.devices:
            return self.cudaError_t.cudaErrorNoDevice, 0
        return self.ok, self.devices

    def cudaGetDeviceProperties(self, device):
        return self.ok, self.prop

    def cudaDriverGetVersion(self):
        return self.ok, self.driver

    def cudaRuntimeGetVersion(self):
        return self.ok, self.runtime


FAKED_CUDART = tuple(n for n, v in vars(FakeCudart).items() if n.startswith("cuda") and inspect.isfunction(v))
