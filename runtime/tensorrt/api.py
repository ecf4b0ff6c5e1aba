"""Lazy access to TensorRT and CUDA (cuda-python), and the facts about this machine engines depend on."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from sdtrt.runtime.backends import BackendError


def import_tensorrt() -> ModuleType:
    """The TensorRT Python module: ``tensorrt`` (full install) or ``tensorrt_bindings`` (bindings wheel)."""
    errors = []
    for name in ("tensorrt", "tensorrt_bindings"):
        try:
            return __import__(name)
        except ImportError as ex:  # also raised when libnvinfer cannot be found
            errors.append(f"{name}: {ex}")
    raise BackendError("TensorRT is not available (pip install tensorrt-cu12 or tensorrt-cu13 on the GPU machine; "
                       f"{'; '.join(errors)})")


def import_cudart() -> ModuleType:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise BackendError("cuda-python is not installed (pip install cuda-python)") from None
    return cudart


def check(cudart, result, what: str):
    """cuda-python returns (err, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA error in {what}: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "90" for sm_90 (H100)
    total_memory_mb: int


def device_info(cudart, device: int = 0) -> DeviceInfo:
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        reason = getattr(err, "name", err) if err != cudart.cudaError_t.cudaSuccess else "0 devices"
        raise BackendError(f"no CUDA device found ({reason}): is the NVIDIA driver installed and a GPU visible?")
    prop = check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(name=name, compute_capability=f"{prop.major}{prop.minor}", total_memory_mb=prop.totalGlobalMem // 2**20)


def trt_version(trt) -> str:
    return str(trt.__version__)

