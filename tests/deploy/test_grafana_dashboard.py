"""docker/grafana: the provisioned dashboard parses, points at the provisioned datasource, its PromQL is valid,
and it reads only series that exist: metrics the live server exports (/metrics of the real server) or that the
recording rules define."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from _deploy_helpers import (
    DASHBOARD,
    DOCKER,
    PROMETHEUS_RULES,
    PROMETHEUS_SYNTHETIC,
    dashboard_expressions,
    dashboard_variable_metrics,
    metric_names,
    recorded_names,
    require_tool,
    rule_expressions,
    substitute_grafana_variables,
)

# The metrics the server promises (issue: exact names). The dashboard or the rules must read each of them.
SERVER_METRICS = {
    "ssd_requests_total", "ssd_request_duration_seconds", "ssd_queue_wait_seconds", "ssd_decode_duration_seconds",
    "ssd_inference_duration_seconds", "ssd_batch_size", "ssd_images_processed_total", "ssd_images_per_second",
    "ssd_requests_in_flight", "ssd_queue_depth", "ssd_rejected_requests_total", "ssd_model_info",
}
PANEL_TOPICS = ["fps", "latency", "batch size", "queue depth", "inference", "error"]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_parses_and_is_complete(dashboard: dict) -> None:
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " | ".join(panel["title"].lower() for panel in panels)
    for topic in PANEL_TOPICS:
        assert topic in titles, f"no panel about {topic}: {titles}"
    assert len(dashboard_expressions(dashboard)) >= 15


def test_dashboard_uses_the_provisioned_datasource(dashboard: dict) -> None:
    provisioning = (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    uid = re.search(r"^\s+uid:\s*(\S+)\s*$", provisioning, re.MULTILINE).group(1)
    assert re.search(r"url:\s*http://prometheus:9090", provisioning)
    dashboards = (DOCKER / "grafana" / "provisioning" / "dashboards" / "ssd-serve.yml").read_text()
    assert re.search(r"path:\s*/var/lib/grafana/dashboards", dashboards)

    def walk(node: object) -> list[dict]:
        if isinstance(node, dict):
            found = [node["datasource"]] if isinstance(node.get("datasource"), dict) else []
            return found + [d for value in node.values() for d in walk(value)]
        if isinstance(node, list):
            return [d for value in node for d in walk(value)]
        return []

    # Every query goes through the ${datasource} variable, whose default is the provisioned datasource.
    sources = walk(dashboard)
    assert sources and all(source == {"type": "prometheus", "uid": "${datasource}"} for source in sources), sources
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    assert datasource["current"]["value"] == uid


def test_every_query_selects_the_instance_variable(dashboard: dict) -> None:
    """Replicas are shown one by one (or summed on purpose over the selected ones), never blindly together."""
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    instance = variables["instance"]
    assert instance["multi"] and instance["includeAll"]
    assert "instance" in instance["definition"] and instance["query"]["query"] == instance["definition"]
    for title, expr in dashboard_expressions(dashboard):
        selectors = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*\{[^}]*\}", expr)
        bare = metric_names(expr) - {re.match(r"[^{]+", s).group(0) for s in selectors}
        assert not bare, f"panel {title!r} reads {sorted(bare)} without a selector: {expr}"
        for selector in selectors:
            assert 'instance=~"$instance"' in selector, f"panel {title!r}: {selector} ignores $instance"


def test_dashboard_promql_is_valid(dashboard: dict, tmp_path: Path) -> None:
    """promtool parses every dashboard expression, wrapped as a recording rule (no server needed)."""
    promtool = require_tool("promtool")
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(dashboard_expressions(dashboard)):
        lines += [f"      - record: dashboard:expr:{i}", f"        expr: {json.dumps(substitute_grafana_variables(expr))}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_server_metric_is_used(dashboard: dict) -> None:
    used: set[str] = set()
    for _, expr in dashboard_expressions(dashboard):
        used |= metric_names(expr)
    for expr in rule_expressions(PROMETHEUS_RULES.read_text()):
        used |= metric_names(expr)
    bases = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert SERVER_METRICS <= bases, f"not shown anywhere: {sorted(SERVER_METRICS - bases)}"


def test_dashboard_and_rules_read_only_exported_or_recorded_series(dashboard: dict, live_series: set[str]) -> None:
    rules_text = PROMETHEUS_RULES.read_text()
    known = live_series | recorded_names(rules_text) | PROMETHEUS_SYNTHETIC
    unknown = {}
    for title, expr in dashboard_expressions(dashboard):
        missing = metric_names(expr) - known
        if missing:
            unknown[f"panel {title!r}: {expr}"] = sorted(missing)
    for expr in rule_expressions(rules_text):
        missing = metric_names(expr) - known
        if missing:
            unknown[f"rule: {expr}"] = sorted(missing)
    missing_vars = dashboard_variable_metrics(dashboard) - known
    if missing_vars:
        unknown["template variables"] = sorted(missing_vars)
    assert not unknown, "series neither exported by the server's /metrics nor recorded:\n" + "\n".join(
        f"  {where}: {names}" for where, names in unknown.items()
    )
