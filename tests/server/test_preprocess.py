"""Decode, orientation, colour modes, limits, and the resize: pixel-equal to torch's bilinear interpolate."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from model_export.contract.image import model_input, resize_bilinear, to_rgb
from server.errors import EmptyBody, ImageTooLarge, InvalidImage, UnsupportedMediaType
from server.preprocess import (
    DEFAULT_MAX_IMAGE_PIXELS,
    _decode,
    _open,
    check_content_type,
    decode,
    decode_jpeg_rgb,
    preprocess,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"
CATS = SHARED / "data" / "images" / "cats_and_dogs.jpg"
SHARED_JPEGS = sorted(SHARED.glob("data/**/*.jpg"))


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def halves(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


# ------------------------------------------------------------------------------------------------- resize


@pytest.fixture(scope="module")
def torch_resize():  # type: ignore[no-untyped-def]
    """torch's interpolate as the export validation runs it (uint8 -> float -> bilinear -> round -> uint8).

    torch switches to a channels-last kernel when it runs on exactly one intra-op thread (a different float
    summation order, which flips ~0.005% of the rounded pixels by one level); the exporter's validation runs
    with torch's default thread count, so the reference here uses at least two threads.
    """
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(max(2, previous))

    def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        batch = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
        out = torch.nn.functional.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=False)
        return out.round().to(torch.uint8)[0].permute(1, 2, 0).numpy()

    yield resize
    torch.set_num_threads(previous)


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((480, 640), (300, 300)),  # VGA down
        ((600, 1200), (300, 300)),  # exactly 2x / 4x: many exact .5 ties
        ((1080, 1920), (300, 300)),
        ((333, 517), (300, 300)),
        ((200, 150), (300, 300)),  # up
        ((37, 1000), (300, 300)),  # mixed
        ((1, 1), (300, 300)),
        ((300, 300), (300, 300)),  # identity
        ((500, 375), (320, 320)),
        ((257, 129), (512, 512)),
    ],
)
def test_resize_is_within_one_step_of_torch_interpolate(torch_resize, shape, size) -> None:  # type: ignore[no-untyped-def]
    """OpenCV's fixed-point INTER_LINEAR samples where torch's float kernel does (half-pixel centres, no
    antialias): every value within one uint8 step of torch's, and most of them equal."""
    rng = np.random.default_rng(sum(shape) + sum(size))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours, theirs = resize_bilinear(image, size), torch_resize(image, size)
    assert ours.shape == (*size, 3) and ours.dtype == np.uint8
    difference = np.abs(ours.astype(np.int16) - theirs)
    assert int(difference.max()) <= 1 and difference.mean() < 0.5, f"max {difference.max()}, mean {difference.mean()}"


def test_resize_of_a_real_photo_is_within_one_step_of_torch(torch_resize) -> None:  # type: ignore[no-untyped-def]
    rgb = np.asarray(Image.open(CATS).convert("RGB"))
    ours, theirs = resize_bilinear(rgb, (300, 300)), torch_resize(rgb, (300, 300))
    difference = np.abs(ours.astype(np.int16) - theirs)
    assert int(difference.max()) <= 1 and difference.mean() < 0.2  # ~11% of the values differ, by one
    assert np.array_equal(preprocess(CATS.read_bytes(), (300, 300)).pixels, ours)


