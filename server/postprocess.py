"""The contract's fixed-size tensors for one image -> its detections in the original image's pixels.

Vectorised over the K rows; the only Python loop is the one that builds the JSON objects at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

BOX_DECIMALS = 2  # 1/100 pixel
SCORE_DECIMALS = 6


@dataclass(frozen=True)
class Detections:
    """One image's kept detections, highest score first."""

    boxes: np.ndarray  # float64 [n, 4] x1, y1, x2, y2 in pixels of the original image
    scores: np.ndarray  # float64 [n]
    classes: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def select_detections(
    num_detections: int,
    boxes: np.ndarray,  # float32 [K, 4] normalised x1, y1, x2, y2
    scores: np.ndarray,  # float32 [K]
    classes: np.ndarray,  # int32 [K]
    *,
    width: int,
    height: int,
    score_threshold: float,
    max_detections: int,
) -> Detections:
    """Valid rows -> score >= score_threshold -> highest max_detections -> pixels of a width x height image."""
    count = max(0, min(int(num_detections), scores.shape[0]))
    valid_scores = scores[:count]  # [n]
    # The graph emits rows sorted by score already; a stable sort on <= K values keeps that promise cheap to hold.
    order = np.argsort(-valid_scores, kind="stable")
    order = order[valid_scores[order] >= score_threshold][:max_detections]  # [m]
    scale = np.array([width, height, width, height], dtype=np.float64)
    pixel_boxes = np.clip(boxes[order].astype(np.float64) * scale, 0.0, scale)  # [m, 4]
    return Detections(
        boxes=np.round(pixel_boxes, BOX_DECIMALS),
        scores=np.round(valid_scores[order].astype(np.float64), SCORE_DECIMALS),
        classes=classes[order].astype(np.int64),
    )


def detections_json(detections: Detections, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """The response's `detections` list (schemas.Detection's shape)."""
    boxes = detections.boxes.tolist()
    scores = detections.scores.tolist()
    classes = detections.classes.tolist()
    unknown = len(labels)
    return [
        {
            "class_id": class_id,
            "label": labels[class_id] if 0 <= class_id < unknown else str(class_id),
            "score": score,
            "box": {"x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3]},
        }
        for class_id, score, box in zip(classes, scores, boxes)
    ]
