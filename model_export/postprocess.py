"""SSD post-processing as one traceable module: decode -> per-class filter -> batched NMS -> top K.

Semantics are those of torchvision's `SSD.postprocess_detections` (and the paper):
for each non-background class keep scores > score_threshold, at most `candidates_per_class` of them,
NMS per class at IoU > iou_threshold, then the `max_detections` best across classes.

Every step is a whole-tensor op, so the exported graph has no loop over images or classes. NMS is the
standard ONNX `NonMaxSuppression` with the (image, class) pairs folded into its batch axis: each pair
is its own NMS problem over its own candidates, which is exactly per-class NMS.
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import nn

from model_export.spec import PostprocessOptions, SSDModel


def decode_boxes(
    regression: torch.Tensor,
    anchors: torch.Tensor,
    weights: tuple[float, float, float, float],
    scale_clamp: float | None,
) -> torch.Tensor:
    """(dx, dy, dw, dh) offsets against (cx, cy, w, h) default boxes -> clipped x1, y1, x2, y2 in [0, 1]."""
    wx, wy, ww, wh = weights
    dx = regression[..., 0] / wx  # [B, N]
    dy = regression[..., 1] / wy
    dw = regression[..., 2] / ww
    dh = regression[..., 3] / wh
    if scale_clamp is not None:
        dw = dw.clamp(max=scale_clamp)
        dh = dh.clamp(max=scale_clamp)
    acx, acy, aw, ah = anchors.unbind(-1)  # [N] each
    cx = dx * aw + acx
    cy = dy * ah + acy
    half_w = 0.5 * torch.exp(dw) * aw
    half_h = 0.5 * torch.exp(dh) * ah
    boxes = torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)  # [B, N, 4]
    return boxes.clamp(0.0, 1.0)


class _TopK(torch.autograd.Function):
    """The k largest along the last axis, in descending order, equal values in ascending index order.

    That tie rule is ONNX TopK's, and ONNX Runtime's NMS visits equal scores the same way; `torch.topk` leaves
    ties unspecified. Ties are common with quantised networks, whose scores take few distinct values.
    """

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        values, index = x.sort(dim=-1, descending=True, stable=True)
        return values[..., :k], index[..., :k]

    @staticmethod
    def symbolic(g, x, k):  # type: ignore[no-untyped-def]
        one = g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64))
        # k: a Python int, or a traced value where it derives from a dynamic shape
        if isinstance(k, int):
            k = g.op("Constant", value_t=torch.tensor([k], dtype=torch.int64))
        else:
            k = g.op("Reshape", k, one)
        return g.op("TopK", x, k, axis_i=-1, outputs=2)


class _BatchedNMS(torch.autograd.Function):
    """NMS over G independent groups; returns ONNX-style selected indices [M, 3] = (group, 0, index).

    In PyTorch it runs torchvision's NMS; in ONNX it becomes one `NonMaxSuppression` node.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: object, boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float
    ) -> torch.Tensor:
        # boxes [G, T, 4], scores [G, 1, T]
        per_group = scores.shape[2]
        flat_scores = scores.reshape(-1)  # [G*T]
        candidates = torch.nonzero(flat_scores > score_threshold).squeeze(1)  # [M0]
        group_of = torch.div(candidates, per_group, rounding_mode="floor")
        keep = torchvision.ops.batched_nms(
            boxes.reshape(-1, 4)[candidates], flat_scores[candidates], group_of, iou_threshold
        )
        kept = candidates[keep]  # [M]
        return torch.stack(
            (torch.div(kept, per_group, rounding_mode="floor"), torch.zeros_like(kept), kept % per_group), dim=1
        )

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float, score_threshold: float):  # type: ignore[no-untyped-def]
        max_per_class = g.op("Shape", boxes)  # T: NMS may keep every candidate of a group
        max_per_class = g.op(
            "Slice",
            max_per_class,
            g.op("Constant", value_t=torch.tensor([1])),
            g.op("Constant", value_t=torch.tensor([2])),
        )
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            max_per_class,
            g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32)),
        )


