"""The monitoring configuration against real processes: Debian's `prometheus` on loopback scrapes the real server
(tests/conftest.py `server_url`) with docker/prometheus/prometheus.yml and rules.yml, made fast (1 s scrape and
rule evaluation) but otherwise unchanged; /detect traffic with a real photo must make the FPS and p99 latency
recording rules return numbers, and every dashboard query must be accepted by Prometheus."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from _deploy_helpers import (
    DASHBOARD,
    PROMETHEUS_CONFIG,
    PROMETHEUS_RULES,
    SHARED,
    dashboard_expressions,
    free_port,
    prometheus_query,
    require_tool,
    running_prometheus,
    substitute_grafana_variables,
)

PHOTO = SHARED / "data" / "images" / "cats_and_dogs.jpg"
WAIT_S = 60.0  # Prometheus waits ~5 s before its first scrape; rate() then needs two samples
MAX_REQUESTS = 200  # bounded traffic (at most ~10 requests/s), whatever the wait


def _photo() -> bytes:
    if not PHOTO.is_file():
        pytest.skip(f"no test photo at {PHOTO}")
    return PHOTO.read_bytes()


def _replace_once(text: str, old: str, new: str, what: str) -> str:
    count = text.count(old)
    assert count == 1, f"{what}: expected {old!r} once in the file, found it {count} times; update this test"
    return text.replace(old, new)


def derive_config(config: str, rules: str, target: str, own_address: str, rules_path: Path) -> tuple[str, str]:
    """docker/prometheus for a test: the compose target and intervals swapped, nothing else touched."""
    config = _replace_once(config, "scrape_interval: 5s", "scrape_interval: 1s", "prometheus.yml")
    config = _replace_once(config, "scrape_timeout: 4s", "scrape_timeout: 1s", "prometheus.yml")
    config = _replace_once(config, "evaluation_interval: 5s", "evaluation_interval: 1s", "prometheus.yml")
    config = _replace_once(config, '"server:8000"', json.dumps(target), "prometheus.yml")
    config = _replace_once(config, '"localhost:9090"', json.dumps(own_address), "prometheus.yml")
    config = _replace_once(config, "- rules.yml", f"- {json.dumps(str(rules_path))}", "prometheus.yml")
    rules = _replace_once(rules, "interval: 5s", "interval: 1s", "rules.yml")
    return config, rules


@pytest.fixture(scope="module")
def prometheus(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    address = f"127.0.0.1:{free_port()}"
    rules_path = work / "rules.yml"
    config, rules = derive_config(
        PROMETHEUS_CONFIG.read_text(), PROMETHEUS_RULES.read_text(), urlsplit(server_url).netloc, address, rules_path
    )
    rules_path.write_text(rules)
    (work / "prometheus.yml").write_text(config)
    with running_prometheus(work / "prometheus.yml", work, address) as url:
        yield url


def _finite_positive(data: dict) -> bool:
    return any(math.isfinite(float(s["value"][1])) and float(s["value"][1]) > 0 for s in data["result"])


class Traffic:
    """Sequential /detect requests in a thread until stopped or MAX_REQUESTS sent."""

    def __init__(self, server_url: str, image: bytes) -> None:
        self.server_url, self.image = server_url, image
        self.stop = threading.Event()
        self.codes: list[int] = []
        self.thread = threading.Thread(target=self._run, name="detect-traffic", daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.server_url, timeout=30) as client:
            while not self.stop.is_set() and len(self.codes) < MAX_REQUESTS:
                response = client.post("/detect", content=self.image, headers={"content-type": "image/jpeg"})
                self.codes.append(response.status_code)
                self.stop.wait(0.1)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def test_recording_rules_produce_fps_and_p99_latency(server_url: str, prometheus: str) -> None:
    fps = "ssd:images_processed:rate1m"
    p99 = 'endpoint:ssd_request_duration_seconds:p99_1m{endpoint="/detect"}'
    with Traffic(server_url, _photo()) as traffic:
        deadline = time.monotonic() + WAIT_S
        while True:
            fps_data, p99_data = prometheus_query(prometheus, fps), prometheus_query(prometheus, p99)
            if _finite_positive(fps_data) and _finite_positive(p99_data):
                break
            if time.monotonic() > deadline:
                targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
                pytest.fail(
                    f"no FPS / p99 after {WAIT_S:.0f} s: {fps}={fps_data['result']} {p99}={p99_data['result']}; "
                    f"requests sent {len(traffic.codes)} (codes {sorted(set(traffic.codes))}); targets "
                    + json.dumps([(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets])
                )
            time.sleep(0.5)
    assert traffic.codes and set(traffic.codes) == {200}, sorted(set(traffic.codes))
    assert len(traffic.codes) <= MAX_REQUESTS
    p99_seconds = float(p99_data["result"][0]["value"][1])
    assert 0 < p99_seconds < 30

    # With data in, each recording rule the dashboard relies on has a series.
    for expr in ("ssd:batch_size:mean_1m", "endpoint:ssd_request_duration_seconds:p50_1m",
                 "endpoint:ssd_request_duration_seconds:p95_1m", "ssd:requests_errors:ratio_rate1m",
                 "ssd:inference_duration_seconds:p99_1m"):
        assert prometheus_query(prometheus, expr)["result"], f"{expr} has no series"
    # Only 200s on /detect: the /readyz 503s the server answered while loading (tests poll it) are not errors.
    (errors,) = prometheus_query(prometheus, "ssd:requests_errors:ratio_rate1m")["result"]
    assert float(errors["value"][1]) == 0, errors


def test_prometheus_accepts_every_dashboard_query(prometheus: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for _, expr in dashboard_expressions(dashboard):
        prometheus_query(prometheus, substitute_grafana_variables(expr))
