"""benchmarks.capacity: the simulator against queueing formulas, the sweep fit, and the CLI on the real sweep JSON.

Formulas (Poisson arrivals at rate lam, one server of rate mu = 1/S, rho = lam/mu):
  M/M/1 (exponential service): mean wait in queue Wq = rho / (mu - lam); the sojourn time is exponential with
  rate mu - lam, so its p99 = ln(100) / (mu - lam).
  M/D/1 (fixed service): Wq = rho / (2 mu (1 - rho))   (Pollaczek-Khinchine with zero service variance).
Random splitting of a Poisson stream gives independent Poisson streams: N replicas behind a random balancer are N
M/M/1 queues at lam/N. Round robin gives each replica Erlang-N interarrivals: less variable, so shorter waits.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.capacity import (
    ReplicaModel,
    fit_linear,
    max_rate_for,
    model_from_sweep,
    replicas_for,
    simulate,
)

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "benchmarks" / "results" / "sweep.json"
REQUESTS = 200_000


def single(service_s: float, cv: float) -> ReplicaModel:
    """Batches of one, no fixed cost outside the queue: a plain single-server queue."""
    return ReplicaModel(batch_fixed_s=0.0, per_image_s=service_s, max_batch=1, overhead_s=0.0, service_cv=cv)


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_mm1_mean_wait_and_p99(rho: float) -> None:
    mu = 50.0
    lam = rho * mu
    prediction, latencies, waits = simulate(single(1 / mu, cv=1.0), 1, lam, requests=REQUESTS, seed=1)
    assert waits.mean() == pytest.approx(rho / (mu - lam), rel=0.06)
    assert latencies.mean() == pytest.approx(1 / (mu - lam), rel=0.05)
    assert prediction.p99_ms / 1000 == pytest.approx(math.log(100) / (mu - lam), rel=0.08)
    assert prediction.utilisation == pytest.approx(rho, rel=0.03)


@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_md1_mean_wait(rho: float) -> None:
    mu = 40.0
    lam = rho * mu
    _, latencies, waits = simulate(single(1 / mu, cv=0.0), 1, lam, requests=REQUESTS, seed=2)
    assert waits.mean() == pytest.approx(rho / (2 * mu * (1 - rho)), rel=0.08)
    assert latencies.min() == pytest.approx(1 / mu)  # a fixed service time: nobody is faster


def test_random_balancer_makes_independent_mm1_queues() -> None:
    mu, replicas, rho = 30.0, 3, 0.7
    lam = rho * mu * replicas
    _, _, waits = simulate(single(1 / mu, cv=1.0), replicas, lam, requests=REQUESTS, dispatch_how="random", seed=3)
    per_replica = lam / replicas
    assert waits.mean() == pytest.approx(rho / (mu - per_replica), rel=0.08)


def test_round_robin_waits_less_than_random_but_more_than_a_shared_queue() -> None:
    mu, replicas, rho = 30.0, 2, 0.8
    lam = rho * mu * replicas
    model = single(1 / mu, cv=1.0)
    _, _, rr = simulate(model, replicas, lam, requests=REQUESTS, dispatch_how="round_robin", seed=4)
    _, _, rnd = simulate(model, replicas, lam, requests=REQUESTS, dispatch_how="random", seed=4)
    # M/M/2 with one shared queue (Erlang C): the best any balancer could do.
    a = lam / mu
    erlang_c = (a**2 / 2 / (1 - rho)) / (1 + a + a**2 / 2 / (1 - rho))
    shared = erlang_c / (replicas * mu - lam)
    assert shared < rr.mean() < rnd.mean()


def test_batching_raises_capacity_to_full_batches() -> None:
    """At 1.5x the capacity of single-image batches, the batcher keeps up by batching, as the engine allows."""
    model = ReplicaModel(batch_fixed_s=0.010, per_image_s=0.002, max_batch=16)
    single_image_capacity = 1 / model.service_s(1)  # 83 img/s
    assert model.capacity == pytest.approx(16 / 0.042)
    prediction, latencies, _ = simulate(model, 1, 1.5 * single_image_capacity, requests=50_000, seed=5)
    assert prediction.mean_batch > 1.5
    assert prediction.p99_ms < 200  # stable: the queue does not grow without bound
    overloaded, _, _ = simulate(model, 1, 1.2 * model.capacity, requests=50_000, seed=5)
    assert overloaded.p99_ms > 10 * prediction.p99_ms
    assert overloaded.mean_batch == pytest.approx(16, rel=0.05)


def test_overhead_adds_to_every_latency() -> None:
    base = single(0.01, cv=0.0)
    with_overhead = ReplicaModel(0.0, 0.01, 1, overhead_s=0.005, service_cv=0.0)
    _, a, _ = simulate(base, 1, 20, requests=5_000, seed=6)
    _, b, _ = simulate(with_overhead, 1, 20, requests=5_000, seed=6)
    np.testing.assert_allclose(b - a, 0.005)


def test_fit_linear_recovers_the_line_and_keeps_the_intercept_non_negative() -> None:
    assert fit_linear([(1, 0.012), (4, 0.018), (16, 0.042)]) == pytest.approx((0.010, 0.002))
    a, k = fit_linear([(1, 0.010), (2, 0.030), (8, 0.170)])  # the free fit's intercept is negative
    assert a == 0 and k == pytest.approx((0.010 + 0.060 + 1.360) / (1 + 4 + 64))


def test_model_from_the_measured_sweep() -> None:
    sweep = json.loads(SWEEP.read_text())
    model = model_from_sweep(sweep)
    runs = sweep["settings"]["batching_on"]["runs"]
    measured_peak = max(run["images_per_s"] for run in runs)
    assert model.capacity == pytest.approx(measured_peak, rel=0.15)  # the closed-loop plateau
    assert model.max_batch == sweep["settings"]["batching_on"]["env"]["max_batch_size"]
    assert 0 < model.service_cv < 1 and 0 < model.overhead_s < 0.05
    with pytest.raises(ValueError, match="no setting"):
        model_from_sweep(sweep, "nonexistent")


def test_replica_count_and_max_rate_agree() -> None:
    model = ReplicaModel(batch_fixed_s=0.001, per_image_s=0.02, max_batch=8, overhead_s=0.005, service_cv=0.2)
    kwargs = {"requests": 20_000, "seed": 7}
    best = max_rate_for(model, 2, 200.0, **kwargs)
    assert best is not None and best.p99_ms <= 200 and best.rate < 2 * model.capacity
    chosen, tried = replicas_for(model, best.rate * 0.95, 200.0, **kwargs)
    assert chosen is not None and chosen.replicas <= 2
    chosen, tried = replicas_for(model, best.rate * 1.3, 200.0, **kwargs)
    assert chosen is not None and chosen.replicas >= 3 and tried[-1] == chosen
    assert max_rate_for(model, 2, 10.0, **kwargs) is None  # one image takes longer than that


def test_cli_prints_replicas_and_p99(tmp_path: Path) -> None:
    out = tmp_path / "capacity.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.capacity", "--rate", "60", "--slo-ms", "250", "--requests", "20000",
         "--sweep", str(SWEEP), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "replicas for 60 img/s: predicted p99" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["replicas"]["replicas"] >= 2 and saved["replicas"]["p99_ms"] <= 250
    bad = subprocess.run([sys.executable, "-m", "benchmarks.capacity", "--rate", "60", "--slo-ms", "250",
                          "--sweep", str(tmp_path / "missing.json")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot build the model" in bad.stderr
