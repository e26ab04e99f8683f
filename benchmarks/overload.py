"""Overload, deadline, drain and slow-client scenarios against real `python -m server` processes: one table.

    .venv/bin/python -m benchmarks.overload                        # every scenario, 10 s floods (~3 min)
    .venv/bin/python -m benchmarks.overload --duration 2 --only overload,drain
    .venv/bin/python -m benchmarks.overload --only overload --set max_in_flight=64   # another bound, A/B
    .venv/bin/python -m benchmarks.overload --only overload --server-cpus 0,1 --client-cpus 2-7

On one machine the load generator (this process) takes CPU from the server it floods; it runs on uvloop with
benchmarks.httpclient's bare protocol client to take as little as it can (~35 us a request). `--server-cpus`
runs each server on those CPUs only, sized to them (engine threads, decode workers, refusal rate), and this
client on the others (or on `--client-cpus`): on a host with spare cores that is a small server flooded from
outside.

Scenarios (each on a fresh server with the default model, 127.0.0.1 only, bounded in time):
  overload    SSD_MAX_QUEUE_SIZE=16: capacity with 8 connections, then 200 connections for --duration;
              503 p50, goodput vs capacity, 5xx other than 503/504, time back to normal latency after the flood
  deadline    SSD_REQUEST_TIMEOUT_MS=200, 200 connections: slowest response, p99 of all responses
  drain       SSD_DRAIN_SECONDS=2, 32 requests in flight at SIGTERM: /readyz 503 delay, answers during the
              drain, all 32 answered 200, exit status and time
  slow        SSD_CLIENT_TIMEOUT_S=3, 60 trickling connections (headers or body): time until all are closed,
              a normal client's latency meanwhile, code="500" added
  defaults    default settings, 600 connections: RSS before/after, 503 p50, 500s, goodput
  bad_inputs  default settings, 2000 bad inputs on 8 connections: RSS before/after
  refusal_cost  every request refused (max_in_flight=1, held): CPU per refusal in the server and in this client,
              and the cores the overload scenario's 503 p50 target takes at that cost
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import uvloop

from benchmarks.httpclient import Connection, HttpError, Target
from server.metrics import cpu_seconds
from server.settings import REFUSALS_PER_S_PER_CORE
from server.testing import REPO_ROOT, ServerProcess, start_server

EXTRA: dict[str, str] = {}  # --set NAME=VALUE: settings added to every scenario's server
SERVER_CPUS: set[int] = set()  # --server-cpus: each server runs on these (empty: anywhere)
CLIENT_CPUS: set[int] = set()  # where this client runs once a server has started on SERVER_CPUS
IMAGES = sorted((REPO_ROOT.parent / "shared" / "data" / "voc2012_sample" / "JPEGImages").glob("*.jpg"))[:16]
JPEG_HEADERS = {"Content-Type": "image/jpeg"}


class Record(NamedTuple):  # a tuple: a flood makes ~5,000 a second, and a frozen dataclass costs 3x more
    start: float
    end: float
    status: int  # 0: connection error, -1: client timeout

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Row:
    scenario: str
    measure: str
    value: str
    target: str = ""


def cpu_list(text: str) -> set[int]:
    """A Linux CPU list ("0,1", "2-7", "0-1,4") as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def serve(settings: dict[str, object]) -> ServerProcess:
    """A fresh server with `settings` and --set's; on SERVER_CPUS when given, sized as a machine of that many
    cores would be by default (instances, engine threads, decode workers), with this client then on CLIENT_CPUS."""
    settings = {**EXTRA, **settings}
    if not SERVER_CPUS:
        return start_server(settings)
    cores = len(SERVER_CPUS)
    sized = {
        "instances": 2 if cores >= 2 else 1,
        "intra_op_threads": cores,
        "decode_workers": min(8, cores),
        "refusal_rate": REFUSALS_PER_S_PER_CORE * cores,
    }
    os.sched_setaffinity(0, SERVER_CPUS)  # the server process and every thread it starts inherit it
    try:
        return start_server({**sized, **settings})
    finally:
        os.sched_setaffinity(0, CLIENT_CPUS)


def target_of(server: ServerProcess) -> Target:
    host, port = server.url.removeprefix("http://").split(":")
    return Target(host=host, port=int(port), base_path="")


