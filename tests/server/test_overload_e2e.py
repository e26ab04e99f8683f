"""Overload, deadlines, drain and abusive clients, against real `python -m server` processes on 127.0.0.1.

Every loop here is bounded in count and time. Raw sockets are used where a real client library would hide
what is being tested (a body that never comes, a trickle, garbage on the wire).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from server.testing import REPO_ROOT, ServerProcess

DATA = REPO_ROOT.parent / "shared" / "data"
JPEG = (DATA / "images" / "cats_and_dogs.jpg").read_bytes()
FAST = {"warmup": "false"}


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(url: str, name: str, **labels: str) -> float:
    return samples(url).get((name, tuple(sorted(labels.items()))), 0.0)


def address(server: ServerProcess) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def connect(server: ServerProcess, timeout_s: float = 30.0) -> socket.socket:
    return socket.create_connection(address(server), timeout=timeout_s)


def read_reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or the socket times out)."""
    raw = b""
    try:
        while chunk := sock.recv(65536):
            raw += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return raw


def read_response(sock: socket.socket) -> str:
    """One whole response on a kept-alive connection: the head, then content-length bytes of body."""
    raw = b""
    while b"\r\n\r\n" not in raw and (chunk := sock.recv(65536)):
        raw += chunk
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head_bytes.lower().split(b"\r\n") if line.startswith(b"content-length")),
        0,
    )
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return (head_bytes + b"\r\n\r\n" + body).decode(errors="replace")


def head(path: str = "/detect", length: int | None = None, extra: str = "") -> bytes:
    length_header = f"Content-Length: {length}\r\n" if length is not None else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n{length_header}{extra}\r\n").encode()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


@pytest.fixture(scope="module")
def guarded(server_factory: Callable[..., ServerProcess], server: ServerProcess) -> ServerProcess:
    """Two images in flight at most, short client and keep-alive timeouts, small headers (started after the
    session's default server, which made the model)."""
    return server_factory(
        {
            **FAST,
            "max_in_flight": 2,
            "max_batch_size": 1,
            "client_timeout_s": 1.5,
            "keep_alive_timeout_s": 1,
            "max_header_bytes": 8192,
            "max_body_bytes": 2_000_000,
        }
    )


# ------------------------------------------------------------------------------------------ admission


@contextlib.contextmanager
def both_slots_held(guarded: ServerProcess) -> Iterator[None]:
    """Two requests admitted, then waiting for bodies that do not come: admission is full until exit; after it,
    the slots are free again and a request is served."""
    holders = [connect(guarded) for _ in range(2)]
    try:
        for sock in holders:
            sock.sendall(head(length=len(JPEG)) + JPEG[:100])
        wait_for(lambda: metric(guarded.url, "ssd_images_in_flight") == 2, 10, "two requests admitted")
        yield
    finally:
        for sock in holders:
            sock.close()
    wait_for(lambda: metric(guarded.url, "ssd_images_in_flight") == 0, 10, "the slots released")
    ok = httpx.post(f"{guarded.url}/detect", content=JPEG, headers={"content-type": "image/jpeg"}, timeout=60)
    assert ok.status_code == 200


def test_over_the_bound_is_refused_at_once_without_reading_the_body(guarded: ServerProcess) -> None:
    before = metric(guarded.url, "ssd_rejected_requests_total", reason="overloaded")
    with both_slots_held(guarded), connect(guarded) as sock:
        started = time.perf_counter()
        sock.sendall(head(length=1_000_000))  # announces 1 MB, sends none of it
        reply = read_response(sock)
        elapsed = time.perf_counter() - started
    assert reply.startswith("HTTP/1.1 503"), reply
    assert "retry-after: 1" in reply.lower() and '"error":"overloaded"' in reply.replace(" ", "")
    assert elapsed < 1.0, f"the refusal took {elapsed * 1000:.0f} ms"
    assert metric(guarded.url, "ssd_rejected_requests_total", reason="overloaded") == before + 1


