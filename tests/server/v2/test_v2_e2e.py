"""KServe v2 end to end: a REAL server process serving two models (the default COCO model and an SSDlite320
export with random weights), driven by tritonclient over HTTP and gRPC, compared with /detect on real photos.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
import tritonclient.http.aio as thttp_aio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from server.preprocess import preprocess
from server.settings import DEFAULT_MODEL_NAME, DEFAULT_MODEL_PATH
from server.testing import REPO_ROOT, ServerProcess, free_port

pytestmark = pytest.mark.slow

DATA = REPO_ROOT.parent / "shared" / "data"
CATS = DATA / "images" / "cats_and_dogs.jpg"
PHOTOS = [CATS, *sorted((DATA / "voc2012_sample" / "JPEGImages").glob("*.jpg"))[:5]]
SECOND = "ssdlite320_mobilenet_v3_large"
MAX_IMAGES = 8
BATCH_DELAY_MS = 500  # a batch waits this long only while more images are being decoded: mixed loads share batches


@pytest.fixture(scope="session")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SSDlite320 exported with random weights (no --weights: the exporter warns and goes on)."""
    out = tmp_path_factory.mktemp("second-model") / f"{SECOND}.onnx"
    command = [sys.executable, "-m", "model_export", "--model", SECOND, "--out", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and out.is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def v2_server(server_factory: Callable[..., ServerProcess], second_model: Path) -> ServerProcess:
    return server_factory(
        {
            "model": f"{DEFAULT_MODEL_PATH},{second_model}",
            "grpc_port": free_port(),
            "max_queue_delay_ms": BATCH_DELAY_MS,
            "max_images_per_request": MAX_IMAGES,
        }
    )


@pytest.fixture(scope="session")
def http_client(v2_server: ServerProcess) -> Iterator[thttp.InferenceServerClient]:
    client = thttp.InferenceServerClient(v2_server.url.removeprefix("http://"), network_timeout=300.0)
    yield client
    client.close()


@pytest.fixture(scope="session")
def grpc_client(v2_server: ServerProcess) -> Iterator[tgrpc.InferenceServerClient]:
    assert v2_server.grpc_address, v2_server.log()[-2000:]
    client = tgrpc.InferenceServerClient(v2_server.grpc_address)
    yield client
    client.close()


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_client")


def module(client: Any) -> Any:
    return thttp if isinstance(client, thttp.InferenceServerClient) else tgrpc


def encoded(client: Any, *files: bytes) -> Any:
    tensor = module(client).InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object))
    return tensor


def pixels(client: Any, array: np.ndarray) -> Any:
    tensor = module(client).InferInput("images", list(array.shape), "UINT8")
    tensor.set_data_from_numpy(array)
    return tensor


def detect(server: ServerProcess, data: bytes, **params: object) -> dict[str, Any]:
    response = httpx.post(
        f"{server.url}/detect", params=params, content=data, headers={"content-type": "image/jpeg"}, timeout=300
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def assert_same_as_detect(body: dict[str, Any], result: Any, index: int) -> None:
    """v2 outputs of image `index` == /detect's detections: same classes, scores, boxes within 0.5 px."""
    width, height = body["width"], body["height"]
    n = int(result.as_numpy("num_detections")[index])
    assert n == len(body["detections"])
    boxes = result.as_numpy("boxes")[index, :n] * np.array([width, height, width, height])
    expected = np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in body["detections"]]).reshape(-1, 4)
    np.testing.assert_allclose(boxes, expected, atol=0.5)
    assert result.as_numpy("classes")[index, :n].tolist() == [d["class_id"] for d in body["detections"]]
    np.testing.assert_allclose(
        result.as_numpy("scores")[index, :n], [d["score"] for d in body["detections"]], atol=2e-6
    )
    assert not result.as_numpy("scores")[index, n:].any()


# ---------------------------------------------------------------------------------------------- health, metadata


def test_live_ready_and_model_ready(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    for name in (DEFAULT_MODEL_NAME, SECOND):
        assert client.is_model_ready(name) and client.is_model_ready(name, "1")


def test_server_metadata(http_client: thttp.InferenceServerClient, grpc_client: tgrpc.InferenceServerClient) -> None:
    assert http_client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    metadata = grpc_client.get_server_metadata()
    assert (metadata.name, list(metadata.extensions)) == ("ssd-serve", ["binary_tensor_data"])


def test_model_metadata_names_the_interface(
    http_client: thttp.InferenceServerClient, grpc_client: tgrpc.InferenceServerClient
) -> None:
    for name, size in ((DEFAULT_MODEL_NAME, 300), (SECOND, 320)):
        body = http_client.get_model_metadata(name)
        assert (body["name"], body["versions"], body["platform"]) == (name, ["1"], "onnxruntime_onnx")
        assert body["inputs"] == [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "images", "datatype": "UINT8", "shape": [-1, size, size, 3]},
        ]
        assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [
            ("num_detections", "INT32", [-1]),
            ("boxes", "FP32", [-1, 200, 4]),
            ("scores", "FP32", [-1, 200]),
            ("classes", "INT32", [-1, 200]),
            ("labels", "BYTES", [-1, 200]),
        ]
        message = grpc_client.get_model_metadata(name, "1", as_json=True)
        shape = ["-1", str(size), str(size), "3"]  # int64 as JSON strings
        assert message["inputs"][1] == {"name": "images", "datatype": "UINT8", "shape": shape}
        assert [o["name"] for o in message["outputs"]] == [o["name"] for o in body["outputs"]]


