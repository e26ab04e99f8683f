"""Model sources, picked by name from `REGISTRY` (`--model NAME`).

A source builds an `SSDModel` from a weights argument and, where one exists, gives reference detections
that the exported file is validated against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model_export.spec import Detections, PostprocessOptions, SSDModel

# weights: None (random init), "coco" (official weights through torchvision's API), or a file path.
Builder = Callable[[str | None, int | None], SSDModel]
# Reference post-processing on the same uint8 NHWC batch: one Detections per image.
Reference = Callable[[SSDModel, torch.Tensor, PostprocessOptions], list[Detections]]


@dataclass(frozen=True)
class ModelSource:
    build: Builder
    reference: Reference | None  # None where only an external runtime is the reference (TFLite: LiteRT)
    description: str


REGISTRY: dict[str, ModelSource] = {}


def _collect() -> None:
    from model_export.models import nvidia_ssd, tflite_ssd, torchvision_ssd

    for module in (torchvision_ssd, nvidia_ssd, tflite_ssd):
        REGISTRY.update(module.SOURCES)


_collect()
