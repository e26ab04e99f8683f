"""NVIDIA's SSD300 v1.1, ResNet-50 backbone (DeepLearningExamples `PyTorch/Detection/SSD`, torch.hub `nvidia_ssd`).

The network is rebuilt here with the same module names as their `SSD300`, so that their checkpoints
(`{"model": state_dict, ...}`, optionally with the `module.` prefix of distributed training) load strictly:

- `feature_extractor.feature_extractor`: torchvision's ResNet-50 up to and including `layer3` (conv4_x), with the
  first block of `layer3` at stride 1 (38x38 output for a 300x300 input);
- `additional_blocks.0..4`: 1x1 conv -> BN -> ReLU -> 3x3 conv (stride 2, pad 1 for the first three; pad 0 after)
  -> BN -> ReLU, giving 19x19, 10x10, 5x5, 3x3 and 1x1 maps;
- `loc.0..5` / `conf.0..5`: one plain 3x3 convolution (with bias, no BatchNorm) per feature map, 4/6/6/6/4/4 default
  boxes per location, 81 classes (0 = background, 1..80 = COCO in annotation-file order).

Their heads emit `[B, 4, N]` and `[B, 81, N]`; `SSD300ResNet50.forward` returns the contract's `[B, N, 4]` (dx, dy,
dw, dh) and `[B, N, 81]`. Inputs are normalised with ImageNet mean/std, as in their training and evaluation
pipelines (their torch.hub notebook helper instead uses (x * 256 - 128) / 128; we follow the training code).

Default boxes follow their `dboxes300_coco()` / `DefaultBoxes`: for each feature map, for each box size
(s_k, sqrt(s_k s_k+1), then the (w, h) and (h, w) pair of every aspect ratio), for each row i, for each column j;
centres ((j + 0.5) / f_k, (i + 0.5) / f_k) with f_k = 300 / step; every coordinate clamped to [0, 1].
Decoding is theirs: centre += 0.1 * d * anchor_size, size = exp(0.2 * d) * anchor_size, no clamp before exp.

`reference` re-implements their `Encoder.decode_batch` semantics at the thresholds of `PostprocessOptions`.
Where their code differs from this project's contract:

- they keep scores > 0.05 and at most 200 candidates per class (we: options, 0.01 and 400 by default);
- their NMS is a Python loop that keeps boxes with IoU < criteria (suppresses IoU >= criteria); we use
  `torchvision.ops.nms`, which suppresses IoU > threshold (identical except at exact ties);
- their evaluation uses NMS IoU 0.50 and the hub helper 0.50 with 20 outputs (we: 0.45 and 200);
- they return boxes unclipped; the contract clips them to [0, 1] (we clip before NMS, as torchvision does);
- they name class 0 "background"; we use "__background__" as torchvision does (it is never reported).

weights: None -> seeded random init, rewritten by `calibrate_random_network` so that validating an export with it
means something; "coco" -> the checkpoint their torch.hub entry point downloads (`COCO_CHECKPOINT_URL`, kept in
torch.hub's cache; offline, download it yourself and pass its path); a path -> one of their checkpoints, loaded
with `torch.load(weights_only=True)`; the class count is read off its heads unless `num_classes` is given.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import nms

from model_export.checkpoints import check_fit, read_state_dict
from model_export.errors import ExportError
from model_export.models import ModelSource, require_float
from model_export.spec import Detections, Numerics, PostprocessOptions, SSDModel
from model_export import weights as weight_store
from model_export.weights import sha256_of

NAME = "ssd300_resnet50"
# The checkpoint their torch.hub entry point (`nvidia_ssd`, src/entrypoints.py) downloads for pretrained=True.
COCO_CHECKPOINT_URL = (
    "https://api.ngc.nvidia.com/v2/models/nvidia/ssd_pyt_ckpt_amp/versions/20.06.0/files/nvidia_ssdpyt_amp_200703.pt"
)
MANIFEST_ENTRY = "nvidia_ssd300_resnet50_coco"  # its entry in model_export/manifest.json
DEFAULT_SEED = 0
# Random init (see calibrate_random_network).
UNIFORM_GREYS = tuple(range(0, 256, 51))  # 0, 51, ..., 255: the blank frames the class heads are made blind to
BLANK_SUBSPACE_RTOL = 1e-3
SIGNAL_DIRECTIONS = 8
RANDOM_LOGIT_GAIN = 1.5
RESIDUAL_BRANCH_GAIN = 0.2

INPUT_SIZE = 300
FEATURE_SIZES = (38, 19, 10, 5, 3, 1)
STEPS = (8, 16, 32, 64, 100, 300)
SCALES = (21, 45, 99, 153, 207, 261, 315)
ASPECT_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
BOXES_PER_LOCATION = (4, 6, 6, 6, 4, 4)  # 2 + 2 * len(aspect ratios)
SCALE_XY = 0.1
SCALE_WH = 0.2

NUM_CLASSES = 81  # background + 80 COCO classes
COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip
LABELS = ("__background__", *COCO_NAMES)

# ImageNet statistics of their pipeline (on 0..1 RGB), expressed on the 0..255 scale of the contract's input.
MEAN = (0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0)
STD = (0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)

# Their DDP-wrapped checkpoints prefix keys; `module.1.` comes from a DDP-wrapped (normaliser, model) Sequential.
# ---------------------------------------------------------------------------------------------------------------
# Network


class ResNet50Trunk(nn.Module):
    """torchvision's ResNet-50 through conv4_x (`layer3`), with conv4_x's first block at stride 1."""

    out_channels = (1024, 512, 512, 256, 256, 256)  # trunk, then each additional block

    def __init__(self) -> None:
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None)
        # conv1, bn1, relu, maxpool, layer1, layer2, layer3: keys feature_extractor.0 .. feature_extractor.6
        self.feature_extractor = nn.Sequential(*list(resnet.children())[:7])
        conv4_block1 = self.feature_extractor[-1][0]
        conv4_block1.conv1.stride = (1, 1)
        conv4_block1.conv2.stride = (1, 1)
        conv4_block1.downsample[0].stride = (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_extractor(x)  # [B, 3, 300, 300] -> [B, 1024, 38, 38]


def _additional_block(in_channels: int, mid_channels: int, out_channels: int, downsample: bool) -> nn.Sequential:
    padding, stride = (1, 2) if downsample else (0, 1)
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=padding, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SSD300ResNet50(nn.Module):
    """Their `SSD300(ResNet('resnet50'))`, same state_dict keys; outputs in the contract's layout."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_extractor = ResNet50Trunk()
        channels = ResNet50Trunk.out_channels
        mid_channels = (256, 256, 128, 128, 128)
        self.additional_blocks = nn.ModuleList(
            _additional_block(channels[i], mid_channels[i], channels[i + 1], downsample=i < 3) for i in range(5)
        )
        self.loc = nn.ModuleList(
            nn.Conv2d(c, n * 4, kernel_size=3, padding=1) for c, n in zip(channels, BOXES_PER_LOCATION)
        )
        self.conf = nn.ModuleList(
            nn.Conv2d(c, n * num_classes, kernel_size=3, padding=1) for c, n in zip(channels, BOXES_PER_LOCATION)
        )
        # Their _init_weights: Xavier-uniform for every weight with dim > 1 outside the backbone.
        for module in (*self.additional_blocks, *self.loc, *self.conf):
            for param in module.parameters():
                if param.dim() > 1:
                    nn.init.xavier_uniform_(param)

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, 300, 300] -> the six maps the heads read: 38x38, 19x19, 10x10, 5x5, 3x3, 1x1."""
        x = self.feature_extractor(images)
        features = [x]
        for block in self.additional_blocks:
            x = block(x)
            features.append(x)
        return features

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.feature_maps(images)
        batch = images.shape[0]
        # Their bbox_view: [B, n*4, H, W] -> [B, 4, n*H*W]: channel = coordinate * n + box, and within a level
        # the order is (box size, row, column), as in their default boxes.
        locs = [loc(f).reshape(batch, 4, -1) for loc, f in zip(self.loc, features)]
        confs = [conf(f).reshape(batch, self.num_classes, -1) for conf, f in zip(self.conf, features)]
        box_regression = torch.cat(locs, dim=2).permute(0, 2, 1)  # [B, 4, N] -> [B, N, 4]
        class_logits = torch.cat(confs, dim=2).permute(0, 2, 1)  # [B, C, N] -> [B, N, C]
        return box_regression, class_logits


# ---------------------------------------------------------------------------------------------------------------
# Default boxes


def default_boxes() -> torch.Tensor:
    """Their 8732 SSD300 default boxes, in their order, as normalised (cx, cy, w, h) clamped to [0, 1]."""
    boxes: list[tuple[float, float, float, float]] = []
    for level, feature_size in enumerate(FEATURE_SIZES):
        cells_per_unit = INPUT_SIZE / STEPS[level]  # their fk
        small = SCALES[level] / INPUT_SIZE
        large = SCALES[level + 1] / INPUT_SIZE
        sizes = [(small, small), (math.sqrt(small * large), math.sqrt(small * large))]
        for ratio in ASPECT_RATIOS[level]:
            w, h = small * math.sqrt(ratio), small / math.sqrt(ratio)
            sizes += [(w, h), (h, w)]
        for w, h in sizes:
            for i, j in itertools.product(range(feature_size), repeat=2):
                boxes.append(((j + 0.5) / cells_per_unit, (i + 0.5) / cells_per_unit, w, h))
    return torch.tensor(boxes, dtype=torch.float32).clamp_(min=0.0, max=1.0)  # [8732, 4]


# ---------------------------------------------------------------------------------------------------------------
# Random init made useful for validation


def _normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [B, H, W, 3] RGB -> float [B, 3, H, W], (x - mean) / std on the 0..255 scale."""
    x = images.permute(0, 3, 1, 2).float()
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _uniform_frames() -> torch.Tensor:
    """Blank frames, uint8 [6, 300, 300, 3]: grey levels 0, 51, ..., 255."""
    levels = torch.tensor(UNIFORM_GREYS, dtype=torch.uint8)
    return levels.view(-1, 1, 1, 1).expand(-1, INPUT_SIZE, INPUT_SIZE, 3).contiguous()


