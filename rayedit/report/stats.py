"""Small statistics for reports: mean with a 95% Student-t interval over records (no scipy needed)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
_Z975 = 1.959963984540054


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table ≤ 30, Cornish–Fisher above)."""
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Stat:
    """A mean over ``n`` values with the half-width of its 95% interval (NaN when n < 2)."""

    mean: float
    ci95: float
    n: int

    def fmt(self, digits: int = 2) -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "–"
        if math.isnan(self.ci95):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.ci95:.{digits}f}"


def mean_ci(values: Iterable[float | None], scale: float = 1.0) -> Stat:
    """Mean ± t(0.975, n-1)·s/√n of the finite values (NaN/None/inf skipped), times ``scale``."""
    vals = [float(v) * scale for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return Stat(math.nan, math.nan, 0)
    mean = math.fsum(vals) / n
    if n < 2:
        return Stat(mean, math.nan, 1)
    var = math.fsum((v - mean) ** 2 for v in vals) / (n - 1)
    return Stat(mean, t975(n - 1) * math.sqrt(var / n), n)


def harmonic_mean(values: Iterable[float]) -> float:
    vals = list(values)
    if not vals or any(math.isnan(v) for v in vals):
        return math.nan
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / math.fsum(1.0 / v for v in vals)
