"""torchvision's SSD300 VGG16 and SSDlite320 MobileNetV3-Large as model sources.

`build(weights, num_classes)` wraps a torchvision `SSD` into an `SSDModel`: the network is its backbone + head
(normalised float [B, 3, H, W] -> box regression and class logits), the anchors are its `DefaultBoxGenerator`'s
default boxes for the fixed input size, and decoding follows its `BoxCoder` (weights (10, 10, 5, 5), dw/dh clamped
at log(1000 / 16)) and its softmax. `reference` runs torchvision's own `SSD.forward` (transform + head +
`postprocess_detections`) on the same torchvision object, so an exported file is checked against the real thing.

weights: None -> seeded random init, adjusted so that validating an export means something
(`make_random_weights_testable`); "coco" -> torchvision's COCO_V1 weights (downloaded into the torch hub cache,
or taken from it offline); a path -> a state_dict saved by torch (bare, or under "model" / "state_dict").
"""

from __future__ import annotations

import math
import os
import urllib.error
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.models.detection import (
    SSD300_VGG16_Weights,
    SSDLite320_MobileNet_V3_Large_Weights,
    ssd300_vgg16,
    ssdlite320_mobilenet_v3_large,
)
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD

from model_export.checkpoints import check_fit, read_state_dict
from model_export.errors import ExportError
from model_export.models import ModelSource, require_float
from model_export.spec import Detections, Numerics, PostprocessOptions, SSDModel
from model_export import weights as weight_store
from model_export.weights import sha256_of

RANDOM_SEED = 0
STEM_DEAD_ZONE = 0.01  # random weights: first-layer responses below this (in its units) are cut to exactly 0
# torchvision's BoxCoder clamps dw, dh at bbox_xform_clip = log(1000 / 16) before exp().
SCALE_CLAMP = math.log(1000.0 / 16)


@dataclass(frozen=True)
class _Architecture:
    name: str
    factory: Callable[..., SSD]
    coco_weights: WeightsEnum
    input_size: tuple[int, int]  # (H, W)
    cls_weight_key: str  # state_dict key of the first level's classification conv (reveals the class count)
    anchors_first_level: int  # default boxes per location on that level
    # Random weights only (see make_random_weights_testable):
    logit_spread: float  # std of foreground logits over synthetic photos, per level
    background_logit: float  # the constant background logit
    head_bn_gain: float = 1.0  # gain of the head's BatchNorms (SSDlite), so its ReLU6 bounds the logits


class TorchvisionSSDNetwork(nn.Module):
    """Backbone + head of a torchvision `SSD`: normalised [B, 3, H, W] -> ([B, N, 4] regression, [B, N, C] logits).

    `detector` is the whole torchvision model (same parameters), kept so that `reference` runs torchvision's own
    post-processing with exactly these weights.
    """

    def __init__(self, detector: SSD) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.detector.backbone(images)  # OrderedDict of [B, C_l, H_l, W_l]
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        outputs = self.detector.head(list(features.values()))
        return outputs["bbox_regression"], outputs["cls_logits"]  # [B, N, 4], [B, N, C]


# ---------------------------------------------------------------------------------------------------- weights


def _num_classes_in(state: dict[str, torch.Tensor], arch: _Architecture) -> int | None:
    """The class count a state_dict was trained with, read off its first classification conv (None if unknown)."""
    weight = state.get(arch.cls_weight_key)
    if weight is None or weight.ndim != 4 or weight.shape[0] % arch.anchors_first_level:
        return None
    return weight.shape[0] // arch.anchors_first_level


def _coco_state_dict(arch: _Architecture) -> tuple[dict[str, torch.Tensor], Path]:
    """torchvision's COCO_V1 weights: from `SSD_WEIGHTS_MIRROR` when set (its file name), else its weights API."""
    url = arch.coco_weights.url
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    cached = hub / os.path.basename(url)
    entry = f"{arch.name}_coco"  # the manifest's name for it
    weight_store.fetch_from_mirror(entry, hub)  # into torch.hub's cache, where get_state_dict looks first
    try:
        state = arch.coco_weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:120]
        raise ExportError(
            f"could not get the COCO weights of {arch.name} ({type(exc).__name__}: {detail}); "
            f"{weight_store.offline_hint(entry)}, or place the file at {cached}, or pass it as --weights PATH"
        ) from exc
    return state, cached


# ---------------------------------------------------------------------------------------------------- random init


def _classification_convs(detector: SSD) -> list[nn.Conv2d]:
    """The last conv of each level of the classification head: output channel a * C + c = anchor a, class c."""
    convs = []
    for block in detector.head.classification_head.module_list:
        convs.append([m for m in block.modules() if isinstance(m, nn.Conv2d)][-1])
    return convs


