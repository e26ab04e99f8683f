"""mAP@0.5 on the shared VOC2012 sample, for an exported ONNX model (ONNX Runtime) and for LiteRT on a .tflite.

    python -m benchmarks.voc_map --onnx weights/ssd_mobilenet_v1_coco.onnx \
        --tflite ../shared/models/coco_ssd_mobilenet_v1/detect.tflite --data ../shared/data/voc2012_sample

Both engines see the same pixels, the server's: the photo decoded (EXIF-oriented, RGB) and resized to the model
input with bilinear filtering WITHOUT antialiasing (model_export.contract.image.resize_bilinear; see DESIGN.md). COCO names are
mapped to VOC names (airplane -> aeroplane, ...); detections of COCO-only classes are dropped. Scoring is
pycocotools' COCOeval at IoU 0.5 (101-point interpolated AP, up to 100 detections per image), with VOC's
rule for `difficult` objects: they count neither as misses nor, when matched, as false positives.
Three numbers: `onnx` (ours, the contract's per-class post-processing 0.01 / 0.45 / top 200), `litert` (the file
as shipped: its TFLite_Detection_PostProcess keeps the top 10 after class-agnostic NMS at 0.6), and
`litert_paper` (LiteRT's network outputs through our post-processing: the like-for-like comparison for `onnx`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
# COCO names that differ from VOC's; the other 14 VOC classes share their COCO name.
COCO_TO_VOC: dict[str, str] = {
    "airplane": "aeroplane",
    "motorcycle": "motorbike",
    "couch": "sofa",
    "dining table": "diningtable",
    "potted plant": "pottedplant",
    "tv": "tvmonitor",
}
MAX_DETECTIONS = 100  # COCO's per-image cap for AP
_DESCRIPTIONS = {
    "onnx": "ours: exported file, ONNX Runtime, paper post-processing (0.01 / 0.45 per class / 200)",
    "litert": "LiteRT, the file's own post-processing (top 10, class-agnostic NMS 0.6)",
    "litert_paper": "LiteRT's network + our paper post-processing (like for like with onnx)",
}


@dataclass(frozen=True)
class GroundTruth:
    file: Path
    width: int
    height: int
    boxes: np.ndarray  # [n, 4] x1, y1, x2, y2 pixels
    labels: tuple[str, ...]  # VOC names
    difficult: tuple[bool, ...]


@dataclass(frozen=True)
class ImageDetections:
    boxes: np.ndarray  # [n, 4] x1, y1, x2, y2 pixels of the original image
    scores: np.ndarray  # [n]
    labels: tuple[str, ...]  # the model's class names


def load_rgb(path: Path) -> np.ndarray:
    """Decode to uint8 [H, W, 3] RGB, EXIF orientation applied."""
    with Image.open(path) as im:
        return np.array(ImageOps.exif_transpose(im).convert("RGB"))  # writable copy


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] (size = (h, w)) with the contract's resize (the server's), pixel for pixel:
    OpenCV's INTER_LINEAR (bilinear, half-pixel centres, no antialiasing; model_export/contract/image.py). Both sides
    of a like-for-like comparison get these same pixels.
    """
    from model_export.contract.image import resize_bilinear as contract_resize

    return contract_resize(image, size)


