"""The validation input set and the export-vs-reference comparison (its tolerances and near-tie rules)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model_export.errors import ExportError
from model_export.exportable import ExportableSSD
from model_export.onnx_export import export_onnx
from model_export.spec import Detections, PostprocessOptions, SSDModel
from server.preprocess import preprocess
from model_export.validate import (
    SHARED_DATA,
    ValidationReport,
    _Tally,
    compare_detections,
    dead_leaves_images,
    load_validation_images,
    validate_export,
)

LABELS = ("__background__", "a", "b", "c")
SIZE = (64, 64)


def dets(rows: list[tuple[int, float, tuple[float, float, float, float]]]) -> Detections:
    """[(class, score, box)] -> Detections."""
    return Detections(
        boxes=torch.tensor([r[2] for r in rows], dtype=torch.float32).reshape(-1, 4),
        scores=torch.tensor([r[1] for r in rows], dtype=torch.float32),
        classes=torch.tensor([r[0] for r in rows], dtype=torch.int64),
    )


def compare(ours: Detections, ref: Detections, options: PostprocessOptions | None = None) -> _Tally:
    tally = _Tally()
    compare_detections(ours, ref, options or PostprocessOptions(), LABELS, "batch 1, image 0", tally)
    return tally


BOX_A = (0.1, 0.1, 0.5, 0.5)
BOX_B = (0.6, 0.6, 0.9, 0.9)
BOX_C = (0.2, 0.6, 0.4, 0.9)


# ---------------------------------------------------------------------------------------------------- comparing


def test_equal_detections_pass_and_are_counted() -> None:
    ref = dets([(1, 0.9, BOX_A), (2, 0.5, BOX_B)])
    tally = compare(ref, ref)
    assert (tally.rows, tally.box, tally.score, tally.near_threshold, tally.at_cut) == (2, 0.0, 0.0, 0, 0)


def test_differences_within_tolerance_pass_and_the_worst_is_kept() -> None:
    ours = dets([(1, 0.9 + 8e-6, (0.1 + 9e-5, 0.1, 0.5, 0.5)), (2, 0.5, BOX_B)])
    tally = compare(ours, dets([(1, 0.9, BOX_A), (2, 0.5, BOX_B)]))
    assert tally.rows == 2
    assert tally.box == pytest.approx(9e-5, rel=1e-2) and tally.score == pytest.approx(8e-6, rel=5e-2)


@pytest.mark.parametrize(
    ("ours", "fragment"),
    [
        ([(1, 0.9 + 2e-5, BOX_A), (2, 0.5, BOX_B)], "reference row 0 (class 1 'a' score 0.900000"),
        ([(1, 0.9, (0.1, 0.1, 0.5, 0.5003)), (2, 0.5, BOX_B)], "reference row 0"),
        ([(1, 0.9, BOX_A), (3, 0.5, BOX_B)], "reference row 1 (class 2 'b'"),
        ([(1, 0.9, BOX_A)], "reference row 1 (class 2 'b' score 0.500000 box [0.60000, 0.60000, 0.90000, 0.90000])"),
        ([(1, 0.9, BOX_A), (2, 0.5, BOX_B), (3, 0.3, BOX_C)], "the export has 3 detections, the reference 2"),
    ],
)
def test_first_difference_is_named(ours: list, fragment: str) -> None:
    with pytest.raises(ExportError) as info:
        compare(dets(ours), dets([(1, 0.9, BOX_A), (2, 0.5, BOX_B)]))
    assert str(info.value).startswith("batch 1, image 0: ")
    assert fragment in str(info.value)


def test_equal_scores_may_come_in_either_order() -> None:
    ref = dets([(1, 0.9, BOX_A), (2, 0.7, BOX_B), (3, 0.7, BOX_C), (1, 0.2, BOX_B)])
    ours = dets([(1, 0.9, BOX_A), (3, 0.7, BOX_C), (2, 0.7 + 1e-7, BOX_B), (1, 0.2, BOX_B)])
    assert compare(ours, ref).rows == 4


def test_rows_within_1e_6_of_the_threshold_are_ignored() -> None:
    ref = dets([(1, 0.9, BOX_A), (2, 0.0100004, BOX_B)])  # passed "> 0.01" by rounding only
    ours = dets([(1, 0.9, BOX_A)])
    tally = compare(ours, ref)
    assert (tally.rows, tally.near_threshold) == (1, 1)
    with pytest.raises(ExportError):  # 1e-5 above the threshold is a real detection
        compare(ours, dets([(1, 0.9, BOX_A), (2, 0.01001, BOX_B)]))


def test_a_tie_at_the_k_th_cut_is_not_compared() -> None:
    options = PostprocessOptions(max_detections=3)
    # Four candidates, the last two tied: either may fill the third row.
    ref = dets([(1, 0.9, BOX_A), (2, 0.6, BOX_B), (3, 0.4, BOX_C)])
    ours = dets([(1, 0.9, BOX_A), (2, 0.6, BOX_B), (1, 0.4, BOX_B)])
    tally = compare(ours, ref, options)
    assert (tally.rows, tally.at_cut) == (2, 2)
    # Above the cut everything must still agree.
    with pytest.raises(ExportError, match="reference row 1"):
        compare(dets([(1, 0.9, BOX_A), (3, 0.6, BOX_B), (1, 0.4, BOX_B)]), ref, options)


def test_fewer_rows_than_the_reference_at_the_cut_is_a_difference() -> None:
    options = PostprocessOptions(max_detections=3)
    ref = dets([(1, 0.9, BOX_A), (2, 0.6, BOX_B), (3, 0.4, BOX_C)])
    with pytest.raises(ExportError, match="reference row 1"):
        compare(dets([(1, 0.9, BOX_A)]), ref, options)


# ---------------------------------------------------------------------------------------------------- images


def test_default_set_is_seven_photos_and_a_black_frame_in_the_middle() -> None:
    images = load_validation_images((300, 300), None)
    assert images.shape == (8, 300, 300, 3) and images.dtype == torch.uint8
    assert not images[4].any()
    for i in (0, 1, 2, 3, 5, 6, 7):
        assert images[i].float().std() > 20  # real photos, not blank


def test_photos_are_resized_bilinear_without_antialias(tmp_path: Path) -> None:
    from torchvision.io import decode_image, read_file

    photo = SHARED_DATA / "images" / "cats_and_dogs.jpg"
    if not photo.is_file():
        pytest.skip("shared test photos are not present")
    decoded = decode_image(read_file(str(photo)))  # [3, 600, 1200]
    expected = torch.nn.functional.interpolate(
        decoded[None].float(), size=(300, 300), mode="bilinear", align_corners=False, antialias=False
    )[0]
    expected = expected.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    served = preprocess(photo.read_bytes(), (300, 300)).pixels
    validated = load_validation_images((300, 300), None)[0]  # cats_and_dogs.jpg sorts first
    assert torch.equal(validated, torch.from_numpy(served))  # the pixels the server feeds the model
    # OpenCV's fixed-point INTER_LINEAR: within one step of torch's float bilinear, never further
    assert int((validated.to(torch.int16) - expected).abs().max()) <= 1
    antialiased = torch.nn.functional.interpolate(
        decoded[None].float(), size=(300, 300), mode="bilinear", align_corners=False, antialias=True
    )[0]
    antialiased = antialiased.round().to(torch.uint8).permute(1, 2, 0)
    assert int((validated.to(torch.int16) - antialiased).abs().max()) > 1  # an antialiased filter is another one


def test_a_folder_of_images(tmp_path: Path) -> None:
    from torchvision.io import write_png

    for i, image in enumerate(dead_leaves_images((40, 50), 2, seed=3)):
        write_png(image.permute(2, 0, 1).contiguous(), str(tmp_path / f"{i}.png"))
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_validation_images((32, 32), tmp_path)
    assert images.shape == (3, 32, 32, 3)
    assert not images[1].any() and images[0].any() and images[2].any()


def test_bad_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="is not a folder"):
        load_validation_images(SIZE, tmp_path / "missing")
    with pytest.raises(ExportError, match="holds no .jpg/.jpeg/.png files"):
        load_validation_images(SIZE, tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ExportError, match="cannot decode validation image .*broken.jpg"):
        load_validation_images(SIZE, tmp_path)


def test_dead_leaves_are_seeded_textured_images() -> None:
    a = dead_leaves_images((48, 64), 2, seed=5)
    assert a.shape == (2, 48, 64, 3) and a.dtype == torch.uint8
    assert torch.equal(a, dead_leaves_images((48, 64), 2, seed=5))
    assert not torch.equal(a, dead_leaves_images((48, 64), 2, seed=6))
    assert not torch.equal(a[0], a[1]) and len(torch.unique(a[0].reshape(-1, 3), dim=0)) > 10


# ---------------------------------------------------------------------------------------------------- end to end


class TinyNetwork(nn.Module):
    """A small real network with default boxes on a 4x4 grid, 3 classes + background."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.box = nn.Conv2d(16, 4, 1)
        self.cls = nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)  # [B, 16, 4, 4]
        return self.box(f).flatten(2).transpose(1, 2), 3 * self.cls(f).flatten(2).transpose(1, 2)  # [B, 16, 4|4]


