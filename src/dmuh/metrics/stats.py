"""Small statistics for `dmuh compare` over seeds: mean, sample standard deviation, paired t interval.

Kept free of NumPy so the numbers are easy to check by hand (tests/test_compare_seeds.py does).
"""

from __future__ import annotations

import math
from typing import Iterable, List, NamedTuple

# Student's t quantile t(0.975, df) for df = 1..30, used when SciPy is not importable.
T_975 = (
    12.706205,
    4.302653,
    3.182446,
    2.776445,
    2.570582,
    2.446912,
    2.364624,
    2.306004,
    2.262157,
    2.228139,
    2.200985,
    2.178813,
    2.160369,
    2.144787,
    2.131450,
    2.119905,
    2.109816,
    2.100922,
    2.093024,
    2.085963,
    2.079614,
    2.073873,
    2.068658,
    2.063899,
    2.059539,
    2.055529,
    2.051831,
    2.048407,
    2.045230,
    2.042272,
)
Z_975 = 1.959964  # the limit as df grows


def _values(values: Iterable[float]) -> List[float]:
    return [float(v) for v in values]


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; NaN for no values."""
    values = _values(values)
    return math.fsum(values) / len(values) if values else math.nan


def sample_sd(values: Iterable[float]) -> float:
    """Sample standard deviation (ddof=1); NaN for fewer than two values."""
    values = _values(values)
    if len(values) < 2:
        return math.nan
    centre = mean(values)
    return math.sqrt(math.fsum((v - centre) ** 2 for v in values) / (len(values) - 1))


def t_quantile(df: int, p: float = 0.975) -> float:
    """Student's t quantile t(p, df): SciPy's when importable, else (p = 0.975 only) the table above
    (df > 30: the 30 entry, a little wide, until df is large enough for the normal quantile)."""
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    try:
        from scipy.stats import t
    except ImportError:
        if p != 0.975:
            raise ValueError("t_quantile without SciPy knows p=0.975 only") from None
        return T_975[df - 1] if df <= len(T_975) else (T_975[-1] if df < 120 else Z_975)
    return float(t.ppf(p, df))


class Interval(NamedTuple):
    """A mean with its confidence interval: mean ± half_width over n values (half_width NaN when n < 2)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and math.isfinite(self.half_width) and (self.low > 0 or self.high < 0)


def paired_interval(differences: Iterable[float], confidence: float = 0.95) -> Interval:
    """Mean of paired differences and its two-sided t confidence interval with n-1 degrees of
    freedom: mean ± t((1+confidence)/2, n-1) * sd / sqrt(n)."""
    differences = _values(differences)
    n = len(differences)
    centre = mean(differences)
    if n < 2:
        return Interval(centre, math.nan, n)
    half = t_quantile(n - 1, (1 + confidence) / 2) * sample_sd(differences) / math.sqrt(n)
    return Interval(centre, half, n)


def seeds_cell(values: Iterable[float], digits: int = 4) -> str:
    """A table cell of one figure over seeds: its mean and the seeds' range, "0.4512 (0.4490-0.4533,
    3 seeds)"; one seed is the bare figure, none (or only NaN/None) "-"."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f}, {len(values)} seeds)"
