"""Check an exported ONNX file against its model's reference detections, under ONNX Runtime (CPU).

`validate_export` runs the file on every validation image alone (batch 1) and in batches of 8, and requires the
same detections as the reference: equal counts and classes, boxes within 1e-4 (normalised units, about 0.03 px at
300x300), scores within 1e-5. The first difference raises `ExportError` naming the run, the image and the row.

Near-ties, which two correct float32 implementations may resolve differently, are not failures:

- a row (on either side) whose score is within 1e-6 of `score_threshold` is ignored: whether it passed the
  strict `score > threshold` test is rounding;
- rows are matched greedily, not by position: each reference row, in descending score order, takes the unmatched
  exported row of the same class with a score within the score tolerance and the closest box (within the box
  tolerance). Equal or nearly equal scores may come out in either order;
- when either side returned all K = `max_detections` rows, the K-th cut may fall inside a run of (nearly) equal
  scores, so only rows scoring more than the tolerance above the cut are compared.

Every ignored row is counted in the report. Not excused: an NMS decision that flips on rounding (two overlapping
boxes of one class within rounding in score, or an IoU within rounding of `iou_threshold`); that is rare and shows
as a missing or extra row. float32 rounding itself is close to the score tolerance: ONNX Runtime and PyTorch differ
by up to ~5e-6 on these networks' scores (input normalisation and convolution order both contribute), so a model
whose logits are larger or deeper-computed may need `score_tolerance` raised.

Ties on TensorRT (and ONNX Runtime CUDA). ONNX fixes no order for equal scores in NonMaxSuppression, and TensorRT's
TopK and NMS layers leave it unspecified, while ONNX Runtime CPU and the PyTorch reference visit equal scores lowest
index first. The rules above are what makes a GPU engine comparable here: rows are matched by class, score and box,
never by position, so equal scores in any order match; and a run of equal scores straddling the K-th cut is
excused. One tie is still a failure on purpose: two overlapping boxes of one class with equal scores, where the
visiting order decides which one NMS keeps. The other engine then returns the other box, which shows as an unmatched
row naming both scores; on the validation photos no such tie occurs (an exact float32 tie of two overlapping boxes
needs identical logits), so a failure there is a real difference, not tie order.

`load_validation_images` gives the input set: real photos resized to the model input exactly as the server does
(bilinear, no antialias), with one blank frame among them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model_export.errors import ExportError
from model_export.exportable import ExportableSSD
from model_export.contract.cpu import exact_session
from model_export.contract.image import model_input
from model_export.contract.metadata import OUTPUT_NAMES
from model_export.spec import Detections, PostprocessOptions, SSDModel

BOX_TOLERANCE = 1e-4
SCORE_TOLERANCE = 1e-5
THRESHOLD_MARGIN = 1e-6
VALIDATION_BATCH = 8
MAX_PHOTOS = 7  # + 1 blank frame = one batch of 8
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Repo-relative default photos: <repo>/../shared/data/...
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

Reference = Callable[[SSDModel, torch.Tensor, PostprocessOptions], list[Detections]]


@dataclass(frozen=True)
class ValidationReport:
    """What was compared and how closely it agreed."""

    model: str
    images: int  # distinct validation images
    batch_sizes: tuple[int, ...]  # runs: every image alone, then batches of this size
    reference_detections: tuple[int, ...]  # per image
    blank_images: tuple[int, ...]  # indices of uniform frames among the images
    blank_detections: int  # exported detections on those frames (all runs)
    rows_compared: int  # matched rows, all runs together
    max_box_diff: float
    max_score_diff: float
    ignored_near_threshold: int  # rows within THRESHOLD_MARGIN of the score threshold (both sides, all runs)
    ignored_at_cut: int  # rows within the score tolerance of the K-th cut (both sides, all runs)
    seconds: float

    def __str__(self) -> str:
        runs = " and ".join(str(b) for b in self.batch_sizes)
        counts = ", ".join(str(n) for n in self.reference_detections)
        return (
            f"{self.model}: {self.images} images at batch {runs} agree with the reference "
            f"(detections per image: {counts}; blank frames: {self.blank_detections} detections); "
            f"{self.rows_compared} rows compared, max |box diff| {self.max_box_diff:.2g}, "
            f"max |score diff| {self.max_score_diff:.2g}; ignored {self.ignored_near_threshold} rows within "
            f"{THRESHOLD_MARGIN:g} of the threshold and {self.ignored_at_cut} in a tie at the K cut "
            f"({self.seconds:.1f} s)"
        )


# ---------------------------------------------------------------------------------------------------- images


def dead_leaves_images(size: tuple[int, int], count: int, seed: int, disks: int = 300) -> torch.Tensor:
    """Seeded synthetic photos, uint8 [count, H, W, 3]: the "dead leaves" model of natural image statistics.

    Opaque discs of random colour, with a power-law radius distribution (2 px up to half the frame), painted
    largest first: flat regions, sharp edges and structure at every scale, as in real photos.
    """
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    rows = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    cols = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    r_min, r_max = 2.0, min(height, width) / 2
    images = []
    for _ in range(count):
        u = torch.rand(disks, generator=generator)
        radii = ((r_min**-2 + (r_max**-2 - r_min**-2) * u) ** -0.5).sort(descending=True).values  # density ~ r^-3
        centre_y = torch.rand(disks, generator=generator).view(-1, 1, 1) * height
        centre_x = torch.rand(disks, generator=generator).view(-1, 1, 1) * width
        colours = torch.rand((disks + 1, 3), generator=generator)  # row 0: the background
        top = torch.zeros((height, width), dtype=torch.int64)  # index + 1 of the last disc painted over a pixel
        for start in range(0, disks, 64):
            stop = min(start + 64, disks)
            inside = (rows - centre_y[start:stop]) ** 2 + (cols - centre_x[start:stop]) ** 2 <= (
                radii[start:stop].view(-1, 1, 1) ** 2
            )  # [n, H, W]
            order = torch.arange(start + 1, stop + 1).view(-1, 1, 1)
            top = torch.maximum(top, (inside * order).amax(dim=0))
        images.append((colours[top] * 255).round().to(torch.uint8))  # [H, W, 3]
    return torch.stack(images)


def _photo_paths(directory: Path | None) -> list[Path]:
    def listing(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []

    if directory is not None:
        if not directory.is_dir():
            raise ExportError(f"--validate-images {directory} is not a folder")
        found = listing(directory)
        if not found:
            raise ExportError(f"--validate-images {directory} holds no {'/'.join(IMAGE_SUFFIXES)} files")
        return found[:MAX_PHOTOS]
    own = listing(SHARED_DATA / "images")[:MAX_PHOTOS]
    return own + listing(SHARED_DATA / "voc2012_sample" / "JPEGImages")[: MAX_PHOTOS - len(own)]


def _prepare(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """The contract's input (`model_input`), so validation feeds the model exactly the pixels the server will."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            oriented = ImageOps.exif_transpose(image)  # a copy, loaded: the file can close
            return torch.from_numpy(model_input(oriented, size))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ExportError(f"cannot decode validation image {path}: {exc}") from exc