def _num_columns(detector: SSD) -> int:
    return detector.head.classification_head.num_columns


@torch.no_grad()
def _class_logits(detector: SSD, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Raw cls_logits per level, [B, A_l, C, H_l, W_l], from the backbone's feature maps (the first few levels
    if given fewer maps)."""
    num_columns = _num_columns(detector)
    outputs = []
    for block, feature in zip(detector.head.classification_head.module_list, features, strict=False):
        logits = block(feature)  # [B, A * C, H_l, W_l]
        outputs.append(logits.view(logits.shape[0], -1, num_columns, *logits.shape[-2:]))
    return outputs


@torch.no_grad()
def make_random_weights_testable(detector: SSD, size: tuple[int, int], arch: _Architecture) -> None:
    """Turn a freshly initialised torchvision SSD into a deterministic network that tests an export well.

    Straight out of init every softmax score is about 1 / C (just above the 0.01 threshold for C = 91; SSDlite's
    N(0, 0.03) init even shrinks its features to ~1e-15), so every anchor of every class is a candidate and no
    decision is near a realistic value. Only for random weights, this rewrites weights (and one padding mode):

    1. Blank frames give exactly zero features. The first convolution's kernels are made zero-sum over their
       window and it pads by replicating the border, so a uniform image of any colour gives 0 before its bias;
       a small dead zone after it (VGG: conv bias -0.01 before ReLU; SSDlite: a BatchNorm shift that puts
       Hardswish's zero below 0.01 sigma) removes float rounding. Every later layer maps 0 to 0 (zero biases;
       BatchNorm re-estimated with zero mean and zero shift), so a blank frame leaves only the head's biases.
    2. Activations keep a useful scale and float32 rounding stays small (the export is compared with the
       reference at 1e-5 on scores, so the network must not amplify rounding):
       - each BatchNorm's variance is re-estimated, in one pass, from the second moment of its input over two
         seeded "dead leaves" images (synthetic photo statistics); SSDlite's head BatchNorms get gain
         `head_bn_gain`, so its ReLU6 keeps logits bounded on high-contrast photos;
       - residual branches (MobileNetV3's inverted residuals) end in a zeroed convolution, so they are identities
         and the float path is as short as the architecture allows;
       - VGG's conv4_3 gets one constant channel (weights 0, bias 0.2 x the features' RMS norm) that the head
         ignores: the L2 normalisation that follows never divides by a near-zero norm.
    3. Scores spread: per level, foreground logit weights are scaled to a standard deviation of `logit_spread`
       over those images (foreground biases 0), and the background logit becomes the constant
       `background_logit` (weights 0). Textured anchors reach scores from 0.01 up to ~1, while a blank frame
       scores every class 1 / (exp(background_logit) + C - 1) < 1e-5: zero detections.

    Measured on the default validation set (7 photos + a black frame, default thresholds): ssd300_vgg16 gives
    200 detections per photo (best 0.27..0.82, lowest kept 0.02..0.07, 6..16 classes), ssdlite320 14..200
    (best 0.07..0.85, lowest kept 0.010..0.023, 8..66 classes); black, grey, white and coloured frames give 0.
    ONNX Runtime vs torchvision on them: scores within 2e-6 (VGG) and 5e-6 (SSDlite), boxes within 1e-5.
    """
    from model_export.validate import dead_leaves_images

    stem = next(m for m in detector.backbone.modules() if isinstance(m, nn.Conv2d))
    stem.weight -= stem.weight.mean(dim=(2, 3), keepdim=True)
    stem.padding_mode = "replicate"
    if stem.bias is not None:
        stem.bias.fill_(-STEM_DEAD_ZONE)
    for block in detector.backbone.modules():
        if getattr(block, "use_res_connect", False):  # torchvision's InvertedResidual
            [m for m in block.block.modules() if isinstance(m, nn.Conv2d)][-1].weight.zero_()
    norms = [m for m in detector.modules() if isinstance(m, nn.BatchNorm2d)]
    head_norms = {id(m) for m in detector.head.modules() if isinstance(m, nn.BatchNorm2d)}

    def estimate(norm: nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        norm.running_mean.zero_()
        norm.running_var.copy_(args[0].pow(2).mean(dim=(0, 2, 3)))
        norm.weight.fill_(arch.head_bn_gain if id(norm) in head_norms else 1.0)
        # Hardswish(x) = 0 for x <= -3: the stem's dead zone in SSDlite.
        norm.bias.fill_(-3.0 - STEM_DEAD_ZONE if norm is norms[0] and stem.bias is None else 0.0)

    def constant_channel(conv: nn.Conv2d, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        conv.weight[0] = 0.0
        conv.bias[0] = 0.2 * float(output[:, 1:].pow(2).sum(dim=1).mean().sqrt())
        output[:, 0] = conv.bias[0]
        return output

    hooks = [norm.register_forward_pre_hook(estimate) for norm in norms]
    normalised_level = isinstance(getattr(detector.backbone, "scale_weight", None), nn.Parameter)  # VGG's L2Norm
    if normalised_level:
        conv4_3 = [m for m in detector.backbone.features.modules() if isinstance(m, nn.Conv2d)][-1]
        hooks.append(conv4_3.register_forward_hook(constant_channel))
    textures = dead_leaves_images(size, 2, seed=RANDOM_SEED)  # [2, H, W, 3]
    batch = torch.stack([detector.transform.normalize(t.permute(2, 0, 1) / 255.0) for t in textures])
    try:  # one pass: each hook rewrites its module just before (BatchNorm) or as (conv4_3) it runs
        features = list(detector.backbone(batch).values())
        detector.head.regression_head(features)
        logits = _class_logits(detector, features)
    finally:
        for hook in hooks:
            hook.remove()
    num_columns = _num_columns(detector)
    convs = _classification_convs(detector)
    if normalised_level:  # the head ignores the constant channel, so a blank frame still gives 0
        convs[0].weight[:, 0] = 0.0
        logits[0] = _class_logits(detector, features[:1])[0]
    for conv, level in zip(convs, logits, strict=True):
        gain = arch.logit_spread / float(level[:, :, 1:].std().clamp_min(1e-12))
        weight = conv.weight.view(-1, num_columns, *conv.weight.shape[1:])  # [A, C, in, kh, kw]
        weight[:, 1:] *= gain
        weight[:, 0] = 0.0
        bias = conv.bias.view(-1, num_columns)  # [A, C]
        bias[:, 1:] = 0.0
        bias[:, 0] = arch.background_logit


# ---------------------------------------------------------------------------------------------------- build


def _labels(weights_enum: WeightsEnum, num_classes: int) -> tuple[str, ...]:
    categories = tuple(weights_enum.meta["categories"])
    if num_classes == len(categories):
        return categories  # "__background__" and "N/A" stay at their ids, so ids map 1:1 to COCO's
    return ("__background__", *(f"class_{i}" for i in range(1, num_classes)))


@torch.no_grad()
def _anchors(detector: SSD, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's default boxes for this input size as normalised (cx, cy, w, h), [N, 4]."""
    height, width = size
    probe = torch.zeros((1, 3, height, width))
    features = list(detector.backbone(probe).values())
    xyxy = detector.anchor_generator(ImageList(probe, [(height, width)]), features)[0]  # [N, 4] pixels
    # The same arithmetic as BoxCoder.decode_single, then scaled to [0, 1].
    widths = xyxy[:, 2] - xyxy[:, 0]
    heights = xyxy[:, 3] - xyxy[:, 1]
    cx = xyxy[:, 0] + 0.5 * widths
    cy = xyxy[:, 1] + 0.5 * heights
    return torch.stack((cx / width, cy / height, widths / width, heights / height), dim=1)