async def closed_loop(
    target: Target, connections: int, duration_s: float, bodies: list[bytes], headers: dict[str, str] | None = None
) -> tuple[list[Record], float]:
    """`connections` clients, each sending its next request when the previous returns, for `duration_s`."""
    records: list[Record] = []
    stop = time.perf_counter() + duration_s
    request_headers = {**JPEG_HEADERS, **(headers or {})}

    async def client(index: int) -> None:
        conn = Connection(target)
        i = index
        try:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                try:
                    response = await conn.request("POST", "/detect", bodies[i % len(bodies)], request_headers, 60)
                    status = response.status
                except TimeoutError:
                    status = -1
                except (HttpError, OSError):
                    status = 0
                    await asyncio.sleep(0.01)
                records.append(Record(started, time.perf_counter(), status))
                i += connections
        finally:
            await conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(connections)))
    return records, max(time.perf_counter() - started, 1e-9)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def statuses(records: list[Record]) -> str:
    return " ".join(f"{code}:{n}" for code, n in sorted(Counter(r.status for r in records).items()))


def rss_mb(server: ServerProcess) -> float:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def metric(target: Target, name: str) -> float:
    """Sum of every sample called `name` on /metrics."""
    conn = Connection(target)
    try:
        text = (await conn.request("GET", "/metrics")).body.decode()
    finally:
        await conn.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def sequential_latency(target: Target, duration_s: float, bodies: list[bytes]) -> list[float]:
    records, _ = await closed_loop(target, 1, duration_s, bodies)
    return [r.latency for r in records if r.status == 200]


# ------------------------------------------------------------------------------------------ scenarios


def overload(duration_s: float, bodies: list[bytes]) -> list[Row]:
    server = serve({"max_queue_size": 16})
    try:
        target = target_of(server)

        async def run() -> list[Row]:
            alone = await sequential_latency(target, 2, bodies)
            capacity, elapsed = await closed_loop(target, 8, duration_s, bodies)
            capacity_rate = sum(r.status == 200 for r in capacity) / elapsed
            flood_end = time.perf_counter() + duration_s
            flood_task = asyncio.ensure_future(closed_loop(target, 200, duration_s, bodies))
            await asyncio.sleep(max(flood_end - time.perf_counter(), 0))
            normal = max(1.5 * pct(alone, 50), pct(alone, 50) + 0.02)
            recovered = float("nan")
            probe = Connection(target)
            try:
                while time.perf_counter() - flood_end < 10:
                    started = time.perf_counter()
                    response = await probe.request("POST", "/detect", bodies[0], JPEG_HEADERS)
                    if response.status == 200 and time.perf_counter() - started <= normal:
                        recovered = time.perf_counter() - flood_end
                        break
            finally:
                await probe.close()
            flood, flood_elapsed = await flood_task
            after_decode = await metric(target, 'ssd_rejected_requests_total{reason="queue_full"}')
            in_window = [r for r in flood if r.start < flood_end]
            refused = [r.latency for r in in_window if r.status == 503]
            goodput = sum(r.status == 200 for r in in_window) / flood_elapsed
            other_5xx = sum(r.status >= 500 and r.status not in (503, 504) for r in in_window)
            return [
                Row("overload", "alone p50 (1 connection)", ms(pct(alone, 50))),
                Row("overload", "capacity, 8 connections", f"{capacity_rate:.1f} img/s"),
                Row("overload", "200 connections: statuses", statuses(in_window)),
                Row("overload", "503 p50 / p99", f"{ms(pct(refused, 50))} / {ms(pct(refused, 99))}", "p50 < 50 ms"),
                Row(
                    "overload",
                    "goodput vs capacity",
                    f"{goodput:.1f} img/s ({goodput / max(capacity_rate, 1e-9):.0%})",
                    ">= 80%",
                ),
                Row("overload", "5xx other than 503/504", str(other_5xx), "0"),
                Row("overload", "503s after a decode (queue full)", f"{after_decode:.0f}", "0"),
                Row("overload", "back to normal latency after", ms(recovered), "< 1000 ms"),
            ]

        return uvloop.run(run())
    finally:
        server.stop()


def deadline(duration_s: float, bodies: list[bytes]) -> list[Row]:
    server = serve({"request_timeout_ms": 200})
    try:
        records, _ = uvloop.run(closed_loop(target_of(server), 200, duration_s, bodies))
        latencies = [r.latency for r in records if r.status > 0]
        ok = [r.latency for r in records if r.status == 200]
        return [
            Row("deadline", "200 connections: statuses", statuses(records)),
            Row("deadline", "slowest response", ms(max(latencies, default=float("nan"))), "< 500 ms"),
            Row("deadline", "p99 of all responses", ms(pct(latencies, 99)), "< 500 ms"),
            Row("deadline", "p50 / p99 of 200s", f"{ms(pct(ok, 50))} / {ms(pct(ok, 99))}"),
        ]
    finally:
        server.stop()


