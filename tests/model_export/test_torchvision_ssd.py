"""torchvision SSD300 VGG16 / SSDlite320 sources: exported under ONNX Runtime vs torchvision's own forward."""

from __future__ import annotations

import math
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model_export.errors import ExportError
from model_export.models import REGISTRY
from model_export.models.torchvision_ssd import TorchvisionSSDNetwork
from model_export.onnx_export import export_onnx
from model_export.postprocess import decode_boxes
from model_export.spec import PostprocessOptions, SSDModel
from model_export.validate import (
    _Tally,
    _unpack,
    compare_detections,
    load_validation_images,
    validate_export,
)

VGG = "ssd300_vgg16"
LITE = "ssdlite320_mobilenet_v3_large"
OPTIONS = PostprocessOptions()


@dataclass(frozen=True)
class Exported:
    model: SSDModel
    path: Path
    images: torch.Tensor  # the default validation set: photos + a blank frame


@pytest.fixture(scope="module", params=[VGG, LITE])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    model = REGISTRY[request.param].build(None, None)
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}.onnx"
    export_onnx(model, OPTIONS, path)
    return Exported(model, path, load_validation_images(model.input_size, None))


@pytest.fixture(scope="module")
def lite() -> SSDModel:
    return REGISTRY[LITE].build(None, None)


def run_onnx(path: Path, images: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})


# ---------------------------------------------------------------------------------------------------- export


@pytest.mark.slow
def test_export_matches_torchvision_at_batch_1_and_8(exported: Exported) -> None:
    reference = REGISTRY[exported.model.name].reference
    report = validate_export(exported.path, exported.model, reference, OPTIONS, exported.images)
    assert report.images == 8 and report.batch_sizes == (1, 8)
    assert report.blank_images == (4,)  # the black frame sits in the middle of the batch of 8
    assert report.blank_detections == 0
    photos = [n for i, n in enumerate(report.reference_detections) if i != 4]
    assert min(photos) > 0 and report.reference_detections[4] == 0
    assert report.max_box_diff <= 1e-4 and report.max_score_diff <= 1e-5
    assert report.rows_compared >= 2 * sum(photos) - 4 * len(photos)  # only K-cut ties may be left out


@pytest.mark.slow
def test_blank_frame_gives_zero_detections_and_zero_rows(exported: Exported) -> None:
    num, boxes, scores, classes = run_onnx(exported.path, exported.images[4:5])
    assert num.tolist() == [0]
    assert not boxes.any() and not scores.any() and not classes.any()
    assert boxes.shape == (1, OPTIONS.max_detections, 4)


@pytest.mark.slow
def test_eight_copies_give_eight_identical_results_equal_to_batch_1(exported: Exported) -> None:
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    photo = exported.images[:1]
    single = dict(zip(names, session.run(None, {"images": photo.numpy()}), strict=True))
    eight = dict(
        zip(names, session.run(None, {"images": photo.expand(8, -1, -1, -1).contiguous().numpy()}), strict=True)
    )
    for output in eight.values():
        assert all(np.array_equal(output[i], output[0]) for i in range(8))
    assert int(single["num_detections"][0]) == int(eight["num_detections"][0]) > 0
    compare_detections(
        _unpack(eight, 0, "batch 8"), _unpack(single, 0, "batch 1"), OPTIONS, exported.model.labels, "8 vs 1", _Tally()
    )


# ---------------------------------------------------------------------------------------------------- model facts


def test_model_facts_follow_torchvision(lite: SSDModel) -> None:
    detector = lite.network.detector
    assert lite.input_size == (320, 320)
    assert lite.anchors.shape == (3234, 4)
    assert lite.box_weights == (10.0, 10.0, 5.0, 5.0)
    assert lite.scale_clamp == pytest.approx(math.log(1000.0 / 16))
    assert lite.score_activation == "softmax"
    assert lite.score_columns == lite.class_ids == tuple(range(1, 91))
    assert len(lite.labels) == 91
    assert lite.labels[0] == "__background__" and lite.labels[1] == "person" and lite.labels[12] == "N/A"
    assert lite.mean == pytest.approx((127.5,) * 3) and lite.std == pytest.approx((127.5,) * 3)
    assert lite.weights_source == "random" and lite.weights_sha256 is None
    assert detector.transform.image_mean == [0.5, 0.5, 0.5]