class SSDPostprocess(nn.Module):
    """Raw head outputs -> the contract's fixed-size tensors (num_detections, boxes, scores, classes)."""

    def __init__(self, model: SSDModel, options: PostprocessOptions) -> None:
        super().__init__()
        self.options = options
        self.box_weights = model.box_weights
        self.scale_clamp = model.scale_clamp
        self.activation = model.score_activation
        self.register_buffer("anchors", model.anchors.to(torch.float32).clone(), persistent=False)
        self.register_buffer("score_columns", torch.tensor(model.score_columns, dtype=torch.int64), persistent=False)
        self.register_buffer("class_ids", torch.tensor(model.class_ids, dtype=torch.int32), persistent=False)
        if not math.isfinite(options.score_threshold) or options.score_threshold < 0:
            raise ValueError("score_threshold must be a finite number >= 0")
        if not 0.0 <= options.iou_threshold <= 1.0:
            raise ValueError("iou_threshold must be within [0, 1]")
        if options.candidates_per_class < 1 or options.max_detections < 1:
            raise ValueError("candidates_per_class and max_detections must be >= 1")

    def forward(
        self, regression: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        opts = self.options
        batch = regression.shape[0]
        boxes = decode_boxes(regression, self.anchors, self.box_weights, self.scale_clamp)  # [B, N, 4]
        probs = logits.softmax(dim=-1) if self.activation == "softmax" else logits.sigmoid()  # [B, N, C]
        scores = probs.index_select(2, self.score_columns).transpose(1, 2)  # [B, K, N] K = real classes
        num_classes, num_anchors = scores.shape[1], scores.shape[2]

        per_class = min(opts.candidates_per_class, num_anchors)  # T
        cand_scores, cand_index = _TopK.apply(scores, per_class)  # [B, K, T]
        cand_boxes = boxes.gather(1, cand_index.reshape(batch, -1, 1).expand(-1, -1, 4))  # [B, K*T, 4]

        selected = _BatchedNMS.apply(
            cand_boxes.reshape(-1, per_class, 4),  # [B*K, T, 4]
            cand_scores.reshape(-1, 1, per_class),  # [B*K, 1, T]
            opts.iou_threshold,
            opts.score_threshold,
        )  # [M, 3] = (b * K + k, 0, t)
        flat_kept = selected[:, 0] * per_class + selected[:, 2]  # [M] into B*K*T
        kept = torch.zeros_like(cand_scores).reshape(-1).scatter(0, flat_kept, 1.0)  # [B*K*T]
        # Suppressed candidates get -1 so they sort below every kept score (all of which are > threshold >= 0).
        ranked = torch.where(kept > 0, cand_scores.reshape(-1), -1.0).reshape(batch, -1)  # [B, K*T]

        top = min(opts.max_detections, num_classes * per_class)
        top_scores, top_index = _TopK.apply(ranked, top)  # [B, D]
        valid = top_scores >= 0  # [B, D]
        out_boxes = cand_boxes.gather(1, top_index.unsqueeze(2).expand(-1, -1, 4))  # [B, D, 4]
        out_classes = self.class_ids[torch.div(top_index, per_class, rounding_mode="floor")]  # [B, D]

        zero = torch.zeros((), dtype=torch.float32)
        out_scores = torch.where(valid, top_scores, zero)
        out_boxes = torch.where(valid.unsqueeze(2), out_boxes, zero)
        out_classes = torch.where(valid, out_classes, torch.zeros((), dtype=torch.int32))
        num_detections = valid.sum(dim=1).to(torch.int32)
        if top < opts.max_detections:  # fewer candidates than K rows: pad to the contract's fixed K
            pad = opts.max_detections - top
            out_boxes = nn.functional.pad(out_boxes, (0, 0, 0, pad))
            out_scores = nn.functional.pad(out_scores, (0, pad))
            out_classes = nn.functional.pad(out_classes, (0, pad))
        return num_detections, out_boxes, out_scores, out_classes
