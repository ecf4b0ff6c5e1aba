"""Lazy access to TensorRT and CUDA (cuda-python), and the facts about this machine engines depend on.

Which packages to install is said once, here: ``sdtrt[tensorrt-cu12]`` pins TensorRT for CUDA 12 with
cuda-python 12.x (any CUDA 12 driver), ``sdtrt[tensorrt-cu13]`` TensorRT for CUDA 13 with cuda-python
13.x (a CUDA 13 driver, 580 or newer).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from sdtrt.runtime.backends import BackendError

INSTALL = "pip install 'sdtrt[tensorrt-cu12]' (CUDA 12 drivers) or 'sdtrt[tensorrt-cu13]' (CUDA 13 drivers, 580+)"
MIN_TENSORRT = (10, 1)  # device_memory_size_v2 and set_device_memory(ptr, size) appear in 10.1


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in str(version).split("."):
        digits = "".join(c for c in p if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def import_tensorrt() -> ModuleType:
    """The TensorRT Python module: ``tensorrt`` (full install) or ``tensorrt_bindings`` (bindings wheel)."""
    errors = []
    for name in ("tensorrt", "tensorrt_bindings"):
        try:
            trt = __import__(name)
        except ImportError as ex:  # also raised when libnvinfer cannot be found
            if not (isinstance(ex, ModuleNotFoundError) and ex.name == name):
                errors.append(f"{name}: {ex}")
            continue
        check_tensorrt_version(trt)
        return trt
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise BackendError(f"TensorRT is not available{detail}: {INSTALL}")


def check_tensorrt_version(trt) -> None:
    if version_tuple(trt_version(trt))[:2] < MIN_TENSORRT:
        raise BackendError(f"TensorRT {trt_version(trt)} is too old: sdtrt needs TensorRT 10.1 or newer "
                           f"(per-shape context memory). {INSTALL}")


def import_cudart() -> ModuleType:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as ex:
        missing = isinstance(ex, ModuleNotFoundError) and ex.name in ("cuda", "cuda.bindings")
        what = "not installed" if missing else f"not usable ({ex})"
        raise BackendError(f"cuda-python (12.8+, with cuda.bindings) is {what}: {INSTALL}") from None
    return cudart


def error_name(cudart, err) -> str:
    return getattr(err, "name", str(err))


def check(cudart, result, what: str):
    """cuda-python returns (err, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA error in {what}: {error_name(cudart, err)}")
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "90" for sm_90 (H100)
    total_memory_mb: int


def _call(fn, *args):
    """A cuda-python call; cuda-bindings 12.8 raises RuntimeError ("Failed to dlopen libcuda.so.1") where later
    versions return cudaErrorInsufficientDriver, so both come back as an error code here."""
    try:
        return fn(*args)
    except RuntimeError as ex:
        return RuntimeError(str(ex)), None


def cuda_versions(cudart) -> tuple[int, int]:
    """(driver, runtime) as CUDA encodes them (12040 = 12.4); driver 0 when no driver is installed."""
    err, driver = _call(cudart.cudaDriverGetVersion)
    driver = int(driver) if err == cudart.cudaError_t.cudaSuccess else 0
    err, runtime = _call(cudart.cudaRuntimeGetVersion)
    runtime = int(runtime) if err == cudart.cudaError_t.cudaSuccess else 0
    return driver, runtime


def format_cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def check_driver(cudart) -> None:
    """Raise with what to do when there is no driver, or one too old for this cuda-python."""
    driver, runtime = cuda_versions(cudart)
    if driver == 0:
        raise BackendError("no NVIDIA driver found (libcuda cannot be loaded): install the NVIDIA driver, "
                           "or run on a machine with an NVIDIA GPU")
    if runtime and driver // 1000 < runtime // 1000:
        raise BackendError(f"the NVIDIA driver supports CUDA {format_cuda_version(driver)}, but this cuda-python is "
                           f"built for CUDA {format_cuda_version(runtime)}: update the driver, or install the "
                           f"CUDA {driver // 1000} set: pip install 'sdtrt[tensorrt-cu{driver // 1000}]'")


def device_info(cudart, device: int = 0) -> DeviceInfo:
    check_driver(cudart)
    err, count = _call(cudart.cudaGetDeviceCount)
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        reason = error_name(cudart, err) if err != cudart.cudaError_t.cudaSuccess else "0 devices"
        raise BackendError(f"no CUDA device found ({reason}): is a GPU visible (CUDA_VISIBLE_DEVICES)?")
    prop = check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(name=name, compute_capability=f"{prop.major}{prop.minor}", total_memory_mb=prop.totalGlobalMem // 2**20)


def memory_info(cudart) -> tuple[int, int]:
    """(free, total) bytes of the current GPU's memory (``cudaMemGetInfo``)."""
    free, total = check(cudart, cudart.cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


def trt_version(trt) -> str:
    return str(trt.__version__)


_LOGGERS: dict[int, tuple] = {}


def logger(trt):
    """The one TensorRT logger of this process (per TensorRT module), shared by builder, runtime and refitters:
    TensorRT documents a single ILogger per process ("the logger ... must be the same for all
    builder/runtime/refitter objects", NvInferRuntime.h)."""
    entry = _LOGGERS.get(id(trt))
    if entry is None or entry[0] is not trt:
        entry = _LOGGERS[id(trt)] = (trt, trt.Logger(trt.Logger.WARNING))
    return entry[1]