def test_vgg_normalisation_on_the_0_255_scale() -> None:
    from torchvision.models.detection import ssd300_vgg16

    with torch.device("meta"):
        transform = ssd300_vgg16(weights=None, weights_backbone=None).transform
    mean = tuple(255.0 * m for m in transform.image_mean)
    assert mean == pytest.approx((123.0, 117.0, 104.0), abs=1e-3)
    assert tuple(255.0 * s for s in transform.image_std) == pytest.approx((1.0, 1.0, 1.0))


def test_anchors_decode_like_torchvision_box_coder(lite: SSDModel) -> None:
    """Our normalised (cx, cy, w, h) anchors + the shared decoder == torchvision's BoxCoder on pixel anchors."""
    from torchvision.models.detection.image_list import ImageList

    detector = lite.network.detector
    height, width = lite.input_size
    probe = torch.zeros((1, 3, height, width))
    with torch.no_grad():
        features = list(detector.backbone(probe).values())
    pixel_anchors = detector.anchor_generator(ImageList(probe, [(height, width)]), features)[0]
    regression = torch.randn((1, len(pixel_anchors), 4), generator=torch.Generator().manual_seed(0)) * 3
    ours = decode_boxes(regression, lite.anchors, lite.box_weights, lite.scale_clamp)[0]
    theirs = detector.box_coder.decode_single(regression[0], pixel_anchors)
    size = torch.tensor([width, height, width, height], dtype=torch.float32)
    theirs = torch.minimum(theirs.clamp(min=0), size) / size
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_torchvision_transform_is_identity_at_the_input_size(lite: SSDModel) -> None:
    detector = lite.network.detector
    image = load_validation_images(lite.input_size, None)[0].permute(2, 0, 1).float() / 255.0
    batched, _ = detector.transform([image])
    assert batched.image_sizes == [lite.input_size]
    assert torch.equal(batched.tensors[0], detector.transform.normalize(image))


def test_reference_boxes_are_normalised_and_scores_descending(lite: SSDModel) -> None:
    images = load_validation_images(lite.input_size, None)
    results = REGISTRY[LITE].reference(lite, images, OPTIONS)
    assert len(results) == len(images) and len(results[4].scores) == 0
    for det in results:
        assert torch.all((det.boxes >= 0) & (det.boxes <= 1))
        assert torch.all(det.scores[:-1] >= det.scores[1:]) and torch.all(det.scores > OPTIONS.score_threshold)
        assert det.classes.dtype == torch.int64 and torch.all(det.classes >= 1)
    # The torchvision model keeps its own thresholds once the reference is done.
    assert lite.network.detector.score_thresh == 0.001


