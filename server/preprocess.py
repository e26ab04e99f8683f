"""bytes -> the model's input: decode (PIL), EXIF orientation, RGB, bilinear resize without antialiasing, uint8.

Runs in the decode thread pool, never on the event loop. Everything that can be wrong with an image is found
here, before the image joins a batch: empty body, not an image, a format we do not take, truncated or corrupt
data (400), more pixels than allowed (413, checked from the header before any pixel is decoded).

The resize is the filter the exported models are validated with (validation feeds the server's own preprocessing):
bilinear with half-pixel centres and no antialiasing, as torch's `F.interpolate(..., align_corners=False)`, computed
by OpenCV's SIMD kernel (`resize_bilinear`), so the server needs no torch.

Opt-in (`jpeg_draft`, setting SSD_JPEG_DRAFT): a large JPEG is decoded at a reduced DCT scale first, which is
faster but antialiased, so it is not the validated filter; its accuracy effect is measured in BENCHMARKS.md.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

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


# The decode pool already runs one image per thread; OpenCV's own worker threads would compete with it and the engine.
cv2.setNumThreads(1)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [H, W, 3]: bilinear, half-pixel centres, no antialiasing (OpenCV's INTER_LINEAR).

    The filter of torch's `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`, computed by
    OpenCV's SIMD kernel in fixed point (11-bit weights): within one grey level of torch's float result.
    """
    in_h, in_w, channels = image.shape
    out_h, out_w = size
    if channels != 3:
        raise ValueError(f"expected an RGB image [h, w, 3], got {image.shape}")
    if (in_h, in_w) == (out_h, out_w):
        return np.ascontiguousarray(image)
    return cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
