"""docker-compose.yml (GPU) and docker-compose.cpu.yml (CPU override) are valid and wired as documented.

`docker-compose config` (Debian's docker-compose v1, no engine needed) validates and merges the files; the
structure checks read its merged output.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

import pytest

from _deploy_helpers import REPO, require_tool

GPU = ["-f", "docker-compose.yml"]
CPU = ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml"]
# Required by the compose file (no default); a test value, as a user would export theirs.
PASSWORD = {"GRAFANA_ADMIN_PASSWORD": "test-only-password"}


def compose_config(files: list[str], **variables: str) -> str:
    return _compose_config(tuple(files), tuple(sorted({**PASSWORD, **variables}.items())))


def compose_config_result(files: list[str], variables: dict[str, str]) -> subprocess.CompletedProcess[str]:
    tool = require_tool("docker-compose")
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "LC_ALL") if key in os.environ}
    env.update(variables)
    return subprocess.run([tool, *files, "config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@functools.lru_cache(maxsize=None)
def _compose_config(files: tuple[str, ...], variables: tuple[tuple[str, str], ...]) -> str:
    tool = require_tool("docker-compose")
    # Only the given variables: a developer's SSD_*, WEIGHTS_MIRROR or COMPOSE_* must not change the result.
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "LC_ALL") if key in os.environ}
    env.update(variables)
    result = subprocess.run(
        [tool, *files, "config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"docker-compose {' '.join(files)} config failed:\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("files", [GPU, CPU], ids=["gpu", "cpu"])
def test_compose_config_is_valid(files: list[str]) -> None:
    compose_config(files)


def _services(files: list[str], **variables: str) -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the merged compose file")
    return yaml.safe_load(compose_config(files, **variables))["services"]


def _started(services: dict) -> dict:
    """The services `docker compose up` starts: those without a profile."""
    return {name: service for name, service in services.items() if not service.get("profiles")}


def _image_is_pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return "@sha256:" in image or (bool(name) and "/" not in tag and tag not in ("", "latest"))


def test_gpu_stack() -> None:
    services = _started(_services(GPU))
    assert set(services) == {"server", "prometheus", "grafana"}
    server = services["server"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile"
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    env = server["environment"]
    assert env["SSD_HOST"] == "0.0.0.0"
    assert env["SSD_ENGINE"] == "tensorrt"
    assert any(str(v).startswith("model-cache:/cache") for v in server["volumes"]), server["volumes"]
    for name in ("prometheus", "grafana"):
        assert _image_is_pinned(services[name]["image"]), services[name]["image"]


def test_cpu_stack_has_no_gpu_and_keeps_the_server_name() -> None:
    services = _started(_services(CPU))
    assert set(services) == {"model-init-cpu", "server-cpu", "prometheus", "grafana"}
    for name, service in services.items():
        assert "devices" not in str(service.get("deploy", {})), f"{name} still reserves a device"
    server = services["server-cpu"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert server["environment"]["SSD_ENGINE"] == "onnxruntime"
    assert server["environment"]["SSD_DEVICE"] == "cpu"
    assert server["environment"]["SSD_HOST"] == "0.0.0.0"
    # Prometheus scrapes server:8000 in both variants.
    assert "server" in server["networks"]["default"]["aliases"]
    assert any(str(v).startswith("model-cache:/cache") for v in server["volumes"]), server["volumes"]


def test_cpu_stack_exports_in_an_init_service_then_serves_from_the_server_only_image() -> None:
    services = _started(_services(CPU))
    init, server = services["model-init-cpu"], services["server-cpu"]
    assert init["build"]["target"] == "exporter" and init["command"] == ["export"]
    assert server["build"]["target"] == "runtime"
    assert server["depends_on"]["model-init-cpu"]["condition"] == "service_completed_successfully"
    assert any(str(v).startswith("model-cache:/cache") for v in init["volumes"]), init["volumes"]
    for name in ("MODEL_NAME", "MODEL_WEIGHTS", "MODEL_NUMERICS", "SSD_ENGINE"):  # both name the same cached file
        assert init["environment"].get(name) == server["environment"].get(name), name


def test_monitoring_mounts_the_repository_configuration() -> None:
    services = _services(GPU)
    prometheus_volumes = " ".join(map(str, services["prometheus"]["volumes"]))
    assert re.search(r"docker/prometheus:/etc/prometheus:ro", prometheus_volumes)
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grafana_volumes = " ".join(map(str, services["grafana"]["volumes"]))
    for inside in ("/etc/grafana/provisioning/datasources", "/etc/grafana/provisioning/dashboards",
                   "/var/lib/grafana/dashboards"):
        assert inside in grafana_volumes
    assert "server:8000" in (REPO / "docker" / "prometheus" / "prometheus.yml").read_text()


@pytest.mark.parametrize(("files", "service"), [(GPU, "server"), (CPU, "server-cpu"), (CPU, "model-init-cpu")],
                         ids=["gpu", "cpu", "cpu-init"])
def test_weights_mirror_from_a_host_directory(files: list[str], service: str, tmp_path: Path) -> None:
    default = _started(_services(files))[service]
    assert not default["environment"].get("WEIGHTS_MIRROR"), "no mirror unless asked for: download by default"
    mirror = str(tmp_path)
    server = _started(_services(files, WEIGHTS_MIRROR=mirror))[service]
    assert server["environment"]["WEIGHTS_MIRROR"] == mirror  # the entrypoint then reads /weights-mirror
    assert f"{mirror}:/weights-mirror:ro" in [str(v) for v in server["volumes"]]
    assert "SSD_WEIGHTS_MIRROR" not in server["environment"], "a host path must not reach the container's settings"


@pytest.mark.parametrize("files", [GPU, CPU], ids=["gpu", "cpu"])
def test_grafana_admin_password_is_required_and_has_no_default(files: list[str]) -> None:
    for variables in ({}, {"GRAFANA_ADMIN_PASSWORD": ""}):
        result = compose_config_result(files, variables)
        assert result.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in result.stderr, result.stderr
    grafana = _services(files)["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == PASSWORD["GRAFANA_ADMIN_PASSWORD"]


def _published(service: dict) -> list[tuple[str, str]]:
    """(host address, host port) of each published port; docker-compose v1 prints them as ip:port:target/tcp."""
    found = []
    for port in service["ports"]:
        if isinstance(port, dict):
            found.append((port.get("host_ip", ""), str(port["published"])))
        else:
            parts = str(port).split(":")
            found.append((parts[0] if len(parts) == 3 else "", parts[-2]))
    return found


@pytest.mark.parametrize("files", [GPU, CPU], ids=["gpu", "cpu"])
def test_monitoring_is_published_on_loopback_unless_asked(files: list[str]) -> None:
    services = _services(files)
    assert _published(services["prometheus"]) == [("127.0.0.1", "9090")]
    assert _published(services["grafana"]) == [("127.0.0.1", "3000")]
    opened = _services(files, MONITORING_BIND_ADDRESS="0.0.0.0", PROMETHEUS_PUBLISH_PORT="19090")
    assert _published(opened["prometheus"]) == [("0.0.0.0", "19090")]
    assert _published(opened["grafana"]) == [("0.0.0.0", "3000")]


def test_prometheus_lifecycle_api_is_off() -> None:
    command = _services(GPU)["prometheus"]["command"]
    assert not any("enable-lifecycle" in str(arg) or "enable-admin-api" in str(arg) for arg in command), command
