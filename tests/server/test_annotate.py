"""POST /detect/annotated against the real server and model: JPEG and PNG out, a large image, bad input; and
the drawing itself (server.annotate) on synthetic images: boxes inside, captions scaled to the image."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from server.annotate import (
    JPEG,
    PNG,
    Style,
    class_colour,
    draw_detections,
    pixel_box,
    preferred_type,
)
from server.testing import REPO_ROOT

CATS = REPO_ROOT.parent / "shared" / "data" / "images" / "cats_and_dogs.jpg"
ROTATED = REPO_ROOT.parent / "shared" / "data" / "images" / "cats_and_dogs_rotation180.jpg"
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def client(server_url: str) -> httpx.Client:
    with httpx.Client(base_url=server_url, timeout=120.0) as c:
        yield c  # type: ignore[misc]


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def box_masks(detections: list[dict[str, Any]], width: int, height: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The union of the boxes' pixels, and each box's outline ring (its line width), as [h, w] masks."""
    line = Style.for_size(width, height).line_width
    union = np.zeros((height, width), bool)
    rings = []
    for detection in detections:
        bounds = pixel_box(detection["box"], width, height)
        assert bounds is not None
        left, top, right, bottom = bounds
        union[top : bottom + 1, left : right + 1] = True
        ring = np.zeros_like(union)
        ring[top : bottom + 1, left : right + 1] = True
        ring[top + line : bottom + 1 - line, left + line : right + 1 - line] = False
        rings.append(ring)
    return union, rings


