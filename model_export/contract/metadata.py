"""The description an exported file carries about itself (pure Python: the server imports it without torch).

It is stored as JSON under one metadata key of the ONNX model (`METADATA_KEY`), and repeated for people in
a sidecar `<file>.json`. A TensorRT engine gets the same JSON beside it, with the build facts added.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

METADATA_KEY = "ssd_serve"
# The contract's tensor names (DESIGN.md).
INPUT_NAME = "images"
OUTPUT_NAMES = ("num_detections", "boxes", "scores", "classes")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelMetadata:
    model: str
    input_size: tuple[int, int]  # (H, W)
    labels: tuple[str, ...]  # labels[class_id]; "" for an unused id
    score_threshold: float
    iou_threshold: float
    candidates_per_class: int
    max_detections: int
    score_activation: str
    weights_source: str
    weights_sha256: str | None
    opset: int
    format_version: int = FORMAT_VERSION
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        data = json.loads(text)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported ssd-serve metadata version {version!r} (expected {FORMAT_VERSION})")
        data["input_size"] = tuple(data["input_size"])
        data["labels"] = tuple(data["labels"])
        return cls(**data)


def sidecar_path(model_path: Path) -> Path:
    """`weights/m.onnx` -> `weights/m.onnx.json`."""
    return model_path.with_name(model_path.name + ".json")