def load_voc(data_dir: Path) -> list[GroundTruth]:
    """Every `Annotations/*.xml` with its `JPEGImages/` photo, sorted by name."""
    items = []
    for xml in sorted((data_dir / "Annotations").glob("*.xml")):
        root = ET.parse(xml).getroot()
        file = data_dir / "JPEGImages" / root.findtext("filename", xml.stem + ".jpg")
        size = root.find("size")
        boxes, labels, difficult = [], [], []
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            assert bb is not None
            # VOC boxes are 1-based inclusive pixel indices; (xmin - 1, xmax) is the continuous extent.
            x1, y1, x2, y2 = (float(bb.findtext(k, "0")) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append((x1 - 1, y1 - 1, x2, y2))
            labels.append(obj.findtext("name", "").strip())
            difficult.append(obj.findtext("difficult", "0").strip() == "1")
        items.append(
            GroundTruth(
                file=file,
                width=int(size.findtext("width", "0")) if size is not None else 0,
                height=int(size.findtext("height", "0")) if size is not None else 0,
                boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                labels=tuple(labels),
                difficult=tuple(difficult),
            )
        )
    if not items:
        raise FileNotFoundError(f"no VOC annotations under {data_dir / 'Annotations'}")
    return items


def detect_onnx(model_path: Path, images: Sequence[np.ndarray], batch_size: int = 8) -> list[ImageDetections]:
    """Run an exported file (the model contract) with ONNX Runtime on CPU."""
    from model_export.contract.cpu import exact_session
    from model_export.contract.metadata import METADATA_KEY, ModelMetadata

    session = exact_session(model_path)
    meta = ModelMetadata.from_json(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = np.stack([resize_bilinear(im, meta.input_size) for im in chunk])
        num, boxes, scores, classes = session.run(["num_detections", "boxes", "scores", "classes"], {"images": batch})
        for i, im in enumerate(chunk):
            n = int(num[i])
            h, w = im.shape[:2]
            results.append(
                ImageDetections(
                    boxes=boxes[i, :n].astype(np.float64) * [w, h, w, h],
                    scores=scores[i, :n].astype(np.float64),
                    labels=tuple(meta.labels[c] for c in classes[i, :n]),
                )
            )
    return results


def detect_tflite(model_path: Path, images: Sequence[np.ndarray], labels: Sequence[str]) -> list[ImageDetections]:
    """Run the .tflite file, its own post-processing included (top 10, class-agnostic NMS), with LiteRT."""
    from model_export.tflite.reference import LiteRTDetector

    detector = LiteRTDetector(model_path)
    results = []
    for im in images:
        det = detector(resize_bilinear(im, detector.input_size))
        h, w = im.shape[:2]
        results.append(
            ImageDetections(
                boxes=det.boxes * [w, h, w, h], scores=det.scores, labels=tuple(labels[c] for c in det.classes)
            )
        )
    return results


def detect_tflite_paper(model_path: Path, images: Sequence[np.ndarray]) -> list[ImageDetections]:
    """LiteRT's network (the file's quantised arithmetic) followed by the contract's post-processing.

    The like-for-like baseline for an export of the same file: only the network numerics differ.
    """
    import torch

    from model_export.models.tflite_ssd import import_tflite_ssd
    from model_export.postprocess import SSDPostprocess
    from model_export.spec import PostprocessOptions
    from model_export.tflite.reference import LiteRTDetector

    model = import_tflite_ssd(model_path)
    postprocess = SSDPostprocess(model, PostprocessOptions()).eval()
    detector = LiteRTDetector(model_path, keep_intermediates=True)
    results = []
    for im in images:
        raw = detector.raw(resize_bilinear(im, detector.input_size))
        if raw.logits is None:
            raise ValueError(f"{model_path}: the scores have no activation op to take logits from")
        regression = torch.from_numpy(raw.box_encodings[:, [1, 0, 3, 2]]).unsqueeze(0)  # (dx, dy, dw, dh)
        with torch.no_grad():
            num, boxes, scores, classes = postprocess(regression, torch.from_numpy(raw.logits).unsqueeze(0))
        n = int(num[0])
        h, w = im.shape[:2]
        results.append(
            ImageDetections(
                boxes=boxes[0, :n].double().numpy() * [w, h, w, h],
                scores=scores[0, :n].double().numpy(),
                labels=tuple(model.labels[c] for c in classes[0, :n].tolist()),
            )
        )
    return results


def _coco_eval_class() -> type:
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    class VOCStyleEval(COCOeval):  # type: ignore[misc]
        """COCOeval with plain IoU against ignored (VOC `difficult`) boxes instead of COCO's crowd IoU."""

        def computeIoU(self, imgId: int, catId: int) -> np.ndarray | list:  # noqa: N802, N803 (pycocotools' names)
            gt = self._gts[imgId, catId]
            dt = sorted(self._dts[imgId, catId], key=lambda d: -d["score"])[: self.params.maxDets[-1]]
            if not gt or not dt:
                return []
            g = [x["bbox"] for x in gt]
            d = [x["bbox"] for x in dt]
            return mask_utils.iou(d, g, [0] * len(g))

    return VOCStyleEval


def voc_map50(ground_truth: Sequence[GroundTruth], detections: Sequence[ImageDetections]) -> float:
    """mAP@0.5 in percent over the VOC classes present in the ground truth."""
    from pycocotools.coco import COCO

    if len(ground_truth) != len(detections):
        raise ValueError(f"{len(ground_truth)} images but {len(detections)} detection lists")
    cat_id = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
    images, annotations, results = [], [], []
    for image_id, (gt, det) in enumerate(zip(ground_truth, detections, strict=True), start=1):
        images.append({"id": image_id, "width": gt.width, "height": gt.height})
        for box, label, hard in zip(gt.boxes, gt.labels, gt.difficult, strict=True):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(hard),  # pycocotools' ignore flag; IoU stays plain (VOCStyleEval)
                }
            )
        order = np.argsort(-det.scores, kind="stable")[:MAX_DETECTIONS]
        for k in order:
            voc = COCO_TO_VOC.get(det.labels[k], det.labels[k])
            if voc not in cat_id:
                continue
            x1, y1, x2, y2 = det.boxes[k]
            results.append(
                {
                    "image_id": image_id,
                    "category_id": cat_id[voc],
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "score": float(det.scores[k]),
                }
            )
    gt_api = COCO()
    gt_api.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for n, i in cat_id.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt_api.createIndex()
        dt_api = gt_api.loadRes(results) if results else COCO()
        evaluator = _coco_eval_class()(gt_api, dt_api, "bbox")
        evaluator.params.iouThrs = np.array([0.5])
        evaluator.params.maxDets = [MAX_DETECTIONS]
        evaluator.params.areaRng = [[0, 1e10]]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][0, :, :, 0, -1]  # [R, K]
    present = (precision > -1).all(axis=0)  # classes with ground truth
    return float(precision[:, present].mean() * 100) if present.any() else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.voc_map", description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, help="exported model (ONNX Runtime, CPU)")
    parser.add_argument("--tflite", type=Path, help="TF OD API TFLite SSD, labelmap.txt beside it (LiteRT)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/voc2012_sample"), help="VOC-layout folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if not args.onnx and not args.tflite:
        parser.error("give --onnx and/or --tflite")
    ground_truth = load_voc(args.data)
    images = [load_rgb(gt.file) for gt in ground_truth]
    scores: dict[str, float] = {}
    if args.onnx:
        scores["onnx"] = voc_map50(ground_truth, detect_onnx(args.onnx, images))
    if args.tflite:
        from model_export.models.tflite_ssd import import_tflite_ssd

        labels = import_tflite_ssd(args.tflite).labels
        scores["litert"] = voc_map50(ground_truth, detect_tflite(args.tflite, images, labels))
        scores["litert_paper"] = voc_map50(ground_truth, detect_tflite_paper(args.tflite, images))
    if args.json:
        print(json.dumps({"images": len(images), "map50": scores}))
    else:
        print(f"VOC2012 sample: {len(images)} images, mAP@0.5 (pycocotools, VOC classes, difficult ignored)")
        for name, value in scores.items():
            print(f"  {name:13s} {value:6.2f}  {_DESCRIPTIONS[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
