"""bytes -> the model's input: decode (PIL), EXIF orientation, RGB, bilinear resize without antialiasing, uint8.

Runs in the decode thread pool, never on the event loop. Everything that can be wrong with an image is found
here, before the image joins a batch: empty body, not an image, a format we do not take, truncated or corrupt
data (400), more pixels than allowed (413, checked from the header before any pixel is decoded).

The resize is the filter the exported models are validated with: torch's
`F.interpolate(x.float(), size, mode="bilinear", align_corners=False, antialias=False)` rounded to uint8, bit for
bit, computed by OpenCV's SIMD kernel with the few near-tie values recomputed (see `resize_bilinear`), so the server
needs no torch.

Opt-in (`jpeg_draft`, setting SSD_JPEG_DRAFT): a large JPEG is decoded at a reduced DCT scale first, which is
faster but antialiased, so it is not the validated filter; its accuracy effect is measured in BENCHMARKS.md.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import EmptyBody, ImageTooLarge, InvalidImage, UnsupportedMediaType

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
# Content types taken as they are; the bytes decide the format either way.
IMAGE_CONTENT_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
        "image/gif",
    }
)
# Content types that say nothing about the data: the format is identified from the bytes.
SNIFFED_CONTENT_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
_SIXTEEN_BIT_GRAY = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the batcher."""

    pixels: np.ndarray  # uint8 [H, W, 3] RGB at the model's input size
    width: int  # of the original image, after EXIF orientation
    height: int
    decode_s: float  # decode + orientation + conversion + resize


def media_type(content_type: str | None) -> str:
    """'image/JPEG; q=1' -> 'image/jpeg'; None -> ''."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_content_type(content_type: str | None) -> None:
    """Accept the image types we decode and the ones that carry no information; refuse the rest (415)."""
    media = media_type(content_type)
    if media in IMAGE_CONTENT_TYPES or media in SNIFFED_CONTENT_TYPES:
        return
    raise UnsupportedMediaType(
        f"content type {media!r} is not supported; send JPEG, PNG, WebP, BMP or GIF "
        "(image/* or application/octet-stream)"
    )


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """bytes -> a loaded PIL image with its EXIF orientation applied (first frame of an animation)."""
    image, _ = _decode(data, max_pixels=max_pixels, draft_for=None)
    return image


def _decode(
    data: bytes, *, max_pixels: int, draft_for: tuple[int, int] | None
) -> tuple[Image.Image, tuple[int, int]]:
    """`decode`, plus the original (width, height) after EXIF orientation.

    draft_for: the model's input (height, width) to let a large JPEG decode at a reduced DCT scale (1/2, 1/4,
    1/8) that keeps both sides >= 2x it; None decodes every pixel. The returned size is the original's either way.
    """
    if not data:
        raise EmptyBody("the request carries no image data")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage("the data is not a JPEG, PNG, WebP, BMP or GIF image") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on a header is a bad image
        raise InvalidImage(f"cannot read the image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImage(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image has {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        drafted = draft_for is not None and image.format == "JPEG" and _draft(image, draft_for)
        image.load()
        stored = image.size  # the drafted size, before orientation
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise InvalidImage(f"cannot decode the image: {exc}") from None
    if not drafted:
        return image, image.size
    if image.size != stored:  # a quarter turn (orientations 5-8) swapped the sides
        width, height = height, width
    return image, (width, height)


_QUARTER_TURNS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


def _draft(image: Image.Image, input_size: tuple[int, int]) -> bool:
    """Ask libjpeg for the smallest DCT scale whose output keeps both sides >= 2x the model input (displayed
    orientation); a JPEG smaller than that is left alone. Antialiased: moves boxes a little (see BENCHMARKS.md)."""
    in_height, in_width = input_size
    want = (2 * in_width, 2 * in_height)  # (width, height) as displayed
    if image.getexif().get(0x0112) in _QUARTER_TURNS:  # stored sideways: the stored width is the displayed height
        want = (want[1], want[0])
    if min(image.size[0] // want[0], image.size[1] // want[1]) < 2:
        return False
    return image.draft("RGB", want) is not None


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3] RGB. 16-bit grey keeps its top 8 bits; alpha is dropped."""
    if image.mode in _SIXTEEN_BIT_GRAY:
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)  # [H, W]
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def preprocess(
    data: bytes,
    input_size: tuple[int, int],
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    jpeg_draft: bool = False,
) -> PreparedImage:
    """The whole path from request bytes to the batcher's input.

    jpeg_draft: opt-in speed for large JPEGs: decode at a reduced DCT scale (>= 2x the input on both sides) before
    the resize. That is antialiased, so pixels and detections differ slightly from the exact path; width and
    height stay the original image's, so boxes are still in original pixels.
    """
    start = time.perf_counter()
    image, (width, height) = _decode(data, max_pixels=max_pixels, draft_for=input_size if jpeg_draft else None)
    pixels = resize_bilinear(to_rgb(image), input_size)
    return PreparedImage(pixels=pixels, width=width, height=height, decode_s=time.perf_counter() - start)


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


# The decode pool already runs one image per thread; OpenCV's own worker threads would compete with it and the engine.
cv2.setNumThreads(1)


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
