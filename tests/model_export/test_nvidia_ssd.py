"""NVIDIA SSD300 (ResNet-50) source: their default boxes, their checkpoint format, and the export under ONNX Runtime."""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision

from model_export.errors import ExportError
from model_export.contract.metadata import METADATA_KEY, ModelMetadata
from model_export.models import REGISTRY
from model_export.models import nvidia_ssd as nv
from model_export.onnx_export import export_onnx
from model_export.spec import Detections, PostprocessOptions, SSDModel
from model_export.validate import _Tally, compare_detections, load_validation_images, validate_export

NAME = "ssd300_resnet50"
OPTIONS = PostprocessOptions()
LEVEL_SIZES = (38, 19, 10, 5, 3, 1)
BOXES_PER_LOCATION = (4, 6, 6, 6, 4, 4)


# ---------------------------------------------------------------------------------------------------- default boxes


def their_box(level: int, size_index: int, i: int, j: int) -> tuple[float, float, float, float]:
    """One default box by the formula of their DefaultBoxes (dboxes300_coco), written out for one position."""
    scales = (21, 45, 99, 153, 207, 261, 315)
    steps = (8, 16, 32, 64, 100, 300)
    ratios = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
    sk1, sk2 = scales[level] / 300, scales[level + 1] / 300
    sizes = [(sk1, sk1), (math.sqrt(sk1 * sk2), math.sqrt(sk1 * sk2))]
    for a in ratios[level]:
        sizes += [(sk1 * math.sqrt(a), sk1 / math.sqrt(a)), (sk1 / math.sqrt(a), sk1 * math.sqrt(a))]
    fk = 300 / steps[level]
    w, h = sizes[size_index]
    return tuple(min(max(v, 0.0), 1.0) for v in ((j + 0.5) / fk, (i + 0.5) / fk, w, h))  # type: ignore[return-value]


def box_index(level: int, size_index: int, i: int, j: int) -> int:
    """Their order: level, then box size, then row i, then column j."""
    offset = sum(s * s * n for s, n in zip(LEVEL_SIZES[:level], BOXES_PER_LOCATION[:level]))
    size = LEVEL_SIZES[level]
    return offset + size_index * size * size + i * size + j


def test_default_boxes_are_their_8732_in_their_order() -> None:
    anchors = nv.default_boxes()
    assert anchors.shape == (8732, 4) and anchors.dtype == torch.float32
    assert float(anchors.min()) >= 0.0 and float(anchors.max()) <= 1.0
    # (level, box size, row, column)
    spots = [(0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 5, 7), (0, 3, 37, 37), (1, 4, 2, 18), (2, 5, 9, 0), (3, 2, 4, 4)]
    spots += [(4, 3, 1, 2), (5, 0, 0, 0), (5, 3, 0, 0)]
    for spot in spots:
        assert anchors[box_index(*spot)].tolist() == pytest.approx(their_box(*spot), abs=1e-6), spot
    # Clamping is theirs too: the tall 1x1 box is sk * sqrt(2) = 1.23 high before it is clamped to 1.
    assert box_index(5, 3, 0, 0) == 8731
    assert anchors[-1].tolist() == pytest.approx([0.5, 0.5, 0.87 / math.sqrt(2), 1.0], abs=1e-6)