def _textured_frames(count: int, seed: int) -> torch.Tensor:
    """Seeded stand-ins for photos, uint8 [count, 300, 300, 3]: smooth colour blobs plus fine noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((count, 3, 10, 10), generator=generator)
    smooth = nn.functional.interpolate(coarse, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    detail = torch.rand((count, 3, INPUT_SIZE, INPUT_SIZE), generator=generator)
    images = (0.8 * smooth + 0.2 * detail).clamp(0, 1) * 255.0
    return images.round().to(torch.uint8).permute(0, 2, 3, 1)


def _principal_basis(vectors: torch.Tensor, rtol: float) -> torch.Tensor:
    """[M, C] row vectors -> [C, r] orthonormal basis of the directions whose singular value is > rtol * largest."""
    gram = (vectors.T @ vectors).double()  # [C, C]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK's eigh at this size is several times faster on one thread than on two
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    finally:
        torch.set_num_threads(threads)
    singular = eigenvalues.clamp_min(0).sqrt()
    return eigenvectors[:, singular > rtol * singular.max()]


def _signal_projector(blank_features: torch.Tensor, textured_features: torch.Tensor) -> torch.Tensor:
    """[C, C] projector onto the strongest directions of textured features that blank frames never produce.

    Feature maps are [B, C, H, W]; every position's C-vector counts (borders too, where padding makes blank
    frames vary). Directions are float64 eigenvectors; the result is float32.
    """
    channels = blank_features.shape[1]
    blank = _principal_basis(blank_features.permute(0, 2, 3, 1).reshape(-1, channels), BLANK_SUBSPACE_RTOL)
    off_blank = torch.eye(channels, dtype=torch.float64) - blank @ blank.T  # [C, C]
    textured = textured_features.permute(0, 2, 3, 1).reshape(-1, channels).double() @ off_blank  # [M, C]
    signal = _principal_basis(textured, BLANK_SUBSPACE_RTOL)[:, -SIGNAL_DIRECTIONS:]  # [C, <= k], strongest last
    return (signal @ signal.T).float()


@torch.no_grad()
def calibrate_random_network(network: SSD300ResNet50, seed: int = DEFAULT_SEED) -> dict[str, float]:
    """Make a randomly initialised network worth validating an export with (deterministic; rewrites weights).

    Straight out of init the ResNet trunk, whose BatchNorms hold no statistics, maps every image onto nearly the
    same feature vector: logits spread by ~30 (softmax saturated, ~1.0 scores everywhere, a blank frame gives
    200 detections like a photo), and what tells images apart is ~1% of the features, so fp32 rounding
    differences between runtimes reach ~5e-5 in scores. torchvision's recipe (background bias above what blank
    frames produce) is not enough: blank frames move these features as much as photos do. So:

    - trunk: the last BatchNorm of every bottleneck scales its residual branch by `RESIDUAL_BRANCH_GAIN`
      (0.2, in the spirit of zero-init residuals), which keeps more of the image in the features;
    - class head, per feature map: every foreground filter is projected, tap by tap, onto the
      `SIGNAL_DIRECTIONS` strongest directions of seeded textured frames' features that lie outside the
      subspace of the features of uniform grey frames (0, 51, ..., 255; every position). A uniform frame then
      gives every class a logit of ~0, photos a spread, and scores agree across runtimes to ~5e-6;
    - foreground biases are zeroed and the weights scaled to a logit spread of `RANDOM_LOGIT_GAIN` on the
      textured frames; the background logit ignores the image (weights 0) and its bias, per box shape, sits
      log(1000) above the highest foreground logit of the grey frames: blank frames score every class below
      ~0.001 and give no detections, photos give scores spread up to ~0.9;
    - box head: scaled to a spread of 1 on the textured frames, as a trained one has, so boxes vary around
      their default boxes instead of all clipping to the whole image.
    """
    for module in network.feature_extractor.modules():
        if isinstance(module, Bottleneck):
            module.bn3.weight.fill_(RESIDUAL_BRANCH_GAIN)
    num_classes = network.num_classes
    blank = network.feature_maps(_normalise(_uniform_frames(), MEAN, STD))
    textured = network.feature_maps(_normalise(_textured_frames(4, seed), MEAN, STD))
    margin = math.log(1000.0)
    for conv, loc, blank_map, textured_map in zip(network.conf, network.loc, blank, textured):
        boxes = conv.out_channels // num_classes
        weight = conv.weight.view(num_classes, boxes, *conv.weight.shape[1:])  # [C, n, in, 3, 3]: class-major
        bias = conv.bias.view(num_classes, boxes)
        projector = _signal_projector(blank_map, textured_map)  # [in, in]
        weight[1:] = torch.einsum("cnikl,ij->cnjkl", weight[1:], projector)
        bias[1:] = 0.0
        weight[0] = 0.0

        def foreground(features: torch.Tensor) -> torch.Tensor:
            logits = conv(features)  # [B, C*n, H, W]
            return logits.view(logits.shape[0], num_classes, boxes, *logits.shape[-2:])[:, 1:]  # [B, C-1, n, H, W]

        weight[1:] *= RANDOM_LOGIT_GAIN / float(foreground(textured_map).std().clamp_min(1e-12))
        bias[0] = foreground(blank_map).amax(dim=(0, 1, 3, 4)) + margin  # [n]

        spread = float(loc(textured_map).std().clamp_min(1e-12))
        loc.weight /= spread
        loc.bias /= spread
    return {"logit_gain": RANDOM_LOGIT_GAIN, "blank_margin": margin}


# ---------------------------------------------------------------------------------------------------------------
# Weights


def _classes_in(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The class count a checkpoint was trained with, read off the first conf head (None if it has none)."""
    weight = state_dict.get("conf.0.weight")
    if weight is None or weight.ndim != 4 or weight.shape[0] % BOXES_PER_LOCATION[0]:
        return None
    return weight.shape[0] // BOXES_PER_LOCATION[0]


