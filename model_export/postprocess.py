"""SSD post-processing as one traceable module: decode -> per-class filter -> NMS -> top K.

Semantics are those of torchvision's `SSD.postprocess_detections` (and the paper):
for each non-background class keep scores > score_threshold, at most `candidates_per_class` of them,
NMS per class at IoU > iou_threshold, then the `max_detections` best across classes. Equal scores rank in
(class column, anchor) order, which is ONNX TopK's stable order over class-major scores.

The algorithm gives exactly that with one NMS problem per image (DESIGN.md, "Post-processing"):

- Boxes of different classes never suppress each other: each class's boxes are shifted by a whole-number offset
  on a grid of cells one unit apart (coordinates are in [0, 1]), so that boxes of two classes at most touch
  (IoU 0). Per-class NMS becomes one NMS problem per image, and greedy NMS with at most K outputs stops once K
  are kept, which are the top K.
- Greedy NMS visits candidates in descending score, and a box's fate depends only on higher-scoring boxes of its
  class. The fast path takes the image's best P candidates over all classes (one TopK), drops those past the
  per-class cap inside them (their rank within their class), and runs NMS on the rest: that is a prefix of the
  exact candidate sequence, so it is already the exact answer when it keeps K boxes, or when P covers every
  candidate above the threshold. Otherwise (any image of the batch) an ONNX `If` takes the full path: per-class
  TopK of `candidates_per_class`, then one NMS per image over all of them.

Every step is a whole-tensor op: no loop over images or classes in the graph. The `If`'s else-branch is the full
path traced on its own and spliced in by `model_export.onnx_fallback`.
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import nn

from model_export.spec import PostprocessOptions, SSDModel

# P: the fast path's candidates per image. On 32 real photos through ssd_mobilenet_v1_coco (80 classes), NMS over
# the best 2000 keeps >= 200 boxes on every one (the best 400 do on 5, the best 1000 on 25). TensorRT's TopK takes
# K <= 3840.
FAST_PATH_CANDIDATES = 2000
# The fast path's TopK over every (class, anchor) score runs in two steps over blocks of this many consecutive
# scores (`best_candidates`): about half the time of one TopK over all of them under ONNX Runtime.
CANDIDATE_BLOCK = 8
FALLBACK_DOMAIN = "ssd_serve"
FALLBACK_OP = "FullPathIfNeeded"  # the placeholder that model_export.onnx_fallback replaces with an `If`


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


def best_candidates(scores: torch.Tensor, k: int, block: int = CANDIDATE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """`_TopK(scores, k)` for scores >= 0 [B, M], computed as TopK over block maxima, then over the chosen blocks.

    Exact, ties included. Rank blocks of `block` consecutive scores by (maximum descending, block index ascending)
    and take the best k. An element among the k best overall lies in one of those blocks: were its block not
    chosen, k chosen blocks would each hold a maximum that ranks above the element (greater, or equal at a lower
    index), so k elements would rank above it. The chosen blocks' scores, gathered in ascending index order, then
    give the same k best with the same tie order. Padding scores are -1, below every real one.
    """
    batch, count = scores.shape
    blocks = -(-count // block)
    if block <= 1 or blocks < k:  # too few blocks to choose k of them: one TopK
        return _TopK.apply(scores, k)
    padded = scores if count % block == 0 else nn.functional.pad(scores, (0, blocks * block - count), value=-1.0)
    _, chosen = _TopK.apply(padded.reshape(batch, blocks, block).amax(dim=2), k)  # [B, k] block indices
    ascending = -_TopK.apply(-chosen.to(torch.float32), k)[0]  # the same blocks in index order (exact below 2**24)
    index = (ascending.to(torch.int64).unsqueeze(2) * block + torch.arange(block, device=scores.device)).reshape(
        batch, k * block
    )  # [B, k * block], ascending
    top_scores, position = _TopK.apply(padded.gather(1, index), k)
    return top_scores, index.gather(1, position)


class _ImageNMS(torch.autograd.Function):
    """Greedy NMS, one problem per image: boxes [B, M, 4], scores [B, 1, M] -> selected [S, 3] = (image, 0, index).

    Candidates are scores > score_threshold, visited in descending score, equal scores in index order; at most
    `max_output` kept per image. In ONNX it is one standard `NonMaxSuppression` node (whose batch axis is the
    images); in PyTorch one `torchvision.ops.nms` per image.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: object,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        max_output: int,
        iou_threshold: float,
        score_threshold: float,
    ) -> torch.Tensor:
        rows = []
        for image in range(boxes.shape[0]):
            image_scores = scores[image, 0]
            candidates = torch.nonzero(image_scores > score_threshold).squeeze(1)
            order = candidates[image_scores[candidates].sort(descending=True, stable=True).indices]
            # Strictly decreasing stand-in scores: torchvision then visits exactly `order`, ties included.
            rank = torch.arange(len(order), 0, -1, dtype=torch.float32, device=boxes.device)
            kept = order[torchvision.ops.nms(boxes[image, order], rank, iou_threshold)[:max_output]]
            rows.append(torch.stack((torch.full_like(kept, image), torch.zeros_like(kept), kept), dim=1))
        return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)

    @staticmethod
    def symbolic(g, boxes, scores, max_output: int, iou_threshold: float, score_threshold: float):  # type: ignore[no-untyped-def]
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            g.op("Constant", value_t=torch.tensor([max_output], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32)),
        )


