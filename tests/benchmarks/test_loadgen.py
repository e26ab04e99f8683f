"""The load generator against a tiny in-process HTTP stub (fast, no model), and its loopback guard."""

import asyncio
import json

import pytest

from benchmarks.httpclient import Connection, NotLoopback, check_loopback, multipart_body
from benchmarks.inputs import InputSet
from benchmarks.loadgen import LoadConfig, run_load_async
from benchmarks.report import load_run_table, to_json

INPUTS = InputSet("stub", (2, 2), (b"\xff\xd8a", b"\xff\xd8bb"), ("a.jpg", "b.jpg"))


class Stub:
    """HTTP/1.1 keep-alive stub: POST /detect -> 200 (or 503 every `fail_every`), GET /metrics -> counters."""

    def __init__(self, delay_s=0.002, fail_every=0, chunked=False, close_every=0):
        self.delay_s, self.fail_every, self.chunked, self.close_every = delay_s, fail_every, chunked, close_every
        self.posts = 0
        self.bodies = []
        self.server = None

    async def handle(self, reader, writer):
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ")
                headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                close = False
                if method == "POST":
                    self.posts += 1
                    n = self.posts
                    self.bodies.append((path, headers.get("content-type"), body))
                    status = 503 if self.fail_every and n % self.fail_every == 0 else 200
                    close = bool(self.close_every and n % self.close_every == 0)
                    payload = json.dumps({"detections": []}).encode()
                    await asyncio.sleep(self.delay_s)
                else:
                    status = 200
                    payload = (
                        "# TYPE ssd_batch_size histogram\n"
                        f"ssd_batch_size_sum {2.0 * self.posts}\nssd_batch_size_count {self.posts}\n"
                        "# TYPE ssd_queue_wait_seconds histogram\n"
                        f"ssd_queue_wait_seconds_sum {0.001 * self.posts}\nssd_queue_wait_seconds_count {self.posts}\n"
                        "# TYPE ssd_images_processed_total counter\n"
                        f"ssd_images_processed_total {self.posts}\n"
                        "# TYPE ssd_event_loop_cpu_seconds counter\n"
                        f"ssd_event_loop_cpu_seconds_total {0.0001 * self.posts}\n"
                    ).encode()
                out = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                if close:
                    out += "connection: close\r\n"
                if self.chunked:
                    half = len(payload) // 2
                    chunks = [payload[:half], payload[half:]]
                    data = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks if c) + b"0\r\n\r\n"
                    writer.write((out + "transfer-encoding: chunked\r\n\r\n").encode() + data)
                else:
                    writer.write((out + f"content-length: {len(payload)}\r\n\r\n").encode() + payload)
                await writer.drain()
                if close:
                    return
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()


def run(coro):
    return asyncio.run(coro)


def test_closed_loop_report_against_stub():
    async def go():
        async with Stub() as stub:
            cfg = LoadConfig(url=stub.url, mode="closed", concurrency=3, duration_s=0.5, warmup_s=0.1)
            return stub, await run_load_async(cfg, INPUTS)

    stub, result = run(go())
    assert result.ok == result.requests > 10
    assert result.errors == {}
    assert result.latency.count == result.ok
    assert 2.0 <= result.latency.p50_ms <= result.latency.p99_ms <= result.latency.max_ms
    assert result.images_per_s == pytest.approx(result.requests_per_s)
    assert result.server is not None and result.server.mean_batch_size == pytest.approx(2.0)
    assert result.server.mean_queue_wait_ms == pytest.approx(1.0)
    assert result.server.event_loop_cpu_s == pytest.approx(0.0001 * result.server.images_processed)
    # the body is the raw JPEG with an image content type, cycling through the inputs
    assert {b for _, _, b in stub.bodies} == set(INPUTS.images)
    assert {(p, t) for p, t, _ in stub.bodies} == {("/detect", "image/jpeg")}
    text = load_run_table([result.as_dict()])
    assert "req/s" in text and "p99 ms" in text and "srv loop cpu %" in text
    json.loads(to_json(result.as_dict()))


def test_errors_counted_by_status_and_chunked_and_reconnects():
    async def go():
        async with Stub(fail_every=4, chunked=True, close_every=3) as stub:
            cfg = LoadConfig(url=stub.url, concurrency=2, duration_s=0.4, warmup_s=0)
            return await run_load_async(cfg, INPUTS)

    result = run(go())
    assert set(result.errors) == {"503"}
    assert result.errors["503"] == pytest.approx(result.requests / 4, abs=2)
    assert result.ok + result.errors["503"] == result.requests


def test_open_loop_counts_dropped_and_measures_from_schedule():
    async def go():
        # 400/s against a 20 ms server with at most 2 outstanding: most arrivals must be dropped
        async with Stub(delay_s=0.02) as stub:
            cfg = LoadConfig(url=stub.url, mode="open", rate=400, concurrency=2, duration_s=0.5, warmup_s=0, seed=1)
            return await run_load_async(cfg, INPUTS)

    result = run(go())
    ol = result.open_loop
    assert ol is not None
    assert ol.scheduled == ol.sent + ol.dropped
    assert ol.dropped > ol.sent > 0
    assert result.requests == ol.sent and result.errors == {}
    assert result.latency.p50_ms >= 20.0