def _official_checkpoint() -> Path:
    """Their torch.hub checkpoint: from `SSD_WEIGHTS_MIRROR` when set (their file name), else torch.hub's cache,
    downloaded into it if missing."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(COCO_CHECKPOINT_URL).name
    mirrored = weight_store.fetch_from_mirror(MANIFEST_ENTRY, cached.parent)
    if mirrored is not None:
        return mirrored
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(COCO_CHECKPOINT_URL, str(cached), progress=False)
    except Exception as exc:  # URLError, HTTPError, timeouts, SSL, unwritable cache: all mean "could not fetch"
        raise ExportError(
            f"cannot download the official {NAME} checkpoint from {COCO_CHECKPOINT_URL} ({type(exc).__name__}); "
            f"{weight_store.offline_hint(MANIFEST_ENTRY)}, or place it at {cached}, or pass --weights PATH"
        ) from exc
    return cached


def _labels(num_classes: int) -> tuple[str, ...]:
    if num_classes == NUM_CLASSES:
        return LABELS
    return ("__background__", *(f"class_{i}" for i in range(1, num_classes)))


def _new_network(num_classes: int, seed: int) -> SSD300ResNet50:
    if num_classes < 2:
        raise ExportError(f"{NAME} needs at least 2 classes (background + 1), got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SSD300ResNet50(num_classes)


def build(weights: str | None, num_classes: int | None = None, numerics: Numerics | None = None) -> SSDModel:
    """weights: None (seeded random init), "coco" (their published checkpoint) or a checkpoint path.

    num_classes (background included): None = 81, or what a checkpoint file's heads say; their COCO
    checkpoint has 81.
    """
    require_float(NAME, numerics)
    extra = {"source": "NVIDIA DeepLearningExamples SSD300 v1.1 (torch.hub nvidia_ssd)"}
    if weights is None:
        network = _new_network(num_classes or NUM_CLASSES, DEFAULT_SEED).eval()
        facts = calibrate_random_network(network, DEFAULT_SEED)
        extra["random_init"] = (
            f"seed {DEFAULT_SEED}; calibrated for validation "
            f"(logit gain {facts['logit_gain']:g}, blank frames score < 0.001)"
        )
        source, digest = "random", None
    else:
        if weights == "coco" and num_classes not in (None, NUM_CLASSES):
            raise ExportError(f"the COCO checkpoint of {NAME} has {NUM_CLASSES} classes, not {num_classes}")
        path = _official_checkpoint() if weights == "coco" else Path(weights)
        state_dict = read_state_dict(path)
        network = _new_network(num_classes or _classes_in(state_dict) or NUM_CLASSES, DEFAULT_SEED)
        check_fit(network, state_dict, path.name, NAME)
        network.load_state_dict(state_dict, strict=True)
        network.eval()
        source = "coco" if weights == "coco" else path.name
        digest = sha256_of(path)
        extra["checkpoint_url"] = COCO_CHECKPOINT_URL if weights == "coco" else ""
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    columns = tuple(range(1, network.num_classes))
    return SSDModel(
        name=NAME,
        network=network,
        input_size=(INPUT_SIZE, INPUT_SIZE),
        anchors=default_boxes(),
        box_weights=(1.0 / SCALE_XY, 1.0 / SCALE_XY, 1.0 / SCALE_WH, 1.0 / SCALE_WH),  # (10, 10, 5, 5)
        score_activation="softmax",
        score_columns=columns,
        class_ids=columns,
        labels=_labels(network.num_classes),
        mean=MEAN,
        std=STD,
        scale_clamp=None,  # their decode has no clamp before exp()
        weights_source=source,
        weights_sha256=digest,
        extra_metadata={k: v for k, v in extra.items() if v},
    )


# ---------------------------------------------------------------------------------------------------------------
# Reference post-processing (their Encoder.decode_batch, at our thresholds)


def decode_boxes(box_regression: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Their scale_back_batch: [B, N, 4] (dx, dy, dw, dh) vs [N, 4] (cx, cy, w, h) -> [B, N, 4] x1, y1, x2, y2."""
    centres = anchors[:, :2] + SCALE_XY * box_regression[..., :2] * anchors[:, 2:]
    sizes = torch.exp(SCALE_WH * box_regression[..., 2:]) * anchors[:, 2:]
    return torch.cat([centres - 0.5 * sizes, centres + 0.5 * sizes], dim=-1)


