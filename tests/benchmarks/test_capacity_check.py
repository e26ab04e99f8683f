"""benchmarks.capacity_check: a real nginx in front of the real server (tests/conftest.py `server_url`), one short
open-loop run through it with the project's load generator, and the bookkeeping of the measured capacity."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from benchmarks.capacity_check import cpu_plan, measured_capacity, open_loop_run, running_nginx

PHOTO = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "images" / "cats_and_dogs.jpg"


def _point(rate: float, p99: float, slo: float = 100.0) -> dict:
    return {"offered_rate": rate, "p99_ms": p99, "meets_slo": p99 <= slo}


def test_measured_capacity_interpolates_to_the_slo() -> None:
    points = [_point(10, 40), _point(20, 60), _point(30, 140), _point(40, 900)]
    assert measured_capacity(points, 100.0) == pytest.approx(20 + 10 * (100 - 60) / (140 - 60))
    assert measured_capacity([_point(10, 40), _point(20, 80)], 100.0) == 20  # none missed: the highest tried
    assert measured_capacity([_point(10, 400)], 100.0) is None


def test_cpu_plan_gives_each_replica_its_own_cores() -> None:
    plan, rest = cpu_plan(2, 0)
    assert plan == [None, None] and rest is None
    cores = len(os.sched_getaffinity(0))
    if cores >= 3:
        plan, rest = cpu_plan(2, 1)
        assert len(plan[0]) == len(plan[1]) == 1 and not plan[0] & plan[1] and rest and not rest & (plan[0] | plan[1])
    if cores >= 2:  # every core to a replica: nginx and the load generator share them all
        plan, rest = cpu_plan(2, cores // 2)
        assert not plan[0] & plan[1] and rest == set(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="cores"):
        cpu_plan(2, cores)


def test_nginx_balances_the_real_server_and_ssd_bench_runs_through_it(server_url: str, tmp_path: Path) -> None:
    if shutil.which("nginx") is None and shutil.which("nginx", path="/usr/sbin:/sbin") is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    if not PHOTO.is_file():
        pytest.skip(f"no test photo at {PHOTO}")
    upstream = server_url.removeprefix("http://")
    with running_nginx([upstream, upstream], tmp_path) as url:
        response = httpx.post(f"{url}/detect", content=PHOTO.read_bytes(),
                              headers={"content-type": "image/jpeg"}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["detections"]
        run = open_loop_run(url, rate=4.0, duration_s=1.0, warmup_s=0.0, seed=0, out=tmp_path / "run.json")
    assert run["config"]["mode"] == "open" and run["config"]["rate"] == pytest.approx(4.0)
    assert run["requests"] >= 1 and run["ok"] == run["requests"] and not run["errors"], run
    assert run["latency"]["p99_ms"] > 0
