"""The images: hadolint where installed, and the invariants the deployment relies on, always."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _deploy_helpers import DOCKER, REPO, require_tool

GPU_DOCKERFILE = DOCKER / "Dockerfile"
CPU_DOCKERFILE = DOCKER / "Dockerfile.cpu"
DOCKERFILES = pytest.mark.parametrize("dockerfile", [GPU_DOCKERFILE, CPU_DOCKERFILE], ids=["gpu", "cpu"])


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, rest = pending.partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def args_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(\S+)", rest)[0] for kind, rest in steps if kind == "ARG" and "=" in rest)


@DOCKERFILES
def test_hadolint(dockerfile: Path) -> None:
    hadolint = require_tool("hadolint")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


@DOCKERFILES
def test_base_image_is_pinned(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    defaults = args_defaults(steps)
    for kind, rest in steps:
        if kind != "FROM":
            continue
        image = rest.split()[0]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), image)
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{dockerfile.name}: FROM {image} has no tag"
        assert tag != "latest" and "$" not in tag, f"{dockerfile.name}: FROM {image} is not pinned"


@DOCKERFILES
def test_runs_as_non_root_with_a_readiness_healthcheck(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    users = [rest for kind, rest in steps if kind == "USER"]
    assert users, f"{dockerfile.name} has no USER: the server would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile.name} ends as USER {users[-1]}"
    checks = [rest for kind, rest in steps if kind == "HEALTHCHECK"]
    assert len(checks) == 1 and "/readyz" in checks[0], checks
    entrypoint = json.loads(next(rest for kind, rest in steps if kind == "ENTRYPOINT"))
    assert entrypoint[-1] == "/app/docker/entrypoint.sh" and (REPO / "docker" / "entrypoint.sh").is_file()
    env = " ".join(rest for kind, rest in steps if kind == "ENV")
    assert "SSD_HOST=0.0.0.0" in env, "inside a container the server must listen on all interfaces"


@DOCKERFILES
def test_dependencies_are_installed_before_the_sources_are_copied(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    copy_all = next(i for i, (kind, rest) in enumerate(steps) if kind == "COPY" and rest.split()[0] == ".")
    deps = next(i for i, (kind, rest) in enumerate(steps) if kind == "RUN" and "pip install -r" in rest)
    assert deps < copy_all, "the dependency layer must not depend on the sources"
    copied_before = [rest.split()[:-1] for kind, rest in steps[:deps] if kind == "COPY"]
    assert sorted(sum(copied_before, [])) == ["docker/requirements.py", "pyproject.toml"], copied_before


def test_gpu_image_uses_tensorrt_base_and_onnxruntime_gpu() -> None:
    steps = instructions(GPU_DOCKERFILE)
    base = next(rest for kind, rest in steps if kind == "FROM")
    assert base.startswith("nvcr.io/nvidia/tensorrt:") and base.endswith("-py3"), base
    install = next(rest for kind, rest in steps if kind == "RUN" and "docker/requirements.py" in rest)
    assert "--extras server,export,gpu" in install
    assert "--exclude onnxruntime" in install  # onnxruntime-gpu provides the module
    assert "--skip-installed tensorrt" in install  # keep the image's TensorRT


def test_cpu_image_is_slim_python() -> None:
    steps = instructions(CPU_DOCKERFILE)
    base = next(rest for kind, rest in steps if kind == "FROM")
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base), base
    assert args_defaults(steps)["EXTRAS"] == "server,export"


def _requirements(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(DOCKER / "requirements.py"), "--pyproject", str(REPO / "pyproject.toml"), *args],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_requirements_script_reads_the_extras() -> None:
    cpu = _requirements("--extras", "server,export")
    names = {re.match(r"[\w.-]+", r).group(0).lower() for r in cpu}
    assert {"numpy", "fastapi", "uvicorn", "onnxruntime", "torch", "torchvision", "onnx"} <= names
    assert len(cpu) == len(set(cpu))
    gpu = _requirements("--extras", "server,export,gpu", "--exclude", "onnxruntime")
    gpu_names = {re.match(r"[\w.-]+", r).group(0).lower() for r in gpu}
    assert "onnxruntime" not in gpu_names and "onnxruntime-gpu" in gpu_names
    skipped = _requirements("--extras", "server", "--skip-installed", "json")  # json: importable everywhere
    assert skipped == _requirements("--extras", "server")  # no requirement named json: nothing dropped
    bad = subprocess.run(
        [sys.executable, str(DOCKER / "requirements.py"), "--pyproject", str(REPO / "pyproject.toml"),
         "--extras", "no-such-extra"],
        capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 1 and "no-such-extra" in bad.stderr


# --- .dockerignore: the build context holds what the images need and nothing heavy -----------------------------


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rules, enough for these checks: last match wins, `!` re-includes, a match covers a directory."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        if re.fullmatch(regex + r"(?:/.*)?", path):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_sources_and_drops_artefacts() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for kept in ("pyproject.toml", "README.md", "server/app.py", "server/engines/onnxruntime.py",
                 "model_export/cli.py", "model_export/manifest.json", "docker/entrypoint.sh", "docker/requirements.py"):
        assert not _ignored(kept, patterns), f"{kept} must be in the build context"
    for dropped in (".git/HEAD", ".venv/bin/python", "tests/conftest.py", "weights/detect.tflite",
                    "weights/ssd_mobilenet_v1_coco.onnx", "x/model.engine", "server/__pycache__/app.cpython-312.pyc",
                    "docker/Dockerfile", "docker/prometheus/rules.yml", "docker-compose.yml"):
        assert _ignored(dropped, patterns), f"{dropped} must stay out of the build context"
