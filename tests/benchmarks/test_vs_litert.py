"""benchmarks.vs_litert, briefly, on the real model: both engines run on the same photos and the table comes out."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.vs_litert import main

SHARED = Path(__file__).resolve().parents[3] / "shared"
TFLITE = SHARED / "models" / "coco_ssd_mobilenet_v1" / "detect.tflite"


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not TFLITE.is_file():
        pytest.skip(f"shared model missing: {TFLITE}")
    pytest.importorskip("ai_edge_litert")
    from model_export.models.tflite_ssd import build
    from model_export.onnx_export import export_onnx
    from model_export.spec import PostprocessOptions

    out = tmp_path_factory.mktemp("vs") / "m.onnx"
    export_onnx(build(str(TFLITE), None), PostprocessOptions(), out)
    return out


def test_table(onnx_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--onnx", str(onnx_path), "--tflite", str(TFLITE), "--rounds", "1", "--seconds", "0.2", "--batch-size", "1,2"]
    assert main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| onnxruntime") or
            line.startswith("| litert")]
    assert [r.split("|")[1].strip() for r in rows] == ["onnxruntime batch 1", "onnxruntime batch 2", "litert batch 1"]
    assert all(float(r.split("|")[2]) > 0 for r in rows)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    assert main(["--onnx", str(tmp_path / "x.onnx"), "--tflite", str(TFLITE)]) == 2


def test_two_files_side_by_side(onnx_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.onnx"
    other.write_bytes(onnx_path.read_bytes())
    args = ["--onnx", str(onnx_path), str(other), "--tflite", str(TFLITE), "--rounds", "1", "--seconds", "0.1",
            "--batch-size", "1"]
    assert main(args) == 0
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["m batch 1", "other batch 1", "litert batch 1"]  # rows[0]: the header