def test_random_weights_are_deterministic_and_leave_the_global_rng_alone(lite: SSDModel) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = REGISTRY[LITE].build(None, None)
    assert torch.equal(torch.rand(3), expected)
    for (name, a), b in zip(lite.network.state_dict().items(), again.network.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_custom_class_count_gets_generic_labels() -> None:
    model = REGISTRY[LITE].build(None, 5)
    assert model.labels == ("__background__", "class_1", "class_2", "class_3", "class_4")
    assert model.score_columns == model.class_ids == (1, 2, 3, 4)
    with pytest.raises(ExportError, match="at least 2"):
        REGISTRY[LITE].build(None, 1)


# ---------------------------------------------------------------------------------------------------- weights


def test_weights_file_round_trip(tmp_path: Path, lite: SSDModel) -> None:
    """A checkpoint saved under "model" with DDP's "module." prefix loads strictly, with its sha256 recorded."""
    import hashlib

    state = lite.network.detector.state_dict()
    path = tmp_path / "trained.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    loaded = REGISTRY[LITE].build(str(path), None)
    assert loaded.weights_source == "trained.pth"
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert isinstance(loaded.network, TorchvisionSSDNetwork)
    for (name, a), b in zip(state.items(), loaded.network.detector.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.labels == lite.labels


def test_class_count_is_read_from_the_weights_file(tmp_path: Path) -> None:
    model = REGISTRY[LITE].build(None, 21)
    path = tmp_path / "voc.pt"
    torch.save(model.network.detector.state_dict(), path)
    loaded = REGISTRY[LITE].build(str(path), None)
    assert len(loaded.labels) == 21 and loaded.score_columns == tuple(range(1, 21))
    with pytest.raises(ExportError, match=r"do not fit ssdlite320_mobilenet_v3_large: .*shape mismatches"):
        REGISTRY[LITE].build(str(path), 91)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"weights file .*nope\.pth does not exist"):
        REGISTRY[LITE].build(str(tmp_path / "nope.pth"), None)


def test_corrupt_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(ExportError, match=r"corrupt\.pth: not a torch checkpoint") as info:
        REGISTRY[LITE].build(str(path), None)
    assert "\n" not in str(info.value)


def test_weights_without_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(ExportError, match="holds no state_dict"):
        REGISTRY[LITE].build(str(path), None)


@pytest.mark.slow
def test_weights_of_the_other_architecture(tmp_path: Path, lite: SSDModel) -> None:
    path = tmp_path / "lite.pth"
    torch.save(lite.network.detector.state_dict(), path)
    with pytest.raises(ExportError) as info:
        REGISTRY[VGG].build(str(path), None)
    message = str(info.value)
    assert message.startswith("weights lite.pth do not fit ssd300_vgg16: ")
    assert re.search(r"; \d+ unexpected keys \(e\.g\. backbone\.features\.0\.0\.0\.weight, ", message)
    assert re.search(r": \d+ missing keys \(e\.g\. backbone\.", message)
    assert "\n" not in message


@pytest.mark.parametrize("name", [VGG, LITE])
def test_coco_weights_offline_name_the_file_to_supply(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh, empty hub cache and a proxy that refuses connections: a real, fast, offline download failure.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("SSD_WEIGHTS_MIRROR", raising=False)  # `make test` points it at ../shared/models
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    # urlopen caches an opener built from these proxies; let it go with the test.
    monkeypatch.setattr(urllib.request, "_opener", None)
    filename = {VGG: "ssd300_vgg16_coco-b556d3b4.pth", LITE: "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"}[name]
    with pytest.raises(ExportError) as info:
        REGISTRY[name].build("coco", None)
    message = str(info.value)
    assert f"https://download.pytorch.org/models/{filename}" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / filename) in message
    assert "--weights PATH" in message and "\n" not in message
    assert f"put {filename} (from " in message and "set SSD_WEIGHTS_MIRROR to that folder" in message


@pytest.mark.parametrize("name", [VGG, LITE])
def test_coco_weights_come_from_the_mirror_under_torchvisions_file_name(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("SSD_WEIGHTS_MIRROR", str(mirror))
    filename = {VGG: "ssd300_vgg16_coco-b556d3b4.pth", LITE: "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"}[name]
    with pytest.raises(ExportError, match=f"mirror {mirror} has no {name}_coco: looked for {mirror / filename}"):
        REGISTRY[name].build("coco", None)
    # A file under that name is taken from the mirror and checked against the hash prefix torchvision's name
    # carries (a real COCO file cannot be made here; a wrong one shows the mirror is read, and checked).
    torch.save({"not": torch.zeros(1)}, mirror / filename)
    with pytest.raises(ExportError, match=f"checksum mismatch for {name}_coco/{filename} from mirror {mirror}"):
        REGISTRY[name].build("coco", None)
    assert not (tmp_path / "torch" / "hub" / "checkpoints" / filename).exists(), "a bad file must not be cached"


def test_the_manifest_names_each_coco_file_as_its_publisher_does() -> None:
    from model_export.models import nvidia_ssd, torchvision_ssd
    from model_export.weights import load_manifest

    manifest = load_manifest()
    assert len(torchvision_ssd._ARCHITECTURES) == 2
    for arch in torchvision_ssd._ARCHITECTURES:
        entry = manifest[f"{arch.name}_coco"]
        assert entry.url == arch.coco_weights.url and entry.primary == Path(arch.coco_weights.url).name
    entry = manifest[nvidia_ssd.MANIFEST_ENTRY]
    assert entry.url == nvidia_ssd.COCO_CHECKPOINT_URL and entry.primary == Path(entry.url).name
