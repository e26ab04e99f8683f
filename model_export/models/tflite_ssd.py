"""SSD from a TF Object Detection API TFLite export (ssd_mobilenet_v1_coco and kin) as a PyTorch SSD.

The file is read generically (`model_export.tflite`): the network is the file's own operator list up to
the inputs of its `TFLite_Detection_PostProcess` custom op, whose other inputs and options give the rest:

- anchors: the op's constant third input, (ycenter, xcenter, h, w) -> the contract's (cx, cy, w, h);
- box coder: the op's y/x/h/w scales (10, 10, 5, 5 for the TF OD API) -> box_weights (wx, wy, ww, wh);
- regression: the file's (ty, tx, th, tw) is reordered to (dx, dy, dw, dh) by permuting the output
  channels of the box-predictor convolutions at import (free at run time);
- scores: the producer of the op's score input (LOGISTIC -> sigmoid, SOFTMAX -> softmax), whose input is
  the logits; column j + label_offset is class id j of labelmap.txt ('???' ids are never returned);
- normalisation: the input's uint8 quantisation (real = scale * (q - zero_point)) as mean / std;
- numerics: "integer" (the default for a uint8 file whose operators all have an integer form) computes
  LiteRT's uint8 arithmetic bit for bit and exports as QuantizeLinear / DequantizeLinear, which ONNX Runtime
  runs as integer QLinearConv; "float" (for TensorRT, or a file with other operators) computes in float
  with each quantised tensor's range kept as a clamp. See `model_export.tflite.ops`.

The reference is LiteRT running the same file (`SSDModel.reference` is None); see the tests.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model_export.errors import ExportError
from model_export.models import ModelSource
from model_export.spec import Numerics, SSDModel
from model_export.tflite.ops import TFLiteNetwork, build_network
from model_export.tflite.reader import Graph, embedded_files, read_tflite

NAME = "ssd_mobilenet_v1_coco"
POSTPROCESS_OP = "TFLite_Detection_PostProcess"
LABELMAP = "labelmap.txt"
UNUSED_LABEL = "???"
# The file's box encodings are (ty, tx, th, tw); the contract wants (dx, dy, dw, dh).
_YXHW_TO_XYWH = np.array([1, 0, 3, 2])
_SCORE_ACTIVATIONS = {"LOGISTIC": "sigmoid", "SOFTMAX": "softmax"}


class TFLiteSSDNetwork(nn.Module):
    """Normalised float [B, 3, H, W] -> (box_regression [B, N, 4] (dx, dy, dw, dh), class_logits [B, N, C])."""

    def __init__(self, body: TFLiteNetwork, num_anchors: int, num_columns: int, box_order: list[int] | None) -> None:
        super().__init__()
        self.body = body
        self.num_anchors = num_anchors
        self.num_columns = num_columns
        # Only when the box channels could not be permuted at import: reorder at run time instead.
        self.box_order = box_order

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, logits = self.body(x)
        boxes = boxes.reshape(-1, self.num_anchors, 4)  # [B, N, 4]
        if self.box_order is not None:
            boxes = boxes[..., self.box_order]
        return boxes, logits.reshape(-1, self.num_anchors, self.num_columns)  # [B, N, C]


def _box_channel_perms(graph: Graph, tensor: int) -> dict[int, np.ndarray] | None:
    """Output-channel permutations of the convs feeding the box encodings that turn yxhw into xywh.

    Follows the encodings back through RESHAPE / SQUEEZE (which keep the 4 coordinates innermost) and
    CONCATENATION (not along the last axis) to CONV_2D ops. None if the path is anything else, or if an
    intermediate tensor has another consumer that a permutation would disturb.
    """
    perms: dict[int, np.ndarray] = {}
    stack = [tensor]
    while stack:
        t = stack.pop()
        producer = graph.producer(t)
        if producer is None:
            return None
        if t != tensor and len(graph.consumers(t)) != 1:
            return None
        shape = graph.tensors[t].shape
        if not shape or shape[-1] % 4:
            return None
        if producer.op in ("RESHAPE", "SQUEEZE"):
            stack.append(producer.inputs[0])
        elif producer.op == "CONCATENATION":
            if int(producer.options.get("axis", 0)) % len(shape) == len(shape) - 1:
                return None
            stack.extend(producer.inputs)
        elif producer.op == "CONV_2D":
            channels = shape[-1]
            perms[producer.index] = (np.arange(channels) // 4 * 4 + _YXHW_TO_XYWH[np.arange(channels) % 4]).astype(
                np.int64
            )
        else:
            return None
    return perms


def _read_labels(path: Path, num_classes: int, label_offset: int) -> list[str]:
    """labelmap.txt beside the file (or packed in its metadata), one name per class id (0-based)."""
    beside = path.with_name(LABELMAP)
    if beside.is_file():
        text, origin = beside.read_text(encoding="utf-8"), str(beside)
    else:
        packed = {Path(k).name: v for k, v in embedded_files(path).items()}
        if LABELMAP not in packed:
            raise ExportError(f"no {LABELMAP} beside {path} and none packed in the file's metadata")
        text, origin = packed[LABELMAP].decode("utf-8"), f"{path} (metadata)"
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    # The TFLite example archive's labelmap starts with a '???' row for the background column.
    if len(names) == num_classes + label_offset and all(n == UNUSED_LABEL for n in names[:label_offset]):
        names = names[label_offset:]
    if len(names) != num_classes:
        raise ExportError(f"{origin} has {len(names)} names; the model has {num_classes} classes")
    return names


def _coder_scales(options: dict[str, object], op_index: int) -> tuple[float, float, float, float]:
    """(wx, wy, ww, wh) from the op's y/x/h/w scales."""
    missing = [k for k in ("x_scale", "y_scale", "w_scale", "h_scale") if k not in options]
    if missing:
        raise ExportError(f"{POSTPROCESS_OP} (operator {op_index}) options lack {', '.join(missing)}")
    wx, wy, ww, wh = (float(options[k]) for k in ("x_scale", "y_scale", "w_scale", "h_scale"))  # type: ignore[arg-type]
    if min(wx, wy, ww, wh) <= 0:
        raise ExportError(f"{POSTPROCESS_OP} box coder scales must be positive, got {(wx, wy, ww, wh)}")
    return wx, wy, ww, wh