def drain(bodies: list[bytes]) -> list[Row]:
    server = serve({"drain_seconds": 2})
    target = target_of(server)

    async def run() -> list[Row]:
        async def one(i: int) -> int:
            conn = Connection(target)
            try:
                return (await conn.request("POST", "/detect", bodies[i % len(bodies)], JPEG_HEADERS)).status
            except (HttpError, OSError):
                return 0
            finally:
                await conn.close()

        flight = [asyncio.ensure_future(one(i)) for i in range(32)]
        for _ in range(200):  # until the 32 are in flight (at most 2 s)
            if await metric(target, "ssd_requests_in_flight") >= 32:
                break
            await asyncio.sleep(0.01)
        signalled = time.perf_counter()
        server.process.send_signal(signal.SIGTERM)
        probe = Connection(target)
        not_ready = float("nan")
        try:
            while time.perf_counter() - signalled < 2:
                if (await probe.request("GET", "/readyz")).status == 503:
                    not_ready = time.perf_counter() - signalled
                    break
                await asyncio.sleep(0.01)
        finally:
            await probe.close()
        during, _ = await closed_loop(target, 1, 1.5 - (time.perf_counter() - signalled), bodies)
        codes = await asyncio.gather(*flight)
        while server.process.poll() is None and time.perf_counter() - signalled < 30:
            await asyncio.sleep(0.05)
        exited = time.perf_counter() - signalled
        return [
            Row("drain", "/readyz 503 after SIGTERM", ms(not_ready), "< 300 ms"),
            Row("drain", "answered during the drain", statuses(during), "200s"),
            Row("drain", "the 32 in flight", statuses([Record(0, 0, c) for c in codes]), "all 200"),
            Row("drain", "exit status, time", f"{server.process.returncode}, {exited:.1f} s", "0, < 20 s"),
        ]

    try:
        return uvloop.run(run())
    finally:
        server.stop()


def slow(duration_s: float, bodies: list[bytes]) -> list[Row]:
    server = serve({"client_timeout_s": 3})
    target = target_of(server)
    request_head = b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"

    async def trickle(index: int, started: float) -> float:
        reader, writer = await asyncio.open_connection(target.host, target.port)
        if index % 2:  # body tricklers: the head at once, then the body a byte at a time
            writer.write(request_head)
        data = request_head if index % 2 == 0 else b"\0" * 100_000
        try:
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(65536), 0.5) == b"":
                        break
                except asyncio.TimeoutError:
                    continue
                break  # an answer (408), then the close
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
        return time.perf_counter() - started

    async def run() -> list[Row]:
        alone = await sequential_latency(target, 2, bodies)
        errors_before = await metric(target, 'ssd_requests_total{code="500"')
        started = time.perf_counter()
        tricklers = [asyncio.ensure_future(trickle(i, started)) for i in range(60)]
        meanwhile = await sequential_latency(target, max(duration_s, 4), bodies)
        closed_after = await asyncio.wait_for(asyncio.gather(*tricklers), 60)
        errors_after = await metric(target, 'ssd_requests_total{code="500"')
        return [
            Row("slow", "60 trickling connections closed after", f"{max(closed_after):.1f} s", "< 10 s"),
            Row("slow", "normal client p50 alone / meanwhile", f"{ms(pct(alone, 50))} / {ms(pct(meanwhile, 50))}"),
            Row("slow", 'code="500" added', f"{errors_after - errors_before:.0f}", "0"),
        ]

    try:
        return uvloop.run(run())
    finally:
        server.stop()


def defaults(duration_s: float, bodies: list[bytes]) -> list[Row]:
    server = serve({})
    try:
        before = rss_mb(server)
        records, elapsed = uvloop.run(closed_loop(target_of(server), 600, duration_s, bodies))
        after = rss_mb(server)
        time.sleep(5)  # the server trims glibc's free memory once arrivals stop for 2 s
        idle = rss_mb(server)
        refused = [r.latency for r in records if r.status == 503]
        return [
            Row("defaults", "600 connections: statuses", statuses(records)),
            Row("defaults", "RSS before / after / 5 s later", f"{before:.0f} / {after:.0f} / {idle:.0f} MB", "bounded"),
            Row("defaults", "503 p50", ms(pct(refused, 50)), "fast"),
            Row("defaults", "500s", str(sum(r.status == 500 for r in records)), "0"),
            Row("defaults", "goodput", f"{sum(r.status == 200 for r in records) / elapsed:.1f} img/s"),
        ]
    finally:
        server.stop()


