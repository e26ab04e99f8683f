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
    earlier_stages: set[str] = set()
    for kind, rest in steps:
        if kind != "FROM":
            continue
        words = rest.split()
        if len(words) == 3 and words[1].upper() == "AS":
            earlier_stages.add(words[2])
        if words[0] in earlier_stages:
            continue  # FROM base AS exporter: a stage of this file, pinned where it was defined
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
    final = list(stages(steps).values())[-1]  # the default target: the server
    for name, stage in installing_stages(dockerfile).items():
        users = [rest for kind, rest in stage if kind == "USER"]
        assert users, f"{dockerfile.name} [{name}] has no USER: it would run as root"
        assert users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name} [{name}] ends as USER {users[-1]}"
        entrypoint = json.loads(next(rest for kind, rest in stage if kind == "ENTRYPOINT"))
        assert entrypoint[-1] == "/app/docker/entrypoint.sh" and (REPO / "docker" / "entrypoint.sh").is_file()
    checks = [rest for kind, rest in final if kind == "HEALTHCHECK"]
    assert len(checks) == 1 and "/readyz" in checks[0], checks
    env = " ".join(rest for kind, rest in steps if kind == "ENV")
    assert "SSD_HOST=0.0.0.0" in env, "inside a container the server must listen on all interfaces"


def stages(steps: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Steps by build stage name (`FROM image AS name`; an unnamed stage is called by its image)."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for kind, rest in steps:
        if kind == "FROM":
            words = rest.split()
            current = found.setdefault(words[2] if len(words) == 3 and words[1].upper() == "AS" else words[0], [])
        current.append((kind, rest))
    return found


def installing_stages(dockerfile: Path) -> dict[str, list[tuple[str, str]]]:
    return {name: steps for name, steps in stages(instructions(dockerfile)).items()
            if any(kind == "COPY" and rest.split()[0] == "." for kind, rest in steps)}


@DOCKERFILES
def test_dependencies_are_locked_and_installed_before_the_sources_are_copied(dockerfile: Path) -> None:
    built = installing_stages(dockerfile)
    assert built, f"{dockerfile.name} installs the project nowhere"
    for name, steps in built.items():
        copy_all = next(i for i, (kind, rest) in enumerate(steps) if kind == "COPY" and rest.split()[0] == ".")
        installs = [rest for kind, rest in steps[:copy_all] if kind == "RUN" and "pip install" in rest]
        assert installs, f"{dockerfile.name} [{name}]: no dependency layer before the sources"
        copied = sum((rest.split()[:-1] for kind, rest in steps[:copy_all] if kind == "COPY"), [])
        assert copied and all(path.startswith("docker/") for path in copied), copied
        for path in copied:
            assert (REPO / path).is_file(), f"{dockerfile.name} copies {path}, which does not exist"
            requirements = [line for line in (REPO / path).read_text().splitlines()
                            if line.strip() and not line.lstrip().startswith("#")]
            assert requirements and all(re.fullmatch(r"[A-Za-z0-9_.-]+==\S+", r) for r in requirements), (
                f"{path}: every requirement must be pinned with ==")
        for install in installs:
            assert "-r docker/" in install and " -e " not in install, install
        source_install = next(rest for kind, rest in steps[copy_all:] if kind == "RUN" and "pip install" in rest)
        assert "--no-deps /app" in source_install and " -e " not in source_install, source_install


def test_gpu_image_uses_tensorrt_base_and_onnxruntime_gpu() -> None:
    steps = instructions(GPU_DOCKERFILE)
    base = next(rest for kind, rest in steps if kind == "FROM")
    assert base.startswith("nvcr.io/nvidia/tensorrt:") and base.endswith("-py3"), base
    locked = (REPO / "docker" / "requirements-gpu.lock").read_text()
    names = {re.match(r"[\w.-]+", line).group(0).lower() for line in locked.splitlines() if re.match(r"\w", line)}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names  # onnxruntime-gpu provides the module
    assert "tensorrt" not in names  # keep the image's TensorRT
    assert {"torch", "torchvision", "fastapi", "onnx"} <= names


def test_cpu_image_is_a_slim_exporter_stage_and_a_server_only_runtime() -> None:
    steps = instructions(CPU_DOCKERFILE)
    by_stage = stages(steps)
    assert list(by_stage)[-1] == "runtime", "the default target (the last stage) must be the server"
    base = next(rest for kind, rest in steps if kind == "FROM").split()[0]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base), base
    exporter = " ".join(rest for kind, rest in by_stage["exporter"] if kind == "RUN")
    assert "pip install -r docker/torch-cpu.txt --index-url https://download.pytorch.org/whl/cpu" in exporter
    assert json.loads(next(rest for kind, rest in by_stage["exporter"] if kind == "CMD")) == ["export"]
    runtime = " ".join(rest for kind, rest in by_stage["runtime"] if kind in ("RUN", "COPY"))
    assert "docker/requirements-cpu.lock" in runtime and "torch" not in runtime
    server_lock = (REPO / "docker" / "requirements-cpu.lock").read_text()
    assert not re.search(r"^(torch|torchvision|onnx|tflite|nvidia-[\w-]+)==", server_lock, re.M), "runtime lock: torch"
    torch_pins = (REPO / "docker" / "torch-cpu.txt").read_text()
    assert re.search(r"^torch==[\d.]+\+cpu$", torch_pins, re.M) and re.search(r"^torchvision==[\d.]+\+cpu$",
                                                                             torch_pins, re.M)


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


@pytest.mark.parametrize(("lock", "arguments"), [
    ("requirements-cpu", ["--extras", "server"]),
    ("requirements-export-cpu", ["--extras", "export", "--exclude", "torch", "--exclude", "torchvision"]),
    ("requirements-gpu", ["--extras", "server,export,gpu", "--exclude", "onnxruntime", "--exclude", "tensorrt"]),
])
def test_lock_inputs_match_pyproject_and_every_input_is_locked(lock: str, arguments: list[str]) -> None:
    """The .in files `make lock` compiles are what pyproject.toml says now; each of them has a pin in the lock."""
    wanted = _requirements(*arguments)
    assert (DOCKER / f"{lock}.in").read_text().split() == wanted, f"docker/{lock}.in is stale: run `make lock`"
    pinned = {}
    for line in (DOCKER / f"{lock}.lock").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            pinned[match.group(1).lower().replace("_", "-")] = match.group(2)
    for requirement in wanted:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")
        assert name in pinned, f"docker/{lock}.lock has no pin for {name}: run `make lock`"


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
                 "model_export/cli.py", "model_export/manifest.json", "docker/entrypoint.sh",
                 "docker/requirements-cpu.lock", "docker/requirements-export-cpu.lock", "docker/requirements-gpu.lock",
                 "docker/torch-cpu.txt"):
        assert not _ignored(kept, patterns), f"{kept} must be in the build context"
    for dropped in (".git/HEAD", ".venv/bin/python", "tests/conftest.py", "weights/detect.tflite",
                    "weights/ssd_mobilenet_v1_coco.onnx", "x/model.engine", "server/__pycache__/app.cpython-312.pyc",
                    "docker/Dockerfile", "docker/prometheus/rules.yml", "docker-compose.yml", "docker/requirements.py"):
        assert _ignored(dropped, patterns), f"{dropped} must stay out of the build context"
