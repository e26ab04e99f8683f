"""The one small protocol every engine implements (Triton's initialize / execute / finalize)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from model_export.contract.metadata import ModelMetadata


@dataclass(frozen=True)
class EngineOptions:
    device: str = "cpu"  # "cpu" or "cuda[:N]"
    intra_op_threads: int = 0  # 0: the runtime's default
    fp16: bool = False  # torch engine on CUDA; TensorRT precision is fixed at build time
    max_batch_size: int = 32


@dataclass(frozen=True)
class EngineOutput:
    """The model contract's tensors for one batch of B images."""

    num_detections: np.ndarray  # int32 [B]
    boxes: np.ndarray  # float32 [B, K, 4] x1, y1, x2, y2 normalised, clipped
    scores: np.ndarray  # float32 [B, K]
    classes: np.ndarray  # int32 [B, K]


class Engine(Protocol):
    def load(self, path: Path, options: EngineOptions) -> ModelMetadata:
        """Load the exported file; return the description it carries."""
        ...

    def infer(self, images: np.ndarray) -> EngineOutput:
        """Run one batch: uint8 [B, H, W, 3] RGB at the model's input size."""
        ...

    def close(self) -> None: ...

    # Optional: `infer_solo(images) -> EngineOutput`, the same results for a batch that runs while nothing else
    # does, tuned for latency (ONNX Runtime on the CPU: threads that spin). The batcher uses it where it exists.