def bad_inputs(count: int, bodies: list[bytes]) -> list[Row]:
    jpeg = bodies[0]
    bad = [jpeg[: len(jpeg) // 3], jpeg[:2000] + b"\xff\xd9", b"not an image at all", jpeg[:600] + b"\xff" * 4000]
    server = serve({})
    try:
        target = target_of(server)
        before = rss_mb(server)

        async def run() -> list[Record]:
            sent = 0
            records: list[Record] = []

            async def client() -> None:
                nonlocal sent
                conn = Connection(target)
                try:
                    while sent < count:
                        sent += 1
                        started = time.perf_counter()
                        response = await conn.request("POST", "/detect", bad[sent % len(bad)], JPEG_HEADERS)
                        records.append(Record(started, time.perf_counter(), response.status))
                finally:
                    await conn.close()

            await asyncio.gather(*(client() for _ in range(8)))
            return records

        records = uvloop.run(run())
        after = rss_mb(server)
        time.sleep(5)
        return [
            Row("bad_inputs", f"{count} bad inputs: statuses", statuses(records)),
            Row("bad_inputs", "RSS before / after / 5 s later", f"{before:.0f} / {after:.0f} / {rss_mb(server):.0f} MB"),
        ]
    finally:
        server.stop()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    return cpu_seconds(Path(f"/proc/{pid}/stat"))


def refusal_cost(duration_s: float, bodies: list[bytes]) -> list[Row]:
    """What one refusal costs the server and this client (every request refused: one held request fills
    max_in_flight=1), and what the overload scenario's 503 p50 target then takes of the machine."""
    server = serve({"max_in_flight": 1, "client_timeout_s": 3 * duration_s + 30})
    try:
        target = target_of(server)
        holder = socket.create_connection((target.host, target.port))
        holder.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\n")
        time.sleep(0.5)  # admitted, then waiting for the body that does not come
        server_before, client_before = cpu_s(server.process.pid), time.process_time()
        records, elapsed = uvloop.run(closed_loop(target, 200, duration_s, bodies))
        server_us = (cpu_s(server.process.pid) - server_before) / len(records) * 1e6
        client_us = (time.process_time() - client_before) / len(records) * 1e6
        holder.close()
        needed = 199 / 0.050  # refusals a second for 199 refused connections to get theirs in 50 ms
        return [
            Row("refusal_cost", "200 connections, all refused", f"{statuses(records)}, {len(records) / elapsed:.0f}/s"),
            Row("refusal_cost", "CPU per refusal: server / this client", f"{server_us:.0f} us / {client_us:.0f} us"),
            Row(
                "refusal_cost",
                f"cores for {needed:.0f} refusals/s (503 p50 of 50 ms)",
                f"{needed * (server_us + client_us) / 1e6:.2f} of {len(SERVER_CPUS) or os.cpu_count()}"
                + (" (the server's)" if SERVER_CPUS else ""),
            ),
        ]
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per flood (default 10)")
    parser.add_argument("--bad-inputs", type=int, default=2000, help="bad inputs in the bad_inputs scenario")
    parser.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a setting for every server")
    parser.add_argument("--server-cpus", default="", metavar="LIST", help="run each server on these CPUs only (0,1)")
    parser.add_argument("--client-cpus", default="", metavar="LIST", help="this client's CPUs (default: the others)")
    args = parser.parse_args(argv)
    available = os.sched_getaffinity(0)
    SERVER_CPUS.update(cpu_list(args.server_cpus))
    CLIENT_CPUS.update(cpu_list(args.client_cpus) or available - SERVER_CPUS)
    if SERVER_CPUS and (not CLIENT_CPUS or SERVER_CPUS & CLIENT_CPUS or not SERVER_CPUS | CLIENT_CPUS <= available):
        parser.error(f"--server-cpus and --client-cpus must be disjoint, non-empty sets of {sorted(available)}")
    for item in args.set:
        name, _, value = item.partition("=")
        EXTRA[name.strip().lower()] = value
    if not IMAGES:
        parser.error("no images under ../shared/data/voc2012_sample/JPEGImages")
    bodies = [path.read_bytes() for path in IMAGES]
    scenarios: dict[str, Callable[[], list[Row]]] = {
        "overload": lambda: overload(args.duration, bodies),
        "deadline": lambda: deadline(args.duration, bodies),
        "drain": lambda: drain(bodies),
        "slow": lambda: slow(args.duration, bodies),
        "defaults": lambda: defaults(args.duration, bodies),
        "bad_inputs": lambda: bad_inputs(args.bad_inputs, bodies),
        "refusal_cost": lambda: refusal_cost(args.duration, bodies),
    }
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(scenarios)
    unknown = set(chosen) - set(scenarios)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(scenarios)}")
    rows: list[Row] = []
    for name in chosen:
        rows += scenarios[name]()
    print("| scenario | measure | value | acceptance |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row.scenario} | {row.measure} | {row.value} | {row.target} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
