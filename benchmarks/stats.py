"""Latency statistics: percentiles and a per-run summary (pure Python + NumPy, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already-sorted values, linearly interpolated between closest ranks.

    This is the definition NumPy uses by default (`method="linear"`): rank = q/100 * (n - 1).
    Empty input gives NaN; q outside [0, 100] is an error.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    n = len(sorted_values)
    if n == 0:
        return math.nan
    rank = q / 100.0 * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


@dataclass(frozen=True)
class LatencySummary:
    """Latency in milliseconds over the successful requests of a run."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize_latencies(latencies_s: Sequence[float]) -> LatencySummary:
    """Summarise latencies given in seconds; an empty run gives count 0 and NaN everywhere else."""
    values = np.sort(np.asarray(latencies_s, dtype=np.float64)) * 1000.0
    if values.size == 0:
        nan = math.nan
        return LatencySummary(0, nan, nan, nan, nan, nan)
    p50, p90, p99 = (percentile(values, q) for q in PERCENTILES)
    return LatencySummary(
        count=int(values.size),
        mean_ms=float(values.mean()),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        max_ms=float(values[-1]),
    )
