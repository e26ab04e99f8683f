"""The model's input: a decoded, EXIF-oriented PIL image -> uint8 [H, W, 3] RGB at the input size, resized
bilinearly with half-pixel centres and no antialiasing (DESIGN.md). The exporter's validation and the server both
call `model_input`, so the exported model is validated on exactly the pixels the server will feed it.
"""

from __future__ import annotations

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


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [H, W, 3]: OpenCV's INTER_LINEAR, i.e. bilinear with half-pixel centres and no
    antialiasing, in fixed point (11-bit weights).

    Within one uint8 step of the exact float result (torch's `F.interpolate(mode="bilinear", align_corners=False)`
    rounded half to even; tests/server/test_preprocess.py measures it: ~11% of the values of a photo differ, by
    one) and ~10x faster than any exact float kernel (DESIGN.md, Preprocessing). Exactness is held where it
    matters: the exported model against its references and LiteRT on these same pixels.
    """
    in_h, in_w, channels = image.shape
    out_h, out_w = size
    if channels != 3:
        raise ValueError(f"expected an RGB image [h, w, 3], got {image.shape}")
    if (in_h, in_w) == (out_h, out_w):
        return np.ascontiguousarray(image)
    return cv2.resize(np.ascontiguousarray(image), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
