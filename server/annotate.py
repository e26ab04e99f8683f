"""POST /detect/annotated: the image with its detections drawn, at the original size (JPEG, or PNG on request).

The route runs the /detect path unchanged (same inputs, options and JSON errors) and draws its response's
detections here. The image is decoded a second time, at full size, only once detection has succeeded: the
/detect path keeps just the model-sized input (a full-size copy per queued image would cost memory on every
request, and with SSD_JPEG_DRAFT it is not even full size), and a refused request costs no decode at all.

Everything a box adds lies inside its box: the outline is drawn inwards and the `label score` caption is
clipped to the box, so the pixels outside every box are the original's.
"""

from __future__ import annotations

import asyncio
import colorsys
import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from model_export.contract.image import to_rgb
from server.preprocess import decode

JPEG, PNG = "image/jpeg", "image/png"
JPEG_QUALITY = 90
_GOLDEN_RATIO = 0.618033988749895


@dataclass(frozen=True)
class Style:
    """Sizes that scale with the image, so captions read the same at 300 px and at 4000 px."""

    line_width: int
    font_size: int
    padding: int

    @classmethod
    def for_size(cls, width: int, height: int) -> Style:
        short = min(width, height)
        return cls(
            line_width=max(2, round(short / 250)),
            font_size=max(11, round(short / 32)),
            padding=max(1, round(short / 400)),
        )


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A bright colour per class, neighbours far apart on the hue circle (golden-ratio steps)."""
    hue = (class_id * _GOLDEN_RATIO) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return round(red * 255), round(green * 255), round(blue * 255)


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font (Pillow >= 10.1), scalable


def pixel_box(box: dict[str, float], width: int, height: int) -> tuple[int, int, int, int] | None:
    """A detection's box as inclusive pixel bounds (left, top, right, bottom) inside the image; None if empty."""
    left, top = max(0, int(np.floor(box["x1"]))), max(0, int(np.floor(box["y1"])))
    right, bottom = min(width, int(np.ceil(box["x2"]))) - 1, min(height, int(np.ceil(box["y2"]))) - 1
    if right < left or bottom < top:
        return None
    return left, top, right, bottom


def draw_detections(image: Image.Image, detections: Sequence[dict[str, Any]]) -> Image.Image:
    """Draw `/detect`'s detections (highest score first) on an RGB image, in place; lower scores underneath."""
    style = Style.for_size(*image.size)
    font = _font(style.font_size)
    canvas = ImageDraw.Draw(image)
    for detection in reversed(detections):
        bounds = pixel_box(detection["box"], *image.size)
        if bounds is None:
            continue
        left, top, right, bottom = bounds
        colour = class_colour(int(detection["class_id"]))
        canvas.rectangle(bounds, outline=colour, width=style.line_width)  # PIL draws the width inwards
        caption = _caption(f"{detection['label']} {detection['score']:.2f}", colour, font, style)
        visible = caption.crop((0, 0, min(caption.width, right - left + 1), min(caption.height, bottom - top + 1)))
        image.paste(visible, (left, top))
    return image


def _caption(
    text: str, colour: tuple[int, int, int], font: ImageFont.FreeTypeFont | ImageFont.ImageFont, style: Style
) -> Image.Image:
    x0, y0, x1, y1 = font.getbbox(text)
    pad = style.padding + style.line_width
    label = Image.new("RGB", (int(x1 - x0) + 2 * pad, int(y1 - y0) + 2 * pad), colour)
    ImageDraw.Draw(label).text((pad - x0, pad - y0), text, fill=_text_colour(colour), font=font)
    return label


def preferred_type(accept: str | None) -> str:
    """JPEG unless the Accept header ranks image/png above image/jpeg (q-values honoured)."""
    quality = {JPEG: -1.0, PNG: -1.0}
    for item in (accept or "").split(","):
        media, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media in quality:
            quality[media] = max(quality[media], q)
    return PNG if quality[PNG] > 0 and quality[PNG] > quality[JPEG] else JPEG


def render(data: bytes, detections: Sequence[dict[str, Any]], media: str, *, max_pixels: int) -> bytes:
    """Decode (EXIF-oriented, as /detect saw it), draw, encode as `media`. Blocking: run it in a thread."""
    image = Image.fromarray(to_rgb(decode(data, max_pixels=max_pixels)))
    draw_detections(image, detections)
    out = io.BytesIO()
    if media == PNG:
        image.save(out, format="PNG", compress_level=3)
    else:
        image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


async def annotated(data: bytes, result: dict[str, Any], accept: str | None, *, max_pixels: int) -> tuple[bytes, str]:
    """The encoded annotated image for `/detect`'s `result` on `data`, and its media type."""
    media = preferred_type(accept)
    body = await asyncio.to_thread(render, data, result["detections"], media, max_pixels=max_pixels)
    return body, media