def import_tflite_ssd(
    path: Path, name: str = NAME, weights_source: str | None = None, numerics: Numerics | None = None
) -> SSDModel:
    """Build the SSD described by a TF OD API TFLite export (`numerics`: see the module docstring)."""
    graph = read_tflite(path)
    posts = graph.find(POSTPROCESS_OP)
    if len(posts) != 1:
        raise ExportError(f"{path}: expected one {POSTPROCESS_OP} op (a TF OD API SSD export), found {len(posts)}")
    post = posts[0]
    if len(post.inputs) != 3:
        raise ExportError(f"{POSTPROCESS_OP} (operator {post.index}) has {len(post.inputs)} inputs; expected 3")
    box_tensor, score_tensor, anchor_tensor = post.inputs
    options = post.options

    # Scores: the op takes activated scores; the contract's network returns the logits before it.
    producer = graph.producer(score_tensor)
    if producer is None or producer.op not in _SCORE_ACTIVATIONS:
        raise ExportError(f"{POSTPROCESS_OP} scores must come from LOGISTIC or SOFTMAX, not {producer and producer.op}")
    activation = _SCORE_ACTIVATIONS[producer.op]
    logit_tensor = producer.inputs[0]

    anchors_raw = graph.tensors[anchor_tensor]
    if anchors_raw.data is None or len(anchors_raw.shape) != 2 or anchors_raw.shape[1] != 4:
        raise ExportError(f"{POSTPROCESS_OP} anchors must be a constant [N, 4] tensor, got {anchors_raw.shape}")
    yxhw = anchors_raw.value().astype(np.float32)  # [N, 4] (ycenter, xcenter, h, w)
    anchors = torch.from_numpy(np.ascontiguousarray(yxhw[:, _YXHW_TO_XYWH]))  # [N, 4] (cx, cy, w, h)
    num_anchors = anchors.shape[0]

    columns = graph.tensors[score_tensor].shape[-1]
    num_classes = int(options.get("num_classes", columns - 1))  # type: ignore[arg-type]
    label_offset = columns - num_classes
    if label_offset < 0:
        raise ExportError(f"{POSTPROCESS_OP}: {num_classes} classes but only {columns} score columns")
    names = _read_labels(path, num_classes, label_offset)
    class_ids = tuple(j for j, n in enumerate(names) if n and n != UNUSED_LABEL)
    labels = tuple("" if n == UNUSED_LABEL else n for n in names)

    image = graph.tensors[graph.inputs[0]]
    if len(image.shape) != 4 or image.shape[3] != 3:
        raise ExportError(f"{path}: input must be [1, H, W, 3], got {image.shape}")
    q = image.quantization
    if image.dtype != np.uint8 or q is None or q.scale.size != 1:
        raise ExportError(f"{path}: only uint8-quantised inputs are supported (the normalisation comes from them)")
    mean, std = float(q.zero_point[0]), 1.0 / float(q.scale[0])  # real = (pixel - mean) / std

    perms = _box_channel_perms(graph, box_tensor)
    heads = [box_tensor, logit_tensor]
    if numerics is None:
        try:
            network, numerics = build_network(graph, heads, perms or {}, "integer"), "integer"
        except ExportError:  # an operator or tensor with no integer form: the float network is the file's best
            network, numerics = build_network(graph, heads, perms or {}, "float"), "float"
    else:
        network = build_network(graph, heads, perms or {}, numerics)
    data = path.read_bytes()
    return SSDModel(
        name=name,
        network=TFLiteSSDNetwork(network, num_anchors, columns, None if perms else _YXHW_TO_XYWH.tolist()),
        input_size=(image.shape[1], image.shape[2]),
        anchors=anchors,
        box_weights=_coder_scales(options, post.index),
        score_activation=activation,  # type: ignore[arg-type]
        score_columns=tuple(j + label_offset for j in class_ids),
        class_ids=class_ids,
        labels=labels,
        mean=(mean,) * 3,
        std=(std,) * 3,
        scale_clamp=None,
        weights_source=weights_source or path.name,
        weights_sha256=hashlib.sha256(data).hexdigest(),
        extra_metadata={
            "source_format": "tflite",
            "reference": f"LiteRT {POSTPROCESS_OP} on the same file",
            "numerics": numerics,
        },
    )


