"""The package as a user installs it: metadata any pip can read, the weights manifest inside the wheel, and a
server-only install without torch. Offline: the wheel is built from this checkout and installed without deps into
a fresh venv whose pip is the one `python -m venv` bundles (23.2 on Python 3.11), never upgraded."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources: setuptools writes build/ and *.egg-info beside them, which must not land in the checkout.
    source = out / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", ".cache", "build", "*.egg-info", "weights", "tests", "results", "__pycache__", "*.onnx"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    [found] = out.glob("ssd_serve-*.whl")
    return found


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A new venv (its bundled pip), with the wheel installed non-editable and without dependencies."""
    root = tmp_path_factory.mktemp("venv") / "v"
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    return python


def metadata_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(name).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def test_metadata_states_ranges_only() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    every = list(project["dependencies"]) + sum(project["optional-dependencies"].values(), [])
    assert not [r for r in every if "===" in r], "arbitrary equality (===) breaks pip < 24.1; use constraints/"
    assert project["license"] == "Apache-2.0"  # an SPDX expression (PEP 639)


def test_the_bundled_pip_parses_every_requirement(wheel: Path, fresh_venv: Path) -> None:
    requirements = metadata_requirements(wheel)
    assert any('extra == "server"' in r for r in requirements)
    code = (
        "import sys, pip; from pip._vendor.packaging.requirements import Requirement\n"
        "for line in sys.stdin.read().splitlines(): Requirement(line)\n"
        "print(pip.__version__)"
    )
    result = subprocess.run([str(fresh_venv), "-c", code], input="\n".join(requirements), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f"the bundled pip cannot read the metadata:\n{result.stderr}"


def test_the_wheel_ships_the_weights_manifest(wheel: Path, fresh_venv: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        assert "model_export/manifest.json" in z.namelist()
    result = subprocess.run([str(fresh_venv), "-m", "model_export.weights", "list"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ssd_mobilenet_v1_coco" in result.stdout and "nvidia_ssd300_resnet50_coco" in result.stdout
    where = subprocess.run([str(fresh_venv), "-c", "import model_export; print(model_export.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "site-packages" in where.stdout, "not the installed copy"


def test_the_server_extra_pulls_no_torch(wheel: Path) -> None:
    server = [r for r in metadata_requirements(wheel) if 'extra == "server"' in r]
    names = {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in server}
    assert names and not names & {"torch", "torchvision", "onnx", "tflite"}, names
