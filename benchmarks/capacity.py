"""Capacity model: how many replicas serve R images/s with a p99 latency of at most L ms?

    python -m benchmarks.capacity --rate 60 --slo-ms 250                      # replicas for 60 img/s, p99 250 ms
    python -m benchmarks.capacity --replicas 2 --slo-ms 250                   # most img/s 2 replicas serve so

A discrete-event simulation of Poisson arrivals (one image per request, as `ssd-bench --mode open`) spread over
N replicas by a load balancer (round robin, as nginx's default, or random), each replica a dynamic batcher in front
of one engine, driven by a per-replica model measured in a sweep (`ssd-bench --sweep`, benchmarks/results/sweep.json):

- engine time of a batch of b images: S(b) = a + k*b, least squares over the sweep's closed-loop runs of one
  batching setting (mean batch size, mean inference time per batch, both from the server's /metrics);
- its variability: S(b) times a gamma-distributed factor of mean 1 whose coefficient of variation is that of
  the latency at concurrency 1 (no queueing there, so its spread is the service's), unless --service-cv is given;
- a fixed time outside the batcher per request (HTTP, decode, response): the mean latency at concurrency 1 minus
  its mean queue wait and inference time.

The batcher takes everything waiting (up to the max batch) as soon as the engine is free; the server's
max_queue_delay (2 ms by default) is below the model's resolution. Queueing formulas check the simulator
(tests/benchmarks/test_capacity.py: M/M/1 and M/D/1 mean waits, random splitting into independent M/M/1 queues).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DEFAULT_SWEEP = Path("benchmarks/results/sweep.json")
DISPATCH = ("round_robin", "random")


@dataclass(frozen=True)
class ReplicaModel:
    """One replica: engine time a + k*b seconds per batch of b (times a gamma factor of CV `service_cv`),
    `overhead_s` per request outside the batcher, batches of at most `max_batch`."""

    batch_fixed_s: float  # a
    per_image_s: float  # k
    max_batch: int
    overhead_s: float = 0.0
    service_cv: float = 0.0
    source: str = ""

    def service_s(self, batch: int) -> float:
        return self.batch_fixed_s + self.per_image_s * batch

    @property
    def capacity(self) -> float:
        """Images/s at full batches: the most one replica can serve."""
        return self.max_batch / self.service_s(self.max_batch)


@dataclass(frozen=True)
class Prediction:
    replicas: int
    rate: float  # offered images/s, all replicas together
    p50_ms: float
    p99_ms: float
    mean_ms: float
    mean_batch: float
    utilisation: float  # engine busy time / simulated time, mean over replicas
    in_flight_per_replica: float  # Little's law: rate per replica x mean latency (the HPA's target)


def fit_linear(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares a, k of y = a + k*x with a >= 0 (refit through the origin when the free fit goes below)."""
    xs = np.array([p[0] for p in points], dtype=float)
    ys = np.array([p[1] for p in points], dtype=float)
    if len(points) >= 2 and np.ptp(xs) > 0:
        k, a = np.polyfit(xs, ys, 1)
        if a >= 0 and k > 0:
            return float(a), float(k)
    return 0.0, float(np.dot(xs, ys) / np.dot(xs, xs))


def model_from_sweep(sweep: dict, setting: str = "batching_on", service_cv: float | None = None) -> ReplicaModel:
    """The replica model of one sweep setting (see the module docstring for what comes from where)."""
    try:
        entry = sweep["settings"][setting]
    except KeyError:
        raise ValueError(f"the sweep has no setting {setting!r}; it has {sorted(sweep.get('settings', {}))}") from None
    runs = [run for run in entry["runs"] if run.get("server") and run["ok"] > 0]
    points = [(run["server"]["mean_batch_size"], run["server"]["mean_inference_ms"] / 1000) for run in runs]
    if not points:
        raise ValueError(f"setting {setting!r} has no run with server metrics")
    a, k = fit_linear(points)
    first = min(runs, key=lambda run: run["config"]["concurrency"])
    latency, server = first["latency"], first["server"]
    overhead_ms = latency["mean_ms"] - server["mean_queue_wait_ms"] - server["mean_inference_ms"]
    if service_cv is None:
        # Normal quantiles: p90 - p50 = 1.2816 sigma; sigma relative to the service time of one image.
        sigma_ms = max(latency["p90_ms"] - latency["p50_ms"], 0.0) / 1.2816
        service_cv = sigma_ms / (1000 * (a + k))
    max_batch = int(entry["env"].get("max_batch_size", 32))
    return ReplicaModel(
        batch_fixed_s=a, per_image_s=k, max_batch=max_batch, overhead_s=max(overhead_ms, 0.0) / 1000,
        service_cv=service_cv, source=f"{setting}: {entry.get('label', '')}",
    )


