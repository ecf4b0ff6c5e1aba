"""Numeric comparisons shared by every stage (torch-free): the export's parity gate, ``sdtrt build``'s
engine verification, the benchmark's fidelity figure and the tests."""

from __future__ import annotations

import numpy as np

from sdtrt.manifest import ValidationResult

# max|a - b| / max|b| allowed for a graph of each precision (the export gate and engine verification)
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


def compare(got: np.ndarray, want: np.ndarray, label: str, tolerance: float) -> ValidationResult:
    """``got`` against the reference ``want``: max absolute error and max|got - want| / max|want|."""
    if got.shape != want.shape:
        return ValidationResult(shape=f"{label} (shape {got.shape} != {want.shape})", max_abs_error=float("inf"),
                                max_rel_error=float("inf"), tolerance=tolerance, passed=False)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    max_abs = float(np.nanmax(diff)) if np.isfinite(got).all() else float("inf")
    scale = float(np.abs(want).max()) or 1.0
    rel = max_abs / scale
    return ValidationResult(shape=label, max_abs_error=max_abs, max_rel_error=rel, tolerance=tolerance,
                            passed=bool(rel <= tolerance))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]; inf when equal, -inf when not finite."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("-inf")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


def format_table(rows: list[tuple[str, str, ValidationResult]]) -> str:
    """(component, precision, result) rows as the table the export gate and engine verification print."""
    header = f"{'component':<14} {'precision':<9} {'shape':<50} {'max rel err':>11} {'tolerance':>9}  ok"
    lines = [header, "-" * len(header)]
    for component, precision, r in rows:
        lines.append(f"{component:<14} {precision:<9} {r.shape:<50} {r.max_rel_error:>11.2e} {r.tolerance:>9.0e}  "
                     f"{'yes' if r.passed else 'NO'}")
    return "\n".join(lines)