# ---------------------------------------------------------------------------------------------- inference


def test_encoded_images_give_detect_results(client: Any, v2_server: ServerProcess) -> None:
    files = [photo.read_bytes() for photo in PHOTOS]
    result = client.infer(DEFAULT_MODEL_NAME, [encoded(client, *files)])
    assert result.as_numpy("boxes").shape == (len(files), 200, 4)
    assert result.as_numpy("labels") is None  # only when asked for
    for index, data in enumerate(files):
        assert_same_as_detect(detect(v2_server, data), result, index)


def test_pixels_at_the_input_size_give_detect_results(client: Any, v2_server: ServerProcess) -> None:
    files = [photo.read_bytes() for photo in PHOTOS[:3]]
    batch = np.stack([preprocess(data, (300, 300)).pixels for data in files])  # what the server feeds the engine
    result = client.infer(DEFAULT_MODEL_NAME, [pixels(client, batch)])
    for index, data in enumerate(files):
        assert_same_as_detect(detect(v2_server, data), result, index)


def test_parameters_and_labels_as_on_detect(client: Any, v2_server: ServerProcess) -> None:
    data = CATS.read_bytes()
    outputs = [module(client).InferRequestedOutput(name) for name in ("labels", "num_detections", "scores")]
    result = client.infer(
        DEFAULT_MODEL_NAME,
        [encoded(client, data)],
        outputs=outputs,
        parameters={"score_threshold": 0.5, "max_detections": 3},
    )
    body = detect(v2_server, data, score_threshold=0.5, max_detections=3)
    n = int(result.as_numpy("num_detections")[0])
    assert n == len(body["detections"]) == 3
    assert [label.decode() for label in result.as_numpy("labels")[0, :n]] == [d["label"] for d in body["detections"]]
    assert set(result.as_numpy("labels")[0, n:].tolist()) == {b""}
    assert result.as_numpy("boxes") is None and result.get_response() is not None


def test_json_tensors_without_the_binary_extension(v2_server: ServerProcess) -> None:
    """A client that speaks plain JSON both ways (the protocol's core, no binary extension)."""
    array = preprocess(CATS.read_bytes(), (300, 300)).pixels
    request = {
        "id": "json-1",
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 300, 300, 3], "data": array.tolist()}],
        "outputs": [{"name": "num_detections"}, {"name": "classes"}],
        "parameters": {"score_threshold": 0.5},
    }
    response = httpx.post(f"{v2_server.url}/v2/models/{DEFAULT_MODEL_NAME}/infer", json=request, timeout=300)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (DEFAULT_MODEL_NAME, "1", "json-1")
    count, classes = body["outputs"]
    detections = detect(v2_server, CATS.read_bytes(), score_threshold=0.5)["detections"]
    assert count == {"name": "num_detections", "datatype": "INT32", "shape": [1], "data": [len(detections)]}
    assert classes["data"][: len(detections)] == [d["class_id"] for d in detections]


def test_the_second_model_over_every_front_end(client: Any, v2_server: ServerProcess) -> None:
    """Random weights, so no particular detections: the same ones over /detect?model= and v2, and a 320 input."""
    data = CATS.read_bytes()
    body = detect(v2_server, data, model=SECOND, score_threshold=0.01)
    result = client.infer(SECOND, [encoded(client, data)])
    assert_same_as_detect(body, result, 0)
    batch = np.stack([preprocess(data, (320, 320)).pixels] * 2)
    result = client.infer(SECOND, [pixels(client, batch)], model_version="1")
    assert_same_as_detect(body, result, 1)
    listed = httpx.get(f"{v2_server.url}/v1/models").json()
    assert [(m["name"], m["input_size"]) for m in listed] == [(DEFAULT_MODEL_NAME, [300, 300]), (SECOND, [320, 320])]
    assert httpx.get(f"{v2_server.url}/v1/model", params={"model": SECOND}).json()["name"] == SECOND


