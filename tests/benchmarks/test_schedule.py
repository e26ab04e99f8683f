import numpy as np
import pytest

from benchmarks.loadgen import MAX_SCHEDULED_REQUESTS, poisson_schedule


def test_seeded_and_reproducible():
    a = poisson_schedule(100.0, 5.0, seed=7)
    b = poisson_schedule(100.0, 5.0, seed=7)
    c = poisson_schedule(100.0, 5.0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[: min(a.size, c.size)], c[: min(a.size, c.size)])


def test_bounded_and_sorted_within_duration():
    s = poisson_schedule(200.0, 3.0, seed=1)
    assert s.size > 0
    assert np.all(np.diff(s) > 0)
    assert s[0] >= 0 and s[-1] < 3.0


def test_max_requests_caps_the_count():
    assert poisson_schedule(1000.0, 10.0, seed=0, max_requests=50).size == 50
    assert poisson_schedule(1000.0, 10.0, seed=0, max_requests=0).size == 0


def test_hard_cap():
    s = poisson_schedule(1e9, 1.0, seed=0)
    assert s.size <= MAX_SCHEDULED_REQUESTS


def test_statistics_of_a_poisson_process():
    rate, duration = 500.0, 40.0
    s = poisson_schedule(rate, duration, seed=3)
    n = s.size
    # count ~ Poisson(rate * duration): within 5 standard deviations
    assert abs(n - rate * duration) < 5 * np.sqrt(rate * duration)
    gaps = np.diff(s)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    # exponential gaps: coefficient of variation ~1 (a fixed-interval schedule would give 0)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("rate,duration", [(0, 1), (-1, 1), (1, 0)])
def test_rejects_nonpositive(rate, duration):
    with pytest.raises(ValueError):
        poisson_schedule(rate, duration, seed=0)
