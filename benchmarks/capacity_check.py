"""Check the capacity model against a measurement: 1 and 2 real servers on 127.0.0.1 behind a real nginx
(round robin), loaded open loop (`ssd-bench --mode open`, Poisson) at rates around the model's prediction.

    python -m benchmarks.capacity_check --replicas 1,2 --slo-ms 250 --duration 30          # a quiet machine
    python -m benchmarks.capacity_check --replicas 1,2 --slo-ms 250 --cpus-per-replica 2 \\
        --sweep benchmarks/results/sweep-2cpu.json                                           # replicas pinned

For each replica count N: the model (benchmarks.capacity, from the sweep JSON) predicts the highest rate whose
p99 is within the SLO; N servers start with the sweep setting's batching settings, nginx balances them, and
ssd-bench offers `--fractions` of the predicted rate, one run each. The measured capacity at the SLO is the
highest offered rate whose measured p99 met it, refined by linear interpolation of p99 to the next rate.
Written to --out (JSON) and printed as a table for BENCHMARKS.md.

The model assumes replicas do not share CPUs. Two servers on one machine share its cores unless pinned:
--cpus-per-replica K gives replica i the cores [iK, (i+1)K) and the balancer and load generator the rest (and sets
SSD_INTRA_OP_THREADS and SSD_DECODE_WORKERS to K); the sweep must then be measured the same way, e.g.
`SSD_INTRA_OP_THREADS=2 SSD_DECODE_WORKERS=2 taskset -c 0-1 python -m benchmarks --sweep --pairs 0 --no-large
--tag sweep-2cpu`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

from benchmarks.capacity import DEFAULT_SWEEP, ReplicaModel, max_rate_for, model_from_sweep, simulate
from benchmarks.server_proc import free_port, running_server, stop

NGINX_CONF = """\
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    client_max_body_size 64m;
    # Bodies and responses stay in memory: no temp files (nginx started as root runs its workers as nobody).
    client_body_buffer_size 4m;
    proxy_request_buffering off;
    proxy_buffering off;
    upstream ssd {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://ssd;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


@contextlib.contextmanager
def running_nginx(upstreams: Sequence[str], work: Path) -> Iterator[str]:
    """Debian's nginx, unprivileged, round robin (its default) over `upstreams` (host:port); yields its URL."""
    import httpx

    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx)")
    port = free_port()
    servers = "\n".join(f"        server {address};" for address in upstreams)
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, servers=servers, port=port))
    log = (work / "nginx.out").open("wb")
    process = subprocess.Popen([binary, "-p", str(work), "-c", str(conf), "-e", str(work / "error.log"),
                                "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited with {process.returncode}: {(work / 'error.log').read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not answer within 20 s: {(work / 'error.log').read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        stop(process)
        log.close()


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """This process (and every child started meanwhile) on `cpus`; None: unchanged."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def cpu_plan(replicas: int, per_replica: int) -> tuple[list[set[int] | None], set[int] | None]:
    """Cores of each replica, and the rest for nginx and the load generator (None everywhere: no pinning). When the
    replicas take every core, nginx and the load generator float over all of them (a small machine: both are light
    next to a replica, but they then take a little from the replicas, which biases the measurement low)."""
    if per_replica <= 0:
        return [None] * replicas, None
    available = sorted(os.sched_getaffinity(0))
    needed = replicas * per_replica
    if len(available) < needed:
        raise ValueError(f"{replicas} replicas x {per_replica} cores need {needed} cores; "
                         f"this process may use {len(available)}")
    plan = [set(available[i * per_replica:(i + 1) * per_replica]) for i in range(replicas)]
    return plan, set(available[needed:]) or set(available)


def open_loop_run(url: str, rate: float, duration_s: float, warmup_s: float, seed: int, out: Path) -> dict:
    """One `ssd-bench --mode open` run (the project's load generator, as a user runs it); its JSON result."""
    command = [sys.executable, "-m", "benchmarks", "--url", url, "--mode", "open", "--rate", f"{rate:.3f}",
               "--duration", str(duration_s), "--warmup", str(warmup_s), "--seed", str(seed), "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + warmup_s + 600)
    if not out.is_file():
        raise RuntimeError(f"ssd-bench failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())["run"]


def measured_capacity(points: list[dict], slo_ms: float) -> float | None:
    """Highest offered rate whose p99 met the SLO (no errors, nothing dropped), interpolated towards the next
    rate that missed it; None if none met it."""
    points = sorted(points, key=lambda p: p["offered_rate"])
    best = None
    for i, point in enumerate(points):
        if not point["meets_slo"]:
            continue
        best = point["offered_rate"]
        following = points[i + 1] if i + 1 < len(points) else None
        if following and not following["meets_slo"] and following["p99_ms"] > point["p99_ms"]:
            share = (slo_ms - point["p99_ms"]) / (following["p99_ms"] - point["p99_ms"])
            best = point["offered_rate"] + share * (following["offered_rate"] - point["offered_rate"])
    return best


def check_replicas(
    model: ReplicaModel, settings: dict, replicas: int, args: argparse.Namespace, work: Path
) -> dict:
    predicted = max_rate_for(model, replicas, args.slo_ms, requests=args.sim_requests, seed=args.seed)
    if predicted is None:
        raise ValueError(f"the model says {replicas} replicas cannot meet p99 {args.slo_ms:g} ms at any rate")
    plan, rest = cpu_plan(replicas, args.cpus_per_replica)
    extra = {"intra_op_threads": args.cpus_per_replica, "decode_workers": args.cpus_per_replica} \
        if args.cpus_per_replica > 0 else {}
    points = []
    with contextlib.ExitStack() as stack:
        urls = []
        for cpus in plan:
            with pinned(cpus):
                urls.append(stack.enter_context(running_server({**settings, **extra})).url)
        lb_work = work / f"nginx-{replicas}"
        lb_work.mkdir(parents=True, exist_ok=True)
        with pinned(rest):
            url = stack.enter_context(running_nginx([u.removeprefix("http://") for u in urls], lb_work))
            for i, fraction in enumerate(args.fractions):
                rate = fraction * predicted.rate
                run = open_loop_run(url, rate, args.duration, args.warmup, args.seed + i,
                                    work / f"run-{replicas}-{i}.json")
                model_here, _, _ = simulate(model, replicas, rate, requests=args.sim_requests, seed=args.seed)
                dropped = (run.get("open_loop") or {}).get("dropped", 0)
                point = {
                    "fraction": fraction, "offered_rate": rate, "images_per_s": run["images_per_s"],
                    "p50_ms": run["latency"]["p50_ms"], "p99_ms": run["latency"]["p99_ms"],
                    "requests": run["requests"], "errors": run["errors"], "dropped": dropped,
                    "late": (run.get("open_loop") or {}).get("late", 0),
                    "predicted_p99_ms": model_here.p99_ms, "predicted_p50_ms": model_here.p50_ms,
                }
                point["meets_slo"] = point["p99_ms"] <= args.slo_ms and not run["errors"] and not dropped
                points.append(point)
                print(f"  N={replicas} offered {rate:7.1f}/s: served {point['images_per_s']:7.1f}/s, "
                      f"p99 {point['p99_ms']:7.1f} ms (model {model_here.p99_ms:7.1f}), "
                      f"errors {point['errors'] or 0}, dropped {dropped}", flush=True)
    measured = measured_capacity(points, args.slo_ms)
    return {
        "replicas": replicas, "predicted": asdict(predicted), "points": points,
        "measured_rate_at_slo": measured,
        "measured_over_predicted": None if measured is None else measured / predicted.rate,
        "cpus": [sorted(c) if c else None for c in plan],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.capacity_check", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--replicas", default="1,2", help="replica counts, comma-separated (default 1,2)")
    p.add_argument("--slo-ms", type=float, default=250.0, help="p99 objective, ms (default 250)")
    p.add_argument("--sweep", type=Path, default=DEFAULT_SWEEP)
    p.add_argument("--setting", default="batching_on", help="the sweep setting: model and server batching settings")
    p.add_argument("--fractions", type=lambda text: [float(v) for v in text.split(",")],
                   default=[0.6, 0.8, 0.9, 1.0, 1.1], help="offered rates as fractions of the predicted one")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per rate (default 30)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each (default 3)")
    p.add_argument("--cpus-per-replica", type=int, default=0, help="pin each replica to this many cores (0: no)")
    p.add_argument("--sim-requests", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/capacity_check.json"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    replica_counts = [int(v) for v in args.replicas.split(",") if v.strip()]
    if not replica_counts or min(replica_counts) < 1 or args.duration <= 0 or not args.fractions:
        print("capacity_check: need replica counts >= 1, a positive duration and fractions", file=sys.stderr)
        return 2
    sweep = json.loads(args.sweep.read_text())
    model = model_from_sweep(sweep, args.setting)
    settings = dict(sweep["settings"][args.setting]["env"])
    print(f"model from {args.sweep} ({model.source}): {model.capacity:.1f} img/s per replica at most; "
          f"server settings {settings}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="ssd-capacity-") as tmp:
        for replicas in replica_counts:
            results.append(check_replicas(model, settings, replicas, args, Path(tmp)))
    print(f"\n| replicas | predicted img/s at p99 <= {args.slo_ms:g} ms | measured img/s at that p99 "
          "| measured / predicted |")
    print("|---:|---:|---:|---:|")
    for r in results:
        measured = "none met it" if r["measured_rate_at_slo"] is None else f"{r['measured_rate_at_slo']:.1f}"
        ratio = "-" if r["measured_over_predicted"] is None else f"{r['measured_over_predicted']:.2f}"
        print(f"| {r['replicas']} | {r['predicted']['rate']:.1f} | {measured} | {ratio} |")
    command = " ".join(["python -m benchmarks.capacity_check", *(argv if argv is not None else sys.argv[1:])])
    out = {"kind": "capacity_check", "command": command,
           "sweep": str(args.sweep), "setting": args.setting, "slo_ms": args.slo_ms, "model": asdict(model),
           "duration_s": args.duration, "cpus_available": len(os.sched_getaffinity(0)), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
