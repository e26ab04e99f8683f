"""The GPU decode path's CPU-checkable pieces: which files it takes, EXIF orientation as PIL turns it, the resize
filter (within one uint8 step of cv2's INTER_LINEAR and of the server's CPU resize), and the batching decoder itself
run with device="cpu" (the same torchvision.io.decode_jpeg call, libjpeg-turbo instead of nvJPEG). The nvJPEG run is
the `gpu` test at the end."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
cv2 = pytest.importorskip("cv2")

from server.engines.torch_gpu import capture_sizes, graph_size_for  # noqa: E402
from server.gpu_preprocess import GpuDecoder, JpegHeader, orient, read_header, resize_to_input  # noqa: E402
from model_export.contract.image import resize_bilinear  # noqa: E402
from server.preprocess import preprocess  # noqa: E402

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PHOTOS = sorted((SHARED / "voc2012_sample" / "JPEGImages").glob("*.jpg"))[:6]
SIZE = (300, 300)


def encode(array: np.ndarray, fmt: str = "JPEG", orientation: int | None = None, mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    image.save(buffer, format=fmt, quality=92, **kwargs)
    return buffer.getvalue()


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_headers_pick_the_jpegs_nvjpeg_takes() -> None:
    pixels = noise(40, 60)
    assert read_header(encode(pixels), 10**7) == JpegHeader(width=60, height=40, orientation=1)
    assert read_header(encode(pixels, orientation=6), 10**7) == JpegHeader(60, 40, 6)
    assert JpegHeader(60, 40, 6).displayed_size == (40, 60) and JpegHeader(60, 40, 3).displayed_size == (60, 40)
    assert read_header(encode(pixels, mode="L"), 10**7) == JpegHeader(60, 40, 1)
    # The CPU path takes (and reports on) everything else.
    assert read_header(encode(pixels, fmt="PNG"), 10**7) is None
    assert read_header(encode(pixels, mode="CMYK"), 10**7) is None
    assert read_header(encode(pixels), 60 * 40 - 1) is None  # too large: the CPU path answers 413
    assert read_header(b"", 10**7) is None and read_header(b"\xff\xd8 not really", 10**7) is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_turns_as_pil_does(orientation: int) -> None:
    data = encode(noise(24, 40, seed=orientation), fmt="PNG")  # lossless, so pixels compare exactly
    stored = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(image))
    ours = orient(torch.from_numpy(stored).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (120, 90), (300, 300), (1000, 1500), (301, 299)])
def test_resize_is_within_one_step_of_cv2_and_of_the_cpu_path(shape: tuple[int, int]) -> None:
    pixels = noise(*shape, seed=shape[0])
    ours = resize_to_input(torch.from_numpy(pixels).permute(2, 0, 1), SIZE).numpy()
    assert ours.shape == (*SIZE, 3) and ours.dtype == np.uint8
    reference = cv2.resize(pixels, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_LINEAR)
    assert int(np.abs(ours.astype(np.int16) - reference).max()) <= 1
    cpu = resize_bilinear(pixels, SIZE)
    assert int(np.abs(ours.astype(np.int16) - cpu).max()) <= 1


def test_capture_sizes_and_padding() -> None:
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 32] and capture_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert [graph_size_for(b, [1, 2, 4, 8]) for b in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, None]
    assert graph_size_for(3, []) is None


def _prepare_all(decoder: GpuDecoder, files: list[bytes]) -> list:
    async def go() -> list:
        return await asyncio.gather(*(decoder.prepare(data, 10**8) for data in files))

    return asyncio.run(go())


@pytest.mark.skipif(not PHOTOS, reason=f"shared photos missing under {SHARED}")
def test_decoder_batches_concurrent_jpegs_and_leaves_the_rest_to_the_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = GpuDecoder("cpu", SIZE, max_batch=64, max_delay_s=0.05)
    batches: list[int] = []
    real = decoder.decode_batch

    def counted(items):  # type: ignore[no-untyped-def]
        batches.append(len(items))
        return real(items)

    monkeypatch.setattr(decoder, "decode_batch", counted)
    jpegs = [p.read_bytes() for p in PHOTOS]
    turned = encode(np.asarray(Image.open(PHOTOS[0]).convert("RGB")), orientation=6)
    png = encode(noise(50, 70), fmt="PNG")
    try:
        results = _prepare_all(decoder, [*jpegs, turned, png])
    finally:
        decoder.close()
    assert batches == [len(jpegs) + 1]  # one decode call for every JPEG that arrived together
    assert results[-1] is None  # PNG: the CPU path
    for data, prepared in zip([*jpegs, turned], results[:-1], strict=True):
        cpu = preprocess(data, SIZE)
        assert (prepared.width, prepared.height) == (cpu.width, cpu.height)
        assert prepared.pixels.shape == (*SIZE, 3) and prepared.pixels.dtype == np.uint8
        # The same libjpeg-turbo here; nvJPEG differs by a few steps (see the gpu test).
        assert float(np.abs(prepared.pixels.astype(np.int16) - cpu.pixels).mean()) < 0.5
    decoder = GpuDecoder("cpu", SIZE, max_batch=2, max_delay_s=5.0)  # a full batch does not wait for the delay
    try:
        async def two() -> list:
            return await asyncio.wait_for(asyncio.gather(*(decoder.prepare(d, 10**8) for d in jpegs[:2])), 2.0)

        out = asyncio.run(two())
    finally:
        decoder.close()
    assert all(p is not None for p in out)


@pytest.mark.gpu
@pytest.mark.skipif(not PHOTOS, reason=f"shared photos missing under {SHARED}")
def test_nvjpeg_decode_and_gpu_resize_track_the_cpu_path() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU visible to torch (torch.cuda.is_available() is False here)")
    decoder = GpuDecoder(torch.device("cuda"), SIZE)
    jpegs = [p.read_bytes() for p in PHOTOS]
    truncated = jpegs[0][: len(jpegs[0]) // 3]
    try:
        results = _prepare_all(decoder, [*jpegs, truncated])
    finally:
        decoder.close()
    for data, prepared in zip(jpegs, results, strict=True):
        cpu = preprocess(data, SIZE)
        diff = np.abs(prepared.pixels.astype(np.int16) - cpu.pixels)
        # nvJPEG's IDCT / chroma upsampling vs libjpeg-turbo's: small on average, bounded at the worst pixel.
        assert float(diff.mean()) < 1.5 and int(diff.max()) <= 24, (float(diff.mean()), int(diff.max()))
    assert results[-1] is None or results[-1].pixels.shape == (*SIZE, 3)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not PHOTOS, reason=f"shared photos missing under {SHARED}")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU visible to torch")
def test_the_gpu_resident_server_answers_like_the_cpu_server(server_factory, server) -> None:  # type: ignore[no-untyped-def]
    """--engine torch --device cuda --fp16 over HTTP: JPEGs through nvJPEG, a PNG through the CPU fallback, a bad
    file refused as on the CPU; every confident CPU-server detection found (class, score within 0.05, box within
    3 px), as nvJPEG's pixels and the fp16 network allow."""
    import httpx

    gpu = server_factory({"engine": "torch", "device": "cuda", "fp16": True, "max_batch_size": 8})
    png = encode(np.asarray(Image.open(PHOTOS[0]).convert("RGB")), fmt="PNG")
    files = [p.read_bytes() for p in PHOTOS] + [png]
    with httpx.Client(base_url=server.url, timeout=60) as cpu_client, \
            httpx.Client(base_url=gpu.url, timeout=60) as gpu_client:
        for data in files:
            want = cpu_client.post("/detect", content=data, params={"score_threshold": 0.4}).json()
            got = gpu_client.post("/detect", content=data, params={"score_threshold": 0.3}).json()
            assert (got["width"], got["height"]) == (want["width"], want["height"])
            for d in want["detections"]:
                assert any(g["class_id"] == d["class_id"] and abs(g["score"] - d["score"]) < 0.05
                           and max(abs(g["box"][k] - d["box"][k]) for k in d["box"]) < 3.0
                           for g in got["detections"]), d
        bad = gpu_client.post("/detect", content=b"\xff\xd8\xff\xe0 not a jpeg")
        assert bad.status_code == 400 and gpu_client.get("/readyz").status_code == 200