def build(weights: str | None, num_classes: int | None, numerics: Numerics | None = None) -> SSDModel:
    """`weights`: a .tflite path (labelmap.txt beside it) or "coco" (fetched through model_export/manifest.json)."""
    if weights is None:
        raise ExportError(f"{NAME} has no random initialisation: pass --weights coco or a .tflite file")
    source = weights
    if weights == "coco":
        from model_export import weights as weight_store

        path = weight_store.fetch(NAME, weight_store.default_dest(), mirror=os.environ.get(weight_store.MIRROR_ENV))
    else:
        path = Path(weights)
        if path.suffix != ".tflite":
            raise ExportError(f"{NAME} imports a .tflite file, got {weights!r}")
        if not path.is_file():
            raise ExportError(f"weights file not found: {weights}")
        source = path.name
    model = import_tflite_ssd(path, NAME, source, numerics)
    columns = max(model.score_columns) + 1  # score columns, background included (the CLI's --num-classes)
    if num_classes is not None and num_classes != columns:
        raise ExportError(
            f"{NAME}: the file fixes {columns} classes (background included); "
            f"--num-classes {num_classes} cannot change that"
        )
    return model


SOURCES = {
    NAME: ModelSource(
        build=build,
        reference=None,  # LiteRT on the same file is the reference (tests/model_export/test_tflite_ssd.py)
        description="SSD MobileNet v1 COCO (TF OD API, uint8 TFLite): LiteRT's integer arithmetic, or float",
    )
}
