"""Proof on the target GPU that freshly built engines compute what their ONNX graphs compute.

Used by ``sdtrt build`` (before the engines are installed) and ``sdtrt doctor --run``. Two checks:

1. per engine: the engine and ONNX Runtime run the same ONNX file on the same inputs, at the shapes
   the export's parity gate used (recorded in the manifest; inputs regenerated deterministically
   here) where the engine's profile admits them, and at the profile's min and opt shapes;
   max|trt - ort| / max|ort| must stay within ``TOLERANCE``;
2. end to end: short generations on the TensorRT device loop against the same generations on
   ONNX Runtime's host loop; the PSNR between the two images must reach ``MIN_PSNR_DB``. Each is run
   twice and the second (a CUDA graph's capture and launch) must equal the first (to 60 dB); a 2-chunk
   prompt, and on --refittable engines a LoRA refitted in and out again, are cases of their own.

No torch: this runs where the engines run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from sdtrt.manifest import Component, EndToEndCheck, Manifest, ValidationResult
from sdtrt.parity import compare, psnr

# Same ONNX, different kernels: fp16 engines round differently from ONNX Runtime's fp16 path, and
# TensorRT runs fp32 convolutions and matmuls in TF32 by default (10-bit mantissa). A wrong engine
# (swapped graph, broken fusion) is off by far more than either.
TOLERANCE = {"fp16": 2e-2, "fp32": 1e-2}
MIN_PSNR_DB = 25.0
# a replayed CUDA graph against the eager run of the same generation: the same kernels, so identical up to TensorRT
# tactics that are not bit-deterministic (atomics); a replay that is broken (stale weights or shapes, a launch that
# does nothing) is off by far more
REPLAY_MIN_PSNR_DB = 60.0
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


def added_condition_feeds(model, component: Component, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """SDXL's ``time_ids`` as a generation feeds them (sizes of the case's image, crop 0, the refiner's aesthetic
    scores: values near 1000 through the U-Net's time embedding, where fp16 kernels could differ), negative and positive
    rows alternating; {} for a graph without them. ``text_embeds`` stays N(0, 1), as a pooled embedding is."""
    added = model.added_conditions
    names = {s.name for s in component.inputs}
    if added is None or added.time_ids_input not in names or "latents" not in shapes:
        return {}
    from sdtrt.runtime.conditioning import time_ids
    from sdtrt.runtime.request import GenerationRequest

    h, w = (d * model.vae_scale_factor for d in shapes["latents"][2:])
    pair = time_ids(model, GenerationRequest(prompt=("",), negative_prompt=("",)), h, w, "txt2img")  # (2, n)
    rows = shapes[added.time_ids_input][0]
    dtype = np.dtype(component.input(added.time_ids_input).dtype)
    return {added.time_ids_input: np.resize(pair, (rows, pair.shape[1])).astype(dtype)}


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
            feeds.update(added_condition_feeds(manifest.model, component, shapes))
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


def end_to_end(folder: Path, manifest: Manifest, trt_engines, steps: int = 4, log=None) -> EndToEndCheck:
    """Check 2: short generations on ``trt_engines`` against the same on ONNX Runtime's host loop, each run twice.

    The first run of a shape is eager and the second is captured and launched as a CUDA graph (``cuda.CudaGraphs``),
    so each case's second image must equal its first (``REPLAY_MIN_PSNR_DB``): a broken replay would otherwise pass this check and
    show only from a user's second generation on. Cases: a one-chunk prompt; a two-chunk prompt (77 tokens more on
    the dynamic text axis) where the profile admits it; on ``--refittable`` engines, a random LoRA refitted in
    (replayed, against ONNX Runtime with the same LoRA) and refitted out again (replayed, the first image again).
    ``psnr_db`` is the worst case's; a replay that differs raises ``BuildError``."""
    from sdtrt.runtime.backends import load_engines
    from sdtrt.runtime.pipeline import Pipeline

    log = log or (lambda s: None)
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
    cases = {"1-chunk prompt": kwargs}
    text_max = build.engines["unet"].profile.get("encoder_hidden_states", ((), (), (0, 0)))[2]
    if len(text_max) > 1 and text_max[1] >= 2 * manifest.model.max_text_length:
        cases["2-chunk prompt"] = dict(kwargs, prompt=[", ".join([E2E_PROMPT] * 8)] * batch)  # 80-150 tokens
    device = Pipeline.from_engines(folder, manifest, trt_engines)
    got = {label: _twice(device, label, kw) for label, kw in cases.items()}
    lora = None
    with tempfile.TemporaryDirectory() as tmp:
        from sdtrt.runtime.tensorrt.refit import refittable_graphs

        if build.refittable and set(refittable_graphs(manifest)) >= {"unet", *(e.component for e in manifest.model.encoders)}:
            from sdtrt.runtime.synthetic import random_lora

            lora = (str(Path(tmp) / "verify_lora.safetensors"), 0.8)
            random_lora(manifest, Path(lora[0]), 4, 0)
            device.set_loras([lora])
            got["refitted LoRA"] = _twice(device, "refitted LoRA", kwargs)
            device.set_loras([])
            back = _twice(device, "LoRA refitted out", kwargs)
            if psnr(back, got["1-chunk prompt"]) < REPLAY_MIN_PSNR_DB:
                raise _replay_error("LoRA refitted out", got["1-chunk prompt"], back, "the image without it")
        # the host loop: a reference that shares no loop code with the device loop under test
        with Pipeline.from_engines(folder, manifest, load_engines(folder, manifest, reference, device_loop=False)) as host:
            values = {}
            for label, image in got.items():
                if label == "refitted LoRA":
                    host.set_loras([lora])
                values[label] = psnr(image, host(**cases.get(label, kwargs)).images)
                log(f"    {label}: PSNR {values[label]:.1f} dB against {reference}; replayed CUDA graph agrees")
    label, value = min(values.items(), key=lambda kv: kv[1])
    return EndToEndCheck(psnr_db=999.0 if value == float("inf") else max(round(value, 2), 0.0), min_psnr_db=MIN_PSNR_DB,
                         passed=bool(value >= MIN_PSNR_DB), width=width, height=height, batch=batch, steps=steps,
                         sampler=device.sampler_table(None, steps).name, reference=reference)


def _twice(pipe, label: str, kwargs: dict) -> np.ndarray:
    """The generation's image, after checking that running it again (the CUDA graph's capture and launch, or its
    replay) gives the same (``REPLAY_MIN_PSNR_DB``)."""
    first = pipe(**kwargs).images
    again = pipe(**kwargs).images
    if psnr(first, again) < REPLAY_MIN_PSNR_DB:
        raise _replay_error(label, first, again, "the first run")
    return first


def _replay_error(label: str, want: np.ndarray, got: np.ndarray, what: str):
    from sdtrt.runtime.tensorrt.build import BuildError

    diff = float(np.nanmax(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)))) \
        if np.isfinite(got).any() else float("nan")
    return BuildError(f"CUDA-graph replay check failed ({label}): the replayed generation differs from {what} (max "
                      f"difference {diff:.3g}); the engines are not safe to use for a second generation (a TensorRT or "
                      "driver problem worth reporting)")