class _FullPathIfNeeded(torch.autograd.Function):
    """Traced: the fast path's outputs. In ONNX: a placeholder node with the fast outputs and the full path's inputs,
    which `model_export.onnx_fallback.splice_fallback` turns into `If(fast_ok, then: fast outputs, else: full path)`.
    """

    @staticmethod
    def forward(ctx: object, fast_ok, num, boxes, scores, classes, all_boxes, all_scores):  # type: ignore[no-untyped-def, override]
        return num, boxes, scores, classes

    @staticmethod
    def symbolic(g, fast_ok, num, boxes, scores, classes, all_boxes, all_scores):  # type: ignore[no-untyped-def]
        outputs = g.op(
            f"{FALLBACK_DOMAIN}::{FALLBACK_OP}", fast_ok, num, boxes, scores, classes, all_boxes, all_scores,
            outputs=4,
        )
        for out, like in zip(outputs, (num, boxes, scores, classes), strict=True):
            out.setType(like.type())
        return outputs


def _rows(boxes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """boxes [B, N, 4], index [B, M] -> boxes[b, index[b, m]] as [B, M, 4]: one Gather of whole rows (a GatherElements
    over an expanded index costs ONNX Runtime several times more)."""
    batch, count = boxes.shape[0], boxes.shape[1]
    flat = index + torch.arange(batch, device=index.device).unsqueeze(1) * count  # [B, M] into B*N
    return boxes.reshape(-1, 4).index_select(0, flat.reshape(-1)).reshape(batch, -1, 4)


def class_offsets(class_index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[...] class indices -> [..., 4] whole-number (x, y, x, y) shifts: class c's cell on a ceil(sqrt(C)) grid.

    A 2-D grid keeps the shifted coordinates small (below 10 for 90 classes), so that they lose few bits.
    """
    side = math.isqrt(num_classes - 1) + 1
    column = (class_index % side).to(torch.float32)
    row = torch.div(class_index, side, rounding_mode="floor").to(torch.float32)
    return torch.stack((column, row, column, row), dim=-1)


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
        self.num_classes = len(model.score_columns)
        # Row c: class c's (x, y, x, y) shift, looked up per candidate (one Gather of whole rows).
        self.register_buffer("offsets", class_offsets(torch.arange(self.num_classes), self.num_classes), persistent=False)
        self.num_anchors = int(model.anchors.shape[0])
        self.fast_candidates = min(FAST_PATH_CANDIDATES, self.num_classes * self.num_anchors)
        # When P covers every (class, anchor) pair, the fast path is always exact: no full path, no `If`.
        self.has_fallback = self.fast_candidates < self.num_classes * self.num_anchors

    def scores_and_boxes(self, regression: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head outputs -> (class-major scores [B, K, N] of the real classes, boxes [B, N, 4])."""
        boxes = decode_boxes(regression, self.anchors, self.box_weights, self.scale_clamp)  # [B, N, 4]
        # Class-major first, so that picking the real classes copies whole rows (a Gather along the last axis copies
        # value by value); a sigmoid then only runs on the real classes.
        if self.activation == "softmax":
            return logits.softmax(dim=-1).transpose(1, 2).index_select(1, self.score_columns), boxes
        return logits.transpose(1, 2).index_select(1, self.score_columns).sigmoid(), boxes

    def forward(
        self, regression: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, boxes = self.scores_and_boxes(regression, logits)
        fast_ok, outputs = self.fast_path(scores, boxes)
        if not self.has_fallback:
            return outputs
        if torch.onnx.is_in_onnx_export():
            return _FullPathIfNeeded.apply(fast_ok, *outputs, scores, boxes)
        if bool(fast_ok.all()):
            return outputs
        return self.full_path(scores, boxes)

    def fast_path(
        self, scores: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """NMS over each image's best P candidates -> (whether that is exact for the whole batch, the outputs)."""
        opts = self.options
        batch = scores.shape[0]
        num_classes, num_anchors = self.num_classes, self.num_anchors
        top_scores, top_index = best_candidates(scores.reshape(batch, -1), self.fast_candidates)  # [B, P], class-major
        top_class = torch.div(top_index, num_anchors, rounding_mode="floor")  # [B, P]
        top_boxes = _rows(boxes, top_index % num_anchors)  # [B, P, 4]
        nms_scores = top_scores
        if self.fast_candidates > opts.candidates_per_class:  # the per-class cap may bind inside the best P
            same_class = (top_class.unsqueeze(2) == torch.arange(num_classes, device=scores.device)).to(torch.int32)
            rank = same_class.cumsum(dim=1).gather(2, top_class.unsqueeze(2)).squeeze(2)  # 1-based, within its class
            nms_scores = torch.where(rank > opts.candidates_per_class, -1.0, top_scores)  # -1: never a candidate
        selected = _ImageNMS.apply(
            top_boxes + self.offsets[top_class],
            nms_scores.unsqueeze(1),
            opts.max_detections,
            opts.iou_threshold,
            opts.score_threshold,
        )
        kept = self._kept(selected, batch, self.fast_candidates)  # [B, P]
        # Exact when NMS kept K boxes, or when fewer than P scores pass the threshold (the best P hold them all).
        exact = (kept.sum(dim=1) >= opts.max_detections) | (top_scores[:, -1] <= opts.score_threshold)  # [B]
        return exact.all(), self._top(kept, nms_scores, top_boxes, top_class)

    def full_path(
        self, scores: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-class TopK of `candidates_per_class`, then one NMS per image over all of them."""
        opts = self.options
        batch = scores.shape[0]
        per_class = min(opts.candidates_per_class, self.num_anchors)  # T
        cand_scores, cand_index = _TopK.apply(scores, per_class)  # [B, K, T]
        cand_scores = cand_scores.reshape(batch, -1)  # [B, K*T], class-major
        cand_boxes = _rows(boxes, cand_index.reshape(batch, -1))  # [B, K*T, 4]
        cand_class = torch.arange(self.num_classes, device=scores.device).repeat_interleave(per_class)  # [K*T]
        selected = _ImageNMS.apply(
            cand_boxes + self.offsets[cand_class],
            cand_scores.unsqueeze(1),
            opts.max_detections,
            opts.iou_threshold,
            opts.score_threshold,
        )
        kept = self._kept(selected, batch, cand_scores.shape[1])
        return self._top(kept, cand_scores, cand_boxes, cand_class.expand(batch, -1))

    @staticmethod
    def _kept(selected: torch.Tensor, batch: int, count: int) -> torch.Tensor:
        """NMS's selected (image, 0, index) rows -> a [B, count] mask of kept candidates."""
        flat = selected[:, 0] * count + selected[:, 2]
        marks = torch.zeros((batch * count,), dtype=torch.float32, device=selected.device).scatter(0, flat, 1.0)
        return marks.reshape(batch, count) > 0

    def _top(
        self, kept: torch.Tensor, cand_scores: torch.Tensor, cand_boxes: torch.Tensor, cand_class: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The K best kept candidates ([B, M] in class-major order) -> the contract's padded outputs."""
        k = self.options.max_detections
        # Suppressed candidates get -1 so they sort below every kept score (all of which are > threshold >= 0).
        ranked = torch.where(kept, cand_scores, -1.0)  # [B, M]
        top = min(k, ranked.shape[1])
        top_scores, top_index = _TopK.apply(ranked, top)  # [B, D]
        valid = top_scores >= 0  # [B, D]
        out_boxes = cand_boxes.gather(1, top_index.unsqueeze(2).expand(-1, -1, 4))  # [B, D, 4]
        out_classes = self.class_ids[cand_class.gather(1, top_index)]  # [B, D]

        zero = torch.zeros((), dtype=torch.float32)
        out_scores = torch.where(valid, top_scores, zero)
        out_boxes = torch.where(valid.unsqueeze(2), out_boxes, zero)
        out_classes = torch.where(valid, out_classes, torch.zeros((), dtype=torch.int32))
        num_detections = valid.sum(dim=1).to(torch.int32)
        if top < k:  # fewer candidates than K rows: pad to the contract's fixed K
            pad = k - top
            out_boxes = nn.functional.pad(out_boxes, (0, 0, 0, pad))
            out_scores = nn.functional.pad(out_scores, (0, pad))
            out_classes = nn.functional.pad(out_classes, (0, pad))
        return num_detections, out_boxes, out_scores, out_classes