def test_open_loop_under_capacity_sends_everything():
    async def go():
        async with Stub(delay_s=0.001) as stub:
            cfg = LoadConfig(url=stub.url, mode="open", rate=50, concurrency=64, duration_s=0.6, warmup_s=0, seed=2)
            return await run_load_async(cfg, INPUTS)

    result = run(go())
    assert result.open_loop.dropped == 0
    assert result.open_loop.sent == result.open_loop.scheduled == result.ok


def test_batch_endpoint_sends_multipart():
    async def go():
        async with Stub() as stub:
            cfg = LoadConfig(url=stub.url, endpoint="batch", images_per_request=3, duration_s=0.2, warmup_s=0)
            return stub, await run_load_async(cfg, INPUTS)

    stub, result = run(go())
    assert result.images_per_s == pytest.approx(3 * result.requests_per_s)
    path, ctype, body = stub.bodies[0]
    assert path == "/detect/batch" and ctype.startswith("multipart/form-data; boundary=")
    assert body.count(b'name="images"') == 3


def test_connection_error_is_reported_not_raised():
    async def go():
        async with Stub() as stub:
            url = stub.url
        cfg = LoadConfig(url=url, duration_s=0.2, warmup_s=0)
        return await run_load_async(cfg, INPUTS)

    result = run(go())
    assert result.ok == 0 and set(result.errors) == {"connection"}


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://localhost:1/x/", "http://[::1]:80", "http://127.1.2.3"]
)
def test_loopback_accepted(url):
    check_loopback(url)


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1:8000", "http://example.com", "https://127.0.0.1", "http://0.0.0.0:8000", "ftp://localhost"]
)
def test_non_loopback_refused(url):
    with pytest.raises(NotLoopback):
        check_loopback(url)
    with pytest.raises(ValueError):
        LoadConfig(url=url).validate()


def test_cli_refuses_remote_host(capsys):
    from benchmarks.__main__ import main

    assert main(["--url", "http://192.168.1.5:8000", "--duration", "1"]) == 2
    assert "refusing" in capsys.readouterr().err


def test_multipart_body_shape():
    body, ctype = multipart_body("image", [("a.jpg", b"AAA")])
    boundary = ctype.split("boundary=")[1]
    assert body.startswith(f"--{boundary}\r\n".encode()) and body.endswith(f"--{boundary}--\r\n".encode())
    assert b"\r\n\r\nAAA\r\n" in body


def test_connection_request_roundtrip():
    async def go():
        async with Stub() as stub:
            conn = Connection(check_loopback(stub.url))
            try:
                r1 = await conn.request("GET", "/metrics")
                r2 = await conn.request("POST", "/detect", b"xy", {"Content-Type": "image/jpeg"})
            finally:
                await conn.close()
            return r1, r2

    r1, r2 = run(go())
    assert r1.status == 200 and b"ssd_batch_size_count" in r1.body
    assert r2.status == 200 and json.loads(r2.body) == {"detections": []}


def test_batch_item_errors_are_read_from_the_answer():
    from benchmarks.loadgen import _batch_item_errors

    body = json.dumps({"results": [{"detections": []}, {"error": "invalid_image", "status": 400}]}).encode()
    assert _batch_item_errors(body) == (400,)
    assert _batch_item_errors(b"not json") == (0,)


def test_a_response_later_than_the_timeout_is_a_timeout_error_and_the_connection_recovers():
    async def go():
        async with Stub(delay_s=1.0) as stub:
            conn = Connection(check_loopback(stub.url))
            try:
                started = asyncio.get_running_loop().time()
                with pytest.raises(TimeoutError):
                    await conn.request("POST", "/detect", b"xy", {"Content-Type": "image/jpeg"}, timeout_s=0.1)
                waited = asyncio.get_running_loop().time() - started
                after = await conn.request("GET", "/metrics", timeout_s=5)  # on a fresh connection
            finally:
                await conn.close()
            return waited, after

    waited, after = run(go())
    assert 0.09 <= waited < 0.5 and after.status == 200


def test_run_load_runs_on_uvloop_unless_asked_otherwise(monkeypatch):
    """ssd-bench's loop is uvloop's where installed: on Python 3.12's own loop, whose transports write through
    sendmsg, a request took ~20x more client CPU (BENCHMARKS.md section 4), and the clients capped a GPU server."""
    import benchmarks.loadgen as loadgen

    async def loop_used(config, inputs):
        return config.loop, type(asyncio.get_running_loop()).__module__.split(".")[0]

    monkeypatch.setattr(loadgen, "run_load_async", loop_used)
    url = "http://127.0.0.1:1"
    assert loadgen.run_load(LoadConfig(url=url), INPUTS) == ("uvloop", "uvloop")
    assert loadgen.run_load(LoadConfig(url=url, loop="asyncio"), INPUTS) == ("asyncio", "asyncio")
    with pytest.raises(ValueError, match="loop must be"):
        LoadConfig(url=url, loop="tokio").validate()
