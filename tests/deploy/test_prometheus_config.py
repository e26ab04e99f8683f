"""docker/prometheus: promtool accepts the configuration and the rules, and the rules record what the dashboard
and the README promise (FPS, p50/p95/p99 latency, mean batch size, error rate)."""

from __future__ import annotations

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
