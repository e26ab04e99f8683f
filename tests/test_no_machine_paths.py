"""No tracked file outside tests/ names an absolute path of a machine (a checkout, a home, a scratch folder)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Absolute paths that only exist on some machine. /home/ssd is the images' own user (docker/Dockerfile*).
MACHINE_PATH = re.compile(r"(?<![\w.~$-])/(?:work|root|tmp|Users|home/(?!ssd\b)[\w.-]+)/")


def tracked_files() -> list[Path]:
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listing = subprocess.run([git, "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60, check=True).stdout
    return [REPO / name for name in listing.decode().split("\0") if name and not name.startswith("tests/")]


def test_no_machine_paths_outside_the_tests() -> None:
    found = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary (a PNG) or deleted in the working tree
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert found == [], "machine paths in tracked files:\n" + "\n".join(found)


def test_the_pattern() -> None:
    for bad in ("cd /work/main", "P = Path('/root/x')", "--out /tmp/bench/m.onnx", "/home/alice/models/"):
        assert MACHINE_PATH.search(bad), bad
    for fine in ("--home-dir /home/ssd", "../shared/models", ".cache/bench/m.onnx", "/usr/bin/time", "/opt/venv"):
        assert not MACHINE_PATH.search(fine), fine
