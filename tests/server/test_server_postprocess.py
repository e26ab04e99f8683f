"""server.postprocess (named apart from tests/model_export/test_postprocess.py: pytest needs unique basenames)."""

from __future__ import annotations

import numpy as np

from server.postprocess import detections_json, select_detections

K = 6
LABELS = ("person", "bicycle", "car")


def contract_row() -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.array(
        [
            [0.1, 0.2, 0.5, 0.6],
            [0.0, 0.0, 1.0, 1.0],
            [0.25, 0.5, 0.75, 1.0],
            [0.2, 0.2, 0.3, 0.3],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
        ],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.7, 0.5, 0.02, 0.0, 0.0], dtype=np.float32)
    classes = np.array([0, 2, 1, 0, 0, 0], dtype=np.int32)
    return 4, boxes, scores, classes


def test_boxes_are_scaled_to_the_original_pixels() -> None:
    n, boxes, scores, classes = contract_row()
    det = select_detections(n, boxes, scores, classes, width=200, height=100, score_threshold=0.01, max_detections=K)
    assert len(det) == 4
    np.testing.assert_allclose(det.boxes[0], [20, 20, 100, 60], atol=1e-3)
    np.testing.assert_allclose(det.boxes[1], [0, 0, 200, 100], atol=1e-3)
    assert det.classes.tolist() == [0, 2, 1, 0]


def test_rows_past_num_detections_are_ignored() -> None:
    _, boxes, scores, classes = contract_row()
    det = select_detections(2, boxes, scores, classes, width=10, height=10, score_threshold=0.0, max_detections=K)
    assert det.scores.tolist() == [0.9, 0.7]


def test_threshold_and_max_detections_keep_the_highest_scores() -> None:
    n, boxes, scores, classes = contract_row()
    det = select_detections(n, boxes, scores, classes, width=10, height=10, score_threshold=0.5, max_detections=K)
    assert det.scores.tolist() == [0.9, 0.7, 0.5]  # >= threshold
    det = select_detections(n, boxes, scores, classes, width=10, height=10, score_threshold=0.01, max_detections=2)
    assert det.scores.tolist() == [0.9, 0.7]


def test_unsorted_rows_come_out_highest_first() -> None:
    n, boxes, scores, classes = contract_row()
    order = np.array([2, 0, 3, 1, 4, 5])
    det = select_detections(
        n, boxes[order], scores[order], classes[order], width=10, height=10, score_threshold=0.0, max_detections=K
    )
    assert det.scores.tolist() == sorted(det.scores.tolist(), reverse=True)
    assert det.classes.tolist() == [0, 2, 1, 0]


def test_no_detections() -> None:
    _, boxes, scores, classes = contract_row()
    det = select_detections(0, boxes, scores, classes, width=10, height=10, score_threshold=0.01, max_detections=K)
    assert len(det) == 0 and det.boxes.shape == (0, 4)
    assert detections_json(det, LABELS) == []


def test_boxes_stay_inside_the_image() -> None:
    boxes = np.array([[-0.1, -0.2, 1.3, 1.0]], dtype=np.float32)
    det = select_detections(
        1,
        boxes,
        np.array([0.5], np.float32),
        np.array([1], np.int32),
        width=50,
        height=40,
        score_threshold=0.0,
        max_detections=1,
    )
    assert det.boxes.tolist() == [[0.0, 0.0, 50.0, 40.0]]


def test_json_shape_and_labels() -> None:
    n, boxes, scores, classes = contract_row()
    det = select_detections(n, boxes, scores, classes, width=200, height=100, score_threshold=0.4, max_detections=K)
    out = detections_json(det, LABELS)
    assert out[0] == {
        "class_id": 0,
        "label": "person",
        "score": 0.9,
        "box": {"x1": 20.0, "y1": 20.0, "x2": 100.0, "y2": 60.0},
    }
    assert [d["label"] for d in out] == ["person", "car", "bicycle"]
    assert all(type(d["score"]) is float and type(d["class_id"]) is int for d in out)


def test_a_class_id_without_a_label_is_reported_by_number() -> None:
    det = select_detections(
        1,
        np.zeros((1, 4), np.float32),
        np.array([0.5], np.float32),
        np.array([7], np.int32),
        width=1,
        height=1,
        score_threshold=0.0,
        max_detections=1,
    )
    assert detections_json(det, LABELS)[0]["label"] == "7"
