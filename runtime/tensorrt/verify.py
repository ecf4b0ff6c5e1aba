"""Proof on the target GPU that freshly built engines compute what their ONNX graphs compute.

Used by ``sdtrt build`` (before the engines are installed) and ``sdtrt doctor --run``. Two checks:

1. per engine: the engine and ONNX Runtime run the same ONNX file on the same inputs, at the shapes
   the export's parity gate used (recorded in the manifest; inputs regenerated deterministically
   here) where the engine's profile admits them, and at the profile's min and opt shapes;
   max|trt - ort| / max|ort| must stay within ``TOLERANCE``;
2. end to end: a short generation on the TensorRT device loop against the same generation on
   ONNX Runtime's host loop; the PSNR between the two images must reach ``MIN_PSNR_DB``.

No torch: this runs where the engines run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdtrt.manifest import Component, EndToEndCheck, Manifest, ValidationResult
from sdtrt.parity import compare, psnr

# Same ONNX, different kernels: fp16 engines round differently from ONNX Runtime's fp16 path, and
# TensorRT runs fp32 convolutions and matmuls in TF32 by default (10-bit mantissa). A wrong engine
# (swapped graph, broken fusion) is off by far more than either.
TOLERANCE = {"fp16": 2e-2, "fp32": 1e-2}
MIN_PSNR_DB = 25.0
E2E_PROMPT = "a photo of an astronaut riding a horse on the moon"
DEFAULT_VALUES = {"timestep": 981.0, "guidance_scale": 7.5}


def random_feeds(component: Component, shapes: dict[str, tuple[int, ...]], values: dict[str, float], vocab: int,
                 seed: int) -> dict[str, np.ndarray]:
    """Deterministic inputs of the given shapes: token ids below ``vocab``, given scalars, else N(0, 1)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in component.inputs:
        shape = tuple(shapes[spec.name])
        dtype = np.dtype(spec.dtype)
        if dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, vocab, size=shape).astype(dtype)
        elif spec.name in values:
            feeds[spec.name] = np.full(shape, values[spec.name], dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    return feeds


def _fits(shapes: dict[str, tuple[int, ...]], profile: dict[str, tuple]) -> bool:
    for name, (lo, _, hi) in profile.items():
        shape = shapes.get(name)
        if shape is None or len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
    return True


def engine_cases(component: Component, profile: dict[str, tuple]) -> list[tuple[str, dict, dict]]:
    """(label, input shapes, scalar values) to check one engine at: the export's cases that fit the
    profile, then the profile's min and opt shapes."""
    static = {s.name: tuple(s.shape) for s in component.inputs if all(isinstance(d, int) for d in s.shape)}
    cases = []
    for r in component.validation:
        if r.inputs and _fits(r.inputs, profile):
            cases.append((f"export case {r.shape}", dict(r.inputs), dict(r.values)))
    for k, label in ((0, "profile min"), (1, "profile opt")):
        shapes = {**static, **{name: tuple(triple[k]) for name, triple in profile.items()}}
        if not any(shapes == c[1] for c in cases):
            cases.append((f"{label} {_describe(shapes, profile)}", shapes, {}))
    return cases


def _describe(shapes: dict[str, tuple[int, ...]], profile: dict) -> str:
    """The first dynamic input's shape, and the first of each other leading (batch) dimension."""
    names = [n for n in shapes if n in profile]
    shown, leads = [], set()
    for n in names:
        if shapes[n][:1] not in leads:
            shown.append(n)
            leads.add(shapes[n][:1])
    return " ".join(f"{n}={'x'.join(map(str, shapes[n]))}" for n in shown)


def reference_backend() -> str:
    """ONNX Runtime's CUDA provider where it works here (faster), else its CPU provider."""
    from sdtrt.runtime.backends import ort_provider

    return "onnxruntime-cuda" if ort_provider("auto") == "CUDAExecutionProvider" else "onnxruntime-cpu"


def verify_engines(folder: Path, manifest: Manifest, engines: dict, log=print) -> dict[str, tuple[ValidationResult, ...]]:
    """Check 1 for every engine in ``engines`` (name -> TrtEngine); returns the results per component."""
    from sdtrt.runtime.backends import OrtEngine, ort_provider

    provider = ort_provider(reference_backend())
    results: dict[str, tuple[ValidationResult, ...]] = {}
    for name, engine in engines.items():
        component = manifest.components[name]
        reference = OrtEngine(Path(folder) / component.file, component, provider)
        tolerance = TOLERANCE["fp32" if component.precision == "fp32" else "fp16"]
        checks = []
        for seed, (label, shapes, values) in enumerate(engine_cases(component, manifest.tensorrt.engines[name].profile)):
            feeds = random_feeds(component, shapes, {**DEFAULT_VALUES, **values}, manifest.model.vocab_size, seed)
            want = reference.run(feeds)
            got = engine.run(feeds)
            worst = None
            for output in want:  # every output; the worst one stands for the case
                r = compare(got[output].astype(np.float32), want[output].astype(np.float32), label, tolerance)
                worst = r if worst is None or not r.passed or r.max_rel_error > worst.max_rel_error else worst
            checks.append(worst)
        results[name] = tuple(checks)
        del reference
    return results


def end_to_end(folder: Path, manifest: Manifest, trt_engines, steps: int = 4) -> EndToEndCheck:
    """Check 2: the same short generation on ``trt_engines`` and on ONNX Runtime."""
    from sdtrt.runtime.backends import load_engines
    from sdtrt.runtime.pipeline import Pipeline

    build = manifest.tensorrt
    latents = build.engines["unet"].profile["latents"][0]  # profile min (static: the only shape)
    batch = int(latents[0])
    factor = manifest.model.vae_scale_factor
    height, width = int(latents[2]) * factor, int(latents[3]) * factor
    reference = reference_backend()
    kwargs = dict(prompt=[E2E_PROMPT] * batch, num_inference_steps=steps, guidance_scale=7.5, height=height,
                  width=width, seed=0, output_type="np")
    if manifest.controlnets:  # every ControlNet in the chain, on a smooth synthetic control map
        y, x = np.mgrid[0:height, 0:width]
        control = np.stack([(x / width), (y / height), 0.5 + 0.5 * np.sin(x / 7.0)], -1).astype(np.float32)  # (H, W, 3)
        kwargs["control_images"] = [(control * 255).astype(np.uint8)] * len(manifest.controlnets)
    device = Pipeline.from_engines(folder, manifest, trt_engines)
    got = device(**kwargs).images
    # the host loop: a reference that shares no loop code with the device loop under test
    with Pipeline.from_engines(folder, manifest, load_engines(folder, manifest, reference, device_loop=False)) as host:
        want = host(**kwargs).images
    value = psnr(got, want)
    return EndToEndCheck(psnr_db=999.0 if value == float("inf") else max(round(value, 2), 0.0), min_psnr_db=MIN_PSNR_DB,
                         passed=bool(value >= MIN_PSNR_DB), width=width, height=height, batch=batch, steps=steps,
                         sampler=device.sampler_table(None, steps).name, reference=reference)
