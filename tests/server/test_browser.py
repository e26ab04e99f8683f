"""The demo page, the offline docs and CORS, in headless Chromium (Debian's, driven by Playwright) against the
real server: upload a real photo, compare the rows and the canvas with /detect, move the slider, no console
errors, no request leaving 127.0.0.1. A screenshot of the page goes to test-artifacts/ (the CI artefact);
with UPDATE_DEMO_SCREENSHOT=1 it also refreshes docs/demo.png, the README's picture.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from server.__main__ import load_settings
from server.annotate import Style, pixel_box
from server.browser import cors_origins
from server.testing import REPO_ROOT, ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CATS = REPO_ROOT.parent / "shared" / "data" / "images" / "cats_and_dogs.jpg"
ARTIFACTS = REPO_ROOT / "test-artifacts"
SCREENSHOT = REPO_ROOT / "docs" / "demo.png"
TIMEOUT_MS = 60_000



@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (make system-deps installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield instance
        instance.close()


class Watched:
    """A page with every request and every console error recorded."""

    def __init__(self, browser: Any) -> None:
        self.page = browser.new_page(viewport={"width": 1360, "height": 480})
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append((request.method, request.url)))
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def external(self) -> list[str]:
        return [
            url
            for _, url in self.requests
            if urlsplit(url).scheme not in ("data", "blob") and urlsplit(url).hostname != "127.0.0.1"
        ]


@pytest.fixture()
def watched(browser: Any) -> Iterator[Watched]:
    watched = Watched(browser)
    yield watched
    watched.page.close()


def api_detections(server_url: str, data: bytes, threshold: float) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{server_url}/detect",
        files={"image": ("cats.jpg", data, "image/jpeg")},
        params={"score_threshold": threshold},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()["detections"]


def page_rows(page: Any) -> list[dict[str, Any]]:
    """The detection list as shown: one child per detection, with the values the page was given."""
    return page.get_by_test_id("detections").evaluate(
        """list => [...list.children].map(row => ({
            label: row.dataset.label, class_id: Number(row.dataset.classId),
            score: Number(row.dataset.score), box: JSON.parse(row.dataset.box),
            text: row.textContent}))"""
    )


def as_api(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: row[key] for key in ("class_id", "label", "score", "box")} for row in rows]


def threshold(page: Any) -> float:
    return float(page.get_by_test_id("threshold").input_value())


def canvas_pixels(page: Any) -> np.ndarray:
    url = page.get_by_test_id("canvas").evaluate("canvas => canvas.toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def open_demo(watched: Watched, server_url: str) -> Any:
    page = watched.page
    page.goto(f"{server_url}/")
    page.get_by_test_id("model").filter(has_text="ssd_mobilenet_v1_coco").wait_for()
    return page


def wait_for_result(page: Any) -> None:
    page.get_by_test_id("status").filter(has_text="round trip").wait_for()


def test_demo_page_matches_the_api(watched: Watched, server_url: str) -> None:
    data = CATS.read_bytes()
    page = open_demo(watched, server_url)
    page.get_by_test_id("file").set_input_files(CATS)
    wait_for_result(page)

    # The rows shown are /detect's detections at the page's threshold, in order, with the same values.
    start = threshold(page)
    assert start == 0.5
    rows = page_rows(page)
    assert as_api(rows) == api_detections(server_url, data, start)
    assert rows and all(row["label"] in row["text"] for row in rows)
    assert page.get_by_test_id("count").text_content() == str(len(rows))
    timings = page.get_by_test_id("timings").locator("dd")
    assert timings.count() == 4 and all(text.endswith(" ms") for text in timings.all_text_contents())

    # The page's one /detect response (score >= the model's floor) decides every count the slider shows.
    posts = [url for method, url in watched.requests if method == "POST"]
    assert posts == [f"{server_url}/detect"]
    everything = api_detections(server_url, data, 0.01)

    slider = page.get_by_test_id("threshold")
    slider.focus()
    for _ in range(20):
        page.keyboard.press("ArrowLeft")
    assert threshold(page) == pytest.approx(0.3)
    lower = page_rows(page)
    assert len(lower) == sum(d["score"] >= threshold(page) for d in everything) > len(rows)
    assert as_api(lower) == api_detections(server_url, data, threshold(page))
    assert page.get_by_test_id("threshold-value").text_content() == "0.30"

    page.keyboard.press("End")
    assert threshold(page) == 1.0 and page_rows(page) == []
    plain = canvas_pixels(page)  # the photo as Chromium decoded it, nothing drawn
    assert plain.shape == (600, 1200, 3)

    page.keyboard.press("Home")
    for _ in range(29):
        page.keyboard.press("ArrowRight")
    assert threshold(page) == pytest.approx(0.3)
    check_canvas(canvas_pixels(page), plain, page_rows(page))
    assert [url for method, url in watched.requests if method == "POST"] == posts  # filtered, never re-sent

    for _ in range(20):
        page.keyboard.press("ArrowRight")
    assert as_api(page_rows(page)) == as_api(rows)
    save_screenshot(page)
    assert watched.errors == []
    assert watched.external() == []


def check_canvas(drawn: np.ndarray, plain: np.ndarray, rows: list[dict[str, Any]]) -> None:
    """The canvas differs from the plain photo only inside the shown boxes, and along each box's outline."""
    height, width = plain.shape[:2]
    line = Style.for_size(width, height).line_width
    union = np.zeros((height, width), bool)
    changed = np.any(drawn != plain, axis=2)
    for row in rows:
        left, top, right, bottom = pixel_box(row["box"], width, height)  # type: ignore[misc]
        union[top : bottom + 1, left : right + 1] = True
        left_edge = changed[top + line * 2 : bottom - line, left + 1 : left + 1 + line]  # fractional x1
        assert left_edge.mean() > 0.5, row
    assert not changed[~union].any(), f"{int(changed[~union].sum())} canvas pixels changed outside the boxes"


def save_screenshot(page: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "demo.png"
    page.screenshot(path=str(shot))
    assert Image.open(shot).size == (1360, 480)
    if os.environ.get("UPDATE_DEMO_SCREENSHOT") == "1":  # the README's picture, kept small (256 colours)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        Image.open(shot).convert("RGB").quantize(256).save(SCREENSHOT, optimize=True)


def test_drop_an_image_and_refuse_a_non_image(watched: Watched, server_url: str) -> None:
    page = open_demo(watched, server_url)
    files = page.evaluate_handle(
        """b64 => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "cats.jpg", {type: "image/jpeg"}));
            return transfer;
        }""",
        base64.b64encode(CATS.read_bytes()).decode(),
    )
    page.get_by_test_id("drop").dispatch_event("drop", {"dataTransfer": files})
    wait_for_result(page)
    assert as_api(page_rows(page)) == api_detections(server_url, CATS.read_bytes(), threshold(page))

    page.get_by_test_id("file").set_input_files({"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"})
    page.locator("[data-testid=status].error").wait_for()
    assert page_rows(page) != []  # the last good result stays
    assert watched.errors == [] and watched.external() == []


def test_docs_render_offline(watched: Watched, server_url: str) -> None:
    page = watched.page
    page.goto(f"{server_url}/docs")
    operations = page.locator(".opblock-summary-path")
    operations.filter(has_text="/detect/annotated").wait_for()
    assert {"/detect", "/detect/batch", "/v1/model"} <= set(operations.all_text_contents())
    page.locator(".opblock-summary-path", has_text="/detect/annotated").click()  # expands, as a reader would
    page.locator(".opblock.is-open").filter(has_text="score_threshold").wait_for()
    loaded = [url for _, url in watched.requests]
    assert f"{server_url}/openapi.json" in loaded and f"{server_url}/docs-assets/swagger-ui-bundle.js" in loaded
    assert watched.external() == [], "/docs asked for resources outside 127.0.0.1"
    assert watched.errors == []
    assert httpx.get(f"{server_url}/redoc").status_code == 404  # ReDoc would load its logo from a CDN


# ------------------------------------------------------------------------------------------ CORS (HTTP level)


@pytest.fixture(scope="module")
def cors_server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory({"cors_origins": "http://app.example, http://other.example:8080", "warmup": False})


def test_cors_allows_the_listed_origins(cors_server: ServerProcess) -> None:
    with httpx.Client(base_url=cors_server.url, timeout=60) as client:
        preflight = client.options(
            "/detect",
            headers={
                "Origin": "http://other.example:8080",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, x-request-id",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://other.example:8080"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        simple = client.get("/v1/model", headers={"Origin": "http://app.example"})
        assert simple.headers["access-control-allow-origin"] == "http://app.example"
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()

        refused = client.options(
            "/detect", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        other = client.get("/v1/model", headers={"Origin": "http://evil.example"})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(server_url: str) -> None:
    response = httpx.get(f"{server_url}/v1/model", headers={"Origin": "http://app.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    preflight = httpx.options(
        f"{server_url}/detect", headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_origins_setting() -> None:
    settings = load_settings(["--cors-origins", "http://a.example, https://b.example:8443,"])
    assert cors_origins(settings.cors_origins) == ["http://a.example", "https://b.example:8443"]
    assert cors_origins(load_settings([]).cors_origins) == []


def test_a_503_at_arrival_carries_the_cors_headers(server_factory: Callable[..., ServerProcess]) -> None:
    """Refused by the server's protocol, before any middleware runs, the 503 still carries what CORSMiddleware
    would add, so a browser sees the 503 and its Retry-After instead of a CORS failure."""
    srv = server_factory({"cors_origins": "http://app.example", "warmup": False, "max_in_flight": 1})
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as holder, httpx.Client(base_url=srv.url) as client:
        holder.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 999\r\n\r\n")
        deadline = time.monotonic() + 10
        while "ssd_images_in_flight 1.0" not in client.get("/metrics").text:  # the one slot held
            assert time.monotonic() < deadline, "the holder was not admitted"
            time.sleep(0.05)
        image = {"content-type": "image/jpeg"}
        allowed = client.post("/detect", content=b"x" * 100, headers={**image, "Origin": "http://app.example"})
        other = client.post("/detect", content=b"x" * 100, headers={**image, "Origin": "http://evil.example"})
    assert allowed.status_code == 503 and allowed.json()["error"] == "overloaded"
    assert allowed.headers["access-control-allow-origin"] == "http://app.example"
    assert "x-request-id" in allowed.headers["access-control-expose-headers"].lower()
    assert allowed.headers["vary"] == "Origin"
    assert other.status_code == 503 and "access-control-allow-origin" not in other.headers


def _reply(sock: socket.socket) -> dict[str, str]:
    """Status line and headers of the one answer before the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = (line.partition(":") for line in head[1:])
    return {"status": head[0], **{name.strip().lower(): value.strip() for name, _, value in fields}}


def test_the_protocols_own_answers_carry_the_cors_headers(server_factory: Callable[..., ServerProcess]) -> None:
    """A slow body's 408, oversized headers' 431 and the 503 over the connection limit are written by the server's
    protocol, outside every middleware; to a request whose headers were read they still carry CORSMiddleware's
    headers, so a browser sees the status instead of a CORS failure."""
    srv = server_factory({"cors_origins": "http://app.example", "warmup": False, "client_timeout_s": 1,
                          "max_header_bytes": 2048, "max_connections": 3})
    host, port = srv.url.removeprefix("http://").split(":")
    origin = "Origin: http://app.example\r\n"

    def connect() -> socket.socket:
        return socket.create_connection((host, int(port)), timeout=30)

    with connect() as sock:  # headers whole, the body never comes
        sock.sendall(f"POST /detect HTTP/1.1\r\nHost: x\r\n{origin}Content-Type: image/jpeg\r\n"
                     "Content-Length: 999\r\n\r\nabc".encode())
        slow = _reply(sock)
    with connect() as sock:  # in one piece, over the bound
        sock.sendall(f"GET /v1/model HTTP/1.1\r\nHost: x\r\n{origin}X-Big: {'a' * 3000}\r\n\r\n".encode())
        big = _reply(sock)
    with connect(), connect(), connect() as third:  # at the bound of 3 connections
        third.sendall(f"GET /v1/model HTTP/1.1\r\nHost: x\r\n{origin}\r\n".encode())
        crowded = _reply(third)
    for reply, status in ((slow, "408"), (big, "431"), (crowded, "503")):
        assert reply["status"].split()[1] == status, reply
        assert reply["access-control-allow-origin"] == "http://app.example", reply
        assert reply["vary"] == "Origin" and reply["connection"] == "close"
    assert httpx.get(f"{srv.url}/healthz").status_code == 200