def annotated_and_detections(
    client: httpx.Client, data: bytes, accept: str | None, **params: object
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    files = {"image": ("photo", data, "application/octet-stream")}
    headers = {"accept": accept} if accept else {}
    response = client.post("/detect/annotated", files=files, params=params, headers=headers)
    assert response.status_code == 200, response.text
    detections = client.post("/detect", files=files, params=params).json()["detections"]
    assert response.headers["x-detections"] == str(len(detections))
    assert detections, "the photo should give detections at this threshold"
    return response, detections


def check_exact(original: np.ndarray, out: np.ndarray, detections: list[dict[str, Any]]) -> None:
    """Lossless output: every pixel outside the boxes is the original's; each box's outline is drawn."""
    height, width = original.shape[:2]
    assert out.shape == original.shape
    union, rings = box_masks(detections, width, height)
    changed = np.any(out != original, axis=2)
    assert not changed[~union].any(), f"{int(changed[~union].sum())} pixels changed outside every box"
    for ring, detection in zip(rings, detections):
        assert changed[ring].mean() > 0.5, detection  # later boxes and captions may cover part of an outline
    # The best detection is drawn last: its left edge, below its caption, is its class colour exactly.
    top = detections[0]
    left, y_top, _, bottom = pixel_box(top["box"], width, height)  # type: ignore[misc]
    y = (y_top + bottom) // 2 + (bottom - y_top) // 4
    assert tuple(out[y, left]) == class_colour(top["class_id"])


def test_png_output_changes_pixels_inside_the_boxes_only(client: httpx.Client) -> None:
    data = CATS.read_bytes()
    response, detections = annotated_and_detections(client, data, "image/png", score_threshold=THRESHOLD)
    assert response.headers["content-type"] == PNG
    assert Image.open(io.BytesIO(response.content)).format == "PNG"
    check_exact(decoded(data), decoded(response.content), detections)


def test_png_input_and_output(client: httpx.Client) -> None:
    png = encode(Image.open(CATS).convert("RGB"), "PNG")
    response, detections = annotated_and_detections(client, png, "image/png;q=0.9, image/jpeg;q=0.5")
    assert response.headers["content-type"] == PNG
    check_exact(decoded(png), decoded(response.content), [d for d in detections])


def test_jpeg_by_default_within_reencoding_noise(client: httpx.Client) -> None:
    data = CATS.read_bytes()
    response, detections = annotated_and_detections(client, data, None, score_threshold=THRESHOLD)
    assert response.headers["content-type"] == JPEG
    assert response.headers["vary"] == "Accept"
    out, original = decoded(response.content).astype(int), decoded(data).astype(int)
    assert out.shape == original.shape == (600, 1200, 3)
    height, width = original.shape[:2]
    union, rings = box_masks(detections, width, height)
    # JPEG works on 8x8 blocks (16x16 with chroma subsampling): ringing reaches a block beyond an edge.
    near = np.zeros_like(union)
    for dy in range(-16, 17, 4):
        for dx in range(-16, 17, 4):
            near |= np.roll(np.roll(union, dy, axis=0), dx, axis=1)
    difference = np.abs(out - original).max(axis=2)
    assert difference[~near].mean() < 2.0 and np.percentile(difference[~near], 99.9) < 16
    for ring in rings:
        assert difference[ring].mean() > 30


def test_large_image_keeps_its_size_and_scales_the_drawing(client: httpx.Client) -> None:
    large = Image.open(CATS).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    data = encode(large, "JPEG", quality=85)
    response, detections = annotated_and_detections(client, data, "image/png", score_threshold=THRESHOLD)
    out = decoded(response.content)
    assert out.shape == (3000, 4000, 3)
    check_exact(decoded(data), out, detections)
    assert Style.for_size(4000, 3000).line_width >= 10  # readable at this size, not 2 px lines


def test_exif_orientation_as_detect_sees_it(client: httpx.Client) -> None:
    data = ROTATED.read_bytes()
    response = client.post("/detect/annotated", content=data, headers={"content-type": "image/jpeg"})
    body = client.post("/detect", content=data, headers={"content-type": "image/jpeg"}).json()
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (body["width"], body["height"])


def test_no_detections_returns_the_image_as_it_was(client: httpx.Client) -> None:
    png = encode(Image.new("RGB", (320, 200), (90, 140, 200)), "PNG")
    response = client.post(
        "/detect/annotated?score_threshold=1", content=png, headers={"content-type": "image/png", "accept": PNG}
    )
    assert response.status_code == 200 and response.headers["x-detections"] == "0"
    assert np.array_equal(decoded(response.content), decoded(png))


@pytest.mark.parametrize(
    ("content", "content_type", "query"),
    [
        (b"", "image/jpeg", ""),
        (b"not an image at all", "image/jpeg", ""),
        (CATS.read_bytes()[:2000], "image/jpeg", ""),
        (b"{}", "application/json", ""),
        (CATS.read_bytes(), "image/jpeg", "?score_threshold=2"),
        (CATS.read_bytes(), "image/jpeg", "?max_detections=0"),
        (CATS.read_bytes(), "image/jpeg", "?max_detections=201"),
    ],
    ids=["empty", "not-an-image", "truncated", "json", "threshold", "zero-max", "max-above-k"],
)
def test_bad_input_gets_the_same_json_error_as_detect(
    client: httpx.Client, content: bytes, content_type: str, query: str
) -> None:
    headers = {"content-type": content_type}
    expected = client.post(f"/detect{query}", content=content, headers=headers)
    response = client.post(f"/detect/annotated{query}", content=content, headers=headers)
    assert expected.status_code >= 400
    assert response.status_code == expected.status_code
    assert response.headers["content-type"] == "application/json"
    body, want = response.json(), expected.json()
    assert (body["error"], body["detail"]) == (want["error"], want["detail"])


def test_missing_multipart_field(client: httpx.Client) -> None:
    response = client.post("/detect/annotated", files={"picture": ("a.jpg", CATS.read_bytes(), "image/jpeg")})
    assert response.status_code == 422 and response.json()["error"] == "missing_field"


# ------------------------------------------------------------------------------------------ drawing, no server


@pytest.mark.parametrize(
    ("accept", "media"),
    [
        (None, JPEG),
        ("*/*", JPEG),
        ("image/png", PNG),
        ("image/png, image/jpeg", JPEG),  # equal preference: the default
        ("image/jpeg;q=0.5, image/png", PNG),
        ("image/png;q=0", JPEG),
        ("text/html, image/png;q=0.8, */*;q=0.1", PNG),
        ("IMAGE/PNG; q=oops", JPEG),
    ],
)
def test_preferred_type(accept: str | None, media: str) -> None:
    assert preferred_type(accept) == media


@pytest.mark.parametrize("size", [(300, 300), (4000, 3000)])
def test_captions_scale_with_the_image(size: tuple[int, int]) -> None:
    width, height = size
    image = Image.new("RGB", size, (0, 0, 0))
    detection = {"class_id": 17, "label": "cat", "score": 0.875, "box": {"x1": 0, "y1": 0, "x2": width, "y2": height}}
    out = np.asarray(draw_detections(image, [detection]))
    line = Style.for_size(width, height).line_width
    inner = out[line:-line, line:-line]  # the caption is the painted area inside the outline
    rows = np.flatnonzero(np.any(inner != 0, axis=(1, 2)))
    columns = np.flatnonzero(np.any(inner != 0, axis=(0, 2)))
    caption_height, caption_width = rows.max() + 1, columns.max() + 1
    short = min(width, height)
    assert caption_height >= 12  # legible at 300 px
    assert 0.02 * short <= caption_height <= 0.08 * short  # same share of the image at 4000 px
    assert caption_width > 2 * caption_height  # it holds the text "cat 0.88", not an empty swatch


def test_caption_is_clipped_to_a_small_box() -> None:
    image = Image.new("RGB", (400, 300), (0, 0, 0))
    box = {"x1": 100.4, "y1": 50.6, "x2": 110.2, "y2": 58.0}
    detection = {"class_id": 1, "label": "person", "score": 0.9, "box": box}
    out = np.asarray(draw_detections(image, [detection]))
    painted = np.argwhere(np.any(out != 0, axis=2))
    assert painted.size
    assert painted[:, 1].min() >= 100 and painted[:, 1].max() <= 110
    assert painted[:, 0].min() >= 50 and painted[:, 0].max() <= 57


def test_colours_differ_between_classes() -> None:
    colours = {class_colour(class_id) for class_id in range(91)}
    assert len(colours) == 91
