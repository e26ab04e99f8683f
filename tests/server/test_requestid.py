"""X-Request-ID against the real server: echoed or generated, on every response, in error bodies, in the
access log; and the middleware's own rules (which incoming ids are kept)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import httpx
import pytest

from server.requestid import incoming_id, new_id
from server.testing import REPO_ROOT, ServerProcess

CATS = REPO_ROOT.parent / "shared" / "data" / "images" / "cats_and_dogs.jpg"
GENERATED = re.compile(r"[0-9a-f]{32}")
JPEG, JSON = {"content-type": "image/jpeg"}, {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(server_url: str) -> httpx.Client:
    with httpx.Client(base_url=server_url, timeout=120.0) as c:
        yield c  # type: ignore[misc]


@pytest.fixture(scope="module")
def logged(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """A server with the access log on (text format) and a small body limit."""
    return server_factory({"access_log": True, "warmup": False, "max_body_bytes": 100_000})


def wait_for_log(server: ServerProcess, pattern: str, timeout_s: float = 10.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = re.search(pattern, server.log(), re.MULTILINE)
        if match:
            return match
        time.sleep(0.05)
    raise AssertionError(f"no log line matches {pattern!r}:\n{server.log()[-3000:]}")


def test_generated_when_absent(client: httpx.Client) -> None:
    first, second = client.get("/healthz"), client.get("/healthz")
    assert GENERATED.fullmatch(first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_echoed_when_given(client: httpx.Client) -> None:
    response = client.post(
        "/detect", content=CATS.read_bytes(), headers={"content-type": "image/jpeg", "x-request-id": "trace-1.a:b_C"}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-1.a:b_C"
    assert response.headers.get_list("x-request-id") == ["trace-1.a:b_C"]


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "quote\"d", "é"])
def test_unusable_ids_are_replaced(client: httpx.Client, bad: str) -> None:
    response = client.get("/healthz", headers={"x-request-id": bad.encode("utf-8")})
    assert GENERATED.fullmatch(response.headers["x-request-id"])


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "error"),
    [
        ("POST", "/detect", {"content": b"not an image", "headers": JPEG}, 400, "invalid_image"),
        ("POST", "/detect/annotated", {"content": b"", "headers": JPEG}, 400, "empty_body"),
        ("POST", "/detect?score_threshold=7", {"content": b"x", "headers": JPEG}, 422, "validation_error"),
        ("POST", "/detect", {"content": b"{}", "headers": JSON}, 415, "unsupported_media_type"),
        ("GET", "/no/such/page", {}, 404, "not_found"),
        ("GET", "/detect", {}, 405, "method_not_allowed"),
    ],
)
def test_error_bodies_carry_the_id(
    client: httpx.Client, method: str, path: str, kwargs: dict, status: int, error: str  # type: ignore[type-arg]
) -> None:
    headers = {**kwargs.get("headers", {}), "x-request-id": "err-7"}
    given = client.request(method, path, **{**kwargs, "headers": headers})
    assert (given.status_code, given.json()["error"]) == (status, error)
    assert given.json()["request_id"] == "err-7" == given.headers["x-request-id"]
    generated = client.request(method, path, **kwargs)
    assert generated.json()["request_id"] == generated.headers["x-request-id"]


def test_body_limit_413_carries_the_id(logged: ServerProcess) -> None:
    response = httpx.post(
        f"{logged.url}/detect",
        content=b"\xff" * 200_000,
        headers={"content-type": "image/jpeg", "x-request-id": "too-big"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["request_id"] == "too-big" == response.headers["x-request-id"]


def test_access_log_line(logged: ServerProcess) -> None:
    data = CATS.read_bytes()
    response = httpx.post(
        f"{logged.url}/detect",
        files={"image": ("cats.jpg", data, "image/jpeg")},
        headers={"x-request-id": "access-42"},
        timeout=60,
    )
    assert response.status_code == 200
    wait_for_log(logged, r'INFO +server\.access: .*"POST /detect" 200 [\d.]+ ms image 1200x600 \[access-42\]$')
    missing = httpx.get(f"{logged.url}/nowhere", timeout=60)
    wait_for_log(logged, rf'"GET /nowhere" 404 [\d.]+ ms \[{missing.headers["x-request-id"]}\]$')
    assert "HTTP/1.1\" 200" not in logged.log()  # uvicorn's own access line is off: one line per request


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc", True),
        ("A-Z_0.9:x", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("a b", False),
        ("a\tb", False),
    ],
)
def test_incoming_id_rules(given: str, kept: bool) -> None:
    scope = {"type": "http", "headers": [(b"x-request-id", given.encode())]}
    assert (incoming_id(scope) == given) is kept
    assert GENERATED.fullmatch(incoming_id({"type": "http", "headers": []}))


def test_generated_ids_are_distinct_across_refills_and_threads() -> None:
    """new_id draws its randomness 256 ids at a time: ids stay 32 hex digits and distinct across refills, also
    when threads (the gRPC front end's) draw at once."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        ids = [i for chunk in pool.map(lambda _: [new_id() for _ in range(2500)], range(4)) for i in chunk]
    assert len(set(ids)) == len(ids) == 10_000
    assert all(GENERATED.fullmatch(i) for i in ids)
