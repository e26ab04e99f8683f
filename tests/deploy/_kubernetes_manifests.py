"""deploy/kubernetes rendered with `kubectl kustomize`, as objects, for test_kubernetes*.py."""

from __future__ import annotations

import functools
import subprocess

import pytest

from _deploy_helpers import REPO, require_tool

KUBE = REPO / "deploy" / "kubernetes"
OVERLAYS = ["cpu", "gpu"]
KUSTOMIZATIONS = [f"overlays/{name}" for name in OVERLAYS] + ["kserve"]
ADAPTER_VALUES = KUBE / "prometheus-adapter" / "values.yaml"
BUILT_IN = {"ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
CRD_KINDS = {"ServiceMonitor", "InferenceService"}
# Settings other issues add to server/settings.py; until they are merged, their keys cannot be checked here.
PENDING_SETTINGS = {"SSD_DRAIN_SECONDS": "issue 11", "SSD_CLIENT_TIMEOUT_S": "issue 11", "SSD_GRPC_PORT": "issue 12"}

yaml = pytest.importorskip("yaml", reason="PyYAML reads the rendered manifests")


@functools.lru_cache(maxsize=None)
def render_text(kustomization: str) -> str:
    kubectl = require_tool("kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBE / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return result.stdout


def render(kustomization: str) -> dict[str, dict]:
    """The rendered objects by kind (one object per kind in these manifests)."""
    objects = [doc for doc in yaml.safe_load_all(render_text(kustomization)) if doc]
    by_kind = {doc["kind"]: doc for doc in objects}
    assert len(by_kind) == len(objects), f"{kustomization}: two objects of one kind"
    return by_kind


def pod_spec(objects: dict[str, dict]) -> dict:
    if "Deployment" in objects:
        return objects["Deployment"]["spec"]["template"]["spec"]
    return objects["InferenceService"]["spec"]["predictor"]


def server_container(spec: dict) -> dict:
    (container,) = spec["containers"]
    return container


def config(objects: dict[str, dict]) -> dict[str, str]:
    return objects["ConfigMap"]["data"]


def seconds(data: dict[str, str]) -> dict[str, float]:
    """The shutdown budget from the ConfigMap: drain, and the bound on a request still in flight after it."""
    return {
        "drain": float(data["SSD_DRAIN_SECONDS"]),
        "in_flight": max(float(data["SSD_REQUEST_TIMEOUT_MS"]) / 1000, float(data["SSD_CLIENT_TIMEOUT_S"])),
    }


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule
