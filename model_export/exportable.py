"""The one exportable module: uint8 NHWC RGB in, the model contract's fixed-size tensors out."""

from __future__ import annotations

import torch
from torch import nn

from model_export.postprocess import SSDPostprocess
from model_export.spec import PostprocessOptions, SSDModel


class ExportableSSD(nn.Module):
    """normalise -> backbone + heads -> decode -> filter -> NMS -> top K, all in one graph."""

    def __init__(self, model: SSDModel, options: PostprocessOptions) -> None:
        super().__init__()
        self.network = model.network.eval()
        # The same value for every channel (as TFLite's models have) stays a scalar: ONNX Runtime broadcasts a
        # [1, 1, 1, 3] operand over NHWC pixels three values at a time, far slower than a scalar.
        uniform = len(set(model.mean)) == 1 and len(set(model.std)) == 1
        shape = () if uniform else (1, 3, 1, 1)
        mean = torch.tensor(model.mean[:1] if uniform else model.mean, dtype=torch.float32).reshape(shape)
        std = torch.tensor(model.std[:1] if uniform else model.std, dtype=torch.float32).reshape(shape)
        # (x - mean) / std folded into one multiply-add.
        self.register_buffer("scale", 1.0 / std, persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)
        self.postprocess = SSDPostprocess(model, options)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        regression, logits = self.network(self.normalise(images))  # [B, N, 4], [B, N, C]
        return self.postprocess(regression, logits)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float32 [B, 3, H, W], (x - mean) / std."""
        # Cast before any other op: TensorRT takes uint8 only as a network input or output, so no uint8
        # intermediate (e.g. a transposed uint8 tensor) may exist in the exported graph.
        x = images.to(torch.float32).permute(0, 3, 1, 2)  # [B, 3, H, W]
        return x * self.scale + self.shift
