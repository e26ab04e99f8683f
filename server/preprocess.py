"""bytes -> the model's input: decode (PIL), EXIF orientation, RGB, bilinear resize without antialiasing, uint8.

Runs in the decode thread pool, never on the event loop. Everything that can be wrong with an image is found
here, before the image joins a batch: empty body, not an image, a format we do not take, truncated or corrupt
data (400), more pixels than allowed (413, checked from the header before any pixel is decoded).

The resize is the filter the exported models are validated with: torch's
`F.interpolate(x.float(), size, mode="bilinear", align_corners=False, antialias=False)` rounded to uint8,
reproduced here in numpy, bit for bit (see `resize_bilinear`), so the server needs no torch.

Opt-in (`jpeg_draft`, setting SSD_JPEG_DRAFT): a large JPEG is decoded at a reduced DCT scale first, which is
faster but antialiased, so it is not the validated filter; its accuracy effect is measured in BENCHMARKS.md.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

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
    if image.format == "JPEG":
        check_jpeg_data_length(data)
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


_BASELINE_SOF = frozenset({0xC0, 0xC1})  # sequential Huffman: every block costs >= 2 bits (DC code + EOB)
_PROGRESSIVE_SOF = 0xC2  # progressive Huffman: the first DC scan costs >= 1 bit per block of a component
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: markers without a length


def check_jpeg_data_length(data: bytes) -> None:
    """InvalidImage for a JPEG whose compressed data is too short to hold the blocks its header declares.

    libjpeg decodes a file that ends (with an EOI marker) before its last block as if the rest were grey, and
    PIL reports no error, so a 6000x6000 header with a few KB of data would be decoded and answered 200; a file
    cut without an EOI is already refused (truncated). Huffman codes are at least one bit, so a baseline scan
    needs >= 2 bits per 8x8 block and a progressive one >= 1 bit per block of its first component: below that
    the data cannot be complete. A sound bound, never a guess (a complete file always passes); a file cut
    further in still decodes with a grey tail, as in any viewer. Other JPEG kinds (arithmetic, lossless) pass.
    """
    frame: tuple[int, int, int, list[tuple[int, int]]] | None = None  # (marker, width, height, sampling)
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return  # not a marker where one must be: PIL's decoder judges
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length]
        if marker in (*_BASELINE_SOF, _PROGRESSIVE_SOF) and len(segment) >= 6:
            height, width, count = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"), segment[5]
            factors = segment[7 : 7 + 3 * count : 3]  # one byte per component: h << 4 | v
            sampling = [(factor >> 4, factor & 15) for factor in factors]
            frame = (marker, width, height, sampling)
        if marker == 0xDA:  # start of scan: entropy-coded data follows the header
            if frame is None or not frame[3]:
                return
            kind, width, height, sampling = frame
            h_max, v_max = max(h for h, _ in sampling) or 1, max(v for _, v in sampling) or 1
            blocks = [  # per component: ceil(ceil(W * h / Hmax) / 8) * ceil(ceil(H * v / Vmax) / 8)
                _ceil_div(_ceil_div(width * h, h_max), 8) * _ceil_div(_ceil_div(height * v, v_max), 8)
                for h, v in sampling
            ]
            need_bits = 2 * sum(blocks) if kind in _BASELINE_SOF else blocks[0]
            have_bits = 8 * (len(data) - (pos + 2 + length))
            if have_bits < need_bits:
                raise InvalidImage(
                    f"the JPEG data ends early: {width}x{height} needs at least {need_bits // 8} bytes of "
                    f"compressed data, the file has {max(have_bits // 8, 0)}"
                )
            return
        pos += 2 + length


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


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
