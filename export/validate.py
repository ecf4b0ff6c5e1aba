"""The numeric parity gate: every exported graph runs in ONNX Runtime and is compared with the
PyTorch FP32 module on the same inputs (cf. Apple ml-stable-diffusion's per-model PSNR check)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.export.graphs import GraphSpec
from sdtrt.manifest import ValidationResult
from sdtrt.parity import TOLERANCE, compare, format_table  # noqa: F401  (re-exported: this module's API)

# The gate checks the guided path at a typical guidance scale (it multiplies the error of cond - uncond).
GATE_GUIDANCE = 7.5


@dataclass(frozen=True)
class ValidationCase:
    batch: int
    height: int
    width: int
    options: dict[str, Any] = field(default_factory=dict)  # passed to GraphSpec.make_inputs

    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in sorted(self.options.items()))
        return f"batch={self.batch} {self.width}x{self.height}{extra}"


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def case_inputs(spec: GraphSpec, case: ValidationCase, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    options = {"guidance_scale": GATE_GUIDANCE, **case.options}
    return spec.make_inputs(case.batch, case.height, case.width, rng, options)


def recorded(result: ValidationResult, feeds: dict[str, np.ndarray]) -> ValidationResult:
    """The result with the case's input shapes and scalar values, so `sdtrt build` can check engines at
    the same shapes (values are regenerated there, torch-free)."""
    return replace(result, inputs={n: tuple(int(d) for d in v.shape) for n, v in feeds.items()},
                   values={n: float(v.reshape(-1)[0]) for n, v in feeds.items()
                           if v.size == 1 and v.dtype.kind == "f"})


def run_case(spec: GraphSpec, session, case: ValidationCase, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(onnx output, torch FP32 output) of the graph's first output for one case (``run_case_all``: every output)."""
    got, want = run_case_all(spec, session, case, seed)
    return got[0], want[0]


def run_case_all(spec: GraphSpec, session, case: ValidationCase, seed: int = 0) -> tuple[list, list]:
    """([onnx outputs], [torch FP32 outputs]) for one case; fp16 graphs get the fp16-rounded inputs."""
    import torch

    feeds = case_inputs(spec, case, seed)
    input_types = {i.name: i.type for i in session.get_inputs()}
    onnx_feeds = {}
    for name, value in feeds.items():
        if input_types[name] == "tensor(float16)":
            value = value.astype(np.float16)
        onnx_feeds[name] = value
    got = [g.astype(np.float32) for g in session.run([o.name for o in spec.outputs], onnx_feeds)]
    with torch.no_grad():
        args = [torch.from_numpy(np.asarray(onnx_feeds[s.name]).astype(feeds[s.name].dtype)) for s in spec.inputs]
        out = spec.module(*args)
    want = [o.float().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]
    return got, want


def validate_graph(spec: GraphSpec, path: Path, cases: list[ValidationCase], precision: str,
                   session=None) -> tuple[ValidationResult, ...]:
    session = session or ort_session(path)
    results = []
    for i, case in enumerate(cases):
        got, want = run_case_all(spec, session, case, seed=i)
        per_output = [compare(g, w, case.label(), TOLERANCE[precision]) for g, w in zip(got, want)]
        worst = max(per_output, key=lambda r: (not r.passed, r.max_rel_error))  # every output must pass
        results.append(recorded(worst, case_inputs(spec, case, i)))
    return tuple(results)


def validate_update_graph(path: Path, latent_channels: int, model_dtype: str,
                          cases: list[ValidationCase], vae_scale: int = 8) -> tuple[ValidationResult, ...]:
    """The sampler-update graph against ``samplers.step`` on real table rows (PLMS, LMS, Euler ancestral), with and
    without 4-channel inpainting's blend (a random mask)."""
    from sdtrt.runtime.samplers import (OUTPUT_DEPTH, STATE_DEPTH, Blend, SamplerConfig, build_table,
                                        coefficient_row, step)

    session = ort_session(path)
    results = []
    for k, case in enumerate(cases):
        rng = np.random.default_rng(k)
        shape = (case.batch, latent_channels, case.height // vae_scale, case.width // vae_scale)
        states = [rng.standard_normal(shape).astype(np.float32) for _ in range(STATE_DEPTH)]
        outputs = [rng.standard_normal(shape).astype(model_dtype) for _ in range(OUTPUT_DEPTH)]
        noise, image, init_noise = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
        mask = (rng.random((shape[0], 1) + shape[2:]) < 0.5).astype(np.float32)
        worst = None
        for sampler, row, blended in (("pndm", 4, False), ("lms", 3, True), ("euler_a", 0, True)):
            # SD's schedule, not the model's: the graph is checked on real table rows whatever the model's
            # scheduler settings are (one no sampler supports must not fail the export)
            table = build_table(SamplerConfig(name=sampler), 10, strength=0.7 if blended else None)
            m = mask if blended else np.ones_like(mask)
            feeds = {f"state_{j}": states[j] for j in range(STATE_DEPTH)}
            feeds |= {f"model_output_{j}": outputs[j] for j in range(OUTPUT_DEPTH)}
            feeds |= {"noise": noise, "coefs": coefficient_row(table, row), "mask": m, "image_latents": image,
                      "init_noise": init_noise}
            got, got_cast = session.run(["next_state", "next_latents"], feeds)
            blend = Blend(m.astype(np.float64), 1 - m.astype(np.float64), image.astype(np.float64),
                          init_noise.astype(np.float64), np.zeros(shape)) if blended else None
            want = step(table, row, [x.astype(np.float64) for x in states],
                        [x.astype(np.float64) for x in outputs], noise.astype(np.float64), blend=blend)
            r = compare(got, want, f"{case.label()} {sampler} row {row}{' blend' if blended else ''}", 1e-5)
            if got_cast.dtype != np.dtype(model_dtype) and not np.array_equal(got_cast, got.astype(got_cast.dtype)):
                r = ValidationResult(r.shape + " (cast output differs)", r.max_abs_error, r.max_rel_error, r.tolerance, False)
            worst = r if worst is None or r.max_rel_error > worst.max_rel_error or not r.passed else worst
        results.append(recorded(worst, feeds))
    return tuple(results)