def tiny_model() -> SSDModel:
    centres = (torch.arange(4, dtype=torch.float32) + 0.5) / 4
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    anchors = torch.stack((cx.flatten(), cy.flatten(), torch.full((16,), 0.4), torch.full((16,), 0.3)), dim=1)
    return SSDModel(
        name="tiny",
        network=TinyNetwork().eval(),
        input_size=SIZE,
        anchors=anchors,
        box_weights=(10.0, 10.0, 5.0, 5.0),
        score_activation="softmax",
        score_columns=(1, 2, 3),
        class_ids=(1, 2, 3),
        labels=LABELS,
        mean=(127.5, 127.5, 127.5),
        std=(127.5, 127.5, 127.5),
    )


def torch_reference(model: SSDModel, images: torch.Tensor, options: PostprocessOptions) -> list[Detections]:
    """The un-exported module in PyTorch: what the ONNX file must reproduce."""
    with torch.no_grad():
        num, boxes, scores, classes = ExportableSSD(model, options).eval()(images)
    return [Detections(boxes[i, :n], scores[i, :n], classes[i, :n].long()) for i, n in enumerate(num.tolist())]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[SSDModel, Path, torch.Tensor]:
    model = tiny_model()
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    export_onnx(model, PostprocessOptions(), path)
    photos = dead_leaves_images(SIZE, 5, seed=2)
    images = torch.cat((photos[:3], torch.zeros((1, *SIZE, 3), dtype=torch.uint8), photos[3:]))
    return model, path, images