def _service_factors(rng: np.random.Generator, cv: float, size: int) -> np.ndarray:
    if cv <= 0:
        return np.ones(size)
    shape = 1.0 / (cv * cv)  # gamma with mean 1 and CV cv
    return rng.gamma(shape, 1.0 / shape, size)


@dataclass
class ReplicaRun:
    latencies_s: np.ndarray  # per request, in arrival order
    waits_s: np.ndarray  # time in the queue before its batch started
    batches: int
    busy_s: float


def simulate_replica(arrivals: np.ndarray, model: ReplicaModel, rng: np.random.Generator) -> ReplicaRun:
    """One batching server, FIFO: when the engine is free it takes every waiting request up to max_batch."""
    n = len(arrivals)
    latencies = np.empty(n)
    waits = np.empty(n)
    factors = _service_factors(rng, model.service_cv, n)  # at most n batches
    free_at, i, batches, busy = 0.0, 0, 0, 0.0
    times = arrivals.tolist()
    while i < n:
        start = max(free_at, times[i])
        j = min(i + model.max_batch, bisect.bisect_right(times, start, lo=i + 1))
        service = model.service_s(j - i) * factors[batches]
        done = start + service
        waits[i:j] = start - arrivals[i:j]
        latencies[i:j] = done - arrivals[i:j] + model.overhead_s
        batches += 1
        busy += service
        free_at, i = done, j
    return ReplicaRun(latencies, waits, batches, busy)


def poisson_arrivals(rate: float, count: int, rng: np.random.Generator) -> np.ndarray:
    return np.cumsum(rng.exponential(1.0 / rate, count))


def dispatch(count: int, replicas: int, how: str, rng: np.random.Generator) -> np.ndarray:
    """Replica index of each arrival."""
    if how == "round_robin":
        return np.arange(count) % replicas
    if how == "random":
        return rng.integers(0, replicas, count)
    raise ValueError(f"dispatch must be one of {DISPATCH}, got {how!r}")


def simulate(
    model: ReplicaModel,
    replicas: int,
    rate: float,
    *,
    requests: int = 100_000,
    dispatch_how: str = "round_robin",
    seed: int = 0,
    warmup_fraction: float = 0.05,
) -> tuple[Prediction, np.ndarray, np.ndarray]:
    """Simulate `requests` Poisson arrivals at `rate`/s over `replicas`; the first `warmup_fraction` of arrivals
    are left out of the statistics. Returns the prediction, and the latencies and queue waits counted (seconds)."""
    if replicas < 1 or rate <= 0 or requests < 10:
        raise ValueError("need replicas >= 1, rate > 0 and at least 10 requests")
    rng = np.random.default_rng(seed)
    arrivals = poisson_arrivals(rate, requests, rng)
    target = dispatch(requests, replicas, dispatch_how, rng)
    latencies = np.empty(requests)
    waits = np.empty(requests)
    batches, busy = 0, 0.0
    for replica in range(replicas):
        mine = np.flatnonzero(target == replica)
        run = simulate_replica(arrivals[mine], model, rng)
        latencies[mine], waits[mine] = run.latencies_s, run.waits_s
        batches += run.batches
        busy += run.busy_s
    counted = slice(int(requests * warmup_fraction), None)
    kept = latencies[counted]
    horizon = float(arrivals[-1])
    mean_s = float(kept.mean())
    prediction = Prediction(
        replicas=replicas,
        rate=rate,
        p50_ms=1000 * float(np.percentile(kept, 50)),
        p99_ms=1000 * float(np.percentile(kept, 99)),
        mean_ms=1000 * mean_s,
        mean_batch=requests / max(batches, 1),
        utilisation=float(busy / (horizon * replicas)),
        in_flight_per_replica=rate / replicas * mean_s,
    )
    return prediction, kept, waits[counted]


def replicas_for(
    model: ReplicaModel, rate: float, slo_ms: float, *, max_replicas: int = 64, **kwargs: object
) -> tuple[Prediction | None, list[Prediction]]:
    """The fewest replicas whose simulated p99 is within the SLO (None if max_replicas do not suffice), and
    every prediction tried, from the first count that is not overloaded."""
    tried: list[Prediction] = []
    first = max(1, math.ceil(rate / model.capacity))
    for replicas in range(first, max_replicas + 1):
        prediction, _, _ = simulate(model, replicas, rate, **kwargs)  # type: ignore[arg-type]
        tried.append(prediction)
        if prediction.p99_ms <= slo_ms:
            return prediction, tried
    return None, tried


