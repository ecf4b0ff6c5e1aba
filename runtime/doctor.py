"""``sdtrt doctor``: what a GPU user needs to know about this machine and an engine folder, in one place.

Reports, never raises for what is missing: TensorRT, cuda-python, the NVIDIA driver and the CUDA
version it supports, the GPU and its compute capability, ONNX Runtime's providers, and whether an
engine folder's TensorRT engines were built for this TensorRT and GPU. ``run_check`` does the short
TensorRT-against-ONNX Runtime generations of ``sdtrt build``'s verification, each run twice so the second replays
the CUDA graph (``tensorrt.verify.end_to_end``: a 2-chunk prompt too, and a LoRA refitted in and out on
--refittable engines); a replay that differs from the first run raises.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from sdtrt.errors import SdtrtError


@dataclass(frozen=True)
class Finding:
    label: str
    value: str
    ok: bool | None = None  # None: information; False: something to fix for the GPU path


def _try(fn):
    try:
        return fn(), None
    except SdtrtError as ex:
        return None, str(ex)


def diagnose(folder: str | Path | None = None) -> list[Finding]:
    import numpy as np
    import onnxruntime as ort

    from sdtrt import __version__
    from sdtrt.runtime.backends import available_backends, cuda_driver_info
    from sdtrt.runtime.tensorrt import api

    out = [Finding("sdtrt", f"{__version__} (Python {platform.python_version()}, numpy {np.__version__})"),
           Finding("onnxruntime", f"{ort.__version__}, providers: {', '.join(ort.get_available_providers())}")]
    trt, trt_problem = _try(api.import_tensorrt)
    out.append(Finding("TensorRT", api.trt_version(trt) if trt else trt_problem, trt is not None))
    cudart, cuda_problem = _try(api.import_cudart)
    if cudart is not None:
        driver, runtime = api.cuda_versions(cudart)
        out.append(Finding("cuda-python", f"cuda-bindings {_dist_version('cuda-bindings', 'cuda-python')} (CUDA runtime "
                                          f"{api.format_cuda_version(runtime)})", True))
    else:
        (driver, _), runtime = cuda_driver_info(), 0
        out.append(Finding("cuda-python", cuda_problem, False))
    _, driver_problem = _try(lambda: api.check_driver(cudart)) if cudart is not None else (None, None)
    if driver == 0:
        out.append(Finding("NVIDIA driver", "not found (libcuda cannot be loaded)", False))
    else:
        out.append(Finding("NVIDIA driver", f"supports CUDA {api.format_cuda_version(driver)}"
                           + (f": {driver_problem}" if driver_problem else ""), driver_problem is None))
    device = None
    if cudart is not None and driver:
        device, problem = _try(lambda: api.device_info(cudart))
        out.append(Finding("GPU", f"{device.name}, sm_{device.compute_capability}, {device.total_memory_mb} MiB"
                           if device else problem, device is not None))
    elif driver:
        out.append(Finding("GPU", f"{cuda_driver_info()[1]} device(s) (install cuda-python for details)", None))
    else:
        out.append(Finding("GPU", "none found", False))
    if folder is not None:
        out += _folder_findings(Path(folder), trt, device)
    out.append(Finding("can run here", ", ".join(available_backends())))
    return out


def _dist_version(*names: str) -> str:
    import importlib.metadata as md

    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return "(version unknown)"


def _folder_findings(folder: Path, trt, device) -> list[Finding]:
    from sdtrt.manifest import Manifest
    from sdtrt.runtime.tensorrt import api

    manifest, problem = _try(lambda: Manifest.load(folder))
    if manifest is None:
        return [Finding(str(folder), problem, False)]
    m = manifest.model
    out = [Finding(str(folder), f"{m.family} ({m.source}), {manifest.precision}, batch {manifest.ranges.batch_min}.."
                                f"{manifest.ranges.batch_max}, size {manifest.ranges.size_min}..{manifest.ranges.size_max}")]
    build = manifest.tensorrt
    if build is None:
        out.append(Finding("engines", f"none: run `sdtrt build {folder}` on the GPU machine", False))
        return out
    out.append(Finding("engines", f"built with TensorRT {build.version} for {build.gpu} (sm_{build.compute_capability}), "
                                  f"{'static' if build.static else 'dynamic'} profile"))
    engines = build.engines.values()
    if any(e.device_memory_bytes for e in engines):  # recorded by builds since issue 25
        from sdtrt.memory import gb

        name, biggest = max(build.engines.items(), key=lambda kv: kv[1].device_memory_bytes)
        out.append(Finding("engine memory", f"{gb(sum(e.size_bytes for e in engines))} of engines (weights); "
                                            f"{gb(biggest.device_memory_bytes)} of context memory at most "
                                            f"({name} at its profile's largest shapes)"))
    missing = [e.file for e in engines if not (folder / e.file).is_file()]
    if missing:
        out.append(Finding("engine files", f"missing: {', '.join(missing)}", False))
    if trt is not None and build.version != api.trt_version(trt):
        out.append(Finding("match", f"no: this is TensorRT {api.trt_version(trt)}; rebuild with `sdtrt build {folder}`", False))
    elif device is not None and build.compute_capability != device.compute_capability:
        out.append(Finding("match", f"no: this GPU is sm_{device.compute_capability}; rebuild with `sdtrt build {folder}`",
                           False))
    elif trt is not None and device is not None:
        out.append(Finding("match", "yes: this TensorRT and GPU can run them", not missing))
    else:
        out.append(Finding("match", "cannot tell without TensorRT and a GPU", None))
    if build.verification:
        worst = max(r.max_rel_error for rs in build.verification.values() for r in rs)
        e2e = build.end_to_end
        out.append(Finding("verified at build", f"worst engine error {worst:.2e} against ONNX Runtime"
                           + (f"; end to end PSNR {e2e.psnr_db:.1f} dB" if e2e else ""),
                           all(r.passed for rs in build.verification.values() for r in rs)))
    else:
        out.append(Finding("verified at build", "no (built with --no-verify); `sdtrt doctor --run` checks them", False))
    return out


def run_check(folder: str | Path, steps: int = 4):
    """The short generations of build's verification on the installed engines: an ``EndToEndCheck``; raises
    ``BuildError`` when a replayed CUDA graph gives another image than the first run."""
    from sdtrt.manifest import Manifest
    from sdtrt.runtime.tensorrt.backend import load_trt_engines
    from sdtrt.runtime.tensorrt.verify import end_to_end

    folder = Path(folder)
    manifest = Manifest.load(folder)
    engines = load_trt_engines(folder, manifest)
    try:
        return end_to_end(folder, manifest, engines, steps)
    finally:
        engines.close()
