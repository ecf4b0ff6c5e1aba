"""The CUDA side of the TensorRT backend: one stream with its allocations and copies, and the CUDA graphs of the
device loop (cuda-python's runtime API).

Follows trtexec's inference code (``samples/common/sampleInference.cpp``, ``sampleUtils``' ``TrtCudaGraph``):

- one stream, non-blocking, so nothing on the legacy default stream can break a capture;
- a shape runs eagerly first (TensorRT sets up lazily, and that set-up must not happen inside a capture) and is
  captured only when it comes a second time: a one-shot generation pays neither a second enqueue of every step
  nor a graph instantiation it never uses;
- the stream is synchronised before ``cudaStreamBeginCapture`` (trtexec: ``stream.synchronize()`` before
  ``mGraph.beginCapture``), and ``cudaGetLastError()`` clears the error a failed capture leaves (trtexec's
  ``endCaptureOnError``); that shape then runs without a graph, with one warning;
- close paths never stop half-way: every free is attempted even after a sticky CUDA error, and the first error is
  raised only once everything was tried.
"""

from __future__ import annotations

import logging

import numpy as np

from sdtrt.runtime.backends import BackendError, DeviceMemoryError
from sdtrt.runtime.device_loop import aligned
from sdtrt.runtime.tensorrt import api

log = logging.getLogger("sdtrt")


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
        """Free ``ptr``; it is forgotten even when cudaFree fails (a sticky error), so no later path frees it twice."""
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
        """Free everything; no call's result stops it, so one error does not leak the rest."""
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
    """Capture the enqueued loop of a key once that key comes a second time, and replay it; one graph exists at a
    time.

    The first run of a key is eager (TensorRT's lazy set-up must not happen inside a capture, and a one-shot
    generation should not pay for a graph it never replays); the second run captures and launches the graph, so the
    work is enqueued once either way; later runs replay."""

    def __init__(self, memory: CudaMemory, enabled: bool = True):
        self.memory, self.cudart, self.enabled = memory, memory.cudart, enabled
        self.exec = None
        self.key = None
        self.captures = 0  # successful captures (tests and benchmarks read it)
        self.failed: set = set()  # keys whose capture failed: they run eagerly
        self.seen: set = set()  # keys that ran eagerly once (captured when they come again)
        self._warned = False

    def reset(self) -> None:
        """Destroy the graph (its exec is forgotten even if the call fails: close paths go on)."""
        if self.exec is not None:
            graph_exec, self.exec, self.key = self.exec, None, None
            api.check(self.cudart, self.cudart.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")

    def run(self, key, enqueue) -> None:
        cudart, stream = self.cudart, self.memory.stream
        if self.exec is not None and self.key == key:
            api.check(cudart, cudart.cudaGraphLaunch(self.exec, stream), "cudaGraphLaunch")
            return
        if not self.enabled or key in self.failed or key not in self.seen:
            enqueue()
            self.seen.add(key)
            return
        self.reset()
        if self._capture(key, enqueue):
            api.check(cudart, cudart.cudaGraphLaunch(self.exec, stream), "cudaGraphLaunch")
        else:
            enqueue()  # nothing of the failed capture ran

    def _capture(self, key, enqueue) -> bool:
        cudart, stream = self.cudart, self.memory.stream
        self.memory.sync()  # trtexec synchronises before beginCapture: no earlier work may land in the graph
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
            cudart.cudaGetLastError()
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
        if problem is None:
            return True
        cudart.cudaGetLastError()  # trtexec's endCaptureOnError: clear the error the failed capture left
        self.failed.add(key)
        if not self._warned:
            log.warning("CUDA graph capture failed (%s); this shape runs without a CUDA graph", problem)
            self._warned = True
        return False
