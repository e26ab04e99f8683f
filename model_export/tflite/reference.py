"""LiteRT as the reference for an imported TFLite SSD, and the rule our detections are held to against it.

`LiteRTDetector` runs the .tflite file as shipped (its own TFLite_Detection_PostProcess: top 10,
class-agnostic NMS at 0.6) and can also hand out the raw head tensors the post-processing consumes.
`compare_detections` checks that every reference detection above a score has a counterpart of ours.

One difference is by design, not error, and the rule knows it: ours is the paper's per-class NMS at IoU
0.45, LiteRT's a class-agnostic NMS at 0.6, so a reference box whose same-class neighbour with a higher score
overlaps it by more than 0.45 is (rightly) suppressed in ours. Such boxes are reported as `suppressed`, not
failures. With integer numerics the networks agree bit for bit, so every other reference box is ours exactly.

Only numpy is needed (LiteRT is imported when a detector is made), so server tests can use it too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_export.tflite.reader import Graph, read_tflite


@dataclass(frozen=True)
class Detections:
    """One image's detections: boxes x1, y1, x2, y2 normalised to [0, 1], scores, class ids."""

    boxes: np.ndarray  # [n, 4] float64
    scores: np.ndarray  # [n] float64
    classes: np.ndarray  # [n] int64


@dataclass(frozen=True)
class RawHeads:
    """What the file's post-processing op consumes, dequantised."""

    box_encodings: np.ndarray  # [N, 4] (ty, tx, th, tw)
    logits: np.ndarray | None  # [N, C] before the score activation (None if the scores have no producer op)
    scores: np.ndarray  # [N, C] after it


class LiteRTDetector:
    """The .tflite file under LiteRT. Input: one uint8 [H, W, 3] RGB image already at the model's input size."""

    def __init__(self, path: Path, num_threads: int = 2, keep_intermediates: bool = False) -> None:
        from ai_edge_litert.interpreter import Interpreter

        with warnings.catch_warnings():  # keep_intermediates is meant: LiteRT warns that it is a debugging aid
            warnings.simplefilter("ignore", UserWarning)
            self._interpreter = Interpreter(
                model_path=str(path), num_threads=num_threads, experimental_preserve_all_tensors=keep_intermediates
            )
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        _, height, width, _ = (int(d) for d in self._input["shape"])
        self.input_size = (height, width)
        self._outputs = sorted(self._interpreter.get_output_details(), key=lambda d: d["name"])
        self._path = path
        self._keep_intermediates = keep_intermediates
        self._graph: Graph | None = None

    def __call__(self, image: np.ndarray) -> Detections:
        """The file's own post-processing output, boxes clipped to [0, 1] as the contract's are."""
        self._run(image)
        boxes, classes, scores, num = (self._interpreter.get_tensor(d["index"]) for d in self._outputs)
        n = int(num[0])
        yxyx = boxes[0, :n].astype(np.float64)
        return Detections(
            boxes=np.clip(yxyx[:, [1, 0, 3, 2]], 0.0, 1.0),
            scores=scores[0, :n].astype(np.float64),
            classes=classes[0, :n].astype(np.int64),
        )

    def raw(self, image: np.ndarray) -> RawHeads:
        """Box encodings and class logits for `image` (needs keep_intermediates=True)."""
        if not self._keep_intermediates:
            raise ValueError("raw() needs LiteRTDetector(..., keep_intermediates=True)")
        if self._graph is None:
            self._graph = read_tflite(self._path)
        graph = self._graph
        posts = graph.find("TFLite_Detection_PostProcess")
        if not posts:
            raise ValueError(f"{self._path} has no TFLite_Detection_PostProcess op")
        post = posts[0]
        self._run(image)

        def value(index: int) -> np.ndarray:
            t = graph.tensors[index]
            data = self._interpreter.get_tensor(index)
            return t.quantization.dequantize(data) if t.is_quantized and t.quantization else data.astype(np.float32)

        producer = graph.producer(post.inputs[1])
        return RawHeads(
            box_encodings=value(post.inputs[0]).reshape(-1, 4),
            logits=value(producer.inputs[0])[0] if producer is not None else None,
            scores=value(post.inputs[1])[0],
        )

    def _run(self, image: np.ndarray) -> None:
        if image.shape != (*self.input_size, 3) or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 {(*self.input_size, 3)}, got {image.dtype} {image.shape}")
        self._interpreter.set_tensor(self._input["index"], image[None])
        self._interpreter.invoke()


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1, y1, x2, y2 box with each of [n, 4]."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / np.maximum(area + areas - inter, 1e-12)


@dataclass(frozen=True)
class Match:
    reference: int  # row of the reference detection
    ours: int | None  # row of ours that matches it; None if none does
    iou: float  # with that row (or the best same-class row when unmatched; 0 if none)
    score_diff: float  # |ours - reference|, same row
    suppressed: bool  # unmatched, and a higher-scoring same-class box of ours overlaps it > nms_iou


@dataclass(frozen=True)
class Tolerances:
    min_score: float = 0.3  # reference detections below this are not checked
    min_iou: float = 0.9
    max_score_diff: float = 0.05
    nms_iou: float = 0.45  # our post-processing's threshold, to recognise a by-design suppression


def compare_detections(
    reference: Detections, ours: Detections, tolerances: Tolerances = Tolerances()
) -> list[Match]:
    """For each reference detection with score >= min_score, its counterpart among ours (same class)."""
    tol = tolerances
    matches = []
    for k in np.flatnonzero(reference.scores >= tol.min_score):
        box, score, cls = reference.boxes[k], float(reference.scores[k]), int(reference.classes[k])
        same = np.flatnonzero(ours.classes == cls)
        if same.size == 0:
            matches.append(Match(int(k), None, 0.0, score, False))
            continue
        ious = box_iou(box, ours.boxes[same])
        diffs = np.abs(ours.scores[same] - score)
        ok = (ious >= tol.min_iou) & (diffs <= tol.max_score_diff)
        if ok.any():
            j = int(np.argmax(np.where(ok, ious, -1.0)))
            matches.append(Match(int(k), int(same[j]), float(ious[j]), float(diffs[j]), False))
            continue
        j = int(np.argmax(ious))
        # The same box with a score off by more than the tolerance is a failure, not a suppression.
        suppressor = (ious > tol.nms_iou) & (ious < tol.min_iou) & (ours.scores[same] >= score - tol.max_score_diff)
        matches.append(Match(int(k), None, float(ious[j]), float(diffs[j]), bool(suppressor.any())))
    return matches
