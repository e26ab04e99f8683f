"""`make gpu-check` on a machine without a GPU: exits at once, non-zero, with one line saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _no_gpu_env() -> dict[str, str]:
    # CUDA_VISIBLE_DEVICES="" hides every GPU from the driver, so this holds on a GPU host too.
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def _assert_one_line_refusal(done: subprocess.CompletedProcess[str], seconds: float) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert seconds < 10
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("make")]
    assert lines == [
        "gpu-check: no NVIDIA GPU visible (no driver, no device, or CUDA_VISIBLE_DEVICES hides them); "
        "nothing to check on this machine"
    ]


def test_the_script_refuses_at_once_without_a_gpu() -> None:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "scripts/gpu_check.py"], cwd=REPO, env=_no_gpu_env(),
                          capture_output=True, text=True, timeout=60)
    _assert_one_line_refusal(done, time.monotonic() - start)
    assert done.stdout == ""


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_refuses_at_once_without_a_gpu() -> None:
    start = time.monotonic()
    done = subprocess.run(["make", "-s", "gpu-check", f"GPU_PY={sys.executable}"], cwd=REPO, env=_no_gpu_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    _assert_one_line_refusal(subprocess.CompletedProcess(done.args, 2, done.stdout, done.stderr),
                             time.monotonic() - start)


def test_the_summary_table_lines_up() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from gpu_check import summary_table
    finally:
        sys.path.pop(0)
    text = summary_table([("versions", "PASS", 1.2, "H200"), ("e2e torch", "FAIL", 30.0, "0 img/s")])
    lines = text.splitlines()
    assert lines[0].startswith("step") and "result" in lines[0]
    assert lines[2].split()[:3] == ["versions", "PASS", "1"] and lines[3].split()[:4] == ["e2e", "torch", "FAIL", "30"]
