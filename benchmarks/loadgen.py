"""HTTP load generator against a running ssd-serve on the loopback interface.

Two modes:
- closed loop: `concurrency` clients, each sending its next request as soon as the previous one returns;
  latency is measured from the actual send.
- open loop: requests arrive as a Poisson process at `rate` requests/s (seeded), independent of the server's
  progress. Latency is measured from the *scheduled* send time, so a slow server (or a slow client) cannot hide
  queueing behind a late send (no coordinated omission). At most `concurrency` requests are outstanding: an
  arrival that finds them all busy is dropped and counted; a send that leaves more than `late_threshold_ms`
  after its scheduled time is counted as late.

Every run is bounded in time (`duration_s`, plus the request timeout for the tail) and in count (open loop).
Server-side means (batch size, queue wait, inference time) come from /metrics deltas around the measured window.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np

from benchmarks.httpclient import (
    Connection,
    ConnectionPool,
    HttpError,
    Response,
    Target,
    check_loopback,
    multipart_body,
)
from benchmarks.inputs import InputSet
from benchmarks.server_metrics import ServerStats, parse_samples, server_stats
from benchmarks.stats import LatencySummary, summarize_latencies

Mode = Literal["closed", "open"]
Endpoint = Literal["detect", "batch"]
Loop = Literal["auto", "uvloop", "asyncio"]
MAX_SCHEDULED_REQUESTS = 1_000_000


@dataclass(frozen=True)
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    mode: Mode = "closed"
    concurrency: int = 1  # closed: clients; open: most requests outstanding at once
    rate: float | None = None  # open loop: mean requests/s
    duration_s: float = 10.0
    warmup_s: float = 1.0
    endpoint: Endpoint = "detect"
    images_per_request: int = 1  # /detect/batch only
    batch_field: str = "images"  # multipart field name of /detect/batch
    seed: int = 0
    late_threshold_ms: float = 5.0
    timeout_s: float = 30.0
    loop: Loop = "auto"  # the client's event loop; auto: uvloop where installed (run_load says which ran)

    def validate(self) -> None:
        check_loopback(self.url)
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not 0 < self.duration_s <= 3600:
            raise ValueError("duration must be within (0, 3600] seconds")
        if self.warmup_s < 0:
            raise ValueError("warmup must be >= 0")
        if self.mode == "open" and (self.rate is None or self.rate <= 0):
            raise ValueError("open loop needs a positive --rate")
        if self.endpoint == "detect" and self.images_per_request != 1:
            raise ValueError("/detect takes one image per request; use --endpoint batch for more")
        if self.images_per_request < 1:
            raise ValueError("images per request must be >= 1")
        if self.loop not in ("auto", "uvloop", "asyncio"):
            raise ValueError("loop must be auto, uvloop or asyncio")


@dataclass(frozen=True)
class RequestRecord:
    start: float  # closed loop: actual send; open loop: scheduled send (perf_counter seconds)
    end: float
    status: int  # HTTP status; 0 = transport error, -1 = timeout
    images: int
    item_errors: tuple[int, ...] = ()  # /detect/batch: statuses of the images answered with an error entry


@dataclass(frozen=True)
class OpenLoopStats:
    rate: float
    scheduled: int
    sent: int
    dropped: int  # arrivals that found `concurrency` requests outstanding: never sent
    late: int  # sent more than late_threshold_ms after their scheduled time
    late_threshold_ms: float
    mean_send_lag_ms: float
    max_send_lag_ms: float


@dataclass(frozen=True)
class RunResult:
    config: dict[str, object]
    inputs: dict[str, object]
    elapsed_s: float
    requests: int
    ok: int
    requests_per_s: float  # successful requests / elapsed
    images_per_s: float  # images answered with detections / elapsed
    latency: LatencySummary
    errors: dict[str, int]  # by HTTP status, "timeout", "connection"; "image:<status>" for batch entries
    client_cpu_fraction: float  # load generator CPU time / elapsed (1.0 = one full core)
    open_loop: OpenLoopStats | None = None
    server: ServerStats | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["latency"] = self.latency.as_dict()
        return out


def poisson_schedule(rate: float, duration_s: float, seed: int, max_requests: int | None = None) -> np.ndarray:
    """Send offsets in seconds (sorted, all in [0, duration_s)) of a seeded Poisson process at `rate`/s.

    Bounded: never more than `max_requests` (default: the mean plus ten standard deviations, so a truncation
    is practically impossible) and never more than MAX_SCHEDULED_REQUESTS.
    """
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    expected = rate * duration_s
    cap = max_requests if max_requests is not None else int(math.ceil(expected + 10 * math.sqrt(expected) + 10))
    cap = min(cap, MAX_SCHEDULED_REQUESTS)
    if cap <= 0:
        return np.zeros(0, dtype=np.float64)
    rng = np.random.default_rng(seed)
    offsets = np.cumsum(rng.exponential(1.0 / rate, size=cap))
    return offsets[offsets < duration_s]


class _Requester:
    """Builds the request for the i-th send, cycling through the input set."""

    def __init__(self, config: LoadConfig, inputs: InputSet) -> None:
        self._images = inputs.images
        self._k = config.images_per_request
        self._counter = itertools.count()
        if config.endpoint == "detect":
            self.path = "/detect"
            self._bodies = [(img, {"Content-Type": "image/jpeg"}) for img in self._images]
        else:
            self.path = "/detect/batch"
            self._bodies = []
            n = len(self._images)
            for i in range(n):
                files = [(f"{(i + j) % n}.jpg", self._images[(i + j) % n]) for j in range(self._k)]
                body, ctype = multipart_body(config.batch_field, files)
                self._bodies.append((body, {"Content-Type": ctype}))

    def next(self) -> tuple[bytes, dict[str, str]]:
        return self._bodies[next(self._counter) % len(self._bodies)]

    @property
    def images_per_request(self) -> int:
        return self._k


async def _send(conn: Connection | ConnectionPool, req: _Requester, timeout_s: float, start: float) -> RequestRecord:
    body, headers = req.next()
    try:
        resp: Response = await conn.request("POST", req.path, body, headers, timeout_s)
    except TimeoutError:
        return RequestRecord(start, time.perf_counter(), -1, req.images_per_request)
    except (HttpError, OSError):
        return RequestRecord(start, time.perf_counter(), 0, req.images_per_request)
    end = time.perf_counter()
    item_errors: tuple[int, ...] = ()
    if resp.status == 200 and req.path == "/detect/batch":
        item_errors = _batch_item_errors(resp.body)
    return RequestRecord(start, end, resp.status, req.images_per_request, item_errors)


def _batch_item_errors(body: bytes) -> tuple[int, ...]:
    """Statuses of the error entries in a /detect/batch answer (`{"results": [..., {"error", "status"}]}`)."""
    try:
        results = json.loads(body).get("results", [])
    except (ValueError, AttributeError):
        return (0,)
    return tuple(int(r.get("status", 0)) for r in results if isinstance(r, dict) and "error" in r)


async def _closed_loop(target: Target, config: LoadConfig, req: _Requester, duration_s: float) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    deadline = time.perf_counter() + duration_s

    async def client() -> None:
        conn = Connection(target)
        try:
            while time.perf_counter() < deadline:
                records.append(await _send(conn, req, config.timeout_s, time.perf_counter()))
        finally:
            await conn.close()

    await asyncio.gather(*(client() for _ in range(config.concurrency)))
    return records


async def _open_loop(
    target: Target, config: LoadConfig, req: _Requester, duration_s: float, seed: int
) -> tuple[list[RequestRecord], OpenLoopStats]:
    assert config.rate is not None
    schedule = poisson_schedule(config.rate, duration_s, seed)
    pool = ConnectionPool(target)
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task[None]] = set()
    dropped = late = 0
    lags: list[float] = []
    late_s = config.late_threshold_ms / 1000.0

    async def one(scheduled: float) -> None:
        nonlocal late
        lag = time.perf_counter() - scheduled  # when the send really starts
        lags.append(lag)
        late += lag > late_s
        records.append(await _send(pool, req, config.timeout_s, scheduled))

    t0 = time.perf_counter()
    for offset in schedule:
        scheduled = t0 + float(offset)
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= config.concurrency:
            dropped += 1
            continue
        task = asyncio.create_task(one(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    await pool.close()
    stats = OpenLoopStats(
        rate=config.rate,
        scheduled=int(schedule.size),
        sent=len(lags),
        dropped=dropped,
        late=late,
        late_threshold_ms=config.late_threshold_ms,
        mean_send_lag_ms=float(np.mean(lags) * 1000.0) if lags else math.nan,
        max_send_lag_ms=float(np.max(lags) * 1000.0) if lags else math.nan,
    )
    return records, stats


async def scrape_metrics(target: Target, timeout_s: float = 10.0) -> dict[str, float] | None:
    """Sample totals from GET /metrics, or None when the server does not expose them."""
    conn = Connection(target)
    try:
        resp = await asyncio.wait_for(conn.request("GET", "/metrics"), timeout_s)
    except (HttpError, OSError, asyncio.TimeoutError):
        return None
    finally:
        await conn.close()
    if resp.status != 200:
        return None
    return parse_samples(resp.body.decode("utf-8", "replace"))


async def wait_ready(url: str, timeout_s: float = 60.0, path: str = "/readyz") -> None:
    """Poll GET `path` until it answers 200, or raise TimeoutError."""
    target = check_loopback(url)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        conn = Connection(target)
        try:
            resp = await asyncio.wait_for(conn.request("GET", path), 5.0)
            if resp.status == 200:
                return
            last = f"HTTP {resp.status}"
        except (HttpError, OSError, asyncio.TimeoutError) as exc:
            last = repr(exc)
        finally:
            await conn.close()
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{url}{path} not ready after {timeout_s:.0f}s ({last})")


def _error_key(status: int) -> str:
    if status == -1:
        return "timeout"
    if status == 0:
        return "connection"
    return str(status)


async def run_load_async(config: LoadConfig, inputs: InputSet) -> RunResult:
    config.validate()
    target = check_loopback(config.url)
    req = _Requester(config, inputs)

    async def phase(duration_s: float, seed: int) -> tuple[list[RequestRecord], OpenLoopStats | None]:
        if config.mode == "closed":
            return await _closed_loop(target, config, req, duration_s), None
        return await _open_loop(target, config, req, duration_s, seed)

    if config.warmup_s > 0:
        await phase(config.warmup_s, config.seed + 1_000_003)
    before = await scrape_metrics(target)
    cpu0, t0 = time.process_time(), time.perf_counter()
    records, open_stats = await phase(config.duration_s, config.seed)
    t_end = max((r.end for r in records), default=time.perf_counter())
    elapsed = max(t_end - t0, 1e-9)
    cpu = time.process_time() - cpu0
    after = await scrape_metrics(target)

    ok = [r for r in records if r.status == 200]
    errors = Counter(_error_key(r.status) for r in records if r.status != 200)
    errors.update(f"image:{_error_key(code)}" for r in ok for code in r.item_errors)
    notes: list[str] = []
    if before is None or after is None:
        notes.append("GET /metrics unavailable: no server-side batch size / queue time")
    return RunResult(
        config=asdict(config),
        inputs=inputs.describe(),
        elapsed_s=elapsed,
        requests=len(records),
        ok=len(ok),
        requests_per_s=len(ok) / elapsed,
        images_per_s=sum(r.images - len(r.item_errors) for r in ok) / elapsed,
        latency=summarize_latencies([r.end - r.start for r in ok]),
        errors=dict(sorted(errors.items())),
        client_cpu_fraction=cpu / elapsed,
        open_loop=open_stats,
        server=server_stats(before, after) if before is not None and after is not None else None,
        notes=notes,
    )


def run_load(config: LoadConfig, inputs: InputSet) -> RunResult:
    """Blocking wrapper: one fresh event loop per run; its `config.loop` says which. uvloop by default where it is
    installed (uvicorn[standard] brings it): on Python 3.12's own loop, whose transports send a request's head and
    body with sendmsg, a request cost ~20x more client CPU (BENCHMARKS.md section 4)."""
    loop = config.loop
    if loop == "auto":
        loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    config = replace(config, loop=loop)
    if loop == "asyncio":
        return asyncio.run(run_load_async(config, inputs))
    import uvloop

    return uvloop.run(run_load_async(config, inputs))
