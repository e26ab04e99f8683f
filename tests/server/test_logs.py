"""--log-format json against the real server: every log line is one JSON object (uvicorn's too), access lines
carry request id, endpoint, status, latency and image size; the text format and the formatter in-process."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from server.__main__ import main
from server.logs import TEXT_FORMAT, JsonFormatter, RequestIdFilter
from server.requestid import RequestIdMiddleware
from server.testing import REPO_ROOT, ServerProcess

CATS = REPO_ROOT.parent / "shared" / "data" / "images" / "cats_and_dogs.jpg"


@pytest.fixture(scope="module")
def json_server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory({"log_format": "json", "access_log": True, "warmup": False})


def json_lines(server: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def access_entry(server: ServerProcess, request_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in json_lines(server):
            if entry["logger"] == "server.access" and entry.get("request_id") == request_id:
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}:\n{server.log()[-3000:]}")


def test_every_line_is_json(json_server: ServerProcess) -> None:
    httpx.get(f"{json_server.url}/healthz", timeout=60)
    lines = [line for line in json_server.log().splitlines() if line.strip()]
    assert lines
    entries = [json.loads(line) for line in lines]  # raises on any line that is not one JSON object
    assert all({"ts", "level", "logger", "message"} <= set(entry) for entry in entries)
    started = [entry for entry in entries if "Uvicorn running on" in entry["message"]]
    assert started and started[0]["logger"] == "uvicorn.error" and started[0]["level"] == "info"
    assert any(entry["logger"] == "server.pipeline" and entry["message"].startswith("ready") for entry in entries)


def test_access_lines_carry_the_request(json_server: ServerProcess) -> None:
    data = CATS.read_bytes()
    ok = httpx.post(
        f"{json_server.url}/detect/annotated",
        files={"image": ("cats.jpg", data, "image/jpeg")},
        headers={"x-request-id": "json-ok"},
        timeout=60,
    )
    assert ok.status_code == 200
    entry = access_entry(json_server, "json-ok")
    assert (entry["method"], entry["path"], entry["endpoint"], entry["status"]) == (
        "POST",
        "/detect/annotated",
        "/detect/annotated",
        200,
    )
    assert entry["images"] == ["1200x600"] and entry["body_bytes"] > len(data)
    assert 0 < entry["latency_ms"] < 60_000 and entry["client"] == "127.0.0.1"

    bad = httpx.post(f"{json_server.url}/detect", content=b"nope", headers={"content-type": "image/png"}, timeout=60)
    entry = access_entry(json_server, bad.json()["request_id"])
    assert (entry["endpoint"], entry["status"], entry["images"], entry["body_bytes"]) == ("/detect", 400, [], 4)

    other = httpx.get(f"{json_server.url}/some/where", timeout=60)
    assert access_entry(json_server, other.headers["x-request-id"])["endpoint"] == "other"


def test_batch_reports_every_image(json_server: ServerProcess) -> None:
    data = CATS.read_bytes()
    files = [("images", ("a.jpg", data, "image/jpeg")), ("images", ("b.jpg", data, "image/jpeg"))]
    headers = {"x-request-id": "batch-2"}
    response = httpx.post(f"{json_server.url}/detect/batch", files=files, headers=headers, timeout=60)
    assert response.status_code == 200
    assert access_entry(json_server, "batch-2")["images"] == ["1200x600", "1200x600"]


def test_a_refusal_at_arrival_has_its_access_line(server_factory: Callable[..., ServerProcess]) -> None:
    """Refused by the protocol before any ASGI work (server.connections), a 503 is still logged like the rest."""
    full = server_factory(
        {"log_format": "json", "access_log": True, "warmup": False, "max_in_flight": 1, "max_batch_size": 1}
    )
    host, port = full.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as holder:  # admitted; its body never comes
        holder.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 9999\r\n\r\n")
        deadline = time.monotonic() + 10
        while "ssd_images_in_flight 1.0" not in httpx.get(f"{full.url}/metrics", timeout=30).text:
            assert time.monotonic() < deadline, "the holding request was not admitted"
            time.sleep(0.05)
        refused = httpx.post(
            f"{full.url}/detect", content=CATS.read_bytes(), headers={"x-request-id": "refused-1"}, timeout=30
        )
    assert refused.status_code == 503 and refused.json()["request_id"] == "refused-1"
    entry = access_entry(full, "refused-1")
    assert (entry["method"], entry["endpoint"], entry["status"], entry["body_bytes"]) == ("POST", "/detect", 503, 0)


# ------------------------------------------------------------------------------------------ in-process


class Capture(logging.Handler):
    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.addFilter(RequestIdFilter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def run_request(handler: logging.Handler, request_id: str | None) -> None:
    """One request through RequestIdMiddleware to an app that logs a warning."""
    logger = logging.getLogger("test.logs.app")
    logger.addHandler(handler)
    logger.propagate = False

    async def app(scope: Any, receive: Any, send: Any) -> None:
        logger.warning("inside the request")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    headers = [(b"x-request-id", request_id.encode())] if request_id else []
    scope = {"type": "http", "method": "GET", "path": "/x", "headers": headers, "client": ("127.0.0.1", 1)}
    middleware = RequestIdMiddleware(app, endpoints=frozenset(), access_log=False)
    try:
        asyncio.run(middleware(scope, receive, send))
        logger.warning("outside any request")
    finally:
        logger.removeHandler(handler)


def test_records_written_in_a_request_carry_its_id() -> None:
    text = Capture(logging.Formatter(TEXT_FORMAT))
    run_request(text, "in-req-1")
    assert text.lines[0].endswith("test.logs.app: inside the request [in-req-1]")
    assert text.lines[1].endswith("test.logs.app: outside any request")

    structured = Capture(JsonFormatter())
    run_request(structured, "in-req-2")
    inside, outside = (json.loads(line) for line in structured.lines)
    assert (inside["request_id"], inside["level"], inside["message"]) == ("in-req-2", "warning", "inside the request")
    assert "request_id" not in outside


def test_log_format_is_checked() -> None:
    assert main(["--log-format", "yaml"]) == 2