def load_validation_images(size: tuple[int, int], directory: Path | None = None) -> torch.Tensor:
    """The validation set, uint8 [N, H, W, 3] at the model input size `size` (H, W): up to 7 photos + 1 blank.

    Photos come from `directory` (its first 7 .jpg/.jpeg/.png files by name) or, by default, from the shared test
    data beside the repository (`../shared/data/images` and a few `voc2012_sample` photos); where neither exists,
    from seeded synthetic "dead leaves" images. Each is EXIF-oriented, converted to RGB and resized by the
    contract's `model_input`, as the server does. A black frame sits in the middle of the set (index N // 2), so that a
    batch of 8 mixes an image with zero detections among images with many.
    """
    paths = _photo_paths(directory)
    if paths:
        photos = torch.stack([_prepare(p, size) for p in paths])
    else:
        photos = dead_leaves_images(size, MAX_PHOTOS, seed=1)
    blank = torch.zeros((1, *size, 3), dtype=torch.uint8)
    middle = (len(photos) + 1) // 2
    return torch.cat((photos[:middle], blank, photos[middle:]))


# ---------------------------------------------------------------------------------------------------- running


def _session(onnx_path: Path):  # -> onnxruntime.InferenceSession
    if not Path(onnx_path).is_file():
        raise ExportError(f"no ONNX file at {onnx_path}")
    try:
        return exact_session(onnx_path)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise ExportError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc


def _run(session, batch: torch.Tensor) -> dict[str, np.ndarray]:  # noqa: ANN001
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    return dict(zip(names, values, strict=True))


def _unpack(outputs: dict[str, np.ndarray], row: int, where: str) -> Detections:
    """The valid rows of one image; the padding rows past num_detections must be zero."""
    count = int(outputs["num_detections"][row])
    boxes, scores, classes = outputs["boxes"][row], outputs["scores"][row], outputs["classes"][row]
    if not 0 <= count <= len(scores):
        raise ExportError(f"{where}: num_detections {count} outside [0, {len(scores)}]")
    if np.any(boxes[count:]) or np.any(scores[count:]) or np.any(classes[count:]):
        raise ExportError(f"{where}: rows past num_detections ({count}) are not all zero")
    return Detections(
        boxes=torch.from_numpy(boxes[:count].copy()),
        scores=torch.from_numpy(scores[:count].copy()),
        classes=torch.from_numpy(classes[:count].astype(np.int64)),
    )


# ---------------------------------------------------------------------------------------------------- comparing


@dataclass
class _Tally:
    rows: int = 0
    box: float = 0.0
    score: float = 0.0
    near_threshold: int = 0
    at_cut: int = 0


def _describe(det: Detections, row: int, labels: Sequence[str]) -> str:
    if row >= len(det.scores):
        return "none"
    cls = int(det.classes[row])
    name = labels[cls] if 0 <= cls < len(labels) else "?"
    box = ", ".join(f"{v:.5f}" for v in det.boxes[row].tolist())
    return f"class {cls} {name!r} score {float(det.scores[row]):.6f} box [{box}]"


def _comparable(det: Detections, keep: torch.Tensor) -> Detections:
    return Detections(boxes=det.boxes[keep], scores=det.scores[keep], classes=det.classes[keep])


def compare_detections(
    ours: Detections,
    reference: Detections,
    options: PostprocessOptions,
    labels: Sequence[str],
    where: str,
    tally: _Tally,
    box_tolerance: float = BOX_TOLERANCE,
    score_tolerance: float = SCORE_TOLERANCE,
) -> None:
    """Raise ExportError at the first difference beyond the tolerances; near-ties as in the module docstring."""
    threshold, k = options.score_threshold, options.max_detections
    sides = {"export": ours, "reference": reference}
    # The K-th cut: a side that returned K rows dropped everything below its last score.
    cut = max((float(d.scores[-1]) for d in sides.values() if len(d.scores) >= k), default=-math.inf)
    filtered = {}
    for name, det in sides.items():
        scores = det.scores.to(torch.float64)
        near = (scores - threshold).abs() <= THRESHOLD_MARGIN
        below_cut = ~near & (scores <= cut + score_tolerance)
        tally.near_threshold += int(near.sum())
        tally.at_cut += int(below_cut.sum())
        filtered[name] = _comparable(det, ~near & ~below_cut)
    ours, reference = filtered["export"], filtered["reference"]

    matched = torch.zeros(len(ours.scores), dtype=torch.bool)
    for i in range(len(reference.scores)):
        score_diff = (ours.scores.to(torch.float64) - float(reference.scores[i])).abs()
        box_diff = (ours.boxes.to(torch.float64) - reference.boxes[i].to(torch.float64)).abs().amax(dim=1)
        fits = (~matched) & (ours.classes == reference.classes[i]) & (score_diff <= score_tolerance)
        fits &= box_diff <= box_tolerance
        if not bool(fits.any()):
            raise ExportError(
                f"{where}: reference row {i} ({_describe(reference, i, labels)}) has no match in the export "
                f"(export row {i}: {_describe(ours, i, labels)}; tolerances: box {box_tolerance:g}, "
                f"score {score_tolerance:g})"
            )
        j = int(torch.where(fits, box_diff, torch.inf).argmin())
        matched[j] = True
        tally.rows += 1
        tally.box = max(tally.box, float(box_diff[j]))
        tally.score = max(tally.score, float(score_diff[j]))
    if not bool(matched.all()):
        extra = int(torch.nonzero(~matched)[0])
        raise ExportError(
            f"{where}: the export has {len(ours.scores)} detections, the reference {len(reference.scores)}; "
            f"first unmatched export row {extra}: {_describe(ours, extra, labels)}"
        )