def _detect_one(boxes: torch.Tensor, probs: torch.Tensor, model: SSDModel, options: PostprocessOptions) -> Detections:
    """One image: boxes [N, 4] clipped xyxy, probs [N, C] softmax."""
    kept_boxes, kept_scores, kept_classes = [], [], []
    for column, class_id in zip(model.score_columns, model.class_ids):
        scores = probs[:, column]
        candidates = torch.nonzero(scores > options.score_threshold).squeeze(1)
        if candidates.numel() == 0:
            continue
        top = scores[candidates].topk(min(options.candidates_per_class, candidates.numel())).indices
        candidates = candidates[top]
        keep = candidates[nms(boxes[candidates], scores[candidates], options.iou_threshold)]
        kept_boxes.append(boxes[keep])
        kept_scores.append(scores[keep])
        kept_classes.append(torch.full((keep.numel(),), class_id, dtype=torch.int64))
    if not kept_scores:
        return Detections(torch.zeros((0, 4)), torch.zeros((0,)), torch.zeros((0,), dtype=torch.int64))
    all_scores = torch.cat(kept_scores)
    best = all_scores.topk(min(options.max_detections, all_scores.numel())).indices  # sorted, descending
    return Detections(torch.cat(kept_boxes)[best], all_scores[best], torch.cat(kept_classes)[best])


@torch.no_grad()
def reference(model: SSDModel, images: torch.Tensor, options: PostprocessOptions) -> list[Detections]:
    """Float PyTorch detections for a uint8 [B, H, W, 3] batch, one `Detections` per image."""
    height, width = model.input_size
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (height, width, 3):
        raise ExportError(f"reference expects uint8 [B, {height}, {width}, 3], got {images.dtype} {list(images.shape)}")
    box_regression, class_logits = model.network(_normalise(images, model.mean, model.std))
    boxes = decode_boxes(box_regression, model.anchors).clamp(min=0.0, max=1.0)  # [B, N, 4]
    probs = torch.softmax(class_logits, dim=-1)  # [B, N, C]
    return [_detect_one(b, p, model, options) for b, p in zip(boxes, probs)]


SOURCES: dict[str, ModelSource] = {
    NAME: ModelSource(
        build=build,
        reference=reference,
        description="NVIDIA SSD300 v1.1, ResNet-50 backbone, COCO (DeepLearningExamples / torch.hub nvidia_ssd)",
    )
}
