"""The real server (a `python -m server` process, the real default model) over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import cpu_seconds
from server.testing import REPO_ROOT, ServerProcess

DATA = REPO_ROOT.parent / "shared" / "data"

GOLDEN = DATA / "golden" / "cats_and_dogs.json"
CATS = DATA / "images" / "cats_and_dogs.jpg"
MODEL = "ssd_mobilenet_v1_coco"  # the served name: every per-model metric has model=MODEL
PHOTOS = sorted((DATA / "voc2012_sample" / "JPEGImages").glob("*.jpg"))[:16]
TFLITE = REPO_ROOT.parent / "shared" / "models" / "coco_ssd_mobilenet_v1" / "detect.tflite"


def detect(client: httpx.Client, data: bytes, **params: object) -> httpx.Response:
    return client.post("/detect", files={"image": ("photo.jpg", data, "image/jpeg")}, params=params)


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def client(server_url: str) -> httpx.Client:
    with httpx.Client(base_url=server_url, timeout=120.0) as c:
        yield c  # type: ignore[misc]


def test_health_readiness_and_model(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    info = client.get("/v1/model").json()
    assert info["name"] == "ssd_mobilenet_v1_coco" and info["input_size"] == [300, 300]
    assert len(info["labels"]) == 90 and info["labels"][16:18] == ["cat", "dog"]
    assert (info["score_threshold"], info["max_detections"]) == (0.01, 200)
    assert (info["engine"], info["max_batch_size"]) == ("onnxruntime", 32)


@pytest.mark.parametrize("photo", [CATS, *PHOTOS[:4]], ids=lambda p: p.name)
def test_detections_are_litert_on_the_same_pixels(client: httpx.Client, photo: Path) -> None:
    """Over HTTP, the default model is LiteRT's arithmetic: every detection LiteRT's own post-processing makes
    (score >= 0.3) on the server's 300x300 pixels comes back, same class, IoU >= 0.9, score within 0.05, unless
    the paper's per-class NMS at 0.45 suppressed it for a higher-scoring overlapping box of the same class."""
    np = pytest.importorskip("numpy")
    from model_export.tflite.reference import Detections, LiteRTDetector, compare_detections
    from server.preprocess import preprocess

    data = photo.read_bytes()
    body = detect(client, data).json()
    scores = [d["score"] for d in body["detections"]]
    assert scores == sorted(scores, reverse=True) and 0 < len(scores) <= 200
    size = np.array([body["width"], body["height"]] * 2, dtype=np.float64)
    ours = Detections(
        boxes=np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in body["detections"]]) / size,
        scores=np.array(scores),
        classes=np.array([d["class_id"] for d in body["detections"]]),
    )
    reference = LiteRTDetector(TFLITE)(preprocess(data, (300, 300)).pixels)
    matches = compare_detections(reference, ours)
    assert matches and all(m.ours is not None or m.suppressed for m in matches), matches
    # The server's boxes are in original pixels, rounded to 0.1 px: IoU stays ~1.
    assert min(m.iou for m in matches if m.ours is not None) > 0.99


def test_raw_body_gives_the_same_result_as_multipart(client: httpx.Client) -> None:
    data = CATS.read_bytes()
    multipart = detect(client, data, score_threshold=0.3).json()
    raw = client.post(
        "/detect", content=data, headers={"content-type": "image/jpeg"}, params={"score_threshold": 0.3}
    ).json()
    sniffed = client.post("/detect", content=data, params={"score_threshold": 0.3}).json()  # no content type
    assert raw["detections"] == multipart["detections"] == sniffed["detections"]
    limited = detect(client, data, score_threshold=0.3, max_detections=2).json()
    assert limited["detections"] == multipart["detections"][:2]


def test_exif_orientation_is_applied(client: httpx.Client) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate a quarter turn
    out = io.BytesIO()
    Image.open(CATS).save(out, format="JPEG", exif=exif.tobytes())
    body = detect(client, out.getvalue()).json()
    assert (body["width"], body["height"]) == (600, 1200)


def test_concurrent_requests_get_exactly_their_own_results(client: httpx.Client, server_url: str) -> None:
    photos = [p.read_bytes() for p in PHOTOS]
    assert len(photos) == 16
    alone = [detect(client, data).json()["detections"] for data in photos]
    before = metric_samples(client)

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server_url, timeout=300.0, limits=limits) as aclient:
            requests = [
                aclient.post("/detect", files={"image": (f"{i}.jpg", photos[i % 16], "image/jpeg")}) for i in range(64)
            ]
            return await asyncio.gather(*requests)

    responses = asyncio.run(flood())
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        assert response.json()["detections"] == alone[i % 16], f"request {i} (photo {i % 16}) differs"
    after = metric_samples(client)
    m = MODEL
    batches = value(after, "ssd_batch_size_count", model=m) - value(before, "ssd_batch_size_count", model=m)
    images = value(after, "ssd_batch_size_sum", model=m) - value(before, "ssd_batch_size_sum", model=m)
    singles = value(after, "ssd_batch_size_bucket", le="1.0", model=m) - value(
        before, "ssd_batch_size_bucket", le="1.0", model=m
    )
    assert images == 64
    assert batches < 64 and singles < batches, "no batch held more than one image"
    assert max(r.json()["timings_ms"]["queue"] for r in responses) > 0