def test_a_refusal_at_arrival_is_a_whole_response_on_a_kept_alive_connection(guarded: ServerProcess) -> None:
    """Refused by the protocol itself (server.connections), the 503 still carries what the middleware stack
    adds: the request id, the metrics; the connection stays usable, and the body sent meanwhile is skipped."""
    counted = metric(guarded.url, "ssd_requests_total", endpoint="/detect", code="503")
    with both_slots_held(guarded), connect(guarded) as sock:
        replies = []
        for i in range(3):  # the whole body each time: the next request follows it on the same connection
            sock.sendall(head(length=len(JPEG), extra=f"X-Request-ID: flood-{i}\r\n") + JPEG)
            replies.append(read_response(sock))
        sock.sendall(head(length=len(JPEG), extra="Expect: 100-continue\r\n"))  # no body unless told
        waiting = read_response(sock)
        assert sock.recv(1) == b"", "a refused 100-continue request must close: its body may never come"
    for i, reply in enumerate(replies):
        assert reply.startswith("HTTP/1.1 503"), reply
        assert f"x-request-id: flood-{i}" in reply.lower() and f'"request_id":"flood-{i}"' in reply, reply
        assert "connection: close" not in reply.lower(), reply
    assert waiting.startswith("HTTP/1.1 503") and "connection: close" in waiting.lower(), waiting
    assert metric(guarded.url, "ssd_requests_total", endpoint="/detect", code="503") == counted + 4


def test_pipelined_requests_refused_at_arrival_are_answered_in_order(guarded: ServerProcess) -> None:
    """Two requests in one write while admission is full: the first is refused from its headers and answered
    before the second is read; both answers come, in order, on the kept-alive connection."""
    with both_slots_held(guarded), connect(guarded, timeout_s=10) as sock:
        pipelined = b"".join(head(length=len(JPEG), extra=f"X-Request-ID: pipe-{i}\r\n") + JPEG for i in range(2))
        sock.sendall(pipelined)
        received = b""  # both answers, which may come in one read
        while received.count(b'"request_id":"pipe-') < 2 and (chunk := sock.recv(65536)):
            received += chunk
    replies = received.decode().split("HTTP/1.1 ")[1:]
    assert len(replies) == 2, received
    for i, reply in enumerate(replies):
        assert reply.startswith("503") and f'"request_id":"pipe-{i}"' in reply, reply


@pytest.mark.parametrize(
    ("request_bytes", "closes"),
    [
        pytest.param(
            head(extra="Transfer-Encoding: chunked\r\n") + b"%x\r\n%s\r\n0\r\n\r\n" % (len(JPEG), JPEG),
            False,
            id="chunked",
        ),
        pytest.param(head(length=len(JPEG)).replace(b"HTTP/1.1", b"HTTP/1.0") + JPEG, True, id="http-1.0"),
        pytest.param(head(length=len(JPEG), extra="Connection: close\r\n") + JPEG, True, id="connection-close"),
        pytest.param(head(path="/detect?timeout_ms=900", length=len(JPEG)) + JPEG, False, id="query"),
        pytest.param(head(path="/%64etect", length=len(JPEG)) + JPEG, False, id="percent-encoded"),  # uvicorn's way
        pytest.param(head(path="http://x/detect", length=len(JPEG)) + JPEG, False, id="absolute-form"),  # uvicorn's way
        pytest.param(head(length=len(JPEG)) + JPEG[:1000], False, id="body-still-coming"),
    ],
)
def test_every_form_of_request_is_refused_whole(guarded: ServerProcess, request_bytes: bytes, closes: bool) -> None:
    """Refused from its headers in the protocol, or (what it leaves to uvicorn) by AdmissionMiddleware: the same
    JSON 503, and the connection closed exactly when the request asks for it."""
    with both_slots_held(guarded), connect(guarded, timeout_s=10) as sock:
        sock.sendall(request_bytes)
        reply = read_response(sock)
        sock.settimeout(0.3)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
    assert reply.startswith("HTTP/1.1 503") and '"error":"overloaded"' in reply.replace(" ", ""), reply
    assert closed is closes, reply


