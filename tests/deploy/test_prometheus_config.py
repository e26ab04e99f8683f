"""docker/prometheus: promtool accepts the configuration and the rules, and the rules record what the dashboard
and the README promise (FPS, p50/p95/p99 latency, mean batch size, error rate)."""

from __future__ import annotations

import json
import re
import subprocess

from _deploy_helpers import PROMETHEUS_CONFIG, PROMETHEUS_RULES, recorded_names, require_tool

REQUIRED_RECORDINGS = {
    "ssd:images_processed:rate1m",  # FPS
    "endpoint:ssd_request_duration_seconds:p50_1m",
    "endpoint:ssd_request_duration_seconds:p95_1m",
    "endpoint:ssd_request_duration_seconds:p99_1m",
    "ssd:batch_size:mean_1m",
    "endpoint:ssd_requests_errors:ratio_rate1m",
    "ssd:requests_errors:ratio_rate1m",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, timeout=60)


def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(PROMETHEUS_RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_recording_rules_exist_and_follow_the_naming_convention() -> None:
    names = recorded_names(PROMETHEUS_RULES.read_text())
    assert REQUIRED_RECORDINGS <= names, REQUIRED_RECORDINGS - names
    for name in names:
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), f"{name}: use level:metric:operations"


def test_scrape_every_five_seconds_and_load_the_rules() -> None:
    config = PROMETHEUS_CONFIG.read_text()
    assert re.search(r"^\s+scrape_interval:\s*5s\s*$", config, re.MULTILINE)
    assert re.search(r"^rule_files:\s*\n\s+-\s*rules\.yml\s*$", config, re.MULTILINE)
    assert '"server:8000"' in config


def test_error_ratio_leaves_out_probe_and_scrape_traffic(tmp_path) -> None:
    """promtool's rule unit test: 5xx on /readyz (loading, draining) and scrapes of /metrics do not count; a 5xx
    on /detect does, as a share of /detect traffic only."""
    tests = tmp_path / "rules_test.yml"
    series = {
        '/detect", code="200': "0+18x20",  # 0.3/s
        '/detect", code="503': "0+6x20",  # 0.1/s
        '/readyz", code="503': "0+60x20",  # 1/s of 503s: a draining server's probes
        '/healthz", code="200': "0+60x20",
        '/metrics", code="200': "0+12x20",
    }
    lines = [f"rule_files: [{json.dumps(str(PROMETHEUS_RULES))}]", "evaluation_interval: 1m", "tests:",
             "  - interval: 1m", "    input_series:"]
    for labels, values in series.items():
        lines += [f"      - series: 'ssd_requests_total{{instance=\"a:8000\", endpoint=\"{labels}\"}}'",
                  f"        values: '{values}'"]
    lines += [
        "    promql_expr_test:",
        "      - expr: ssd:requests_errors:ratio_rate1m",
        "        eval_time: 10m",
        "        exp_samples:",
        "          - labels: 'ssd:requests_errors:ratio_rate1m{instance=\"a:8000\"}'",
        "            value: 0.25",
        "      - expr: count(endpoint:ssd_requests_errors:ratio_rate1m)",
        "        eval_time: 10m",
        "        exp_samples:",
        "          - labels: '{}'",
        "            value: 1",
    ]
    tests.write_text("\n".join(lines) + "\n")
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
