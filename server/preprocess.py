"""bytes -> the model's input: decode, EXIF orientation, RGB, bilinear resize without antialiasing, uint8.

PIL reads every header and decodes every format; a JPEG's pixels come from simplejpeg where it can (the same
pixels, less CPU: `decode_jpeg_rgb`), and from PIL otherwise.

Runs in the decode thread pool, never on the event loop. Everything that can be wrong with an image is found
here, before the image joins a batch: empty body, not an image, a format we do not take, truncated or corrupt
data (400), more pixels than allowed (413, checked from the header before any pixel is decoded).

Conversion to RGB and the resize are the model contract's (`model_export.contract.image`: `model_input`, or its
`resize_bilinear` on simplejpeg's RGB): the very functions validation feeds the exported model with, so the server
needs no torch and cannot drift from it.

Opt-in (`jpeg_draft`, setting SSD_JPEG_DRAFT): a large JPEG is decoded at a reduced DCT scale first, which is
faster but antialiased, so it is not the validated filter; its accuracy effect is measured in BENCHMARKS.md.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from model_export.contract.image import model_input, resize_bilinear
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
    return _load(_open(data, max_pixels=max_pixels), draft_for=draft_for)


def _open(data: bytes, *, max_pixels: int) -> Image.Image:
    """The image's header, checked (format, size, and a JPEG's data length); no pixel decoded yet."""
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
    return image


def _load(image: Image.Image, *, draft_for: tuple[int, int] | None) -> tuple[Image.Image, tuple[int, int]]:
    """An opened image's pixels with its EXIF orientation applied, and its original (width, height) as shown."""
    width, height = image.size  # as stored, before a draft
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
    image = _open(data, max_pixels=max_pixels)
    rgb = None if jpeg_draft else decode_jpeg_rgb(data, image)
    if rgb is not None:
        height, width = rgb.shape[:2]
        pixels = resize_bilinear(rgb, input_size)
    else:
        loaded, (width, height) = _load(image, draft_for=input_size if jpeg_draft else None)
        pixels = model_input(loaded, input_size)
    return PreparedImage(pixels=pixels, width=width, height=height, decode_s=time.perf_counter() - start)


_EXIF_ORIENTATION = 0x0112
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {  # PIL's ImageOps.exif_transpose, on [H, W, C] arrays
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # ROTATE_270: a quarter turn clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
    8: lambda a: a.transpose(1, 0, 2)[::-1],  # ROTATE_90: a quarter turn anticlockwise
}


def decode_jpeg_rgb(data: bytes, image: Image.Image) -> np.ndarray | None:
    """A colour or grey JPEG opened by PIL (`image`, header checked), decoded by simplejpeg: uint8 [H, W, 3] RGB
    with its EXIF orientation applied, or None where PIL decodes it instead.

    The same pixels as PIL's decode (both libjpeg-turbo at its exact defaults: integer IDCT, smooth chroma
    upsampling; tests/server/test_preprocess.py holds it on every shared photo, each orientation and subsampling)
    without PIL's copy of the result into numpy: 0.3 ms less per 640x480 photo in the server (BENCHMARKS.md,
    section 5). simplejpeg is strict: any libjpeg warning (corrupt or cut data) raises, and PIL then decides as
    before, so bad input gets exactly the answers it got; OpenCV's decoder would print those warnings on stderr.
    None also for CMYK and other modes.
    """
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    try:
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:  # noqa: BLE001 - corrupt, cut, or a kind libjpeg-turbo refuses: PIL's decode decides
        return None
    if rgb.shape[:2] != (image.height, image.width):
        return None
    orient = _ORIENT.get(image.getexif().get(_EXIF_ORIENTATION, 1))
    return rgb if orient is None else orient(rgb)