def test_every_default_box_matches_their_formula() -> None:
    anchors = nv.default_boxes()
    expected = [
        their_box(level, k, i, j)
        for level, (size, n) in enumerate(zip(LEVEL_SIZES, BOXES_PER_LOCATION))
        for k in range(n)
        for i, j in itertools.product(range(size), repeat=2)
    ]
    assert torch.allclose(anchors, torch.tensor(expected), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- network


def test_network_has_their_module_names_and_strides() -> None:
    network = nv._new_network(81, seed=0)
    state = network.state_dict()
    assert len(state) == len(nv.SSD300ResNet50().state_dict())
    assert state["feature_extractor.feature_extractor.0.weight"].shape == (64, 3, 7, 7)  # resnet conv1
    assert state["feature_extractor.feature_extractor.6.5.bn3.running_var"].shape == (1024,)  # layer3's last block
    assert not any(k.startswith("feature_extractor.feature_extractor.7") for k in state)  # no layer4
    assert state["additional_blocks.0.0.weight"].shape == (256, 1024, 1, 1)
    assert state["additional_blocks.4.4.running_mean"].shape == (256,)
    # Heads are plain convolutions with bias (no BatchNorm): weight and bias only.
    assert sorted(k for k in state if k.startswith("conf.0.")) == ["conf.0.bias", "conf.0.weight"]
    assert state["conf.0.weight"].shape == (4 * 81, 1024, 3, 3)
    assert state["loc.5.weight"].shape == (4 * 4, 256, 3, 3)
    conv4_block1 = network.feature_extractor.feature_extractor[6][0]
    assert conv4_block1.conv1.stride == conv4_block1.conv2.stride == conv4_block1.downsample[0].stride == (1, 1)


def test_forward_permutes_their_layout_to_the_contracts() -> None:
    """Heads see 38x38 ... 1x1 maps; their [B, 4, N] / [B, C, N] (N ordered box size, row, column per level)
    become [B, N, 4] / [B, N, C]."""
    network = nv._new_network(81, seed=0).eval()
    seen: dict[str, torch.Tensor] = {}
    shapes: list[tuple[int, ...]] = []
    network.loc[0].register_forward_hook(lambda m, i, o: seen.update(loc=o))  # [2, 4 * 4, 38, 38]
    network.conf[0].register_forward_hook(lambda m, i, o: seen.update(conf=o))  # [2, 81 * 4, 38, 38]
    for loc in network.loc:
        loc.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape[1:])))
    x = torch.randn((2, 3, 300, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        regression, logits = network(x)
    assert shapes == [(1024, 38, 38), (512, 19, 19), (512, 10, 10), (256, 5, 5), (256, 3, 3), (256, 1, 1)]
    assert regression.shape == (2, 8732, 4) and logits.shape == (2, 8732, 81)
    k, i, j = 2, 11, 30  # channel = coordinate (or class) * 4 + box size k
    n = box_index(0, k, i, j)
    assert torch.equal(regression[1, n], seen["loc"][1, [c * 4 + k for c in range(4)], i, j])
    assert torch.equal(logits[1, n], seen["conf"][1, [c * 4 + k for c in range(81)], i, j])


# ---------------------------------------------------------------------------------------------------- checkpoints


@functools.cache
def randomised_state(num_classes: int = 81, seed: int = 3) -> dict[str, torch.Tensor]:
    """A state_dict of their SSD300 with every tensor (BN statistics too) set to seeded values, so that a
    loader that skipped or mixed up any entry would be caught."""
    generator = torch.Generator().manual_seed(seed)
    state = nv._new_network(num_classes, seed=0).state_dict()
    out = {}
    for key, value in state.items():
        if value.dtype.is_floating_point:
            out[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            out[key] = torch.randint(0, 1000, value.shape, generator=generator, dtype=value.dtype)
    return out


def save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "layout", ["their checkpoint", "distributed", "distributed module.1", "bare state_dict", "fp16 checkpoint"]
)
def test_checkpoint_round_trip_is_strict_and_exact(tmp_path: Path, layout: str) -> None:
    state = randomised_state()
    prefix = {"distributed": "module.", "distributed module.1": "module.1."}.get(layout, "")
    stored = {prefix + k: v for k, v in state.items()}
    if layout == "fp16 checkpoint":  # their older hub checkpoints hold half-precision tensors
        state = {k: v.half().float() if v.dtype.is_floating_point else v for k, v in state.items()}
        stored = {k: v.half() if v.dtype.is_floating_point else v for k, v in stored.items()}
    if layout == "bare state_dict":
        checkpoint: object = stored
    else:  # what their main.py saves
        checkpoint = {"epoch": 65, "iteration": 120000, "model": stored, "label_map": {0: "background", 1: "person"}}
    path = save(tmp_path / "epoch_64.pt", checkpoint)

    model = nv.build(str(path))
    loaded = model.network.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert model.weights_source == "epoch_64.pt"
    assert model.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not model.network.training
    assert "random_init" not in model.extra_metadata


def test_checkpoint_with_other_class_count_loads_with_generic_labels(tmp_path: Path) -> None:
    path = save(tmp_path / "voc.pt", {"model": randomised_state(num_classes=21)})
    model = nv.build(str(path))
    assert model.network.num_classes == 21
    assert model.score_columns == model.class_ids == tuple(range(1, 21))
    assert model.labels[0] == "__background__" and model.labels[1:3] == ("class_1", "class_2")
    with pytest.raises(ExportError, match=r"do not fit ssd300_resnet50: .*shape mismatches.*conf\.0\.weight \[84,"):
        nv.build(str(path), 81)


def test_torchvision_resnet50_weights_are_rejected_clearly(tmp_path: Path) -> None:
    path = save(tmp_path / "resnet50.pth", torchvision.models.resnet50(weights=None).state_dict())
    with pytest.raises(ExportError) as excinfo:
        nv.build(str(path))
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("weights resnet50.pth do not fit ssd300_resnet50:")
    assert "missing keys (e.g. feature_extractor.feature_extractor.0.weight, " in message
    assert "unexpected keys (e.g. conv1.weight, " in message


def test_missing_corrupt_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="weights file .*nowhere.pt does not exist"):
        nv.build(str(tmp_path / "nowhere.pt"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 this is not a torch checkpoint" * 10)
    with pytest.raises(ExportError, match=r"cannot read weights file .*corrupt.pt: not a torch checkpoint that loads with weights_only=True"):
        nv.build(str(corrupt))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(save(tmp_path / "whole.pt", {"model": randomised_state()}).read_bytes()[:100_000])
    with pytest.raises(ExportError, match="cannot read weights file .*truncated.pt"):
        nv.build(str(truncated))
    with pytest.raises(ExportError, match="list.pt holds no state_dict of tensors"):
        nv.build(str(save(tmp_path / "list.pt", [1, 2, 3])))
    with pytest.raises(ExportError, match="odd.pt holds no state_dict of tensors"):
        nv.build(str(save(tmp_path / "odd.pt", {"model": {"conf.0.weight": [1.0]}})))


def test_coco_offline_names_the_url_and_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("SSD_WEIGHTS_MIRROR", raising=False)  # `make test` points it at ../shared/models

    def offline(url: str, dst: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ExportError) as excinfo:
        nv.build("coco")
    message = str(excinfo.value)
    assert nv.COCO_CHECKPOINT_URL in message and "--weights PATH" in message and "URLError" in message
    assert "put nvidia_ssdpyt_amp_200703.pt (from " in message and "set SSD_WEIGHTS_MIRROR" in message
    with pytest.raises(ExportError, match="has 81 classes, not 21"):
        nv.build("coco", 21)


def test_coco_comes_from_the_mirror_under_nvidias_file_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(url: str, dst: str, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"downloaded {url} although a mirror was given")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("SSD_WEIGHTS_MIRROR", str(mirror))
    with pytest.raises(ExportError, match=f"looked for {mirror / 'nvidia_ssdpyt_amp_200703.pt'}"):
        nv.build("coco")
    state = randomised_state()
    save(mirror / "nvidia_ssdpyt_amp_200703.pt", {"model": state})
    model = nv.build("coco")
    assert model.weights_source == "coco"
    assert torch.equal(model.network.state_dict()["conf.3.weight"], state["conf.3.weight"])
    assert (tmp_path / "hub" / "checkpoints" / "nvidia_ssdpyt_amp_200703.pt").is_file()  # copied into the cache


def test_coco_uses_the_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("SSD_WEIGHTS_MIRROR", raising=False)
    cached = tmp_path / "hub" / "checkpoints" / "nvidia_ssdpyt_amp_200703.pt"
    cached.parent.mkdir(parents=True)
    state = randomised_state()
    save(cached, {"model": {"module." + k: v for k, v in state.items()}})
    model = nv.build("coco")
    assert model.weights_source == "coco"
    assert model.extra_metadata["checkpoint_url"] == nv.COCO_CHECKPOINT_URL
    assert torch.equal(model.network.state_dict()["conf.3.weight"], state["conf.3.weight"])


# ---------------------------------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class TwoClasses:
    """The two fields of an SSDModel that `_detect_one` reads: background + classes 1 and 2."""

    score_columns: tuple[int, ...] = (1, 2)
    class_ids: tuple[int, ...] = (1, 2)


def detect(boxes: list[list[float]], probs: list[list[float]], options: PostprocessOptions) -> Detections:
    return nv._detect_one(torch.tensor(boxes), torch.tensor(probs), TwoClasses(), options)  # type: ignore[arg-type]


def test_reference_filters_and_suppresses_per_class_then_keeps_the_best_across_classes() -> None:
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.01, 0.0, 0.51, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]]
    probs = [
        [0.1, 0.8, 0.1],  # class 1: kept
        [0.2, 0.7, 0.1],  # class 1: overlaps row 0 (IoU 0.96), suppressed
        [0.5, 0.005, 0.495],  # class 1 below the threshold; class 2 kept (no overlap)
        [0.3, 0.1, 0.6],  # class 2 kept, and suppresses rows 0 and 1 of class 2; class 1 suppressed by row 0
    ]
    det = detect(boxes, probs, OPTIONS)
    assert det.classes.tolist() == [1, 2, 2]
    assert det.scores.tolist() == pytest.approx([0.8, 0.6, 0.495])
    assert torch.equal(det.boxes, torch.tensor([boxes[0], boxes[3], boxes[2]]))
    top2 = detect(boxes, probs, PostprocessOptions(max_detections=2))
    assert top2.scores.tolist() == pytest.approx([0.8, 0.6])
    one_candidate = detect(boxes, probs, PostprocessOptions(candidates_per_class=1))
    assert one_candidate.classes.tolist() == [1, 2] and one_candidate.scores.tolist() == pytest.approx([0.8, 0.6])
    strict = detect(boxes, [[0.5, 0.5, 0.0]] * 4, PostprocessOptions(score_threshold=0.5))
    assert len(strict.scores) == 0  # score > threshold, not >=
    assert strict.boxes.shape == (0, 4) and strict.classes.dtype == torch.int64


# ---------------------------------------------------------------------------------------------------- export


@dataclass(frozen=True)
class Exported:
    model: SSDModel
    path: Path
    images: torch.Tensor  # the default validation set: 7 photos + a black frame at index 4
    reference: list[Detections]  # the source's reference detections on `images`


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    source = REGISTRY[NAME]
    model = source.build(None, None)
    path = tmp_path_factory.mktemp(NAME) / f"{NAME}.onnx"
    export_onnx(model, OPTIONS, path)
    images = load_validation_images(model.input_size, None)
    return Exported(model, path, images, source.reference(model, images, OPTIONS))


def run_onnx(path: Path, images: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})


