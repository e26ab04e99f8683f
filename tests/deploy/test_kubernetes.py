"""deploy/kubernetes without a cluster: every kustomization renders (`kubectl kustomize`), the built-in kinds pass
`kubernetes-validate --strict` (its bundled Kubernetes OpenAPI schemas), and the rendered objects agree with each
other and with the server: probes on the app's real routes, ports equal to the Service's and to SSD_PORT /
SSD_GRPC_PORT, a grace period longer than preStop + drain + the in-flight bound, the HPA's metric the adapter's.

kubernetes-validate has no schema for the CRD kinds (ServiceMonitor, InferenceService): it reports them as
unknown, and the tests here check the fields of theirs that the setup relies on (selectors, ports, probe paths).
The live half (probes answered by a real server, the adapter's query against a real Prometheus) is in
test_kubernetes_live.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from _deploy_helpers import REPO, require_tool
from _kubernetes_manifests import (
    BUILT_IN,
    CRD_KINDS,
    KUSTOMIZATIONS,
    OVERLAYS,
    PENDING_SETTINGS,
    adapter_rule,
    config,
    pod_spec,
    render,
    render_text,
    seconds,
    server_container,
    yaml,
)
from server.settings import Settings

# --- rendering and schemas ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders(kustomization: str) -> None:
    kinds = set(render(kustomization))
    expected = {"ConfigMap", "InferenceService"} if kustomization == "kserve" else BUILT_IN | {"ServiceMonitor"}
    assert kinds == expected


def _validate(path: Path, version: str | None = None) -> subprocess.CompletedProcess[str]:
    tool = require_tool("kubernetes-validate")
    command = [tool, "--strict", *(["-k", version] if version else []), str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


# The oldest Kubernetes the manifests are for (HPA behavior, PDB unhealthyPodEvictionPolicy), and the newest
# schemas kubernetes-validate ships (its default).
@pytest.mark.parametrize("version", ["1.27.0", None], ids=["k8s-1.27", "k8s-latest"])
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_built_in_kinds_pass_kubernetes_validate_strict(kustomization: str, version: str | None, tmp_path: Path) -> None:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(render_text(kustomization))
    result = _validate(rendered, version)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for kind in set(render(kustomization)) & BUILT_IN:
        assert re.search(rf"passed for resource {kind.lower()}/", output), f"{kind} was not validated:\n{output}"
    for kind in set(render(kustomization)) & CRD_KINDS:
        assert f"Couldn't find schema for kind {kind}" in output, output


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The check above can fail: the same Deployment with a misspelt field does not pass."""
    deployment = render("overlays/cpu")["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(deployment))
    result = _validate(broken)
    assert result.returncode != 0 and "readinesProbe" in result.stdout + result.stderr


# --- invariants --------------------------------------------------------------------------------------------------


def app_routes() -> set[str]:
    from server.app import create_app

    app = create_app(Settings())
    # Routers included into the app (KServe v2) keep their routes to themselves; the OpenAPI schema lists them.
    return {route.path for route in app.routes if hasattr(route, "path")} | set(app.openapi()["paths"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_probes_hit_real_routes_on_the_server_port(kustomization: str) -> None:
    objects = render(kustomization)
    container = server_container(pod_spec(objects))
    ports = {port.get("name"): port["containerPort"] for port in container["ports"]}
    routes = app_routes()
    probes = {name: container.get(name) for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    if kustomization != "kserve":  # KServe's own readiness gate waits for the container; no startup probe there
        assert probes["startupProbe"]["httpGet"]["path"] == "/healthz"
        startup = probes["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "the startup window covers an export"
    for name, probe in probes.items():
        if probe is None:
            continue
        path, port = probe["httpGet"]["path"], probe["httpGet"]["port"]
        assert path in routes, f"{name} {path} is not a route of the app: {sorted(routes)}"
        assert ports.get(port, port) == int(config(objects)["SSD_PORT"]), f"{name} port {port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_match_service_and_settings(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    data = config(objects)
    container = server_container(pod_spec(objects))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": int(data["SSD_PORT"]), "grpc": int(data["SSD_GRPC_PORT"])}
    assert data["SSD_HOST"] == "0.0.0.0", "the server must listen on the pod's address, not loopback"
    service = objects["Service"]["spec"]
    by_name = {port["name"]: port for port in service["ports"]}
    assert set(by_name) == set(ports)
    for name, port in by_name.items():
        assert port["targetPort"] in (name, ports[name])
        assert port["port"] == ports[name]
    assert (service["ports"][0]["port"], service["ports"][1]["port"]) == (8000, 8001)  # Triton's, the README's


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_pick_the_server_pods(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    deployment_selector = objects["Deployment"]["spec"]["selector"]["matchLabels"]
    for selector in (
        deployment_selector,
        objects["Service"]["spec"]["selector"],
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items(), (selector, pod_labels)
    monitor = objects["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= objects["Service"]["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {port["name"] for port in objects["Service"]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and "/metrics" in app_routes()
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ssd-serve"}
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] < hpa["minReplicas"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_settings_are_server_settings(kustomization: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SSD_* key is a Settings field, and the values parse (as the server would read them)."""
    data = config(render(kustomization))
    fields = {f"SSD_{name.upper()}" for name in Settings.model_fields}
    unknown = {key for key in data if key.startswith("SSD_")} - fields
    pending = {key: PENDING_SETTINGS[key] for key in unknown & PENDING_SETTINGS.keys()}
    assert not unknown - pending.keys(), f"not server settings: {sorted(unknown - pending.keys())}"
    for key, value in data.items():
        if key.startswith("SSD_"):
            monkeypatch.setenv(key, value)
    if data.get("SSD_ENGINE") == "tensorrt":
        monkeypatch.setenv("SSD_MODEL", "model.engine")
    settings = Settings()
    assert settings.port == int(data["SSD_PORT"])
    assert settings.engine == data["SSD_ENGINE"] and settings.device == data["SSD_DEVICE"]
    if pending:
        pytest.skip(f"{', '.join(sorted(pending))} come with {', '.join(sorted(set(pending.values())))}: merge it")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_prestop_drain_and_in_flight(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    spec = pod_spec(objects)
    container = server_container(spec)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    budget = seconds(config(objects))
    needed = float(command[1]) + budget["drain"] + budget["in_flight"]
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > needed, f"terminationGracePeriodSeconds {grace} <= preStop + drain + in-flight = {needed}"
    assert budget["drain"] > 0, "no drain: the pod would refuse requests still routed to it"


def test_kserve_leaves_shutdown_to_knative_and_keeps_the_drain() -> None:
    """Knative rejects `lifecycle` and terminationGracePeriodSeconds (its queue-proxy drains the pod); the
    server's own drain still turns /readyz to 503 before it exits."""
    objects = render("kserve")
    predictor = pod_spec(objects)
    assert "terminationGracePeriodSeconds" not in predictor
    assert "lifecycle" not in server_container(predictor) and "securityContext" not in predictor
    assert float(config(objects)["SSD_DRAIN_SECONDS"]) > 0
    assert predictor["timeout"] > seconds(config(objects))["in_flight"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_locked_down_with_writable_caches(kustomization: str) -> None:
    objects = render(kustomization)
    spec = pod_spec(objects)
    volumes = {volume["name"] for volume in spec["volumes"]}
    cache_dir = config(objects)["MODEL_CACHE_DIR"]
    for container in spec["initContainers"] + spec["containers"]:
        context = {**spec.get("securityContext", {}), **container["securityContext"]}  # the container's wins
        assert context["runAsNonRoot"] is True, container["name"]
        assert context["runAsUser"] == 10001, container["name"]  # the images' user (docker/Dockerfile*)
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert {cache_dir, "/tmp"} <= mounts.keys(), f"{container['name']}: {mounts}"
        assert set(mounts.values()) <= volumes
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys() and {"cpu", "memory"} <= resources["limits"].keys()


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_init_container_runs_the_images_entrypoint_export(kustomization: str) -> None:
    """The cache is filled by docker/entrypoint.sh itself (its command replaced by `true`), in the same image,
    with the same settings and cache mount as the server; nothing re-implements the export."""
    spec = pod_spec(render(kustomization))
    (init,) = spec["initContainers"]
    server = server_container(spec)
    assert "command" not in init and init["args"] == ["true"], "keep the image's ENTRYPOINT (docker/entrypoint.sh)"
    assert "command" not in server and "args" not in server
    assert init["image"] == server["image"] and init["envFrom"] == server["envFrom"]
    cache = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert cache == {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    entrypoint = (REPO / "docker" / "entrypoint.sh").read_text()
    assert 'exec "$@"' in entrypoint and "export_onnx" in entrypoint and "build_engine" in entrypoint
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        text = (REPO / "docker" / dockerfile).read_text()
        assert re.search(r'^ENTRYPOINT \["/bin/bash", "/app/docker/entrypoint.sh"\]', text, re.MULTILINE), dockerfile
        assert re.search(r"^USER 10001:10001", text, re.MULTILINE), dockerfile


def test_gpu_overlay_takes_one_gpu_and_cpu_none() -> None:
    gpu = pod_spec(render("overlays/gpu"))
    for container in gpu["initContainers"] + gpu["containers"]:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", container["name"]
    assert config(render("overlays/gpu"))["SSD_ENGINE"] == "tensorrt"
    assert server_container(gpu)["image"].endswith(":gpu")
    cpu = pod_spec(render("overlays/cpu"))
    assert "nvidia.com/gpu" not in str(cpu)
    assert server_container(cpu)["image"].endswith(":cpu")
    data = config(render("overlays/cpu"))
    limit = int(server_container(cpu)["resources"]["limits"]["cpu"])
    assert int(data["SSD_INTRA_OP_THREADS"]) <= limit, "engine threads beyond the CPU limit only get throttled"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_on_the_adapters_metric_with_scale_down_stabilisation(overlay: str) -> None:
    hpa = render(f"overlays/{overlay}")["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    rule = adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 60
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert re.fullmatch(rule["name"]["matches"], "ssd_requests_in_flight")


def test_kserve_runs_the_same_image_on_the_v2_protocol_port() -> None:
    objects = render("kserve")
    isvc = objects["InferenceService"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    container = server_container(predictor)
    assert container["name"] == "kserve-container"
    assert container["image"] == server_container(pod_spec(render("overlays/cpu")))["image"]
    (port,) = container["ports"]  # Knative routes one port: HTTP, where /v2 lives next to /detect
    assert port["containerPort"] == int(config(objects)["SSD_PORT"])
    assert config(objects)["SSD_GRPC_PORT"] == "0", "a gRPC listener nobody can reach would only hold a port"
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] > 0
    deployment = server_container(pod_spec(render("overlays/cpu")))
    assert container["readinessProbe"]["httpGet"]["path"] == deployment["readinessProbe"]["httpGet"]["path"]