def test_refusals_are_answered_at_the_refusal_rate(server_factory: Callable[..., ServerProcess]) -> None:
    """Clients that resend the moment they are refused get their 503s at `refusal_rate` a second in all, each
    waiting its turn, while a request that can be admitted is not held back by them."""
    srv = server_factory({**FAST, "max_in_flight": 1, "refusal_rate": 40, "client_timeout_s": 30})
    holder = connect(srv)
    holder.sendall(head(length=len(JPEG)) + JPEG[:100])  # holds the one slot
    wait_for(lambda: metric(srv.url, "ssd_images_in_flight") == 1, 10, "the slot held")
    body = JPEG[:2000]  # refused from its headers: its content does not matter

    async def resend_when_refused(stop: float) -> list[float]:
        reader, writer = await asyncio.open_connection(*address(srv))
        waits = []
        try:
            while time.monotonic() < stop:
                started = time.monotonic()
                writer.write(head(length=len(body)) + body)
                status = await reader.readuntil(b"\r\n\r\n")
                lines = status.lower().split(b"\r\n")
                await reader.readexactly(int(next(line for line in lines if line.startswith(b"content-length"))[15:]))
                assert status.startswith(b"HTTP/1.1 503"), status
                waits.append(time.monotonic() - started)
        finally:
            writer.close()
        return waits

    async def flood() -> list[list[float]]:
        stop = time.monotonic() + 2.0
        return await asyncio.gather(*(resend_when_refused(stop) for _ in range(8)))

    try:
        waits = [wait for client in asyncio.run(flood()) for wait in client]
    finally:
        holder.close()
    # 2 s at 40 a second: ~80 in all (+ the last round's 8), where unpaced the 8 clients would get thousands
    assert 60 <= len(waits) <= 100, len(waits)
    assert sorted(waits)[len(waits) // 2] > 0.1, "8 clients at 40 answers a second wait ~200 ms each"


def test_a_flood_gets_fast_503s_and_the_admitted_are_served(guarded: ServerProcess) -> None:
    async def flood() -> list[tuple[int, float, str]]:
        async with httpx.AsyncClient(base_url=guarded.url, timeout=60, limits=httpx.Limits(max_connections=30)) as c:

            async def one() -> tuple[int, float, str]:
                started = time.perf_counter()
                r = await c.post("/detect", content=JPEG, headers={"content-type": "image/jpeg"})
                return r.status_code, time.perf_counter() - started, r.json()["error"] if r.status_code != 200 else ""

            return await asyncio.gather(*(one() for _ in range(30)))

    results = asyncio.run(flood())
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 10, codes
    assert {error for code, _, error in results if code == 503} == {"overloaded"}
    refused = sorted(t for code, t, _ in results if code == 503)
    served = sorted(t for code, t, _ in results if code == 200)
    assert refused[len(refused) // 2] < served[len(served) // 2], (refused, served)


# ------------------------------------------------------------------------------------------ deadlines


def test_a_deadline_passed_before_decode_is_504_and_nothing_is_decoded(guarded: ServerProcess) -> None:
    decoded = metric(guarded.url, "ssd_decode_duration_seconds_count")
    with connect(guarded) as sock:  # the body takes 400 ms to arrive; the client allowed 150 ms
        sock.sendall(head(length=len(JPEG), extra="X-Request-Timeout-Ms: 150\r\n") + JPEG[:1000])
        time.sleep(0.4)
        sock.sendall(JPEG[1000:])
        reply = read_response(sock)
    assert reply.startswith("HTTP/1.1 504"), reply
    assert '"error":"timeout"' in reply.replace(" ", "") and "before decode" in reply
    assert metric(guarded.url, "ssd_decode_duration_seconds_count") == decoded


def test_the_query_parameter_sets_a_shorter_deadline_and_a_longer_one_is_capped(guarded: ServerProcess) -> None:
    url = f"{guarded.url}/detect"
    ok = httpx.post(url, content=JPEG, params={"timeout_ms": 60_000}, headers={"content-type": "image/jpeg"})
    assert ok.status_code == 200  # more than the server's 10 s is capped at it, not refused
    bad = httpx.post(url, content=JPEG, params={"timeout_ms": 0}, headers={"content-type": "image/jpeg"})
    assert bad.status_code == 422 and bad.json()["error"] == "validation_error"


def test_under_load_every_answer_comes_by_its_deadline(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory({**FAST, "max_batch_size": 1, "max_queue_delay_ms": 0, "decode_workers": 1})
    processed = metric(srv.url, "ssd_images_processed_total")

    async def flood() -> list[tuple[int, float]]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=httpx.Limits(max_connections=40)) as c:

            async def one() -> tuple[int, float]:
                started = time.perf_counter()
                r = await c.post(
                    "/detect", content=JPEG, headers={"content-type": "image/jpeg", "X-Request-Timeout-Ms": "150"}
                )
                return r.status_code, time.perf_counter() - started

            return await asyncio.gather(*(one() for _ in range(40)))

    results = asyncio.run(flood())
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 504} and codes.count(504) >= 5, codes
    slowest = max(t for _, t in results)
    assert slowest < 1.5, f"the slowest answer took {slowest * 1000:.0f} ms with a 150 ms deadline"
    inferred = metric(srv.url, "ssd_images_processed_total") - processed
    assert inferred < 40, "work for requests past their deadline still reached the engine"


def test_a_short_deadline_admits_only_what_the_engines_finish_in_time(
    server_factory: Callable[..., ServerProcess],
) -> None:
    # Warm-up measures the engines' rate; with a 200 ms deadline the bound falls below max_in_flight (256 by
    # default): a request that would only wait out its deadline is refused at arrival instead of decoded.
    srv = server_factory({"request_timeout_ms": 200})
    bound = metric(srv.url, "ssd_admission_bound")
    assert 1 <= bound < 256, bound
    decoded = metric(srv.url, "ssd_decode_duration_seconds_count", model="ssd_mobilenet_v1_coco")

    async def flood() -> list[tuple[int, str, float]]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=httpx.Limits(max_connections=60)) as c:

            async def one() -> tuple[int, str, float]:
                started = time.perf_counter()
                r = await c.post("/detect", content=JPEG, headers={"content-type": "image/jpeg"})
                return r.status_code, r.json().get("detail", ""), time.perf_counter() - started

            return await asyncio.gather(*(one() for _ in range(60)))

    results = asyncio.run(flood())
    codes = [code for code, _, _ in results]
    refused = [detail for code, detail, _ in results if code == 503]
    assert set(codes) <= {200, 503, 504} and refused, codes
    assert all("ms deadline at" in detail for detail in refused), refused[:3]
    slowest = max(seconds for _, _, seconds in results)
    assert slowest < 1.5, f"the slowest answer took {slowest * 1000:.0f} ms with a 200 ms deadline"
    now_decoded = metric(srv.url, "ssd_decode_duration_seconds_count", model="ssd_mobilenet_v1_coco")
    assert now_decoded - decoded <= 60 - len(refused), "a request refused at arrival was decoded"