def _construct(arch: _Architecture, num_classes: int) -> SSD:
    """A torchvision SSD with seeded random init (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        # weights_backbone=None as torchvision itself does for COCO weights (SSDlite: the reduced tail they need).
        detector = arch.factory(weights=None, weights_backbone=None, num_classes=num_classes)
    return detector.eval()


def _construct_loaded(arch: _Architecture, num_classes: int, state: dict[str, torch.Tensor], source: str) -> SSD:
    """A torchvision SSD holding `state` (built on the meta device: no time spent on a random init)."""
    with torch.device("meta"):
        detector = arch.factory(weights=None, weights_backbone=None, num_classes=num_classes)
    check_fit(detector, state, source, arch.name)
    expected = detector.state_dict()
    detector.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, assign=True)
    return detector.eval()


def _build(
    arch: _Architecture, weights: str | None, num_classes: int | None, numerics: Numerics | None = None
) -> SSDModel:
    require_float(arch.name, numerics)
    if num_classes is not None and num_classes < 2:
        raise ExportError(f"--num-classes counts the background too: it must be at least 2, not {num_classes}")
    coco_classes = len(arch.coco_weights.meta["categories"])  # 91
    sha256: str | None = None
    extra = {"source": f"torchvision.models.detection.{arch.name}"}
    if weights is None:
        detector = _construct(arch, num_classes or coco_classes)
        make_random_weights_testable(detector, arch.input_size, arch)
        weights_source = "random"
        extra["random_weights"] = f"seed {RANDOM_SEED}, made testable (blank frames give no detections)"
    elif weights == "coco":
        if num_classes not in (None, coco_classes):
            raise ExportError(f"the COCO weights of {arch.name} have {coco_classes} classes, not {num_classes}")
        state, cached = _coco_state_dict(arch)
        detector = _construct_loaded(arch, coco_classes, state, cached.name)
        sha256 = sha256_of(cached)
        weights_source = "coco"
    else:
        path = Path(weights)
        state = read_state_dict(path)
        classes = num_classes or _num_classes_in(state, arch) or coco_classes
        detector = _construct_loaded(arch, classes, state, path.name)
        sha256 = sha256_of(path)
        weights_source = path.name
    for parameter in detector.parameters():
        parameter.requires_grad_(False)

    classes = _num_columns(detector)
    columns = tuple(range(1, classes))  # column 0 is background
    transform = detector.transform
    return SSDModel(
        name=arch.name,
        network=TorchvisionSSDNetwork(detector),
        input_size=arch.input_size,
        anchors=_anchors(detector, arch.input_size),
        box_weights=tuple(float(w) for w in detector.box_coder.weights),  # (10, 10, 5, 5)
        score_activation="softmax",
        score_columns=columns,
        class_ids=columns,
        labels=_labels(arch.coco_weights, classes),
        # torchvision normalises x / 255 with image_mean / image_std; the same on the 0..255 scale:
        mean=tuple(255.0 * m for m in transform.image_mean),
        std=tuple(255.0 * s for s in transform.image_std),
        scale_clamp=SCALE_CLAMP,
        weights_source=weights_source,
        weights_sha256=sha256,
        extra_metadata=extra,
    )


# ---------------------------------------------------------------------------------------------------- reference


@torch.no_grad()
def reference(model: SSDModel, images: torch.Tensor, options: PostprocessOptions) -> list[Detections]:
    """torchvision's own `SSD.forward` in eval mode on uint8 [B, H, W, 3] at the model's input size.

    At exactly the input size GeneralizedRCNNTransform's resize is the identity (bilinear, align_corners=False,
    scale 1 samples the pixel centres) and `transform.postprocess` rescales boxes by 1, so what remains is
    normalisation, backbone, head and `postprocess_detections` with the export's thresholds.
    """
    if not isinstance(model.network, TorchvisionSSDNetwork):
        raise ExportError(f"{model.name} was not built by the torchvision source; no torchvision reference")
    height, width = model.input_size
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (height, width, 3):
        raise ExportError(f"reference expects uint8 [B, {height}, {width}, 3], got {images.dtype} {list(images.shape)}")
    detector = model.network.detector
    settings = {
        "score_thresh": options.score_threshold,
        "nms_thresh": options.iou_threshold,
        "topk_candidates": options.candidates_per_class,
        "detections_per_img": options.max_detections,
    }
    saved = {name: getattr(detector, name) for name in settings}
    was_training = detector.training
    try:
        for name, value in settings.items():
            setattr(detector, name, value)
        detector.eval()
        float_images = [image.permute(2, 0, 1).float() / 255.0 for image in images]  # [3, H, W] in 0..1
        outputs = detector(float_images)
    finally:
        for name, value in saved.items():
            setattr(detector, name, value)
        detector.train(was_training)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return [
        Detections(boxes=out["boxes"] / scale, scores=out["scores"], classes=out["labels"].to(torch.int64))
        for out in outputs
    ]


_ARCHITECTURES = (
    _Architecture(
        name="ssd300_vgg16",
        factory=ssd300_vgg16,
        coco_weights=SSD300_VGG16_Weights.COCO_V1,
        input_size=(300, 300),
        cls_weight_key="head.classification_head.module_list.0.weight",
        anchors_first_level=4,
        logit_spread=3.2,
        background_logit=13.0,
    ),
    _Architecture(
        name="ssdlite320_mobilenet_v3_large",
        factory=ssdlite320_mobilenet_v3_large,
        coco_weights=SSDLite320_MobileNet_V3_Large_Weights.COCO_V1,
        input_size=(320, 320),
        cls_weight_key="head.classification_head.module_list.0.1.weight",
        anchors_first_level=6,
        logit_spread=2.6,
        background_logit=12.5,
        head_bn_gain=8.0,
    ),
)

SOURCES: dict[str, ModelSource] = {
    arch.name: ModelSource(
        build=partial(_build, arch),
        reference=reference,
        description=f"torchvision {arch.name}, {arch.input_size[0]}x{arch.input_size[1]} (random, coco or a file)",
    )
    for arch in _ARCHITECTURES
}
