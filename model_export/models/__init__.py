"""Model sources, picked by name from `REGISTRY` (`--model NAME`).

A source builds an `SSDModel` from a weights argument and, where one exists, gives reference detections
that the exported file is validated against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model_export.errors import ExportError
from model_export.spec import Detections, Numerics, PostprocessOptions, SSDModel

# weights: None (random init), "coco" (official weights through torchvision's API), or a file path;
# num_classes: None = the weights' own; numerics: None = the source's own (see spec.Numerics).
Builder = Callable[[str | None, int | None, Numerics | None], SSDModel]
# Reference post-processing on the same uint8 NHWC batch: one Detections per image.
Reference = Callable[[SSDModel, torch.Tensor, PostprocessOptions], list[Detections]]


@dataclass(frozen=True)
class ModelSource:
    build: Builder
    reference: Reference | None  # None where only an external runtime is the reference (TFLite: LiteRT)
    description: str


REGISTRY: dict[str, ModelSource] = {}


def require_float(model: str, numerics: Numerics | None) -> None:
    """For the sources whose networks are float: integer numerics need a quantised file."""
    if numerics not in (None, "float"):
        raise ExportError(f"{model} is a float model; --numerics {numerics} needs a quantised TFLite file")


def _collect() -> None:
    from model_export.models import nvidia_ssd, tflite_ssd, torchvision_ssd

    for module in (torchvision_ssd, nvidia_ssd, tflite_ssd):
        REGISTRY.update(module.SOURCES)


_collect()