def exported_module_reference(model: SSDModel, images: torch.Tensor, options: PostprocessOptions) -> list[Detections]:
    """The exportable module itself, run in PyTorch: what the ONNX file must reproduce."""
    with torch.no_grad():
        num, boxes, scores, classes = ExportableSSD(model, options).eval()(images)
    return [Detections(boxes[i, :n], scores[i, :n], classes[i, :n].long()) for i, n in enumerate(num.tolist())]


def validate_export(
    onnx_path: Path,
    model: SSDModel,
    reference: Reference | Sequence[Detections] | None,
    options: PostprocessOptions,
    images: torch.Tensor,
    batch_size: int = VALIDATION_BATCH,
    box_tolerance: float = BOX_TOLERANCE,
    score_tolerance: float = SCORE_TOLERANCE,
) -> ValidationReport:
    """Run `onnx_path` under ONNX Runtime CPU at batch 1 and `batch_size`; compare every image with the reference.

    `reference` is the model source's reference function (called once on all images) or its detections,
    one per image; None (a source whose reference is an external runtime, such as LiteRT for TFLite) compares
    with the same exportable module run in PyTorch, which checks the export itself. `images` is uint8 [N, H, W, 3] at the model's input size (see `load_validation_images`).
    Batches of `batch_size` are filled by cycling through the images, so every run has exactly that size.
    Raises ExportError at the first difference (see the module docstring for what counts as one).
    """
    start = time.perf_counter()
    height, width = model.input_size
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (height, width, 3):
        raise ExportError(f"validation images must be uint8 [N, {height}, {width}, 3], got {list(images.shape)}")
    count = len(images)
    if count == 0:
        raise ExportError("no validation images")
    if reference is None:
        reference = exported_module_reference
    expected = reference(model, images, options) if callable(reference) else list(reference)
    if len(expected) != count:
        raise ExportError(f"the reference gave {len(expected)} results for {count} images")
    blank = tuple(i for i in range(count) if bool((images[i] == images[i].flatten()[0]).all()))

    session = _session(onnx_path)
    missing = set(OUTPUT_NAMES) - {o.name for o in session.get_outputs()}
    if missing:
        raise ExportError(f"{onnx_path} lacks the contract's outputs {sorted(missing)}")
    tally = _Tally()
    blank_detections = 0
    # (batch size, image indices) of each run.
    runs = [(1, [i]) for i in range(count)]
    batches = math.ceil(count / batch_size)
    runs += [(batch_size, [(b * batch_size + j) % count for j in range(batch_size)]) for b in range(batches)]
    for size, indices in runs:
        outputs = _run(session, images[indices])
        if len(outputs["num_detections"]) != len(indices):
            raise ExportError(f"batch {size}: {len(outputs['num_detections'])} results for {len(indices)} images")
        for position, index in enumerate(indices):
            where = f"batch {size}, image {index}" + (f" (position {position})" if size > 1 else "")
            ours = _unpack(outputs, position, where)
            if index in blank:
                blank_detections += len(ours.scores)
            compare_detections(
                ours, expected[index], options, model.labels, where, tally, box_tolerance, score_tolerance
            )
    return ValidationReport(
        model=model.name,
        images=count,
        batch_sizes=(1, batch_size),
        reference_detections=tuple(len(d.scores) for d in expected),
        blank_images=blank,
        blank_detections=blank_detections,
        rows_compared=tally.rows,
        max_box_diff=tally.box,
        max_score_diff=tally.score,
        ignored_near_threshold=tally.near_threshold,
        ignored_at_cut=tally.at_cut,
        seconds=time.perf_counter() - start,
    )
