"""The model's input: a decoded, EXIF-oriented PIL image -> uint8 [H, W, 3] RGB at the input size, resized
bilinearly with half-pixel centres and no antialiasing (DESIGN.md). The exporter's validation and the server both
call `model_input`, so the exported model is validated on exactly the pixels the server will feed it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

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
    return _Axis(index0, index1, weight0, weight1)


@lru_cache(maxsize=256)
def _columns(in_width: int, out_width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The width axis spread over interleaved RGB: byte offsets and weights for a row of W * 3 values."""
    axis = _axis(in_width, out_width)
    channel = np.arange(3)
    offsets0 = (axis.index0[:, None] * 3 + channel).reshape(-1)  # [W * 3]
    offsets1 = (axis.index1[:, None] * 3 + channel).reshape(-1)
    weights0 = np.repeat(axis.weight0, 3)[None, :]  # [1, W * 3]
    weights1 = np.repeat(axis.weight1, 3)[None, :]
    return offsets0, offsets1, weights0, weights1


class _Scratch(threading.local):
    """Per-thread float32 buffers, reused: allocating ~1 MB arrays per image costs page faults."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}

    def get(self, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
        buffers = self.buffers.get(shape)
        if buffers is None:
            buffers = tuple(np.empty(shape, dtype=np.float32) for _ in range(3))
            self.buffers[shape] = buffers
        return buffers


_scratch = _Scratch()
# A value this close to k + 0.5 might round either way depending on the last bits, so it is recomputed
# with torch's exact operation order; float32 reorderings differ by ~1e-5 at 255.
_TIE_BAND = np.float32(1e-3)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [H, W, 3]: bilinear, half-pixel centres, no antialiasing, round half to even.

    Equal, pixel for pixel, to `F.interpolate(t.float(), (H, W), mode="bilinear", align_corners=False)
    .round().to(torch.uint8)` with torch's multi-threaded CPU kernel, which computes per output value
    t0 = fma(a, w0, b * w1), t1 = fma(c, w0, d * w1) (a, b / c, d: the left and right source pixels of the top /
    bottom row) and out = fma(t0, h0, t1 * h1). The bulk is computed in plain float32; the few values near
    a rounding tie are recomputed in exactly that order.
    """
    in_h, in_w, channels = image.shape
    out_h, out_w = size
    if channels != 3:
        raise ValueError(f"expected an RGB image [h, w, 3], got {image.shape}")
    if (in_h, in_w) == (out_h, out_w):
        return np.ascontiguousarray(image)
    rows = _axis(in_h, out_h)
    offsets0, offsets1, weights0, weights1 = _columns(in_w, out_w)
    flat = np.ascontiguousarray(image).reshape(in_h, in_w * 3)
    top, bottom = flat[rows.index0], flat[rows.index1]  # uint8 [H, w * 3]
    a, b = np.take(top, offsets0, axis=1), np.take(top, offsets1, axis=1)  # uint8 [H, W * 3]
    c, d = np.take(bottom, offsets0, axis=1), np.take(bottom, offsets1, axis=1)

    upper, lower, work = _scratch.get((out_h, out_w * 3))
    np.multiply(a, weights0, out=upper)
    np.multiply(b, weights1, out=work)
    upper += work
    upper *= rows.weight0[:, None]
    np.multiply(c, weights0, out=lower)
    np.multiply(d, weights1, out=work)
    lower += work
    lower *= rows.weight1[:, None]
    upper += lower  # float32 [H, W * 3], within a few ulps of torch's value

    np.floor(upper, out=work)
    np.subtract(upper, work, out=work)
    work -= np.float32(0.5)
    np.abs(work, out=work)
    near = np.flatnonzero(work < _TIE_BAND)
    if near.size:
        y, x = np.divmod(near, out_w * 3)
        upper.reshape(-1)[near] = _exact(
            a.reshape(-1)[near],
            b.reshape(-1)[near],
            c.reshape(-1)[near],
            d.reshape(-1)[near],
            weights0[0, x],
            weights1[0, x],
            rows.weight0[y],
            rows.weight1[y],
        )
    out = np.rint(upper, out=upper).astype(np.uint8)
    return out.reshape(out_h, out_w, 3)


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