def max_rate_for(
    model: ReplicaModel, replicas: int, slo_ms: float, *, tolerance: float = 0.005, **kwargs: object
) -> Prediction | None:
    """The highest offered rate at which `replicas` keep the simulated p99 within the SLO (bisection, common
    random numbers through the fixed seed); None if even a trickle misses it."""
    low, high = 0.0, replicas * model.capacity
    best: Prediction | None = None
    trickle, _, _ = simulate(model, replicas, high * 0.01, **kwargs)  # type: ignore[arg-type]
    if trickle.p99_ms > slo_ms:
        return None
    while high - low > tolerance * high:
        middle = (low + high) / 2
        prediction, _, _ = simulate(model, replicas, middle, **kwargs)  # type: ignore[arg-type]
        if prediction.p99_ms <= slo_ms:
            low, best = middle, prediction
        else:
            high = middle
    return best or trickle


def _row(prediction: Prediction, slo_ms: float) -> str:
    verdict = "meets" if prediction.p99_ms <= slo_ms else "misses"
    return (f"{prediction.replicas:>8} {prediction.rate:>9.1f} {prediction.p50_ms:>8.1f} {prediction.p99_ms:>8.1f} "
            f"{prediction.mean_batch:>6.2f} {100 * prediction.utilisation:>5.0f}% "
            f"{prediction.in_flight_per_replica:>9.2f}  {verdict} the SLO")


HEADER = f"{'replicas':>8} {'img/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'busy':>6} {'in flight':>9}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.capacity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--rate", type=float, help="offered load, images/s (all replicas together)")
    what.add_argument("--replicas", type=int, help="how many images/s this many replicas serve within the SLO")
    p.add_argument("--slo-ms", type=float, required=True, help="p99 latency objective, ms")
    p.add_argument("--sweep", type=Path, default=DEFAULT_SWEEP, help=f"sweep JSON (default {DEFAULT_SWEEP})")
    p.add_argument("--setting", default="batching_on", help="which of the sweep's settings (default batching_on)")
    p.add_argument("--service-cv", type=float, help="service time variability (default: from the sweep)")
    p.add_argument("--dispatch", choices=DISPATCH, default="round_robin", help="load balancer (default round_robin)")
    p.add_argument("--requests", type=int, default=100_000, help="simulated requests per point (default 100000)")
    p.add_argument("--max-replicas", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the model and the predictions to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad_rate = args.rate is not None and args.rate <= 0
    if args.slo_ms <= 0 or bad_rate or (args.replicas is not None and args.replicas < 1):
        print("capacity: --slo-ms and --rate must be positive, --replicas at least 1", file=sys.stderr)
        return 2
    try:
        model = model_from_sweep(json.loads(args.sweep.read_text()), args.setting, args.service_cv)
    except (OSError, ValueError, KeyError) as exc:
        print(f"capacity: cannot build the model from {args.sweep}: {exc}", file=sys.stderr)
        return 2
    sim = {"requests": args.requests, "dispatch_how": args.dispatch, "seed": args.seed}
    print(f"replica model ({args.sweep}, {model.source}): engine {1000 * model.batch_fixed_s:.1f} ms + "
          f"{1000 * model.per_image_s:.2f} ms/image per batch (max {model.max_batch}, CV {model.service_cv:.2f}), "
          f"{1000 * model.overhead_s:.1f} ms outside the batcher; at most {model.capacity:.1f} img/s per replica")
    out: dict[str, object] = {"model": asdict(model), "slo_ms": args.slo_ms, "dispatch": args.dispatch}
    if args.rate is not None:
        chosen, tried = replicas_for(model, args.rate, args.slo_ms, max_replicas=args.max_replicas, **sim)
        print(HEADER)
        for prediction in tried:
            print(_row(prediction, args.slo_ms))
        out["tried"] = [asdict(p) for p in tried]
        if chosen is None:
            print(f"no replica count up to {args.max_replicas} keeps p99 within {args.slo_ms:g} ms at "
                  f"{args.rate:g} img/s (one image's own latency may exceed the SLO)")
            code = 1
        else:
            print(f"\n{chosen.replicas} replicas for {args.rate:g} img/s: predicted p99 {chosen.p99_ms:.0f} ms "
                  f"(SLO {args.slo_ms:g} ms); HPA target ssd_requests_in_flight_avg1m averageValue "
                  f"~{chosen.in_flight_per_replica:.1f} per pod")
            out["replicas"] = asdict(chosen)
            code = 0
    else:
        best = max_rate_for(model, args.replicas, args.slo_ms, **sim)
        if best is None:
            print(f"{args.replicas} replicas cannot meet p99 {args.slo_ms:g} ms at any rate")
            code = 1
        else:
            print(HEADER)
            print(_row(best, args.slo_ms))
            print(f"\n{args.replicas} replicas serve up to {best.rate:.1f} img/s with a predicted p99 of "
                  f"{best.p99_ms:.0f} ms (SLO {args.slo_ms:g} ms)")
            out["max_rate"] = asdict(best)
            code = 0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
