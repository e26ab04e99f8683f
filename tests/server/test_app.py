"""The app in-process with a small stand-in engine: readiness, routes, error mapping, metrics (fast).

The real server with the real model is exercised over HTTP in test_server_e2e.py.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from model_export.contract.metadata import ModelMetadata
from server.app import create_app
from server.engines.base import EngineOptions, EngineOutput
from server.settings import Settings

K = 3
METADATA = ModelMetadata(
    model="stand-in",
    input_size=(8, 8),
    labels=("background", "grey"),
    score_threshold=0.05,
    iou_threshold=0.45,
    candidates_per_class=400,
    max_detections=K,
    score_activation="softmax",
    weights_source="random",
    weights_sha256=None,
    opset=17,
)


class StandInEngine:
    """One detection per image: class 1, score = mean pixel / 255, box = the centre quarter."""

    def __init__(self) -> None:
        self.loaded = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.infer_gate = threading.Event()
        self.infer_gate.set()
        self.fail_load = False
        self.fail_next = False
        self.batch_sizes: list[int] = []
        self.closed = False

    def load(self, path: Path, options: EngineOptions) -> ModelMetadata:
        self.release.wait(10)
        if self.fail_load:
            raise RuntimeError("cannot load the stand-in")
        self.loaded.set()
        return METADATA

    def infer(self, images: np.ndarray) -> EngineOutput:
        self.batch_sizes.append(len(images))
        self.infer_gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("engine exploded")
        b = len(images)
        scores = np.zeros((b, K), np.float32)
        scores[:, 0] = images.reshape(b, -1).mean(axis=1) / 255.0
        boxes = np.zeros((b, K, 4), np.float32)
        boxes[:, 0] = (0.25, 0.25, 0.75, 0.75)
        classes = np.zeros((b, K), np.int32)
        classes[:, 0] = 1
        return EngineOutput(np.ones(b, np.int32), boxes, scores, classes)

    def close(self) -> None:
        self.closed = True


def jpeg(value: int = 128, size: tuple[int, int] = (40, 20)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(out, format="PNG")  # PNG: exact pixel values
    return out.getvalue()


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "stand-in.onnx"
    path.write_bytes(b"")
    return path


@pytest.fixture()
def engine() -> StandInEngine:
    return StandInEngine()


@pytest.fixture()
def client(model_file: Path, engine: StandInEngine) -> Iterator[TestClient]:
    settings = Settings(
        grpc_port=0, model=model_file, max_batch_size=4, max_body_bytes=50_000, max_image_pixels=100_000
    )
    app = create_app(settings, registry=CollectorRegistry(), engine_factory=lambda: engine)
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


def wait_ready(client: TestClient) -> None:
    for _ in range(500):
        if client.get("/readyz").status_code == 200:
            return
        threading.Event().wait(0.01)
    raise AssertionError(client.get("/readyz").json())


def sample(client: TestClient, name: str, labels: dict[str, str] | None = None) -> float:
    value = client.app.state.metrics.registry.get_sample_value(name, labels or {})  # type: ignore[attr-defined]
    return 0.0 if value is None else value


def test_detect_returns_detections_in_original_pixels(client: TestClient) -> None:
    response = client.post("/detect", files={"image": ("grey.png", jpeg(128), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["width"], body["height"]) == ("stand-in", 40, 20)
    (detection,) = body["detections"]
    assert detection["class_id"] == 1 and detection["label"] == "grey"
    assert detection["score"] == pytest.approx(128 / 255, abs=1e-5)
    assert detection["box"] == {"x1": 10.0, "y1": 5.0, "x2": 30.0, "y2": 15.0}
    assert set(body["timings_ms"]) == {"decode", "queue", "inference", "total"}


def test_raw_body_and_query_options(client: TestClient) -> None:
    raw = client.post("/detect", content=jpeg(200), headers={"content-type": "image/png"})
    assert raw.status_code == 200 and len(raw.json()["detections"]) == 1
    high = client.post("/detect?score_threshold=0.9", content=jpeg(200), headers={"content-type": "image/png"})
    assert high.json()["detections"] == []  # 200 / 255 = 0.78 < 0.9


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("score_threshold=0.01", "0.05"),
        ("score_threshold=1.5", "less than or equal"),
        ("max_detections=0", "greater"),
        ("max_detections=4", "model's 3"),
        ("score_threshold=abc", "valid number"),
    ],
)
def test_bad_query_parameters_are_422(client: TestClient, query: str, fragment: str) -> None:
    response = client.post(f"/detect?{query}", content=jpeg(), headers={"content-type": "image/png"})
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error" and fragment in response.json()["detail"]
    assert sample(client, "ssd_rejected_requests_total", {"reason": "validation_error"}) == 1


@pytest.mark.parametrize(
    ("kwargs", "status", "error"),
    [
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty_body"),
        ({"content": b"not an image", "headers": {"content-type": "image/jpeg"}}, 400, "invalid_image"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"files": {"picture": ("a.png", b"x", "image/png")}}, 422, "missing_field"),
        ({"content": b"x" * 60_000, "headers": {"content-type": "image/png"}}, 413, "payload_too_large"),
        ({"content": jpeg(size=(400, 300)), "headers": {"content-type": "image/png"}}, 413, "image_too_large"),
    ],
)
def test_bad_input_gets_a_json_error_and_the_server_stays_ready(
    client: TestClient, kwargs: dict[str, object], status: int, error: str
) -> None:
    response = client.post("/detect", **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    assert response.json()["error"] == error and response.json()["detail"]
    assert client.get("/readyz").status_code == 200
    assert client.post("/detect", content=jpeg(), headers={"content-type": "image/png"}).status_code == 200


def test_engine_failure_is_a_500_and_the_next_request_works(client: TestClient, engine: StandInEngine) -> None:
    engine.fail_next = True
    failed = client.post("/detect", content=jpeg(), headers={"content-type": "image/png"})
    assert failed.status_code == 500 and failed.json()["error"] == "engine_error"
    assert "engine exploded" in failed.json()["detail"]
    assert client.post("/detect", content=jpeg(), headers={"content-type": "image/png"}).status_code == 200


def test_batch_isolates_a_bad_image(client: TestClient) -> None:
    files = [
        ("images", ("a.png", jpeg(100), "image/png")),
        ("images", ("b.png", b"junk", "image/png")),
        ("images", ("c.png", jpeg(50), "image/png")),
    ]
    response = client.post("/detect/batch", files=files)
    assert response.status_code == 200, response.text
    first, bad, third = response.json()["results"]
    assert first["detections"][0]["score"] == pytest.approx(100 / 255, abs=1e-5)
    assert bad == {"error": "invalid_image", "detail": bad["detail"], "status": 400}
    assert third["detections"][0]["score"] == pytest.approx(50 / 255, abs=1e-5)
    assert sample(client, "ssd_rejected_requests_total", {"reason": "invalid_image"}) == 1


def test_batch_needs_multipart(client: TestClient) -> None:
    response = client.post("/detect/batch", content=jpeg(), headers={"content-type": "image/png"})
    assert response.status_code == 415


def test_model_info(client: TestClient) -> None:
    info = client.get("/v1/model").json()
    assert info["name"] == "stand-in" and info["labels"] == ["background", "grey"]
    assert info["input_size"] == [8, 8] and info["max_detections"] == K and info["score_threshold"] == 0.05
    assert info["engine"] == "onnxruntime" and info["max_batch_size"] == 4


def test_warm_up_covers_the_batch_sizes(client: TestClient, engine: StandInEngine) -> None:
    assert engine.batch_sizes[:3] == [1, 2, 4]


def test_metrics_count_requests_by_endpoint_and_code(client: TestClient) -> None:
    for _ in range(3):
        client.post("/detect", content=jpeg(), headers={"content-type": "image/png"})
    client.post("/detect", content=b"hello", headers={"content-type": "text/plain"})
    client.get("/nowhere")
    assert sample(client, "ssd_requests_total", {"endpoint": "/detect", "code": "200"}) == 3
    assert sample(client, "ssd_requests_total", {"endpoint": "/detect", "code": "415"}) == 1
    assert sample(client, "ssd_requests_total", {"endpoint": "other", "code": "404"}) == 1
    assert sample(client, "ssd_request_duration_seconds_count", {"endpoint": "/detect"}) == 4
    served = {"model": "stand-in"}  # the file's name (stand-in.onnx)
    assert sample(client, "ssd_images_processed_total", served) == 3  # warm-up batches are not served images
    assert sample(client, "ssd_decode_duration_seconds_count", served) == 3
    assert sample(client, "ssd_requests_in_flight") == 0
    assert sample(client, "ssd_model_info", {"model": "stand-in", "engine": "onnxruntime", "input_size": "8x8"}) == 1
    text = client.get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")


def test_docs_describe_the_responses(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"DetectResponse", "BatchResponse", "ModelInfo", "ErrorResponse"} <= set(schema["components"]["schemas"])
    detect = schema["paths"]["/detect"]["post"]
    assert (
        "multipart/form-data" in detect["requestBody"]["content"] and "image/jpeg" in detect["requestBody"]["content"]
    )
    assert {"200", "400", "413", "415", "422", "503"} <= set(detect["responses"])


def test_not_ready_while_loading_then_ready(model_file: Path, engine: StandInEngine) -> None:
    engine.release.clear()
    app = create_app(
        Settings(grpc_port=0, model=model_file, max_batch_size=2),
        registry=CollectorRegistry(),
        engine_factory=lambda: engine,
    )
    with TestClient(app) as client:
        loading = client.get("/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert client.get("/healthz").status_code == 200
        refused = client.post("/detect", content=jpeg(), headers={"content-type": "image/png"})
        assert refused.status_code == 503 and refused.json()["error"] == "not_ready" and refused.headers["retry-after"]
        engine.release.set()
        wait_ready(client)
        assert client.post("/detect", content=jpeg(), headers={"content-type": "image/png"}).status_code == 200
    assert engine.closed


def test_a_failed_load_is_reported_and_signalled(model_file: Path, engine: StandInEngine) -> None:
    engine.fail_load = True
    reasons: list[str] = []
    app = create_app(
        Settings(grpc_port=0, model=model_file),
        registry=CollectorRegistry(),
        engine_factory=lambda: engine,
        on_load_failure=reasons.append,
    )
    with TestClient(app) as client:
        for _ in range(500):
            if reasons:
                break
            threading.Event().wait(0.01)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "cannot load the stand-in" in ready.json()["detail"]
        assert client.get("/healthz").status_code == 503
    assert reasons and "cannot load" in reasons[0]


def test_a_missing_model_file_fails_the_load(tmp_path: Path) -> None:
    reasons: list[str] = []
    app = create_app(
        Settings(grpc_port=0, model=tmp_path / "absent.onnx"),
        registry=CollectorRegistry(),
        on_load_failure=reasons.append,
    )
    with TestClient(app):
        for _ in range(500):
            if reasons:
                break
            threading.Event().wait(0.01)
    assert reasons and "model file not found" in reasons[0]


def test_the_fast_json_encoder_writes_what_the_standard_one_writes() -> None:
    import json

    from server.app import _dumps, _dumps_stdlib

    body = {
        "model": "ssd_mobilenet_v1_coco",
        "width": 640,
        "height": 480,
        "detections": [
            {
                "class_id": 16,
                "label": "cat é",
                "score": 0.644933,
                "box": {"x1": 54.54, "y1": 0.0, "x2": 1e-05, "y2": 600.0},
            }
        ],
        "timings_ms": {"decode": 3.125, "queue": 0.06, "inference": 20.5, "total": 25.0},
    }
    assert json.loads(_dumps(body)) == json.loads(_dumps_stdlib(body)) == body  # (1e-05 vs 1e-5: same value)


def test_a_request_that_waited_too_long_is_504_and_never_inferred(model_file: Path, engine: StandInEngine) -> None:
    # One instance: the second request queues behind the first's batch.
    settings = Settings(grpc_port=0, model=model_file, max_batch_size=1, request_timeout_ms=100, warmup=False,
                        instances=1)
    app = create_app(settings, registry=CollectorRegistry(), engine_factory=lambda: engine)
    with TestClient(app) as client:
        wait_ready(client)
        engine.infer_gate.clear()  # the first request's batch blocks in the engine
        answers: dict[str, int] = {}

        def send(name: str, value: int) -> None:
            response = client.post("/detect", content=jpeg(value), headers={"content-type": "image/png"})
            answers[name] = response.status_code

        first = threading.Thread(target=send, args=("first", 10))
        first.start()
        for _ in range(500):
            if engine.batch_sizes:
                break
            threading.Event().wait(0.01)
        second = threading.Thread(target=send, args=("second", 20))
        second.start()
        threading.Event().wait(0.4)  # the second waits in the queue past its 100 ms
        engine.infer_gate.set()
        first.join(10)
        second.join(10)
        # The deadline counts from arrival and covers the engine too: the first is answered 504 at its deadline
        # while its batch is still blocked (the result is dropped), the second never reaches the engine.
        assert answers == {"first": 504, "second": 504}
        assert engine.batch_sizes == [1]  # the late one never reached the engine
        assert sample(client, "ssd_rejected_requests_total", {"reason": "timeout"}) == 2
