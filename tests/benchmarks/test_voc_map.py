"""benchmarks/voc_map.py: VOC loading, the mAP@0.5 computation, and our export against LiteRT on the VOC sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.voc_map import (
    COCO_TO_VOC,
    VOC_CLASSES,
    GroundTruth,
    ImageDetections,
    detect_onnx,
    detect_tflite,
    detect_tflite_paper,
    load_rgb,
    load_voc,
    main,
    voc_map50,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"
VOC = SHARED / "data" / "voc2012_sample"
TFLITE = SHARED / "models" / "coco_ssd_mobilenet_v1" / "detect.tflite"

needs_voc = pytest.mark.skipif(not (VOC / "Annotations").is_dir(), reason=f"no VOC sample at {VOC}")
needs_model = pytest.mark.skipif(not TFLITE.is_file(), reason=f"no shared model at {TFLITE}")


def _gt(boxes: list[list[float]], labels: list[str], difficult: list[bool] | None = None) -> GroundTruth:
    return GroundTruth(
        file=Path("x.jpg"),
        width=100,
        height=100,
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        labels=tuple(labels),
        difficult=tuple(difficult or [False] * len(labels)),
    )


def _det(boxes: list[list[float]], scores: list[float], labels: list[str]) -> ImageDetections:
    return ImageDetections(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores), tuple(labels))


@needs_voc
def test_load_voc() -> None:
    items = load_voc(VOC)
    assert len(items) == 50
    assert all(item.file.is_file() for item in items)
    assert {label for item in items for label in item.labels} <= set(VOC_CLASSES)
    assert any(any(item.difficult) for item in items)
    first = items[0]  # 2007_000027.xml: one person, xmin 174 ymin 101 xmax 349 ymax 351
    assert first.labels == ("person",) and first.boxes.tolist() == [[173.0, 100.0, 349.0, 351.0]]
    assert (first.height, first.width) == load_rgb(first.file).shape[:2]


def test_coco_names_reach_every_voc_class() -> None:
    labelmap = TFLITE.with_name("labelmap.txt")
    if not labelmap.is_file():
        pytest.skip("no labelmap")
    coco = {n.strip() for n in labelmap.read_text().splitlines()}
    assert set(COCO_TO_VOC) <= coco
    assert {COCO_TO_VOC.get(n, n) for n in coco} >= set(VOC_CLASSES)


def test_map_of_perfect_and_empty_detections() -> None:
    gt = [_gt([[10, 10, 50, 50], [60, 60, 90, 90]], ["cat", "dog"]), _gt([[0, 0, 40, 80]], ["person"])]
    perfect = [_det(g.boxes.tolist(), [0.9] * len(g.labels), list(g.labels)) for g in gt]
    assert voc_map50(gt, perfect) == pytest.approx(100.0)
    assert voc_map50(gt, [_det([], [], []), _det([], [], [])]) == 0.0
    # COCO names are mapped (airplane -> aeroplane); COCO-only classes are dropped.
    plane = [_gt([[10, 10, 50, 50]], ["aeroplane"])]
    assert voc_map50(
        plane, [_det([[10, 10, 50, 50], [0, 0, 9, 9]], [0.9, 0.95], ["airplane", "toaster"])]
    ) == pytest.approx(100.0)


def test_map_ignores_difficult_objects() -> None:
    gt = [_gt([[10, 10, 50, 50], [60, 60, 90, 90]], ["cat", "cat"], [False, True])]
    # A hit on the difficult cat is neither a true nor a false positive; missing it costs nothing.
    hit_both = _det([[60, 60, 90, 90], [10, 10, 50, 50]], [0.95, 0.9], ["cat", "cat"])
    assert voc_map50(gt, [hit_both]) == pytest.approx(100.0)
    assert voc_map50(gt, [_det([[10, 10, 50, 50]], [0.9], ["cat"])]) == pytest.approx(100.0)
    # A false positive ranked first halves... the precision at full recall: AP drops.
    miss_first = _det([[0, 60, 5, 65], [10, 10, 50, 50]], [0.95, 0.9], ["cat", "cat"])
    assert voc_map50(gt, [miss_first]) < 100.0


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not TFLITE.is_file():
        pytest.skip(f"no shared model at {TFLITE}")
    from model_export.models.tflite_ssd import build
    from model_export.onnx_export import export_onnx
    from model_export.spec import PostprocessOptions

    out = tmp_path_factory.mktemp("voc-map") / "ssd_mobilenet_v1_coco.onnx"
    export_onnx(build(str(TFLITE), None), PostprocessOptions(), out)
    return out


@needs_voc
@needs_model
@pytest.mark.slow
def test_export_map_matches_litert(onnx_path: Path) -> None:
    """Ours within 1.0 point of LiteRT's. Like for like (LiteRT's network, our post-processing) they are the same
    arithmetic, so the same mAP; LiteRT as shipped keeps only its top 10, so ours must not be worse than it."""
    from model_export.models.tflite_ssd import import_tflite_ssd

    ground_truth = load_voc(VOC)
    images = [load_rgb(gt.file) for gt in ground_truth]
    ours = voc_map50(ground_truth, detect_onnx(onnx_path, images))
    shipped = voc_map50(ground_truth, detect_tflite(TFLITE, images, import_tflite_ssd(TFLITE).labels))
    like_for_like = voc_map50(ground_truth, detect_tflite_paper(TFLITE, images))
    print(
        f"\nVOC sample mAP@0.5: ours {ours:.2f}, LiteRT (paper post-processing) {like_for_like:.2f}, "
        f"LiteRT as shipped {shipped:.2f}"
    )
    assert abs(ours - like_for_like) <= 0.01
    assert ours >= shipped - 1.0
    assert 50.0 < ours < 95.0  # a real detector on real photos, not a degenerate score


@needs_voc
def test_cli_requires_a_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--data", str(VOC)])
    assert "give --onnx and/or --tflite" in capsys.readouterr().err
