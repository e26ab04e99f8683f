"""The one exportable module: uint8 NHWC RGB in, the model contract's fixed-size tensors out."""

from __future__ import annotations

import torch
from torch import nn

from model_export.postprocess import SSDPostprocess
from model_export.spec import PostprocessOptions, SSDModel


class _PixelGrid(torch.autograd.Function):
    """uint8 pixels -> (p - zero_point) * scale in float32: one DequantizeLinear of the graph input."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: object, images: torch.Tensor, scale: float, zero_point: int
    ) -> torch.Tensor:
        return (images.to(torch.float32) - zero_point) * torch.tensor(scale, dtype=torch.float32)

    @staticmethod
    def symbolic(g, images, scale, zero_point):  # type: ignore[no-untyped-def]
        return g.op(
            "DequantizeLinear",
            images,
            g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8)),
        )


class ExportableSSD(nn.Module):
    """normalise -> backbone + heads -> decode -> filter -> NMS -> top K, all in one graph."""

    def __init__(self, model: SSDModel, options: PostprocessOptions) -> None:
        super().__init__()
        self.network = model.network.eval()
        # The same value for every channel (as TFLite's models have) stays a scalar: ONNX Runtime broadcasts a
        # [1, 1, 1, 3] operand over NHWC pixels three values at a time, far slower than a scalar.
        uniform = len(set(model.mean)) == 1 and len(set(model.std)) == 1
        # An integer network whose normalisation is the input's own uint8 grid (a quantised TFLite file: mean =
        # zero point, std = 1 / scale) takes the pixels as one DequantizeLinear, whose output its first conv's
        # QuantizeLinear maps back to the same integers; that is 4 operators fewer over every pixel than a cast
        # and a multiply-add. Integer exports only: TensorRT, which refuses them anyway, takes no uint8 DQ input.
        self.pixel_grid: tuple[float, int] | None = None
        zero_point = model.mean[0]
        integer = model.extra_metadata.get("numerics") == "integer"
        if integer and uniform and float(zero_point).is_integer() and 0 <= zero_point <= 255:
            self.pixel_grid = (float(torch.tensor(1.0 / model.std[0], dtype=torch.float32)), int(zero_point))
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
        if self.pixel_grid is not None:
            return _PixelGrid.apply(images, *self.pixel_grid).permute(0, 3, 1, 2)
        # Cast before any other op: TensorRT takes uint8 only as a network input or output, so no uint8
        # intermediate (e.g. a transposed uint8 tensor) may exist in the exported graph.
        x = images.to(torch.float32).permute(0, 3, 1, 2)  # [B, 3, H, W]
        return x * self.scale + self.shift