def test_validate_export_runs_batch_1_and_full_batches_of_8(tiny: tuple[SSDModel, Path, torch.Tensor]) -> None:
    model, path, images = tiny
    calls = []

    def reference(m: SSDModel, batch: torch.Tensor, options: PostprocessOptions) -> list[Detections]:
        calls.append(len(batch))
        return torch_reference(m, batch, options)

    report = validate_export(path, model, reference, PostprocessOptions(), images)
    assert isinstance(report, ValidationReport)
    assert calls == [6]  # the reference runs once, on every image
    assert report.images == 6 and report.batch_sizes == (1, 8) and report.blank_images == (3,)
    expected = torch_reference(model, images, PostprocessOptions())
    assert report.reference_detections == tuple(len(d.scores) for d in expected)
    # Every image alone, then one batch of 8 (6 images + the first 2 again).
    assert report.rows_compared == sum(report.reference_detections) * 2 + sum(report.reference_detections[:2])
    assert report.max_box_diff <= 1e-4 and report.max_score_diff <= 1e-5
    text = str(report)
    assert text.startswith("tiny: 6 images at batch 1 and 8 agree with the reference") and "max |score diff|" in text


def test_precomputed_reference_detections_are_accepted(tiny: tuple[SSDModel, Path, torch.Tensor]) -> None:
    model, path, images = tiny
    expected = torch_reference(model, images, PostprocessOptions())
    assert validate_export(path, model, expected, PostprocessOptions(), images).images == 6


def test_a_wrong_reference_fails_with_the_run_image_and_row(tiny: tuple[SSDModel, Path, torch.Tensor]) -> None:
    model, path, images = tiny
    expected = torch_reference(model, images, PostprocessOptions())
    target = next(i for i, d in enumerate(expected) if len(d.scores) > 1)
    moved = expected[target].boxes.clone()
    moved[1, 2] -= 1e-3
    expected[target] = Detections(moved, expected[target].scores, expected[target].classes)
    with pytest.raises(ExportError, match=rf"^batch 1, image {target}: reference row 1 \("):
        validate_export(path, model, expected, PostprocessOptions(), images)
    report = validate_export(path, model, expected, PostprocessOptions(), images, box_tolerance=2e-3)
    assert report.max_box_diff == pytest.approx(1e-3, rel=1e-3)


def test_bad_inputs_are_clear_errors(tiny: tuple[SSDModel, Path, torch.Tensor], tmp_path: Path) -> None:
    model, path, images = tiny
    options = PostprocessOptions()
    with pytest.raises(ExportError, match="no ONNX file at"):
        validate_export(tmp_path / "none.onnx", model, torch_reference, options, images)
    with pytest.raises(ExportError, match=r"must be uint8 \[N, 64, 64, 3\]"):
        validate_export(path, model, torch_reference, options, images[:, :32])
    with pytest.raises(ExportError, match="gave 5 results for 6 images"):
        validate_export(path, model, torch_reference(model, images[:5], options), options, images)
    (tmp_path / "junk.onnx").write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(ExportError, match="ONNX Runtime cannot load"):
        validate_export(tmp_path / "junk.onnx", model, torch_reference, options, images)
