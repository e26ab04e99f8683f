"""The in-graph post-processing against a plain per-image, per-class loop (torchvision's algorithm)."""

from __future__ import annotations

import json
from collections import Counter
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
from model_export.postprocess import SSDPostprocess, _TopK, best_candidates, decode_boxes
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


class _BestCandidates(nn.Module):
    def __init__(self, k: int, block: int) -> None:
        super().__init__()
        self.k, self.block = k, block

    def forward(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return best_candidates(scores, self.k, self.block)


@pytest.mark.parametrize(("count", "k", "block", "levels"), [(153360, 2000, 8, 256), (785880, 2000, 8, 5),
                                                              (10003, 500, 8, 3), (4096, 512, 8, 2), (1000, 100, 7, 1),
                                                              (999, 200, 7, 1)])
def test_best_candidates_in_two_steps_are_one_topk(count: int, k: int, block: int, levels: int, tmp_path: Path) -> None:
    """Blocked TopK equals one TopK, values and indices, with heavy ties (scores on a few levels, as quantised
    networks give; down to all equal), a length that is not a multiple of the block, eager and under ONNX Runtime."""
    rng = np.random.default_rng(count)
    scores = torch.from_numpy((rng.integers(0, levels, (3, count)) / max(levels - 1, 1) * rng.random()).astype(np.float32))
    expected = _TopK.apply(scores, k)
    got = best_candidates(scores, k, block)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    path = tmp_path / "best.onnx"
    torch.onnx.export(_BestCandidates(k, block), (scores,), str(path), dynamo=False, opset_version=17)
    two_steps = -(-count // block) >= k  # else too few blocks: one TopK
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("TopK") == (3 if two_steps else 1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values, index = session.run(None, {session.get_inputs()[0].name: scores.numpy()})
    np.testing.assert_array_equal(values, expected[0].numpy())
    np.testing.assert_array_equal(index, expected[1].numpy())


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
    assert "NonMaxSuppression" in ops and "Loop" not in ops  # an If holds the full path (tests below)
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


# ------------------------------------------------------------------------- constructed inputs: every branch

PIX_ANCHORS = 1200  # 0..399: one heavily overlapping cluster; 400..1199: 800 disjoint boxes
PIX_SIDE = 40  # 40 x 40 x 3 pixels = 1200 anchors x 4 logit columns


class PixelHeads(nn.Module):
    """Head outputs read straight from the pixels: logits = (pixel - 128) / 8, zero box regression (boxes = anchors)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(1)  # [B, 3 * 40 * 40], NCHW order
        logits = ((flat - 128.0) / 8.0).reshape(-1, PIX_ANCHORS, 4)
        return torch.zeros_like(logits), logits


def pixel_model() -> SSDModel:
    g = torch.Generator().manual_seed(3)
    cluster = torch.cat((0.5 + 0.005 * torch.rand(400, 2, generator=g), torch.full((400, 2), 0.3)), dim=1)
    cells = torch.stack(torch.meshgrid(torch.arange(40), torch.arange(20), indexing="ij"), dim=-1).reshape(-1, 2)
    centres = (cells.float() + 0.5) * torch.tensor([0.025, 0.05])
    disjoint = torch.cat((centres, torch.tensor([[0.02, 0.04]]).expand(800, 2)), dim=1)
    return SSDModel(
        name="pixels",
        network=PixelHeads(),
        input_size=(PIX_SIDE, PIX_SIDE),
        anchors=torch.cat((cluster, disjoint)),
        box_weights=(10.0, 10.0, 5.0, 5.0),
        score_activation="sigmoid",
        score_columns=(1, 2, 3),
        class_ids=(0, 1, 2),
        labels=("a", "b", "c"),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )


CLUSTER, DISJOINT = slice(0, 400), slice(400, 1200)


def scenario(name: str) -> torch.Tensor:
    """uint8 [40, 40, 3] pixels whose logits build one case. Levels: 250 > 245 > 240 > 235 > 200 > 100 > threshold
    (sigmoid((100 - 128) / 8) = 0.029 > 0.01) > 0."""
    p = torch.zeros((PIX_ANCHORS, 4), dtype=torch.uint8)  # column 0 is the unused background
    if name == "fallback":
        # The best 2000 are class 1 (1200) and class 2's cluster and 400 of its disjoint boxes: inside the per-class
        # cap only two clusters, so NMS keeps 2 < 200 there, while class 3's 800 disjoint boxes wait below them.
        p[CLUSTER, 1], p[DISJOINT, 1] = 250, 245
        p[CLUSTER, 2], p[400:800, 2], p[800:, 2] = 240, 235, 100
        p[DISJOINT, 3] = 200
    elif name == "cap":
        # Class 1 has 1200 candidates in the best 2000; past its cap of 400 (its cluster) come disjoint boxes that
        # NMS would keep. Class 2's 800 equal disjoint scores then fill the top 200, cut inside a tie.
        p[CLUSTER, 1], p[DISJOINT, 1] = 250, 245
        p[DISJOINT, 2] = 200
    elif name == "ties":
        # 300 equal scores across three classes, the 200th row inside them; fewer than 2000 candidates in all.
        p[CLUSTER, 1] = 250
        p[400:500, 1:4] = 200
    elif name == "sparse":
        p[600:610, 2] = 100
    else:
        assert name == "blank"
    return p.reshape(-1).reshape(3, PIX_SIDE, PIX_SIDE).permute(1, 2, 0).contiguous()  # NHWC, read back as NCHW


SCENARIOS = ("fallback", "cap", "ties", "sparse", "blank")


def ordered_reference(model: SSDModel, images: torch.Tensor, opts: PostprocessOptions) -> list[Detections]:
    """The per-image, per-class loop with the module's tie rule made explicit: candidates in descending score, equal
    scores in anchor order; NMS visits them in that order; the top K in descending score, then class, then rank."""
    x = images.permute(0, 3, 1, 2).float()
    x = (x - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(model.std).view(1, 3, 1, 1)
    regression, logits = model.network(x)
    probs = logits.softmax(-1) if model.score_activation == "softmax" else logits.sigmoid()
    results = []
    for reg, prob in zip(regression, probs):
        boxes = decode_boxes(reg, model.anchors, model.box_weights, model.scale_clamp)
        rows = []  # (score, class position, rank in class, box, class id)
        for position, (column, class_id) in enumerate(zip(model.score_columns, model.class_ids)):
            score = prob[:, column]
            order = score.sort(descending=True, stable=True).indices
            order = order[score[order] > opts.score_threshold][: opts.candidates_per_class]
            visit = torch.arange(len(order), 0, -1, dtype=torch.float32)
            for rank in torchvision.ops.nms(boxes[order], visit, opts.iou_threshold).tolist():
                rows.append((float(score[order[rank]]), position, rank, boxes[order[rank]], class_id))
        rows.sort(key=lambda r: (-r[0], r[1], r[2]))
        rows = rows[: opts.max_detections]
        results.append(
            Detections(
                torch.stack([r[3] for r in rows]) if rows else torch.zeros((0, 4)),
                torch.tensor([r[0] for r in rows], dtype=torch.float32),
                torch.tensor([r[4] for r in rows], dtype=torch.int64),
            )
        )
    return results


def assert_same_rows(outputs: tuple[np.ndarray, ...], reference: list[Detections], k: int) -> None:
    """Row for row, in order: the tie rule included."""
    num, boxes, scores, classes = outputs
    for i, ref in enumerate(reference):
        n = int(num[i])
        assert n == len(ref.scores), (i, n, len(ref.scores))
        np.testing.assert_array_equal(classes[i, :n], ref.classes.numpy())
        np.testing.assert_allclose(scores[i, :n], ref.scores.numpy(), rtol=0, atol=1e-7)  # sigmoid kernels: 1 ulp
        np.testing.assert_allclose(boxes[i, :n], ref.boxes.numpy(), rtol=0, atol=1e-6)
        assert not scores[i, n:].any() and not boxes[i, n:].any() and not classes[i, n:].any()
    assert boxes.shape[1] == k


def fast_path_exact(model: SSDModel, image: torch.Tensor) -> bool:
    module = ExportableSSD(model, PostprocessOptions()).eval()
    x = image[None].permute(0, 3, 1, 2).float() * module.scale + module.shift
    with torch.no_grad():
        scores, boxes = module.postprocess.scores_and_boxes(*model.network(x))
        return bool(module.postprocess.fast_path(scores, boxes)[0])


def test_scenarios_force_each_branch() -> None:
    """The constructed inputs do what they say: the fallback is needed where claimed, and only there."""
    model = pixel_model()
    assert not fast_path_exact(model, scenario("fallback"))
    assert all(fast_path_exact(model, scenario(name)) for name in SCENARIOS if name != "fallback")
    opts = PostprocessOptions()
    with torch.no_grad():
        module = ExportableSSD(model, opts).eval()
        x = scenario("fallback")[None].permute(0, 3, 1, 2).float()
        scores, boxes = module.postprocess.scores_and_boxes(*model.network(x))
        fast = module.postprocess.fast_path(scores, boxes)[1]
    reference = ordered_reference(model, scenario("fallback")[None], opts)[0]
    assert int(fast[0][0]) == 2 and len(reference.scores) == 200  # the fast answer alone would be wrong
    cap = ordered_reference(model, scenario("cap")[None], opts)[0]
    assert cap.classes.tolist().count(0) == 1 and len(cap.scores) == 200  # class 0's disjoint boxes were capped away


@pytest.fixture(scope="module")
def pixel_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pixels") / "pixels.onnx"
    export_onnx(pixel_model(), PostprocessOptions(), out)
    return out


@pytest.mark.parametrize("name", SCENARIOS)
def test_each_branch_at_batch_1(pixel_export: Path, name: str) -> None:
    model, opts = pixel_model(), PostprocessOptions()
    image = scenario(name)[None]
    reference = ordered_reference(model, image, opts)
    with torch.no_grad():
        eager = tuple(t.numpy() for t in ExportableSSD(model, opts).eval()(image))
    assert_same_rows(eager, reference, 200)
    session = ort.InferenceSession(str(pixel_export), providers=["CPUExecutionProvider"])
    assert_same_rows(tuple(session.run(None, {"images": image.numpy()})), reference, 200)


@pytest.mark.parametrize("names", [("cap", "ties", "sparse", "blank", "cap", "ties", "sparse", "blank"),
                                   ("cap", "fallback", "ties", "blank", "sparse", "cap", "ties", "fallback")],
                         ids=["fast", "one-needs-fallback"])
def test_each_branch_at_batch_8(pixel_export: Path, names: tuple[str, ...]) -> None:
    model, opts = pixel_model(), PostprocessOptions()
    batch = torch.stack([scenario(n) for n in names])
    reference = ordered_reference(model, batch, opts)
    with torch.no_grad():
        eager = tuple(t.numpy() for t in ExportableSSD(model, opts).eval()(batch))
    assert_same_rows(eager, reference, 200)
    session = ort.InferenceSession(str(pixel_export), providers=["CPUExecutionProvider"])
    assert_same_rows(tuple(session.run(None, {"images": batch.numpy()})), reference, 200)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes += _all_nodes(attr.g)
    return nodes


def test_graph_is_standard_onnx_that_tensorrt_parses(pixel_export: Path) -> None:
    """Standard ops only: one If (the fallback), NonMaxSuppression in both paths, every TopK with K <= 3840."""
    proto = onnx.load(str(pixel_export))
    onnx.checker.check_model(proto, full_check=True)
    nodes = _all_nodes(proto.graph)
    assert {n.domain for n in nodes} <= {"", "ai.onnx"} and [o.domain for o in proto.opset_import] == [""]
    assert Counter(n.op_type for n in nodes)["If"] == 1 and "Loop" not in {n.op_type for n in nodes}
    assert Counter(n.op_type for n in nodes)["NonMaxSuppression"] == 2
    constants = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in nodes if n.op_type == "Constant"}
    for graph in [proto.graph] + [a.g for n in nodes for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]:
        constants |= {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    ks = [int(constants[n.input[1]].reshape(-1)[0]) for n in nodes if n.op_type == "TopK"]
    assert ks and max(ks) <= 3840


def test_every_nms_solves_one_problem_per_image(pixel_export: Path, tmp_path: Path) -> None:
    """ONNX Runtime's own profile of a run that takes both paths: every NonMaxSuppression node it ran had the images
    as its batch axis and one class, i.e. one NMS problem per image."""
    names = ("cap", "fallback", "ties")
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(pixel_export), options, providers=["CPUExecutionProvider"])
    session.run(None, {"images": torch.stack([scenario(n) for n in names]).numpy()})  # the fallback
    session.run(None, {"images": scenario("cap")[None].numpy()})  # the fast path alone
    events = json.loads(Path(session.end_profiling()).read_text())
    nms = [e["args"]["input_type_shape"] for e in events
           if e.get("cat") == "Node" and e["args"].get("op_name") == "NonMaxSuppression" and "input_type_shape" in e["args"]]
    shapes = [(next(iter(b.values())), next(iter(s.values()))) for b, s, *_ in nms]
    assert len({tuple(b) for b, _ in shapes}) == 3, shapes  # batch 3 fast path, batch 3 full path, batch 1 fast path
    for boxes, scores in shapes:
        assert boxes[0] == scores[0] in (1, 3) and scores[1] == 1 and boxes[1] == scores[2], (boxes, scores)
