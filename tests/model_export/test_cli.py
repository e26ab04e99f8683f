"""`python -m model_export` as a user runs it: timed steps, one-line errors, no partial files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_export.contract.metadata import ModelMetadata, sidecar_path

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO.parent / "shared" / "models" / "coco_ssd_mobilenet_v1"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model_export", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def assert_one_line_error(run: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], run.stderr


@pytest.mark.skipif(not MODEL_DIR.is_dir(), reason="the shared COCO SSD MobileNet v1 is not beside the repository")
def test_export_prints_timed_steps_and_writes_file_and_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    run = run_cli("--model", "ssd_mobilenet_v1_coco", "--weights", str(MODEL_DIR / "detect.tflite"), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("done in") == 2 and "- build ssd_mobilenet_v1_coco" in run.stdout
    metadata = ModelMetadata.from_json(sidecar_path(out).read_text())
    assert metadata.model == "ssd_mobilenet_v1_coco" and metadata.extra["max_batch"] == "64"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]


def test_unknown_model(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("--model", "yolo", "--out", str(tmp_path / "m.onnx")), "unknown model 'yolo'")


def test_integer_numerics_of_a_float_model(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = run_cli("--model", "ssdlite320_mobilenet_v3_large", "--numerics", "integer", "--out", str(out))
    assert_one_line_error(result, "is a float model; --numerics integer needs a quantised TFLite file")
    assert not out.exists()


def test_missing_and_corrupt_weights(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    missing = run_cli("--model", "ssdlite320_mobilenet_v3_large", "--weights", str(tmp_path / "no.pth"), "--out", str(out))
    assert_one_line_error(missing, "does not exist")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage" * 1000)
    bad = run_cli("--model", "ssdlite320_mobilenet_v3_large", "--weights", str(corrupt), "--out", str(out))
    assert_one_line_error(bad, "not a torch checkpoint")
    assert not out.exists()


def test_state_dict_of_another_architecture_and_verbose_traceback(tmp_path: Path) -> None:
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), other)
    args = ("--model", "ssdlite320_mobilenet_v3_large", "--weights", str(other), "--out", str(tmp_path / "m.onnx"))
    assert_one_line_error(run_cli(*args), "do not fit ssdlite320_mobilenet_v3_large")
    assert "Traceback" in run_cli(*args, "--verbose").stderr


def test_unwritable_output_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = run_cli("--model", "ssdlite320_mobilenet_v3_large", "--out", str(blocker / "m.onnx"))
    assert_one_line_error(run, "cannot write")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]
