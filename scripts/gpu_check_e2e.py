"""gpu-check's end-to-end step: one server on the GPU, saturated over HTTP by several ssd-bench processes.

Reports images/s (all clients together), p50 and p99 (the median of the clients' p50s, the worst of their p99s),
mean batch size, GPU utilisation (nvidia-smi sampled every 200 ms during the measured run) and the server process's
CPU use (cores, from /proc), so the table says what limited the run: the GPU, the server's one event loop (about
one core), or the clients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
CLIENT_PROCESSES = 4
CONNECTIONS_PER_CLIENT = 64
SERVER_SETTINGS = {"max_batch_size": 64, "max_queue_delay_ms": 2, "max_queue_size": 2048,
                   "request_timeout_ms": 30000}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


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


def run_e2e(model: Path, settings: dict[str, object], seconds: float, env: dict[str, str],
            out: Path) -> tuple[str, bool]:
    from benchmarks.server_proc import running_server

    os.environ.update({k: v for k, v in env.items() if k.startswith(("SSD_", "PYTHONPATH"))})
    with running_server({**SERVER_SETTINGS, **settings}, model=model, ready_timeout_s=240.0) as server:
        jsons = [out / f"e2e-{model.stem}-{i}.json" for i in range(CLIENT_PROCESSES)]
        command = [sys.executable, "-m", "benchmarks", "--url", server.url, "--concurrency",
                   str(CONNECTIONS_PER_CLIENT), "--duration", str(seconds), "--warmup", "3"]
        sampler_start = time.monotonic() + 3.0  # after the clients' warm-up
        clients = [subprocess.Popen([*command, "--json", str(path)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True) for path in jsons]
        time.sleep(max(0.0, sampler_start - time.monotonic()))
        cpu_before, wall_before = _cpu_seconds(server.pid), time.monotonic()
        sampler = _gpu_sampler()
        time.sleep(seconds)
        utilisation = _gpu_utilisation(sampler)
        server_cores = (_cpu_seconds(server.pid) - cpu_before) / (time.monotonic() - wall_before)
        errors = []
        for client in clients:
            _, stderr = client.communicate(timeout=seconds + 60)
            if client.returncode != 0:
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
    gpu = f"{utilisation:.0f}%" if utilisation is not None else "n/a (no nvidia-smi)"
    detail = (f"{images:.0f} img/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms, {failed} errors; GPU {gpu}, server "
              f"{server_cores:.2f} cores, clients {client_cpu:.2f} cores, mean batch {batch:.1f} "
              f"({CLIENT_PROCESSES}x{CONNECTIONS_PER_CLIENT} connections)")
    return detail, failed == 0 and not errors