@pytest.mark.slow
def test_export_matches_the_reference_at_batch_1_and_8(exported: Exported) -> None:
    report = validate_export(exported.path, exported.model, exported.reference, OPTIONS, exported.images)
    assert report.images == 8 and report.batch_sizes == (1, 8)
    assert report.blank_images == (4,) and report.reference_detections[4] == 0 and report.blank_detections == 0
    photos = [n for i, n in enumerate(report.reference_detections) if i != 4]
    assert min(photos) > 0
    assert report.max_box_diff <= 1e-4 and report.max_score_diff <= 1e-5
    assert report.rows_compared >= 2 * sum(photos) - 4 * len(photos)  # only K-cut ties may be left out


@pytest.mark.slow
def test_random_weights_score_photos_well_above_the_threshold(exported: Exported) -> None:
    for index, det in enumerate(exported.reference):
        if index == 4:
            assert len(det.scores) == 0
            continue
        assert float(det.scores.max()) > 0.05, index  # a spread, not a crowd at 1/81 = 0.012
        assert len(set(det.classes.tolist())) > 5
        widths = det.boxes[:, 2] - det.boxes[:, 0]
        assert float(widths.median()) < 0.9  # boxes vary around their default boxes, not all clipped to the frame
    assert "random_init" in exported.model.extra_metadata