# ------------------------------------------------------------------------------------------ disconnects


def test_clients_that_leave_cancel_their_work_and_count_as_499(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory({**FAST, "max_batch_size": 1, "max_queue_delay_ms": 0, "decode_workers": 1})
    before = samples(srv.url)
    sockets = [connect(srv) for _ in range(20)]
    for sock in sockets:
        sock.sendall(head(length=len(JPEG)) + JPEG)
    time.sleep(0.05)
    for sock in sockets:
        sock.close()
    wait_for(lambda: metric(srv.url, "ssd_images_in_flight") == 0, 30, "every request finished or cancelled")
    after = samples(srv.url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    gone = delta("ssd_requests_total", endpoint="/detect", code="499")
    answered = delta("ssd_requests_total", endpoint="/detect", code="200")
    assert gone + answered == 20 and gone >= 10, (gone, answered)
    assert delta("ssd_images_processed_total") < 20, "work for clients that left still reached the engine"
    assert delta("ssd_requests_total", endpoint="/detect", code="500") == 0
    assert delta("ssd_rejected_requests_total", reason="client_disconnect") == gone

    with connect(srv) as sock:  # hang up in the middle of the body
        sock.sendall(head(length=len(JPEG)) + JPEG[:1000])
        time.sleep(0.2)
    wait_for(
        lambda: metric(srv.url, "ssd_requests_total", endpoint="/detect", code="499") == after.get(
            ("ssd_requests_total", (("code", "499"), ("endpoint", "/detect"))), 0.0
        )
        + 1,
        10,
        "the mid-body hang-up counted as 499",
    )
    log = srv.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    assert "INFO    server.connections:" in log and "INFO    server.errors:" in log


# ------------------------------------------------------------------------------------------ slow clients


def test_trickling_clients_are_closed_by_the_client_timeout(guarded: ServerProcess) -> None:
    before_500 = metric(guarded.url, "ssd_requests_total", endpoint="/detect", code="500")
    before_408 = metric(guarded.url, "ssd_requests_total", endpoint="/detect", code="408")
    timed_out = metric(guarded.url, "ssd_rejected_requests_total", reason="client_timeout")
    header_tricklers = [connect(guarded, timeout_s=10) for _ in range(3)]
    body_tricklers = [connect(guarded, timeout_s=10) for _ in range(2)]  # admission allows two
    request = head(length=len(JPEG))
    for sock in body_tricklers:
        sock.sendall(request)
    started = time.monotonic()
    closed: dict[int, bytes] = {}
    replies: dict[int, bytes] = {i: b"" for i in range(5)}
    everyone = header_tricklers + body_tricklers
    for sock in everyone:
        sock.setblocking(False)
    step = 0
    while len(closed) < len(everyone) and time.monotonic() - started < 8:
        for i, sock in enumerate(everyone):
            if i in closed:
                continue
            try:
                sock.send(request[step : step + 1] if i < 3 else JPEG[step : step + 1])
            except OSError:
                pass
            try:
                chunk = sock.recv(65536)
                if chunk == b"":
                    closed[i] = replies[i]
                replies[i] += chunk
            except BlockingIOError:
                pass
            except OSError:
                closed[i] = replies[i]
        step += 1
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    for sock in everyone:
        sock.close()
    assert len(closed) == 5, f"{5 - len(closed)} trickling connections still open after {elapsed:.1f} s"
    assert elapsed < 5, elapsed
    for reply in closed.values():
        text = reply.decode(errors="replace")
        assert text.startswith("HTTP/1.1 408") and '"error":"client_timeout"' in text.replace(" ", ""), text
    ok = httpx.post(f"{guarded.url}/detect", content=JPEG, headers={"content-type": "image/jpeg"}, timeout=60)
    assert ok.status_code == 200
    assert metric(guarded.url, "ssd_requests_total", endpoint="/detect", code="500") == before_500
    assert metric(guarded.url, "ssd_requests_total", endpoint="/detect", code="408") == before_408 + 2  # in a request
    assert metric(guarded.url, "ssd_rejected_requests_total", reason="client_timeout") == timed_out + 5  # all


def test_an_idle_new_connection_is_closed_after_the_keep_alive_time(guarded: ServerProcess) -> None:
    with connect(guarded, timeout_s=10) as sock:
        started = time.monotonic()
        assert read_reply(sock) == b""  # closed without a word: nothing was asked
        assert time.monotonic() - started < 5


def test_oversized_headers_are_431_json(guarded: ServerProcess) -> None:
    with connect(guarded) as sock:
        try:
            sock.sendall(head(extra=f"X-Big: {'a' * 100_000}\r\n"))
        except OSError:
            pass  # the server may close before it read everything
        reply = read_reply(sock).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 431") and '"error":"headers_too_large"' in reply.replace(" ", ""), reply
    assert httpx.get(f"{guarded.url}/healthz").status_code == 200


def test_a_header_streamed_without_end_is_cut_off_early(guarded: ServerProcess) -> None:
    sent = 0
    with connect(guarded) as sock:
        sock.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            while sent < 64_000_000:  # the 64 MB header of the report, in pieces
                sock.sendall(b"a" * 16384)
                sent += 16384
                if sent % (16384 * 8) == 0:
                    time.sleep(0.01)  # let the server read what it has
        except OSError:
            pass
        reply = read_reply(sock).decode(errors="replace")
    assert sent < 8_000_000, f"{sent} header bytes accepted"
    assert reply.startswith("HTTP/1.1 431"), reply


# ------------------------------------------------------------------------------------------ JSON everywhere


def test_protocol_errors_are_json(guarded: ServerProcess) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"GARBAGE \x00\x01 NOT HTTP\r\n\r\n")
        reply = read_reply(sock).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 400"), reply
    assert "application/json" in reply and '"error":"bad_request"' in reply.replace(" ", "")


def test_connections_over_the_limit_are_refused_with_json_503(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory({**FAST, "max_connections": 2, "keep_alive_timeout_s": 30})
    idle = [connect(srv) for _ in range(2)]
    try:
        time.sleep(0.2)
        with connect(srv) as sock:  # refused as it opens: the descriptor is not kept
            reply = read_reply(sock).decode(errors="replace")
    finally:
        for sock in idle:
            sock.close()
    assert reply.startswith("HTTP/1.1 503") and '"error":"too_many_connections"' in reply.replace(" ", ""), reply
    time.sleep(0.2)
    assert metric(srv.url, "ssd_rejected_requests_total", reason="too_many_connections") == 1


def test_a_chunked_body_over_the_limit_is_413_and_closes(guarded: ServerProcess) -> None:
    with connect(guarded) as sock:
        sock.sendall(head(extra="Transfer-Encoding: chunked\r\n"))
        chunk = b"\0" * 100_000
        try:
            for _ in range(40):  # 4 MB against a 2 MB limit
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:
            pass
        reply = read_reply(sock).decode(errors="replace")
    head_text, _, body = reply.partition("\r\n\r\n")
    assert head_text.startswith("HTTP/1.1 413"), reply[:500]
    assert "connection: close" in head_text.lower() and '"error":"payload_too_large"' in body.replace(" ", "")


def multipart(fields: list[tuple[str, bytes, bool]]) -> tuple[bytes, str]:
    boundary = "b0undary"
    out = b""
    for name, value, is_file in fields:
        disposition = f'form-data; name="{name}"' + ('; filename="a.jpg"' if is_file else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ([("image", JPEG, True)] + [(f"f{i}", b"x", False) for i in range(40)], "too_many_fields"),
        ([("note", b"x" * 1_100_000, False), ("image", JPEG, True)], "part_too_large"),
    ],
    ids=["too many fields", "text part too large"],
)
def test_multipart_limits_have_their_own_codes(
    guarded: ServerProcess, fields: list[tuple[str, bytes, bool]], error: str
) -> None:
    body, content_type = multipart(fields)
    response = httpx.post(f"{guarded.url}/detect", content=body, headers={"content-type": content_type}, timeout=60)
    assert response.status_code == 413 and response.json()["error"] == error, response.text
    assert metric(guarded.url, "ssd_rejected_requests_total", reason=error) >= 1


def test_a_jpeg_that_claims_6000x6000_but_ends_early_is_400(guarded: ServerProcess) -> None:
    out = io.BytesIO()
    Image.effect_noise((6000, 6000), 40).convert("RGB").save(out, format="JPEG", quality=80)
    cut = out.getvalue()[:20_000] + b"\xff\xd9"  # the data ends, then a proper end-of-image marker
    response = httpx.post(f"{guarded.url}/detect", content=cut, headers={"content-type": "image/jpeg"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"] == "invalid_image", response.text
    assert "ends early" in response.json()["detail"]


def test_the_openapi_schema_states_the_models_bounds(guarded: ServerProcess) -> None:
    schema = httpx.get(f"{guarded.url}/openapi.json").json()
    params = {p["name"]: p["schema"] for p in schema["paths"]["/detect"]["post"]["parameters"]}

    def bound(name: str, key: str) -> float:
        return next(s[key] for s in [params[name], *params[name].get("anyOf", [])] if key in s)

    assert bound("score_threshold", "minimum") == 0.01 and bound("max_detections", "maximum") == 200
    assert "x-request-timeout-ms" in {p["name"].lower() for p in schema["paths"]["/detect"]["post"]["parameters"]}


# ------------------------------------------------------------------------------------------ drain


def test_drain_fails_readiness_at_once_keeps_serving_then_exits_0(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory({**FAST, "drain_seconds": 2, "max_batch_size": 8})
    photos = sorted((DATA / "voc2012_sample" / "JPEGImages").glob("*.jpg"))[:8]
    bodies = [p.read_bytes() for p in photos]

    async def scenario() -> tuple[list[int], float, int, float]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
            flight = [
                asyncio.ensure_future(
                    c.post("/detect", content=bodies[i % 8], headers={"content-type": "image/jpeg"})
                )
                for i in range(32)
            ]
            await asyncio.sleep(0.1)
            signalled = time.perf_counter()
            srv.process.send_signal(signal.SIGTERM)
            while (await c.get("/readyz")).status_code != 503:
                await asyncio.sleep(0.01)
            not_ready_after = time.perf_counter() - signalled
            await asyncio.sleep(0.5)
            during = await c.post("/detect", content=bodies[0], headers={"content-type": "image/jpeg"})
            responses = await asyncio.gather(*flight)
            return [r.status_code for r in responses], not_ready_after, during.status_code, signalled

    codes, not_ready_after, during, signalled = asyncio.run(scenario())
    assert codes == [200] * 32
    assert not_ready_after < 1.0, f"/readyz turned 503 {not_ready_after * 1000:.0f} ms after SIGTERM"
    assert during == 200  # still served during the drain
    srv.process.wait(timeout=20)
    exited_after = time.perf_counter() - signalled
    assert srv.process.returncode == 0, srv.log()[-2000:]
    assert 2.0 <= exited_after < 20, exited_after
    assert "draining" in srv.log()


def test_a_request_cut_off_by_the_shutdown_gets_json_503(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory({**FAST, "request_timeout_ms": 500})  # graceful bound: ceil(0.5) + 1 = 2 s
    with connect(srv) as sock:
        sock.sendall(head(length=len(JPEG)) + JPEG[:100])  # admitted, its body stalls
        wait_for(lambda: metric(srv.url, "ssd_images_in_flight") == 1, 10, "the request admitted")
        srv.process.send_signal(signal.SIGINT)
        reply = read_reply(sock).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 503") and '"error":"shutting_down"' in reply.replace(" ", ""), reply
    srv.process.wait(timeout=20)
    assert "Exception in ASGI application" not in srv.log()


# ------------------------------------------------------------------------------------------ telemetry


def test_onnxruntime_writes_no_telemetry_database(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)  # the server must turn it off itself
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    database = Path(".cache") / "Microsoft" / "DeveloperTools" / ".onnxruntime"
    probe_home = tmp_path / "probe"
    probe_home.mkdir()
    env = {**os.environ, "HOME": str(probe_home)}
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, check=True, timeout=120)
    if not (probe_home / database).exists():
        pytest.skip("this onnxruntime build writes no telemetry database even when allowed to")
    home = tmp_path / "home"
    home.mkdir()
    srv = server_factory(FAST, extra_env={"HOME": str(home)})
    ok = httpx.post(f"{srv.url}/detect", content=JPEG, headers={"content-type": "image/jpeg"}, timeout=60)
    assert ok.status_code == 200
    srv.stop()
    assert not (home / database).exists(), sorted(str(p) for p in home.rglob("*"))
