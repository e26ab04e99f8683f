"""gpu-check's end-to-end step: one server on the GPU, saturated over HTTP by several ssd-bench processes.

Reports images/s (all clients together), p50 and p99 (the median of the clients' p50s, the worst of their p99s),
mean batch size, GPU utilisation (nvidia-smi sampled every 200 ms during the measured run) and the server process's
CPU use (cores, from /proc; its event loop's from ssd_event_loop_cpu_seconds_total), so the table says what limited
the run: the GPU, the server's one event loop (near 1.0 core), or the clients. `/detect/batch` loads send several
images per request: they show how much of the loop's cost is per request rather than per image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks.server_proc; gpu_check.py runs with scripts/ on the path, not the repo
SERVER_SETTINGS = {"max_batch_size": 64, "max_queue_delay_ms": 2, "max_queue_size": 2048,
                   "request_timeout_ms": 30000}


def _gpu_sampler() -> subprocess.Popen[str] | None:
    try:
        return subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                 "-lms", "200", "-i", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
    except FileNotFoundError:
        return None


def _gpu_utilisation(sampler: subprocess.Popen[str] | None) -> float | None:
    if sampler is None:
        return None
    sampler.terminate()
    out, _ = sampler.communicate(timeout=10)
    values = [float(v) for v in out.split() if v.strip().replace(".", "", 1).isdigit()]
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class Load:
    """One measured run against the server: `processes` ssd-bench clients of `connections` each."""

    label: str
    processes: int
    connections: int
    images_per_request: int = 1  # > 1: /detect/batch

    def arguments(self) -> list[str]:
        if self.images_per_request == 1:
            return ["--concurrency", str(self.connections)]
        return ["--concurrency", str(self.connections), "--endpoint", "batch", "--images-per-request",
                str(self.images_per_request)]


def run_e2e(model: Path, settings: dict[str, object], loads: list[Load], seconds: float, env: dict[str, str],
            out: Path) -> list[tuple[Load, str, bool]]:
    """One server, each load in turn against it: (load, detail, passed) for each."""
    from benchmarks.server_proc import running_server

    os.environ.update({k: v for k, v in env.items() if k.startswith(("SSD_", "PYTHONPATH"))})
    with running_server({**SERVER_SETTINGS, **settings}, model=model, ready_timeout_s=240.0) as server:
        return [(load, *_measure(server, load, model, seconds, env, out)) for load in loads]


def _measure(server, load: Load, model: Path, seconds: float, env: dict[str, str],  # noqa: ANN001
             out: Path) -> tuple[str, bool]:
    from server.metrics import cpu_seconds

    jsons = [out / f"e2e-{model.stem}-{load.images_per_request}x-{i}.json" for i in range(load.processes)]
    command = [sys.executable, "-m", "benchmarks", "--url", server.url, *load.arguments(), "--duration", str(seconds),
               "--warmup", "3"]
    sampler_start = time.monotonic() + 3.0  # after the clients' warm-up
    benches = [subprocess.Popen([*command, "--json", str(path)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for path in jsons]
    time.sleep(max(0.0, sampler_start - time.monotonic()))
    stat = Path(f"/proc/{server.pid}/stat")
    cpu_before, wall_before = cpu_seconds(stat), time.monotonic()
    sampler = _gpu_sampler()
    time.sleep(seconds)
    utilisation = _gpu_utilisation(sampler)
    server_cores = (cpu_seconds(stat) - cpu_before) / (time.monotonic() - wall_before)
    errors = []
    for bench in benches:
        _, stderr = bench.communicate(timeout=seconds + 60)
        if bench.returncode != 0:
            errors.append(stderr.strip().splitlines()[-1:] or ["?"])
    runs = [json.loads(path.read_text())["run"] for path in jsons if path.is_file()]
    if not runs:
        return f"no client finished: {errors[:1]}", False
    images = sum(r["images_per_s"] for r in runs)
    p50 = median(r["latency"]["p50_ms"] for r in runs)
    p99 = max(r["latency"]["p99_ms"] for r in runs)
    failed = sum(sum(r["errors"].values()) for r in runs)
    client_cpu = sum(r["client_cpu_fraction"] for r in runs)
    batch = median((r.get("server") or {}).get("mean_batch_size") or 0 for r in runs)
    loop_cores = median((r.get("server") or {}).get("event_loop_cpu_s", 0.0) / r["elapsed_s"] for r in runs)
    gpu = f"{utilisation:.0f}%" if utilisation is not None else "n/a (no nvidia-smi)"
    detail = (f"{images:.0f} img/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms (per request), {failed} errors; GPU {gpu}, "
              f"server {server_cores:.2f} cores (event loop {loop_cores:.2f}), clients {client_cpu:.2f} cores, "
              f"mean batch {batch:.1f} ({load.processes}x{load.connections} connections)")
    return detail, failed == 0 and not errors