def test_mixed_v2_and_detect_requests_share_batches(v2_server: ServerProcess) -> None:
    """16 /detect + 8 HTTP-v2 + 8 gRPC single-image requests at once: a batch of more than 16 images holds
    requests of at least two front ends (the batch-size metric of the model)."""
    photos = [photo.read_bytes() for photo in PHOTOS]
    before = batch_metrics(v2_server)

    async def load() -> None:
        async with httpx.AsyncClient(base_url=v2_server.url, timeout=300) as web:
            grpc_aio = tgrpc_aio.InferenceServerClient(v2_server.grpc_address)
            # tritonclient's asyncio HTTP client: its gevent one cannot be shared by threads (greenlet errors)
            http_aio = thttp_aio.InferenceServerClient(v2_server.url.removeprefix("http://"))
            try:
                jobs = [
                    web.post("/detect", content=photos[i % len(photos)], headers={"content-type": "image/jpeg"})
                    for i in range(16)
                ]
                jobs += [
                    grpc_aio.infer(DEFAULT_MODEL_NAME, [encoded_grpc(photos[i % len(photos)])]) for i in range(8)
                ]
                jobs += [http_aio.infer(DEFAULT_MODEL_NAME, [encoded_http(photos[i % len(photos)])]) for i in range(8)]
                results = await asyncio.gather(*jobs)
            finally:
                await grpc_aio.close()
                await http_aio.close()
        for response in results[:16]:
            assert response.status_code == 200, response.text
        for result in results[16:]:
            assert result.as_numpy("num_detections")[0] > 0

    asyncio.run(load())
    after = batch_metrics(v2_server)
    batches, images = after["count"] - before["count"], after["sum"] - before["sum"]
    upto16 = after["16.0"] - before["16.0"]
    assert images == 32
    assert upto16 < batches, f"no batch held more than 16 images ({batches} batches)"


def encoded_http(data: bytes) -> thttp.InferInput:
    tensor = thttp.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=object))
    return tensor


def encoded_grpc(data: bytes) -> tgrpc.InferInput:
    tensor = tgrpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=object))
    return tensor


