"""The torch engine rebuilds the exported module from the file's description and agrees with ONNX Runtime."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from model_export.contract.metadata import ModelMetadata
from server.engines.base import EngineOptions, EngineOutput
from server.engines.onnxruntime import OnnxRuntimeEngine
from server.preprocess import preprocess

pytest.importorskip("torch")
pytest.importorskip("onnx")
from server.engines.torch import TorchEngine, TorchEngineError, weights_argument

REPO_ROOT = Path(__file__).resolve().parents[2]
PHOTOS = sorted((REPO_ROOT.parent / "shared" / "data" / "voc2012_sample" / "JPEGImages").glob("*.jpg"))[:4]


@pytest.fixture(scope="module")
def default_model(server) -> Path:  # type: ignore[no-untyped-def]
    """The default model file, as the session's server found or exported it."""
    path = Path(os.environ.get("SSD_MODEL") or REPO_ROOT / "weights" / "ssd_mobilenet_v1_coco.onnx")
    assert path.is_file()
    return path


def kept(out: EngineOutput, i: int, threshold: float = 0.3) -> list[tuple[int, float, np.ndarray]]:
    n = int(out.num_detections[i])
    return [
        (int(c), float(s), b)
        for c, s, b in zip(out.classes[i, :n], out.scores[i, :n], out.boxes[i, :n])
        if s >= threshold
    ]


@pytest.mark.slow
def test_torch_agrees_with_onnxruntime_on_the_default_model(default_model: Path) -> None:
    images = np.stack([preprocess(p.read_bytes(), (300, 300)).pixels for p in PHOTOS])
    reference, torch_engine = OnnxRuntimeEngine(), TorchEngine()
    meta_ort = reference.load(default_model, EngineOptions())
    meta_torch = torch_engine.load(default_model, EngineOptions(intra_op_threads=2))
    assert meta_torch == meta_ort
    a, b = reference.infer(images), torch_engine.infer(images)
    assert b.num_detections.dtype == np.int32 and b.boxes.shape == a.boxes.shape and b.classes.dtype == np.int32
    assert sum(len(kept(a, i, threshold=0.5)) for i in range(len(PHOTOS))) >= 3
    for i in range(len(PHOTOS)):
        # Confident detections only: near-tied weaker boxes may swap places in NMS between two runtimes.
        theirs = kept(b, i, threshold=0.4)
        for cls, score, box in kept(a, i, threshold=0.5):
            # The imported network keeps the file's quantised activation ranges as clamps, so a float rounding
            # difference can move a score by a quantisation step or two (and a box edge by ~1 px of 300).
            assert any(
                c == cls and abs(s - score) < 0.03 and float(np.abs(x - box).max()) < 0.01 for c, s, x in theirs
            ), (i, cls, score, box)


def test_fp16_needs_cuda(tmp_path: Path) -> None:
    with pytest.raises(TorchEngineError, match="fp16 needs a CUDA device"):
        TorchEngine().load(tmp_path / "m.onnx", EngineOptions(fp16=True))


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TorchEngineError, match="not found"):
        TorchEngine().load(tmp_path / "absent.onnx", EngineOptions())


def test_weights_are_found_from_the_description(tmp_path: Path) -> None:
    def meta(source: str) -> ModelMetadata:
        return ModelMetadata("m", (300, 300), ("a",), 0.01, 0.45, 400, 200, "softmax", source, None, 17)

    assert weights_argument(meta("coco"), tmp_path / "m.onnx") == "coco"
    assert weights_argument(meta("random"), tmp_path / "m.onnx") is None
    (tmp_path / "mine.pth").write_bytes(b"")
    assert weights_argument(meta("mine.pth"), tmp_path / "m.onnx") == str(tmp_path / "mine.pth")
    with pytest.raises(TorchEngineError, match="put it there"):
        weights_argument(meta("elsewhere.pth"), tmp_path / "m.onnx")
