"""deploy/kubernetes against real processes: the probe paths answer on the real server (tests/conftest.py
`server_url`), and the HPA's metric exists: a real Prometheus scrapes the server's /metrics with the labels a
ServiceMonitor gives (namespace, pod), and the prometheus-adapter rule's seriesQuery finds the series and its
metricsQuery, templated as the adapter does for `kubectl get --raw .../pods/*/<metric>`, returns one value per pod
that rises with requests in flight."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from _deploy_helpers import SHARED, free_port, prometheus_query, require_tool, running_prometheus
from _kubernetes_manifests import adapter_rule, pod_spec, render, server_container

NAMESPACE, POD = "ssd-test", "ssd-serve-7d9f-abcde"
PHOTO = SHARED / "data" / "images" / "cats_and_dogs.jpg"
CLIENTS = 4
MAX_REQUESTS = 4000  # bounded traffic that lasts until the metric is seen (400 can end before the first scrape)
WAIT_S = 60.0


@pytest.mark.parametrize("kustomization", ["overlays/cpu", "overlays/gpu", "kserve"])
def test_probe_paths_answer_on_the_real_server(kustomization: str, server_url: str) -> None:
    container = server_container(pod_spec(render(kustomization)))
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        if name in container:
            path = container[name]["httpGet"]["path"]
            response = httpx.get(f"{server_url}{path}", timeout=10)
            assert response.status_code == 200, f"{name} {path}: {response.status_code} {response.text}"


def test_hpa_metric_is_in_the_live_metrics(live_series: set[str]) -> None:
    series = re.fullmatch(r"(\w+)\{.*\}", adapter_rule()["seriesQuery"]).group(1)
    assert series in live_series, f"{series} is not in the server's /metrics"


@pytest.fixture(scope="module")
def prometheus(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus scraping the server every second, its series labelled as a ServiceMonitor labels them."""
    require_tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus-k8s")
    address = f"127.0.0.1:{free_port()}"
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "ssd-serve",
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [urlsplit(server_url).netloc], "labels": {"namespace": NAMESPACE, "pod": POD}}
                ],
            }
        ],
    }
    path = work / "prometheus.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    with running_prometheus(path, work, address) as url:
        yield url


def adapter_query(template: str, series: str, pods: list[str]) -> str:
    """The adapter's Go template for a pods query in NAMESPACE, as prometheus-adapter fills it."""
    matchers = f'namespace="{NAMESPACE}",pod=~"{"|".join(pods)}"'
    query = template.replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
    query = query.replace("<<.GroupBy>>", "pod")
    assert "<<" not in query, f"a template field this test does not fill: {query}"
    return query


class Traffic:
    """CLIENTS concurrent /detect loops until stopped or MAX_REQUESTS sent."""

    def __init__(self, server_url: str, image: bytes) -> None:
        self.server_url, self.image = server_url, image
        self.stop = threading.Event()
        self.codes: list[int] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.server_url, timeout=60) as client:
            while not self.stop.is_set() and len(self.codes) < MAX_REQUESTS:
                response = client.post("/detect", content=self.image, headers={"content-type": "image/jpeg"})
                self.codes.append(response.status_code)

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def test_adapter_rule_yields_the_hpa_metric_per_pod(server_url: str, prometheus: str) -> None:
    if not PHOTO.is_file():
        pytest.skip(f"no test photo at {PHOTO}")
    rule = adapter_rule()
    hpa = render("overlays/cpu")["HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]

    with Traffic(server_url, Path(PHOTO).read_bytes()) as traffic:
        deadline = time.monotonic() + WAIT_S
        while True:
            # 1. discovery: the seriesQuery finds the series, with the labels the resource overrides name.
            response = httpx.get(f"{prometheus}/api/v1/series", params={"match[]": rule["seriesQuery"]}, timeout=10)
            found = response.json()["data"]
            value = None
            if found:
                (labels,) = found
                assert set(rule["resources"]["overrides"]) <= labels.keys(), labels
                series = labels["__name__"]
                assert re.sub(rule["name"]["matches"], rule["name"]["as"], series) == rule["name"]["as"]
                # 2. the value the HPA gets for this pod.
                result = prometheus_query(prometheus, adapter_query(rule["metricsQuery"], series, [POD]))["result"]
                if result:
                    (sample,) = result
                    assert sample["metric"] == {"pod": POD}, sample["metric"]
                    value = float(sample["value"][1])
                    assert math.isfinite(value) and 0 <= value <= CLIENTS + 1, value
            if value:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"no positive {rule['name']['as']} after {WAIT_S:.0f} s (series {found}, value {value}); "
                            f"requests {len(traffic.codes)}, codes {sorted(set(traffic.codes))}")
            time.sleep(0.5)
    assert set(traffic.codes) == {200}, sorted(set(traffic.codes))
    # Another pod's matcher selects nothing: the value is this pod's own.
    other = adapter_query(rule["metricsQuery"], series, ["ssd-serve-other"])
    assert prometheus_query(prometheus, other)["result"] == []