def batch_metrics(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "ssd_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("model") != DEFAULT_MODEL_NAME:
                continue
            if sample.name.endswith("_count"):
                values["count"] = sample.value
            elif sample.name.endswith("_sum"):
                values["sum"] = sample.value
            elif sample.name.endswith("_bucket"):
                values[sample.labels["le"]] = sample.value
    return values


# ---------------------------------------------------------------------------------------------- bad input


def expect_error(call: Callable[[], object], http_status: str, grpc_status: str, match: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() in (http_status, f"StatusCode.{grpc_status}"), caught.value
    assert match in caught.value.message(), caught.value.message()


@pytest.mark.parametrize(
    ("make", "http_status", "grpc_status", "match"),
    [
        pytest.param(
            lambda m: m.InferInput("image", [1], "FP32"), "400", "INVALID_ARGUMENT", "must be BYTES", id="datatype"
        ),
        pytest.param(
            lambda m: m.InferInput("images", [1, 200, 200, 3], "UINT8"), "400", "INVALID_ARGUMENT", "[N, 300, 300, 3]",
            id="shape",
        ),
        pytest.param(
            lambda m: m.InferInput("pixels", [1], "BYTES"), "400", "INVALID_ARGUMENT", "unknown input", id="name"
        ),
    ],
)
def test_a_tensor_that_does_not_fit_is_refused(
    client: Any, make: Callable[..., object], http_status: str, grpc_status: str, match: str
) -> None:
    tensor = make(module(client))
    datatype, shape = tensor.datatype(), tensor.shape()
    if datatype == "BYTES":
        tensor.set_data_from_numpy(np.array([b"x"] * int(np.prod(shape)), dtype=object).reshape(shape))
    else:
        dtype = np.float32 if datatype == "FP32" else np.uint8
        tensor.set_data_from_numpy(np.zeros(shape, dtype=dtype))
    expect_error(lambda: client.infer(DEFAULT_MODEL_NAME, [tensor]), http_status, grpc_status, match)


def test_bad_elements_requests_and_names_are_refused(client: Any) -> None:
    good = CATS.read_bytes()
    infer = client.infer
    expect_error(
        lambda: infer(DEFAULT_MODEL_NAME, [encoded(client, good, b"not an image")]),
        "400",
        "INVALID_ARGUMENT",
        "element 1 of input 'image'",
    )
    expect_error(
        lambda: infer(DEFAULT_MODEL_NAME, [encoded(client, *[good] * (MAX_IMAGES + 1))]),
        "413",
        "INVALID_ARGUMENT",
        f"the limit is {MAX_IMAGES}",
    )
    expect_error(lambda: infer("nope", [encoded(client, good)]), "404", "NOT_FOUND", "no model named 'nope'")
    expect_error(
        lambda: infer(DEFAULT_MODEL_NAME, [encoded(client, good)], model_version="2"), "404", "NOT_FOUND", "version"
    )
    expect_error(lambda: client.get_model_metadata("nope"), "404", "NOT_FOUND", "no model")
    expect_error(
        lambda: infer(DEFAULT_MODEL_NAME, [encoded(client, good)], parameters={"score_threshold": 2.0}),
        "400",
        "INVALID_ARGUMENT",
        "score_threshold must be between",
    )
    expect_error(
        lambda: infer(DEFAULT_MODEL_NAME, [encoded(client, good)], parameters={"max_detections": "ten"}),
        "400",
        "INVALID_ARGUMENT",
        "max_detections must be an integer",
    )
    outputs = [module(client).InferRequestedOutput("masks")]
    expect_error(
        lambda: infer(DEFAULT_MODEL_NAME, [encoded(client, good)], outputs=outputs),
        "400",
        "INVALID_ARGUMENT",
        "unknown output 'masks'",
    )
    assert client.is_server_ready()


def raw_infer(server: ServerProcess, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{DEFAULT_MODEL_NAME}/infer", content=body, headers=headers, timeout=60)


def bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


@pytest.mark.parametrize(
    ("header", "declared", "binary", "match"),
    [
        pytest.param("abc", None, b"", "Inference-Header-Content-Length is 'abc'", id="header-not-a-number"),
        pytest.param("99999", None, b"", "within the body", id="header-past-the-body"),
        pytest.param(None, 4096, bytes_element(b"x"), "binary_data_size 4096 does not fit", id="size-past-the-body"),
        pytest.param(None, 7, b"\x40\x00\x00\x00xyz", "runs past the end", id="element-past-its-data"),
        pytest.param(None, 2, b"\x01\x00", "inside an element's 4-byte length", id="cut-length"),
        pytest.param(None, 5, bytes_element(b"x"), "bytes of binary data after", id="trailing-bytes"),
    ],
)
def test_a_malformed_binary_body_is_refused(
    v2_server: ServerProcess, header: str | None, declared: int | None, binary: bytes, match: str
) -> None:
    size = len(binary) if declared is None else declared
    if match == "bytes of binary data after":
        binary += b"junk"
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": size}}
    request = {"inputs": [tensor]}
    text = json.dumps(request).encode()
    response = raw_infer(v2_server, text + binary, {"Inference-Header-Content-Length": header or str(len(text))})
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"} and match in response.json()["error"]


def test_a_body_that_is_not_a_request_is_refused(v2_server: ServerProcess) -> None:
    for body in (b"{not json", b"[]", b'{"inputs": [{"name": "image"}]}'):
        response = raw_infer(v2_server, body, {"content-type": "application/json"})
        assert response.status_code == 400 and "error" in response.json(), response.text
    response = httpx.get(f"{v2_server.url}/v2/models/nope/ready")
    served = f"{DEFAULT_MODEL_NAME}, {SECOND}"
    assert response.status_code == 404 and response.json() == {"error": f"no model named 'nope'; served: {served}"}
    assert httpx.get(f"{v2_server.url}/v2/models/{SECOND}/versions/7").status_code == 404
    response = httpx.post(
        f"{v2_server.url}/detect",
        params={"model": "nope"},
        content=CATS.read_bytes(),
        headers={"content-type": "image/jpeg"},
    )
    assert response.status_code == 404 and response.json()["error"] == "model_not_found"


def test_a_taken_grpc_port_stops_the_server(server_factory: Callable[..., ServerProcess]) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(Exception, match="gRPC"):
            server_factory({"grpc_port": port, "warmup": False}, wait_ready=False)


def test_v2_requests_are_counted_like_http_requests(
    v2_server: ServerProcess, http_client: thttp.InferenceServerClient, grpc_client: tgrpc.InferenceServerClient
) -> None:
    def counts() -> dict[tuple[str, str], float]:
        text = httpx.get(f"{v2_server.url}/metrics").text
        return {
            (s.labels["endpoint"], s.labels["code"]): s.value
            for family in text_string_to_metric_families(text)
            if family.name == "ssd_requests"
            for s in family.samples
            if s.name == "ssd_requests_total"
        }

    before = counts()
    good = CATS.read_bytes()
    http_client.infer(DEFAULT_MODEL_NAME, [encoded(http_client, good)])
    grpc_client.infer(DEFAULT_MODEL_NAME, [encoded(grpc_client, good)])
    with pytest.raises(InferenceServerException):
        grpc_client.infer(DEFAULT_MODEL_NAME, [encoded(grpc_client, b"not an image")])
    after = counts()

    def delta(endpoint: str, code: str) -> float:
        return after.get((endpoint, code), 0.0) - before.get((endpoint, code), 0.0)

    assert delta("/v2/infer", "200") == 1
    assert delta("grpc/ModelInfer", "200") == 1 and delta("grpc/ModelInfer", "400") == 1
