"""Numerics in one place: how far one set of outputs is from a reference.

Used by validate (the gate) and by benchmark (each engine's accuracy columns). It
knows nothing about runtimes: it compares named arrays.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

# Below this magnitude an output "is zero": comparing it proves nothing.
NEAR_ZERO = 1e-6


def is_class_scores(ref: np.ndarray) -> bool:
    """[batch, classes] float scores: the outputs where top-1 agreement means something."""
    return ref.ndim == 2 and ref.shape[1] > 1 and np.issubdtype(ref.dtype, np.floating)


def degenerate_reason(ref: np.ndarray) -> str | None:
    """Why a reference output cannot tell a right graph from a wrong one, or None if it can."""
    ref = np.asarray(ref, dtype=np.float64)
    peak = float(np.max(np.abs(ref))) if ref.size else 0.0
    if peak < NEAR_ZERO:
        return f"all values are near zero (max |x| = {peak:.3g})"
    if ref.ndim >= 1 and ref.shape[0] > 1:
        spread = float(np.max(np.ptp(ref, axis=0)))
        if spread <= NEAR_ZERO * max(1.0, peak):
            return f"it is the same for every input in the batch (max spread {spread:.3g})"
    return None


@dataclass
class OutputComparison:
    name: str
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    mean_abs_err: float
    p99_abs_err: float
    cosine: float
    sqnr_db: float | None  # None when the outputs are identical (infinite SQNR)
    top1_agreement: float | None
    atol: float
    rtol: float
    worst_index: tuple[int, ...]
    worst_ref: float
    worst_got: float

    @property
    def passed(self) -> bool:
        return self.excess <= 0.0

    @property
    def excess(self) -> float:
        """How far the worst element is beyond atol + rtol*|ref| (<= 0 when within tolerance)."""
        return abs(self.worst_got - self.worst_ref) - (self.atol + self.rtol * abs(self.worst_ref))

    def failure_line(self, context: str = "") -> str:
        where = f" {context}" if context else ""
        return (
            f"output '{self.name}'{where}: max abs error {self.max_abs_err:.3g} exceeds tolerance "
            f"(atol {self.atol:g} + rtol {self.rtol:g} x |ref|) at index {list(self.worst_index)} "
            f"(reference {self.worst_ref:.6g}, got {self.worst_got:.6g}); max rel error {self.max_rel_err:.3g}"
        )

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["worst_index"] = list(self.worst_index)
        d["passed"] = self.passed
        return d


def _p99(err: np.ndarray) -> float:
    if not err.size:
        return 0.0
    with np.errstate(invalid="ignore"):  # inf errors (NaN outputs) make the interpolation NaN
        return float(np.percentile(err, 99))


# A finite stand-in for SQNR's two infinities (identical outputs; a reference of zeros), for tables and plots.
SQNR_BOUND_DB = 200.0


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio in dB: None when the outputs are identical (infinite), -inf when the
    reference is all zeros and the output is not."""
    r, g = np.asarray(ref, dtype=np.float64).ravel(), np.asarray(got, dtype=np.float64).ravel()
    noise = float(np.sum((g - r) ** 2))
    signal = float(np.sum(r**2))
    if noise == 0:
        return None
    if signal == 0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def bounded_sqnr_db(sqnr: float | None) -> float:
    """`sqnr_db`'s answer within +-SQNR_BOUND_DB: a number a CSV, a ranking or a plot can hold."""
    return SQNR_BOUND_DB if sqnr is None else max(-SQNR_BOUND_DB, min(SQNR_BOUND_DB, float(sqnr)))


def compare_output(name: str, ref: np.ndarray, got: np.ndarray, atol: float = 0.0, rtol: float = 0.0) -> OutputComparison:
    if ref.shape != got.shape:
        raise ValueError(f"output '{name}': shape {tuple(got.shape)} differs from the reference's {tuple(ref.shape)}")
    r = np.asarray(ref, dtype=np.float64)
    g = np.asarray(got, dtype=np.float64)
    err = np.abs(g - r)
    if not np.all(np.isfinite(g)):
        err = np.where(np.isfinite(g), err, np.inf)
    # The worst element is the one furthest beyond its own allowance, not simply the largest error.
    over = err - (atol + rtol * np.abs(r))
    worst = np.unravel_index(int(np.argmax(over)), r.shape) if r.size else ()
    significant = np.abs(r) > max(atol, NEAR_ZERO)
    max_rel = float(np.max(err[significant] / np.abs(r[significant]))) if np.any(significant) else 0.0
    rf, gf = r.ravel(), g.ravel()
    denom = float(np.linalg.norm(rf) * np.linalg.norm(gf))
    cosine = float(np.dot(rf, gf) / denom) if denom > 0 and np.isfinite(denom) else 0.0
    sqnr = sqnr_db(r, g)
    top1 = float(np.mean(np.argmax(r, axis=1) == np.argmax(g, axis=1))) if is_class_scores(ref) else None
    return OutputComparison(
        name=name,
        shape=tuple(ref.shape),
        max_abs_err=float(np.max(err)) if err.size else 0.0,
        max_rel_err=max_rel,
        mean_abs_err=float(np.mean(err)) if err.size else 0.0,
        p99_abs_err=_p99(err),
        cosine=cosine,
        sqnr_db=sqnr,
        top1_agreement=top1,
        atol=atol,
        rtol=rtol,
        worst_index=tuple(int(i) for i in worst),
        worst_ref=float(r[worst]) if r.size else 0.0,
        worst_got=float(g[worst]) if r.size else 0.0,
    )


def compare_outputs(
    ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], atol: float = 0.0, rtol: float = 0.0
) -> list[OutputComparison]:
    missing = [n for n in ref if n not in got]
    if missing:
        raise ValueError(f"outputs {missing} are missing (got {sorted(got)})")
    return [compare_output(n, ref[n], got[n], atol, rtol) for n in ref]


def summarize(comparisons: list[OutputComparison]) -> dict[str, float | None]:
    """One figure per metric across outputs: the worst one."""
    top1 = [c.top1_agreement for c in comparisons if c.top1_agreement is not None]
    sqnr = [c.sqnr_db for c in comparisons if c.sqnr_db is not None and np.isfinite(c.sqnr_db)]
    return {
        "max_abs_err": max(c.max_abs_err for c in comparisons),
        "mean_abs_err": max(c.mean_abs_err for c in comparisons),
        "cosine": min(c.cosine for c in comparisons),
        "sqnr_db": min(sqnr) if sqnr else None,
        "top1_agreement": min(top1) if top1 else None,
    }
