import math

import numpy as np
import pytest

from benchmarks.stats import percentile, summarize_latencies


@pytest.mark.parametrize("q", [0, 1, 10, 25, 50, 90, 99, 99.9, 100])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentile_matches_numpy_linear(q, n):
    values = np.sort(np.random.default_rng(n).lognormal(size=n))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_small_cases():
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_rejects_out_of_range(q):
    with pytest.raises(ValueError):
        percentile([1.0], q)


def test_summary_in_milliseconds():
    s = summarize_latencies([0.001 * i for i in range(1, 101)])  # 1..100 ms
    assert s.count == 100
    assert s.mean_ms == pytest.approx(50.5)
    assert s.p50_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)
    assert s.p99_ms == pytest.approx(99.01)
    assert s.max_ms == pytest.approx(100.0)


def test_summary_is_order_independent():
    data = [0.003, 0.001, 0.002, 0.010]
    assert summarize_latencies(data) == summarize_latencies(sorted(data))


def test_empty_summary():
    s = summarize_latencies([])
    assert s.count == 0 and math.isnan(s.p50_ms) and math.isnan(s.max_ms)