def test_a_batch_request_answers_each_image_in_order(client: httpx.Client) -> None:
    photos = [p.read_bytes() for p in PHOTOS[:2]]
    files = [
        ("images", ("a.jpg", photos[0], "image/jpeg")),
        ("images", ("bad.jpg", b"\xff\xd8 not really", "image/jpeg")),
        ("images", ("b.jpg", photos[1], "image/jpeg")),
    ]
    response = client.post("/detect/batch", files=files, params={"score_threshold": 0.2})
    assert response.status_code == 200, response.text
    first, bad, second = response.json()["results"]
    assert first["detections"] == detect(client, photos[0], score_threshold=0.2).json()["detections"]
    assert second["detections"] == detect(client, photos[1], score_threshold=0.2).json()["detections"]
    assert bad["status"] == 400 and bad["error"] == "invalid_image"


def png_header_only(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def tiff() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="TIFF")
    return out.getvalue()


JPEG = CATS.read_bytes()


def corrupt_jpeg() -> bytes:
    table = JPEG.index(b"\xff\xc4")  # the first Huffman table
    return JPEG[: table + 5] + b"\xff" * 40 + JPEG[table + 45 :]


BAD_INPUTS: list[tuple[str, dict[str, object], int, str, str]] = [
    # (name, request kwargs, status, error, rejected reason)
    ("empty raw body", {"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty_body", "empty_body"),
    ("empty file part", {"files": {"image": ("a.jpg", b"", "image/jpeg")}}, 400, "empty_body", "empty_body"),
    (
        "not an image",
        {"content": b"hello world", "headers": {"content-type": "image/jpeg"}},
        400,
        "invalid_image",
        "invalid_image",
    ),
    (
        "truncated jpeg",
        {"content": JPEG[: len(JPEG) // 3], "headers": {"content-type": "image/jpeg"}},
        400,
        "invalid_image",
        "invalid_image",
    ),
    # (JPEG tolerates damaged entropy-coded data, decoding it as noise like any viewer; a damaged table is fatal)
    (
        "corrupt jpeg",
        {"content": corrupt_jpeg(), "headers": {"content-type": "image/jpeg"}},
        400,
        "invalid_image",
        "invalid_image",
    ),
    (
        "unsupported format",
        {"content": tiff(), "headers": {"content-type": "application/octet-stream"}},
        400,
        "invalid_image",
        "invalid_image",
    ),
    (
        "text/plain",
        {"content": b"hello", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
        "unsupported_media_type",
    ),
    (
        "json",
        {"content": b"{}", "headers": {"content-type": "application/json"}},
        415,
        "unsupported_media_type",
        "unsupported_media_type",
    ),
    (
        "too many pixels",
        {"content": png_header_only(8000, 8000), "headers": {"content-type": "image/png"}},
        413,
        "image_too_large",
        "image_too_large",
    ),
    (
        "decompression bomb",
        {"content": png_header_only(30000, 30000), "headers": {"content-type": "image/png"}},
        413,
        "image_too_large",
        "image_too_large",
    ),
    ("missing field", {"files": {"photo": ("a.jpg", JPEG, "image/jpeg")}}, 422, "missing_field", "validation_error"),
    (
        "threshold not a number",
        {"content": JPEG, "params": {"score_threshold": "high"}},
        422,
        "validation_error",
        "validation_error",
    ),
    (
        "threshold above 1",
        {"content": JPEG, "params": {"score_threshold": 1.5}},
        422,
        "validation_error",
        "validation_error",
    ),
    (
        "threshold below the model's",
        {"content": JPEG, "params": {"score_threshold": 0.001}},
        422,
        "validation_error",
        "validation_error",
    ),
    (
        "max_detections 0",
        {"content": JPEG, "params": {"max_detections": 0}},
        422,
        "validation_error",
        "validation_error",
    ),
    (
        "max_detections above K",
        {"content": JPEG, "params": {"max_detections": 201}},
        422,
        "validation_error",
        "validation_error",
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "status", "error", "reason"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_and_the_server_stays_healthy(
    client: httpx.Client, name: str, kwargs: dict[str, object], status: int, error: str, reason: str
) -> None:
    before = metric_samples(client)
    response = client.post("/detect", **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and isinstance(body["detail"], str) and body["detail"]
    after = metric_samples(client)
    assert (
        value(after, "ssd_rejected_requests_total", reason=reason)
        - value(before, "ssd_rejected_requests_total", reason=reason)
        == 1
    )
    assert (
        value(after, "ssd_requests_total", endpoint="/detect", code=str(status))
        - value(before, "ssd_requests_total", endpoint="/detect", code=str(status))
        == 1
    )
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_metrics_parse_and_count_what_was_sent(client: httpx.Client) -> None:
    before = metric_samples(client)
    for _ in range(3):
        assert detect(client, JPEG, score_threshold=0.5).status_code == 200
    client.post("/detect", content=b"x", headers={"content-type": "text/plain"})
    client.get("/v1/model")
    after = metric_samples(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ssd_requests_total", endpoint="/detect", code="200") == 3
    assert delta("ssd_requests_total", endpoint="/detect", code="415") == 1
    assert delta("ssd_requests_total", endpoint="/v1/model", code="200") == 1
    assert delta("ssd_requests_total", endpoint="/metrics", code="200") == 1  # the first scrape
    assert delta("ssd_request_duration_seconds_count", endpoint="/detect") == 4
    assert delta("ssd_images_processed_total", model=MODEL) == 3
    assert delta("ssd_decode_duration_seconds_count", model=MODEL) == 3
    assert delta("ssd_queue_wait_seconds_count", model=MODEL) == 3
    assert delta("ssd_inference_duration_seconds_count", model=MODEL) >= 1
    assert value(after, "ssd_requests_in_flight") == 0 and value(after, "ssd_queue_depth", model=MODEL) == 0
    assert value(after, "ssd_images_per_second", model=MODEL) > 0
    assert (
        value(after, "ssd_model_info", model="ssd_mobilenet_v1_coco", engine="onnxruntime", input_size="300x300") == 1
    )


def test_the_event_loops_cpu_is_its_threads_alone(server: ServerProcess, client: httpx.Client) -> None:
    """ssd_event_loop_cpu_seconds_total counts the event loop's thread: it grows with requests, and stays below the
    process's CPU (decode and engine threads do the rest)."""

    stat = Path(f"/proc/{server.process.pid}/stat")
    before, process_before = metric_samples(client), cpu_seconds(stat)
    for _ in range(40):
        assert detect(client, JPEG).status_code == 200
    after, process_after = metric_samples(client), cpu_seconds(stat)
    loop_s = value(after, "ssd_event_loop_cpu_seconds_total") - value(before, "ssd_event_loop_cpu_seconds_total")
    assert 0 < loop_s < process_after - process_before


def test_docs_are_served(client: httpx.Client) -> None:
    assert client.get("/docs").status_code == 200
    assert "DetectResponse" in client.get("/openapi.json").json()["components"]["schemas"]


# ------------------------------------------------------------------------------------------ a small, strict server


@pytest.fixture(scope="module")
def strict_server(server_factory: Callable[..., ServerProcess], server: ServerProcess) -> ServerProcess:
    """Batching off, a queue of 2 and small limits (started after the default server, which made the model)."""
    return server_factory(
        {
            "max_batch_size": 1,
            "max_queue_delay_ms": 0,
            "max_queue_size": 2,
            "max_body_bytes": 200_000,
            "decode_workers": 4,
        }
    )


def test_a_flood_beyond_the_queue_gets_503_with_retry_after_then_normal_service(strict_server: ServerProcess) -> None:
    data = PHOTOS[0].read_bytes()

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=strict_server.url, timeout=300.0, limits=limits) as aclient:
            return await asyncio.gather(
                *(aclient.post("/detect", content=data, headers={"content-type": "image/jpeg"}) for _ in range(40))
            )

    with httpx.Client(base_url=strict_server.url, timeout=60.0) as c:
        before = metric_samples(c)
        responses = asyncio.run(flood())
        codes = [r.status_code for r in responses]
        refused = [r for r in responses if r.status_code == 503]
        assert set(codes) <= {200, 503} and refused and codes.count(200) >= 2, codes  # in flight: the queue of 2
        for r in refused:  # refused at arrival (overloaded) or, rarely, at the queue after decode
            assert r.headers["retry-after"] == "1" and r.json()["error"] in ("overloaded", "queue_full")
        after = metric_samples(c)
        assert sum(
            value(after, "ssd_rejected_requests_total", reason=reason)
            - value(before, "ssd_rejected_requests_total", reason=reason)
            for reason in ("overloaded", "queue_full")
        ) == len(refused)
        assert value(after, "ssd_batch_size_bucket", le="1.0", model=MODEL) == value(
            after, "ssd_batch_size_count", model=MODEL
        )  # batching off
        assert c.post("/detect", content=data, headers={"content-type": "image/jpeg"}).status_code == 200
        assert c.get("/readyz").status_code == 200


def test_a_body_over_the_limit_is_refused_from_its_length(strict_server: ServerProcess) -> None:
    host, port = strict_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        # Announce 50 MB, send none of it: the answer must come without the body.
        sock.sendall(
            b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 50000000\r\n\r\n"
        )
        raw = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its answer
            raw += chunk
    reply = raw.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"error":"payload_too_large"' in reply.replace(" ", "")


def test_a_streamed_body_over_the_limit_is_stopped(strict_server: ServerProcess) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(100):
            yield b"\0" * 10_000  # 1 MB in all, no Content-Length (chunked)

    with httpx.Client(base_url=strict_server.url, timeout=60.0) as c:
        try:
            response = c.post("/detect", content=chunks(), headers={"content-type": "image/jpeg"})
            assert response.status_code == 413 and response.json()["error"] == "payload_too_large"
        except httpx.TransportError:
            pass  # the server may close the connection before the client finished sending
        assert c.get("/healthz").status_code == 200
        samples = metric_samples(c)
        assert value(samples, "ssd_rejected_requests_total", reason="payload_too_large") >= 1
        ok = c.post("/detect", content=PHOTOS[1].read_bytes(), headers={"content-type": "image/jpeg"})
        assert ok.status_code == 200


def test_graceful_shutdown_exits_cleanly(strict_server: ServerProcess) -> None:
    # uvicorn finishes the shutdown, then re-raises the signal it caught (exit status: killed by SIGINT).
    assert strict_server.stop() in (0, -signal.SIGINT)
    assert "Application shutdown complete" in strict_server.log()


# ----------------------------------------------------------------------------------- opt-in JPEG draft


def test_jpeg_draft_server_still_finds_the_golden_cats_and_dog(server_factory: Callable[..., ServerProcess]) -> None:
    """SSD_JPEG_DRAFT=1 on a 4000x2000 copy of cats_and_dogs.jpg (decoded at 1/2): the size is the original's and
    the golden cats and dog are still found, boxes in original pixels (loose: the draft path is antialiased)."""
    golden = json.loads(GOLDEN.read_text())
    scale = 4000 / golden["image_size"]["width"]
    out = io.BytesIO()
    with Image.open(CATS) as image:
        image.convert("RGB").resize((4000, 2000), Image.Resampling.BICUBIC).save(out, format="JPEG", quality=90)
    server = server_factory({"jpeg_draft": 1, "warmup": "false", "max_batch_size": 1})
    with httpx.Client(base_url=server.url, timeout=120.0) as client:
        body = detect(client, out.getvalue(), score_threshold=0.3).json()
    assert (body["width"], body["height"]) == (4000, 2000)
    for expected in golden["detections"]:
        x, y, w, h = (v * scale for v in expected["box_xywh"])
        edges = (x, y, min(x + w, 4000), min(y + h, 2000))
        matches = [
            d
            for d in body["detections"]
            if d["class_id"] == expected["class_index"]
            and max(abs(a - b) for a, b in zip((d["box"]["x1"], d["box"]["y1"], d["box"]["x2"], d["box"]["y2"]), edges))
            <= 40 * scale
        ]
        assert matches, f"no detection >= 0.3 matches {expected} (x{scale:.2f}): {body['detections']}"


# ------------------------------------------------------------------------------------------ start-up


def test_a_missing_model_file_makes_the_server_exit_with_an_error(server_factory: Callable[..., ServerProcess]) -> None:
    proc = server_factory({"model": "/nonexistent/model.onnx"}, wait_ready=False)
    proc.process.wait(timeout=60)
    assert proc.process.returncode == 1
    assert "model file not found" in proc.log()


@pytest.mark.slow
def test_first_start_exports_the_default_model(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """In an empty working directory the default model is missing: the server exports it, then serves it."""
    if os.environ.get("SSD_MODEL"):
        pytest.skip("SSD_MODEL points every server at another file")
    server = server_factory({"max_batch_size": 2}, cwd=tmp_path, wait_ready=False)
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # alive while exporting
    server.wait_ready()
    log = server.log()
    assert "exporting ssd_mobilenet_v1_coco" in log and "export | " in log
    assert (tmp_path / "weights" / "ssd_mobilenet_v1_coco.onnx").is_file()
    response = httpx.post(f"{server.url}/detect", content=JPEG, headers={"content-type": "image/jpeg"}, timeout=60)
    assert response.status_code == 200 and response.json()["model"] == "ssd_mobilenet_v1_coco"
    assert server.stop() in (0, -signal.SIGINT)