@pytest.mark.slow
def test_eight_copies_of_one_photo_give_eight_identical_results(exported: Exported) -> None:
    photo = exported.images[0:1]
    single = run_onnx(exported.path, photo)
    batch = run_onnx(exported.path, photo.expand(8, -1, -1, -1).contiguous())
    assert int(single[0][0]) > 0
    for output in batch:
        assert all(np.array_equal(output[0], output[i]) for i in range(1, 8))
    first_row = [
        Detections(
            boxes=torch.from_numpy(boxes[0, : int(num[0])]),
            scores=torch.from_numpy(scores[0, : int(num[0])]),
            classes=torch.from_numpy(classes[0, : int(num[0])]).long(),
        )
        for num, boxes, scores, classes in (single, batch)
    ]
    compare_detections(first_row[1], first_row[0], OPTIONS, exported.model.labels, "batch 8 vs 1", _Tally())


@pytest.mark.slow
def test_exported_file_describes_itself(exported: Exported) -> None:
    import onnx

    proto = onnx.load(str(exported.path), load_external_data=False)
    meta = ModelMetadata.from_json({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert meta.model == NAME and meta.input_size == (300, 300)
    assert len(meta.labels) == 81 and meta.labels[:3] == ("__background__", "person", "bicycle")
    assert meta.labels[-1] == "toothbrush"
    assert meta.weights_source == "random" and meta.weights_sha256 is None
    assert meta.score_activation == "softmax"
