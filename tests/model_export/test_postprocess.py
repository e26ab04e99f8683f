"""The in-graph post-processing against a plain per-image, per-class loop (torchvision's algorithm)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

from model_export.errors import ExportError
from model_export.exportable import ExportableSSD
from model_export.contract.metadata import METADATA_KEY, ModelMetadata, sidecar_path
from model_export.onnx_export import export_onnx
from model_export.postprocess import SSDPostprocess, decode_boxes
from model_export.spec import Detections, PostprocessOptions, SSDModel

NUM_ANCHORS = 600
NUM_LOGITS = 6  # background + 5 classes


class TinyHeads(nn.Module):
    """A small real network: conv features -> per-anchor regression and logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(10))
        self.box = nn.Linear(8 * 100, NUM_ANCHORS * 4)
        self.cls = nn.Linear(8 * 100, NUM_ANCHORS * NUM_LOGITS)
        nn.init.normal_(self.cls.weight, std=0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x).flatten(1)
        return self.box(f).reshape(-1, NUM_ANCHORS, 4), self.cls(f).reshape(-1, NUM_ANCHORS, NUM_LOGITS)


def tiny_model(activation: str = "softmax") -> SSDModel:
    g = torch.Generator().manual_seed(1)
    centres = torch.rand(NUM_ANCHORS, 2, generator=g)
    sizes = 0.05 + 0.3 * torch.rand(NUM_ANCHORS, 2, generator=g)
    return SSDModel(
        name="tiny",
        network=TinyHeads(),
        input_size=(80, 80),
        anchors=torch.cat((centres, sizes), dim=1),
        box_weights=(10.0, 10.0, 5.0, 5.0),
        score_activation=activation,  # type: ignore[arg-type]
        score_columns=(1, 2, 3, 5),  # column 4 is an unused id: never reported
        class_ids=(0, 1, 2, 4),
        labels=("a", "b", "c", "", "e"),
        mean=(127.5, 127.5, 127.5),
        std=(127.5, 127.5, 127.5),
    )


def loop_reference(model: SSDModel, images: torch.Tensor, opts: PostprocessOptions) -> list[Detections]:
    """torchvision's `SSD.postprocess_detections`, written as its per-image, per-class loop."""
    x = images.permute(0, 3, 1, 2).float()
    x = (x - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(model.std).view(1, 3, 1, 1)
    regression, logits = model.network(x)
    probs = logits.softmax(-1) if model.score_activation == "softmax" else logits.sigmoid()
    results = []
    for reg, prob in zip(regression, probs):
        boxes = decode_boxes(reg, model.anchors, model.box_weights, model.scale_clamp)
        all_boxes, all_scores, all_labels = [], [], []
        for column, class_id in zip(model.score_columns, model.class_ids):
            score = prob[:, column]
            keep = score > opts.score_threshold
            score, box = score[keep], boxes[keep]
            score, idx = score.topk(min(opts.candidates_per_class, score.numel()))
            all_boxes.append(box[idx])
            all_scores.append(score)
            all_labels.append(torch.full_like(score, class_id, dtype=torch.int64))
        b, s, l = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
        keep = torchvision.ops.batched_nms(b, s, l, opts.iou_threshold)[: opts.max_detections]
        results.append(Detections(b[keep], s[keep], l[keep]))
    return results


def images(batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    out = torch.randint(0, 256, (batch, 80, 80, 3), generator=g, dtype=torch.uint8)
    out[0] = 0  # a flat image among textured ones
    return out


def canonical(scores: np.ndarray, classes: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    rows = np.column_stack((scores, classes, boxes)).astype(np.float64)
    order = np.lexsort(tuple(rows[:, c] for c in range(rows.shape[1] - 1, 0, -1)) + (-rows[:, 0],))
    return rows[order]


def assert_matches(
    outputs: tuple[np.ndarray, ...], reference: list[Detections], k: int
) -> None:
    num, boxes, scores, classes = outputs
    assert boxes.shape == (len(reference), k, 4) and scores.shape == classes.shape == (len(reference), k)
    for i, ref in enumerate(reference):
        n = int(num[i])
        assert n == len(ref.scores)
        # Rows with exactly equal scores may come in either order: compare in a canonical order.
        ours_rows = canonical(scores[i, :n], classes[i, :n], boxes[i, :n])
        ref_rows = canonical(ref.scores.numpy(), ref.classes.numpy(), ref.boxes.numpy())
        np.testing.assert_allclose(ours_rows, ref_rows, atol=1e-5)  # float kernels differ by ~1e-6
        assert not scores[i, n:].any() and not boxes[i, n:].any() and not classes[i, n:].any()


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize(
    "opts",
    [PostprocessOptions(), PostprocessOptions(score_threshold=0.2, iou_threshold=0.3, candidates_per_class=50, max_detections=30)],
    ids=["paper", "tight"],
)
def test_torch_module_equals_per_class_loop(activation: str, opts: PostprocessOptions) -> None:
    model = tiny_model(activation)
    batch = images(4)
    with torch.no_grad():
        ours = ExportableSSD(model, opts)(batch)
        reference = loop_reference(model, batch, opts)
    assert sum(len(r.scores) for r in reference) > 10  # the comparison has detections to compare
    assert_matches(tuple(t.numpy() for t in ours), reference, opts.max_detections)


def test_fewer_candidates_than_k_pads_to_k() -> None:
    model = tiny_model()
    opts = PostprocessOptions(candidates_per_class=10, max_detections=200)  # 4 classes x 10 < 200
    with torch.no_grad():
        num, boxes, scores, classes = ExportableSSD(model, opts)(images(2))
    assert boxes.shape == (2, 200, 4) and int(num.max()) <= 40


def test_invalid_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="iou_threshold"):
        SSDPostprocess(tiny_model(), PostprocessOptions(iou_threshold=1.5))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelMetadata]:
    out = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    return out, export_onnx(tiny_model(), PostprocessOptions(), out)


def test_onnx_graph_is_standard_and_self_describing(exported: tuple[Path, ModelMetadata]) -> None:
    path, metadata = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ops = {node.op_type for node in proto.graph.node}
    assert "NonMaxSuppression" in ops and "Loop" not in ops and "If" not in ops
    assert proto.opset_import[0].version >= 17
    stored = {p.key: p.value for p in proto.metadata_props}[METADATA_KEY]
    assert ModelMetadata.from_json(stored) == metadata
    assert ModelMetadata.from_json(sidecar_path(path).read_text()) == metadata
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("batch", [1, 8])
def test_onnxruntime_equals_per_class_loop(exported: tuple[Path, ModelMetadata], batch: int) -> None:
    path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch_images = images(batch)
    outputs = session.run(None, {"images": batch_images.numpy()})
    assert [o.dtype for o in outputs] == [np.int32, np.float32, np.float32, np.int32]
    with torch.no_grad():
        reference = loop_reference(tiny_model(), batch_images, PostprocessOptions())
    assert_matches(tuple(outputs), reference, 200)


def test_unwritable_output_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="cannot write"):
        export_onnx(tiny_model(), PostprocessOptions(), blocker / "sub" / "m.onnx")
