"""The model's input: a decoded, EXIF-oriented PIL image -> uint8 [H, W, 3] RGB at the input size, resized
bilinearly with half-pixel centres and no antialiasing (DESIGN.md). The exporter's validation and the server both
call `model_input`, so the exported model is validated on exactly the pixels the server will feed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from PIL import Image

_SIXTEEN_BIT_GRAY = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3] RGB. 16-bit grey keeps its top 8 bits; alpha is dropped."""
    if image.mode in _SIXTEEN_BIT_GRAY:
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)  # [H, W]
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def model_input(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A decoded, EXIF-oriented image -> uint8 [H, W, 3] RGB at the model's input size `size` (H, W)."""
    return resize_bilinear(to_rgb(image), size)


# ------------------------------------------------------------------------------------------------------- resize


@dataclass(frozen=True)
class _Axis:
    """Source indices and weights along one axis, as torch's CPU kernel computes them."""

    scale: np.float32  # in / out
    index0: np.ndarray  # intp [out]
    index1: np.ndarray  # intp [out]
    weight0: np.ndarray  # float32 [out]
    weight1: np.ndarray  # float32 [out]


@lru_cache(maxsize=256)
def _axis(in_size: int, out_size: int) -> _Axis:
    # torch: scale = in / out (float32); src = scale * (dst + 0.5) - 0.5, which its compiled kernel evaluates
    # as one fused multiply-add (a single rounding; float64 holds the float32 product exactly); clamped at 0.
    scale = np.float32(np.float32(in_size) / np.float32(out_size))
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    index0 = np.minimum(src.astype(np.intp), in_size - 1)
    index1 = np.minimum(index0 + 1, in_size - 1)
    weight1 = src - index0.astype(np.float32)
    weight0 = np.float32(1.0) - weight1
    for array in (index0, index1, weight0, weight1):
        array.flags.writeable = False
    return _Axis(scale, index0, index1, weight0, weight1)


def _tie_band(in_h: int, in_w: int) -> np.float32:
    """How close to k + 0.5 a value of the bulk must be to be recomputed in torch's exact order. OpenCV's float kernel
    keeps its weights less precisely than torch's float32 (measured: up to 0.008 at 255 from 640 px, 0.025 from 4000
    px); this bound is 2.5-5x those, and 1e-3 covers plain float32 reorderings (~1e-5 at 255)."""
    return np.float32(max(1e-3, 255.0 * max(in_h, in_w) * 2.0**-23))


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [H, W, 3]: bilinear, half-pixel centres, no antialiasing, round half to even.

    Equal, pixel for pixel, to `F.interpolate(t.float(), (H, W), mode="bilinear", align_corners=False)
    .round().to(torch.uint8)` with torch's CPU kernel. The bulk is OpenCV's float32 INTER_LINEAR (SIMD) with torch's
    float32 scale factors, so that both sample at the same source positions; it differs from torch only in the order
    of float32 operations, i.e. in the last bits. The few values near a rounding tie are recomputed in torch's exact
    order: t0 = fma(a, w0, b * w1), t1 = fma(c, w0, d * w1) (a, b / c, d: the left and right source pixels of the
    top / bottom row) and out = fma(t0, h0, t1 * h1).
    """
    in_h, in_w, channels = image.shape
    out_h, out_w = size
    if channels != 3:
        raise ValueError(f"expected an RGB image [h, w, 3], got {image.shape}")
    if (in_h, in_w) == (out_h, out_w):
        return np.ascontiguousarray(image)
    rows, cols = _axis(in_h, out_h), _axis(in_w, out_w)
    image = np.ascontiguousarray(image)
    source = image.astype(np.float32)
    bulk = cv2.resize(source, None, fx=1.0 / float(cols.scale), fy=1.0 / float(rows.scale), interpolation=cv2.INTER_LINEAR)
    if bulk.shape[:2] != (out_h, out_w):  # the scale's rounding moved OpenCV's output size: name the size instead
        bulk = cv2.resize(source, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    bulk = bulk.reshape(-1)
    distance = np.floor(bulk)  # then |frac - 0.5|, in place
    np.subtract(bulk, distance, out=distance)
    distance -= np.float32(0.5)
    np.abs(distance, out=distance)
    near = np.flatnonzero(distance < _tie_band(in_h, in_w))
    if near.size:
        pixel, channel = np.divmod(near, 3)
        y, x = np.divmod(pixel, out_w)
        flat = image.reshape(-1)
        top0, top1 = rows.index0[y] * (in_w * 3) + channel, rows.index1[y] * (in_w * 3) + channel
        left0, left1 = cols.index0[x] * 3, cols.index1[x] * 3
        bulk[near] = _exact(
            flat.take(top0 + left0),
            flat.take(top0 + left1),
            flat.take(top1 + left0),
            flat.take(top1 + left1),
            cols.weight0[x],
            cols.weight1[x],
            rows.weight0[y],
            rows.weight1[y],
        )
    return np.rint(bulk).astype(np.uint8).reshape(out_h, out_w, 3)


def _exact(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    d: np.ndarray,
    w0: np.ndarray,
    w1: np.ndarray,
    h0: np.ndarray,
    h1: np.ndarray,
) -> np.ndarray:
    """torch's operation order with its fused multiply-adds: fma(x, y, z) = float32(float64(x) * y + z)."""

    def fma(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return (x.astype(np.float64) * y + z).astype(np.float32)

    t0 = fma(a, w0, (b * w1).astype(np.float32))
    t1 = fma(c, w0, (d * w1).astype(np.float32))
    return fma(t0, h0, (t1 * h1).astype(np.float32))
