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


def ort_session(path: Path, optimize: bool = True):
    """A CPU session; ``optimize=False`` runs the graph as written: ONNX Runtime then does not fold the casts it adds
    around the fp16 nodes its CPU kernels lack into FP32 copies of the weights (the export's gate: an fp16 SD 1.5
    U-Net peaks at 3.1 GB instead of 6.2 GB, and starts in 1 s instead of 39 s)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
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
    fp16 = {i.name for i in session.get_inputs() if i.type == "tensor(float16)"}
    ref = gate_reference(spec, case, seed, fp16)
    return run_session(spec, session, ref.feeds), ref.want


@dataclass(frozen=True)
class GateReference:
    """One gate case computed on the PyTorch FP32 module: the graph's feeds (fp16-rounded where the graph takes
    fp16) and the module's outputs on the same values. Computed before the export halves or frees the module."""

    feeds: dict[str, np.ndarray]
    want: list[np.ndarray]


def gate_reference(spec: GraphSpec, case: ValidationCase, seed: int, fp16_inputs) -> GateReference:
    """The case's feeds (inputs named in ``fp16_inputs`` rounded to float16, as the graph takes them) and the
    PyTorch module's FP32 outputs on those values."""
    import torch

    feeds = case_inputs(spec, case, seed)
    onnx_feeds = {n: v.astype(np.float16) if n in fp16_inputs else v for n, v in feeds.items()}
    if any(p.dtype != torch.float32 for p in spec.module.parameters()):  # the gate compares with FP32 PyTorch
        raise RuntimeError(f"{spec.name}: the gate reference needs the FP32 module, which was already converted")
    with torch.no_grad():
        args = [torch.from_numpy(np.asarray(onnx_feeds[s.name]).astype(feeds[s.name].dtype)) for s in spec.inputs]
        out = spec.module(*args)
    return GateReference(onnx_feeds, [o.float().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))])


def gate_references(spec: GraphSpec, cases: list[ValidationCase], fp16_inputs) -> list[GateReference]:
    """``gate_reference`` of every case (case i drawn with seed i, as ``validate_graph`` runs them)."""
    return [gate_reference(spec, case, i, fp16_inputs) for i, case in enumerate(cases)]


def run_session(spec: GraphSpec, session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [g.astype(np.float32) for g in session.run([o.name for o in spec.outputs], feeds)]


def validate_graph(spec: GraphSpec, path: Path, cases: list[ValidationCase], precision: str,
                   session=None, references: list[GateReference] | None = None) -> tuple[ValidationResult, ...]:
    """Run every case in ONNX Runtime and compare with PyTorch FP32: ``references`` (``gate_references``, computed
    earlier, so the module may be gone by now) or the module run now."""
    session = session or ort_session(path)
    results = []
    for i, case in enumerate(cases):
        if references is None:
            got, want = run_case_all(spec, session, case, seed=i)
        else:
            got, want = run_session(spec, session, references[i].feeds), references[i].want
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