def test_resize_does_not_antialias() -> None:
    # A one-pixel checkerboard halved by a bilinear filter without antialiasing samples between two pixels.
    board = (np.indices((8, 8)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = np.repeat(board[:, :, None], 3, axis=2)
    out = resize_bilinear(image, (4, 4))
    assert set(np.unique(out)) <= {127, 128}  # (0 + 255) / 2 = 127.5, rounded half to even / by weights


def test_the_server_never_imports_torch() -> None:
    code = (
        "import sys, server.app, server.preprocess, server.batcher, server.engines.onnxruntime; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=False).returncode == 0


# ------------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_every_supported_format_decodes(fmt: str) -> None:
    data = encode(halves(), fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    prepared = preprocess(data, (10, 20))
    assert (prepared.width, prepared.height) == (40, 20)
    left, right = prepared.pixels[5, 2].astype(int), prepared.pixels[5, 17].astype(int)
    assert left[0] > 200 and left[2] < 60, left
    assert right[2] > 200 and right[0] < 60, right


def test_gif_uses_the_first_frame() -> None:
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    out = io.BytesIO()
    red.save(out, format="GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    pixels = preprocess(out.getvalue(), (4, 4)).pixels
    assert tuple(pixels[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 200, (200, 200, 200)),
        ("1", 1, (255, 255, 255)),
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha is dropped, colour kept
        ("LA", (90, 255), (90, 90, 90)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 256 * 77, (77, 77, 77)),
        ("I", 120, (120, 120, 120)),
        ("F", 33.0, (33, 33, 33)),
    ],
)
def test_every_mode_becomes_rgb(mode: str, value: object, expected: tuple[int, int, int]) -> None:
    rgb = to_rgb(Image.new(mode, (3, 2), value))  # type: ignore[arg-type]
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert tuple(int(v) for v in rgb[1, 2]) == expected


def test_palette_images_use_their_palette() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    assert tuple(preprocess(encode(image, "PNG"), (2, 2)).pixels[0, 0]) == (12, 34, 56)


def test_sixteen_bit_png_decodes() -> None:
    grey = Image.fromarray(np.full((4, 4), 50000, dtype=np.uint16))
    data = encode(grey, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert tuple(preprocess(data, (2, 2)).pixels[0, 0]) == (50000 >> 8,) * 3


@pytest.mark.parametrize(
    ("orientation", "size", "left_colour"),
    [(1, (40, 20), "red"), (3, (40, 20), "blue"), (6, (20, 40), None), (8, (20, 40), None)],
)
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int], left_colour: str | None) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(halves(), "JPEG", quality=95, exif=exif.tobytes())
    image = decode(data)
    assert image.size == size
    if left_colour is not None:
        red, _, blue = image.getpixel((2, 10))
        assert (red > blue) == (left_colour == "red")
    else:  # rotated a quarter turn: the halves are now top and bottom
        top, bottom = image.getpixel((10, 2)), image.getpixel((10, 37))
        assert top != bottom


# ---------------------------------------------------------------------------------- simplejpeg's decode


def pil_reference(data: bytes, size: tuple[int, int] = (300, 300)) -> tuple[np.ndarray, tuple[int, int]]:
    """The model input as PIL decodes it (decode, EXIF orientation, RGB, `model_input`), and the image's size."""
    image = decode(data)
    return model_input(image, size), image.size


def takes_simplejpeg(data: bytes) -> bool:
    return decode_jpeg_rgb(data, _open(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)) is not None


def test_shared_photos_exist() -> None:
    assert len(SHARED_JPEGS) >= 50, f"expected the shared photos under {SHARED / 'data'}"


@pytest.mark.parametrize("path", SHARED_JPEGS, ids=lambda path: path.name)
def test_simplejpeg_decodes_every_shared_photo_to_pils_pixels(path: Path) -> None:
    data = path.read_bytes()
    assert takes_simplejpeg(data)
    prepared = preprocess(data, (300, 300))
    pixels, size = pil_reference(data)
    np.testing.assert_array_equal(prepared.pixels, pixels)
    assert (prepared.width, prepared.height) == size


@pytest.mark.parametrize("orientation", range(1, 9))
def test_simplejpeg_path_applies_every_exif_orientation_as_pil_does(orientation: int) -> None:
    with Image.open(CATS) as photo:
        image = photo.convert("RGB").resize((160, 90))  # not square: a quarter turn shows in the size
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(image, "JPEG", quality=90, exif=exif.tobytes())
    assert takes_simplejpeg(data)
    prepared = preprocess(data, (300, 300))
    pixels, size = pil_reference(data)
    np.testing.assert_array_equal(prepared.pixels, pixels)
    assert (prepared.width, prepared.height) == size == ((90, 160) if orientation >= 5 else (160, 90))


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_simplejpeg_matches_pil_for_each_chroma_subsampling(subsampling: int) -> None:
    with Image.open(CATS) as photo:
        data = encode(photo.convert("RGB").resize((333, 251)), "JPEG", quality=85, subsampling=subsampling)
    assert takes_simplejpeg(data)
    np.testing.assert_array_equal(preprocess(data, (300, 300)).pixels, pil_reference(data)[0])


def test_simplejpeg_matches_pil_for_grey_and_progressive_jpegs() -> None:
    with Image.open(CATS) as photo:
        small = photo.convert("RGB").resize((200, 150))
    for data in (encode(small.convert("L"), "JPEG", quality=90), encode(small, "JPEG", progressive=True)):
        assert takes_simplejpeg(data)
        np.testing.assert_array_equal(preprocess(data, (300, 300)).pixels, pil_reference(data)[0])


def test_pil_decodes_cmyk_jpegs_and_simplejpeg_takes_padded_ones() -> None:
    with Image.open(CATS) as photo:
        small = photo.convert("RGB").resize((200, 150))
    cmyk = encode(small.convert("CMYK"), "JPEG", quality=90)
    padded = encode(small, "JPEG", quality=90) + b"\0" * 16  # a camera's padding after the EOI marker
    for data, simple in ((cmyk, False), (padded, True)):
        assert takes_simplejpeg(data) == simple
        np.testing.assert_array_equal(preprocess(data, (300, 300)).pixels, pil_reference(data)[0])


def test_corrupt_and_cut_jpegs_get_pils_answers() -> None:
    """simplejpeg refuses what libjpeg warns about; PIL then decides as it always did: a file cut without its EOI
    is refused as truncated, one that ends early with an EOI decodes with a grey tail."""
    jpeg = CATS.read_bytes()
    cut = jpeg[: len(jpeg) * 3 // 4]
    assert not takes_simplejpeg(cut)
    with pytest.raises(InvalidImage, match="truncated"):
        preprocess(cut, (300, 300))
    ended_early = cut + b"\xff\xd9"
    corrupt = bytearray(jpeg)
    corrupt[len(jpeg) // 2 : len(jpeg) // 2 + 50] = b"\x13" * 50
    for data in (ended_early, bytes(corrupt)):
        assert not takes_simplejpeg(data)
        np.testing.assert_array_equal(preprocess(data, (300, 300)).pixels, pil_reference(data)[0])


def test_simplejpeg_decodes_without_holding_the_gil() -> None:
    """The decode pool's threads must leave the event loop running while they decode."""
    import threading
    import time

    data = CATS.read_bytes()
    counts: list[int] = []
    stop = threading.Event()

    def count() -> None:
        n = 0
        while not stop.is_set():
            n += 1
        counts.append(n)

    def rate(work) -> float:  # type: ignore[no-untyped-def]
        counts.clear()
        stop.clear()
        thread = threading.Thread(target=count)
        started = time.perf_counter()
        thread.start()
        work()
        elapsed = time.perf_counter() - started
        stop.set()
        thread.join()
        return counts[0] / elapsed

    idle = rate(lambda: time.sleep(0.3))
    decoding = rate(lambda: [simplejpeg.decode_jpeg(data) for _ in range(30)])
    assert decoding > 0.5 * idle, (decoding, idle)  # holding the GIL would leave the counter a small fraction


def test_empty_data_is_refused() -> None:
    with pytest.raises(EmptyBody):
        preprocess(b"", (4, 4))


@pytest.mark.parametrize("data", [b"hello, world", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, b"GIF89a"])
def test_non_images_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        preprocess(data, (4, 4))


def test_unsupported_formats_are_invalid() -> None:
    with pytest.raises(InvalidImage, match="JPEG, PNG, WebP, BMP or GIF"):
        preprocess(encode(halves(), "TIFF"), (4, 4))


def test_truncated_and_corrupt_images_are_invalid() -> None:
    jpeg = CATS.read_bytes()
    with pytest.raises(InvalidImage):
        preprocess(jpeg[: len(jpeg) // 2], (4, 4))
    corrupt = bytearray(encode(halves(200, 200), "PNG"))
    corrupt[60:200] = bytes(140)
    with pytest.raises(InvalidImage):
        preprocess(bytes(corrupt), (4, 4))


def test_too_many_pixels_is_refused_from_the_header() -> None:
    data = encode(halves(100, 100), "PNG")
    with pytest.raises(ImageTooLarge, match="10000 pixels"):
        preprocess(data, (4, 4), max_pixels=5000)
    preprocess(data, (4, 4), max_pixels=10000)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries no pixel data (a decompression bomb's header)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [8000, 20000])  # 64 MP: our limit; 400 MP: PIL's own DecompressionBombError too
def test_decompression_bombs_are_refused_before_decoding(side: int) -> None:
    with pytest.raises(ImageTooLarge):
        preprocess(png_header_only(side, side), (4, 4), max_pixels=40_000_000)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "image/jpeg",
        "image/png",
        "IMAGE/WEBP",
        "image/bmp",
        "image/gif",
        "application/octet-stream",
        "image/jpeg; charset=x",
    ],
)
def test_image_and_unlabelled_content_types_are_accepted(content_type: str | None) -> None:
    check_content_type(content_type)


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "image/tiff", "image/svg+xml", "video/mp4"])
def test_other_content_types_are_refused(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        check_content_type(content_type)


# ------------------------------------------------------------------------------------------- opt-in JPEG draft


@pytest.fixture(scope="module")
def large_cats(tmp_path_factory: pytest.TempPathFactory) -> Image.Image:
    """cats_and_dogs.jpg upscaled to 4000x2000 (bicubic), as a large camera photo would be."""
    with Image.open(CATS) as image:
        large = image.convert("RGB").resize((4000, 2000), Image.Resampling.BICUBIC)
    large.save(tmp_path_factory.mktemp("draft") / "large_cats.jpg", quality=90)  # for inspection on failure
    return large


def _large_jpeg(image: Image.Image, orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=90, exif=exif.tobytes())


def test_jpeg_draft_decodes_a_large_jpeg_smaller_but_keeps_its_size(large_cats: Image.Image) -> None:
    data = _large_jpeg(large_cats)
    image, size = _decode(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, draft_for=(300, 300))
    assert image.size == (2000, 1000) and size == (4000, 2000)  # 1/2: 1/4 would be 1000x500, < 600 tall
    exact = preprocess(data, (300, 300))
    drafted = preprocess(data, (300, 300), jpeg_draft=True)
    assert (drafted.width, drafted.height) == (exact.width, exact.height) == (4000, 2000)
    assert drafted.pixels.shape == exact.pixels.shape == (300, 300, 3) and drafted.pixels.dtype == np.uint8
    diff = np.abs(drafted.pixels.astype(np.int16) - exact.pixels.astype(np.int16))
    assert diff.any()  # antialiased: not the validated filter
    assert diff.mean() < 2.0, diff.mean()  # measured 0.17 (max 9 levels)


def test_jpeg_draft_scale_keeps_both_sides_at_least_twice_the_input() -> None:
    data = encode(Image.new("RGB", (4000, 3000), "grey"), "JPEG", quality=50)
    image, size = _decode(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, draft_for=(300, 300))
    assert image.size == (1000, 750) and size == (4000, 3000)
    image, _ = _decode(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, draft_for=(400, 400))
    assert image.size == (2000, 1500)  # 1/4 would be 750 tall, < 800


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_jpeg_draft_applies_exif_orientation(large_cats: Image.Image, orientation: int) -> None:
    data = _large_jpeg(large_cats, orientation)
    quarter = orientation in (6, 8)
    expected_size = (2000, 4000) if quarter else (4000, 2000)
    exact = preprocess(data, (300, 300))
    drafted = preprocess(data, (300, 300), jpeg_draft=True)
    assert (drafted.width, drafted.height) == (exact.width, exact.height) == expected_size
    diff = np.abs(drafted.pixels.astype(np.int16) - exact.pixels.astype(np.int16))
    assert diff.any() and diff.mean() < 2.0, diff.mean()  # measured 0.17; a wrong orientation: 27-35
    if quarter:  # a non-square input: the draft request is turned with the image (600 x 300 displayed, h x w)
        image, size = _decode(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, draft_for=(600, 300))
        assert size == (2000, 4000) and image.size == (1000, 2000)  # 1/2; unturned, 4000 // 600 x 2000 // 1200 = 1


def test_jpeg_draft_leaves_small_jpegs_and_other_formats_alone(large_cats: Image.Image) -> None:
    small = CATS.read_bytes()  # 1200x600: 600 < 2 x 300 tall, not drafted
    png = encode(large_cats.resize((2400, 1200)), "PNG", compress_level=1)
    for data in (small, png):
        exact = preprocess(data, (300, 300))
        drafted = preprocess(data, (300, 300), jpeg_draft=True)
        assert (drafted.width, drafted.height) == (exact.width, exact.height)
        assert np.array_equal(drafted.pixels, exact.pixels)


def test_jpeg_draft_checks_pixels_on_the_original_header_size() -> None:
    data = encode(Image.new("RGB", (4000, 3000), "grey"), "JPEG", quality=50)
    with pytest.raises(ImageTooLarge, match="12000000 pixels"):
        preprocess(data, (300, 300), max_pixels=1_000_000, jpeg_draft=True)  # drafted, it would be 750_000
