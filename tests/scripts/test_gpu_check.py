"""`make gpu-check` on a machine without a GPU: exits at once, non-zero, with one line saying why; its CPU
rehearsal runs every step (the GPU engines replaced by torch on the CPU), and its offline bootstrap sees the host's
packages from a venv of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402  (scripts/ is no package)

sys.path.pop(0)


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
    text = gpu_check.summary_table([("versions", "PASS", 1.2, "H200"), ("e2e torch", "FAIL", 30.0, "0 img/s")])
    lines = text.splitlines()
    assert lines[0].startswith("step") and "result" in lines[0]
    assert lines[2].split()[:3] == ["versions", "PASS", "1"] and lines[3].split()[:4] == ["e2e", "torch", "FAIL", "30"]


def test_the_requirements_are_pyprojects_less_the_hosts_gpu_builds() -> None:
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--requirements"], cwd=REPO, env=_no_gpu_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    names = {gpu_check._name(line) for line in lines}
    # the server's every import (fastapi-offline and grpcio were once missed), the exporter's, and the tests' few
    assert {"fastapi", "fastapi-offline", "uvicorn", "grpcio", "protobuf", "simplejpeg", "tflite", "onnx", "pytest",
            "httpx", "pyyaml"} <= names
    assert not names & {"torch", "torchvision", "onnxruntime", "playwright", "tritonclient"}
    assert "uvicorn[standard]>=0.30" in lines  # with their ranges and extras, for pip


def test_unmet_requirements_are_the_missing_and_the_out_of_range() -> None:
    assert gpu_check.unmet(["pytest>=1", "pytest<1", "no-such-distribution-here>=1"]) == [
        "pytest<1", "no-such-distribution-here>=1"]


def test_the_overlay_venv_sees_the_hosts_packages(tmp_path: Path) -> None:
    """The test's interpreter is itself a venv's (as the host's torch may be): a venv made with
    --system-site-packages would not see its packages, the overlay does, and pip counts them as installed."""
    python = gpu_check.overlay_venv(tmp_path / "venv")
    assert gpu_check.overlay_venv(tmp_path / "venv") == python  # made once
    code = "import sys, fastapi; print(sys.prefix); print(fastapi.__file__)"
    prefix, fastapi_file = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                                          timeout=60).stdout.split()
    assert Path(prefix) == tmp_path / "venv"
    assert Path(fastapi_file).is_relative_to(Path(sys.prefix))
    (tmp_path / "no-wheels").mkdir()
    done = subprocess.run([python, "-m", "pip", "install", "--no-index", "--find-links", str(tmp_path / "no-wheels"),
                           "fastapi>=0.115"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "already satisfied" in done.stdout, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "models").is_dir(), reason=f"shared weights and photos missing under {SHARED}")
def test_the_cpu_rehearsal_runs_every_step(tmp_path: Path) -> None:
    """Every step for real, on the CPU: exports validated, torch against ONNX Runtime on the shared photos, the server
    over HTTP under ssd-bench clients, the GPU tests (skipped here). The GPU run is then left with only the GPU's
    own failures to find."""
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--cpu-rehearsal", "--out", str(tmp_path),
                           "--e2e-seconds", "4"], cwd=REPO, env=_no_gpu_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {step: (status, detail) for step, status, _, detail in summary["rows"]}
    assert rows["versions"][0] == "PASS" and rows["versions"][1].startswith("CPU rehearsal")
    for model in ("ssd_mobilenet_v1_coco", "ssd300_vgg16"):
        status, detail = rows[f"export+validate {model}"]
        assert status == "PASS" and "agree with the reference" in detail
    engine = rows["engine ssd_mobilenet_v1_coco torch cpu fp32"]
    assert engine[0] == "PASS" and "rows match ORT CPU" in engine[1] and "b64" in engine[1]
    decoder = rows["engine ssd_mobilenet_v1_coco torch cpu fp32 + batched GPU decoder on the CPU"]
    assert decoder[0] == "PASS" and "pixels vs CPU decode" in decoder[1]
    for load in ("", ", /detect/batch x8"):
        status, detail = rows[f"e2e torch cpu fp32{load} (ssd_mobilenet_v1_coco)"]
        assert status == "PASS" and " 0 errors" in detail and "img/s" in detail and "event loop" in detail
    assert rows["tests -m gpu"][0] == "PASS" and "skipped" in rows["tests -m gpu"][1]
    assert "gpu-check summary" in done.stdout


def test_the_perturbed_agreement_needs_every_sure_detection_and_nearly_all_others() -> None:
    """fp16 and GPU-decoded rows: all reference detections from 0.5 up found, and 98% of those from 0.35 up."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from gpu_check_engines import agree_fp16
    finally:
        sys.path.pop(0)
    from server.engines.base import EngineOutput

    def output(scores: list[float]) -> EngineOutput:
        k = len(scores)
        boxes = np.array([[i / 200, i / 200, i / 200 + 0.1, i / 200 + 0.1] for i in range(k)], dtype=np.float32)
        return EngineOutput(np.array([k], np.int32), boxes[None], np.array([scores], np.float32),
                            np.ones((1, k), np.int32))

    reference = [0.9] * 10 + [0.4] * 90
    assert agree_fp16(output(reference), output(reference))[0]
    one_middling_lost = [0.9] * 10 + [0.4] * 89 + [0.2]
    assert agree_fp16(output(one_middling_lost), output(reference))[0]
    one_sure_lost = [0.9] * 9 + [0.2] + [0.4] * 90
    assert not agree_fp16(output(one_sure_lost), output(reference))[0]
    three_middling_lost = [0.9] * 10 + [0.4] * 87 + [0.2] * 3
    ok, detail = agree_fp16(output(three_middling_lost), output(reference))
    assert not ok and "97/100 detections > 0.35 found" in detail
