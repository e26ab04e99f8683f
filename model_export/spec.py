"""What every model source hands to the exporter: a float network plus everything needed to decode it.

Each builder in `model_export.models` returns an `SSDModel`. The exporter wraps it in
`ExportableSSD` (uint8 NHWC in, the contract's fixed-size tensors out), so a new model source only has to
describe its network, its default boxes and its label space here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

ScoreActivation = Literal["softmax", "sigmoid"]
# How the network computes: "float", or "integer" (a quantised file's own uint8 arithmetic, bit for bit;
# model_export.tflite.ops). None, where a builder takes it, means the source's own: integer for a quantised
# TFLite file whose operators all have an integer form, float for everything else.
Numerics = Literal["float", "integer"]


@dataclass(frozen=True)
class PostprocessOptions:
    """The paper's filtering; every threshold is an export option."""

    score_threshold: float = 0.01  # keep class scores strictly above this
    iou_threshold: float = 0.45  # suppress a box whose IoU with a kept box is strictly above this
    candidates_per_class: int = 400  # highest-scoring boxes per class that enter NMS
    max_detections: int = 200  # K: rows per image in the output


@dataclass(frozen=True)
class SSDModel:
    """A float SSD and the facts needed to turn its raw head outputs into detections.

    `network` maps a normalised float image batch [B, 3, H, W] to a tuple
    (box_regression [B, N, 4] ordered (dx, dy, dw, dh), class_logits [B, N, C]).
    """

    name: str
    network: nn.Module
    input_size: tuple[int, int]  # (H, W)
    anchors: torch.Tensor  # [N, 4] default boxes (cx, cy, w, h), normalised to [0, 1]
    box_weights: tuple[float, float, float, float]  # (wx, wy, ww, wh): dx / wx, dw / ww, ...
    score_activation: ScoreActivation
    # Columns of class_logits that are real classes (background and unused ids left out) ...
    score_columns: tuple[int, ...]
    # ... and the class id reported for each of them, in the model's own label space.
    class_ids: tuple[int, ...]
    labels: tuple[str, ...]  # labels[class_id] = name; "" where the id is unused
    # Per-channel normalisation applied to the 0..255 RGB input: (x - mean) / std.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Clamp on dw / ww and dh / wh before exp(); torchvision uses log(1000 / 16), others none.
    scale_clamp: float | None = None
    weights_source: str = "random"  # file name, "coco", or "random"
    weights_sha256: str | None = None
    extra_metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.score_columns) != len(self.class_ids):
            raise ValueError("score_columns and class_ids must have the same length")
        if self.anchors.ndim != 2 or self.anchors.shape[1] != 4:
            raise ValueError(f"anchors must be [N, 4], got {tuple(self.anchors.shape)}")
        if max(self.class_ids) >= len(self.labels):
            raise ValueError("every class id needs an entry in labels")

    def with_extra(self, **entries: str) -> SSDModel:
        """A copy with more `extra_metadata` entries (stored in the exported file's description)."""
        return replace(self, extra_metadata={**self.extra_metadata, **entries})


@dataclass(frozen=True)
class Detections:
    """One image's detections, as the contract reports them (only the valid rows)."""

    boxes: torch.Tensor  # [n, 4] float32 x1, y1, x2, y2 normalised to [0, 1]
    scores: torch.Tensor  # [n] float32, descending
    classes: torch.Tensor  # [n] int64 class ids in the model's label space
