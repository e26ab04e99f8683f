"""/detect next to KServe v2 over HTTP and gRPC, at the same concurrency, on one server, interleaved.

    python -m benchmarks.v2_bench --concurrency 8 --duration 10 --rounds 3         # starts its own server
    python -m benchmarks.v2_bench --url http://127.0.0.1:8000 --grpc 127.0.0.1:8001  # a running server

Closed loop: `concurrency` clients per front end, each sending its next request when the last one returns; the
front ends take turns (round 1: detect, v2-http, v2-grpc; round 2: ...) so a noisy machine hurts all alike.
/detect and v2-http use the same HTTP client (httpx), with the same JPEG bytes: v2-http sends the binary tensor
data extension, as tritonclient does. v2-grpc uses tritonclient.grpc.aio. Reported: images/s (median over the
rounds), latency percentiles of all rounds, and the server's mean batch size (from /metrics deltas).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from benchmarks.httpclient import check_loopback
from benchmarks.inputs import load_input_set
from benchmarks.server_metrics import parse_samples, server_stats
from benchmarks.stats import summarize_latencies

FRONT_ENDS = ("detect", "v2-http", "v2-grpc")
MODEL = "ssd_mobilenet_v1_coco"


@dataclass(frozen=True)
class FrontEndResult:
    front_end: str
    concurrency: int
    images_per_request: int
    images_per_s: float  # median over rounds
    images_per_s_rounds: tuple[float, ...]
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch_size: float


def v2_body(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A v2 infer body for `images` as one BYTES input, binary both ways (what tritonclient sends)."""
    raw = b"".join(struct.pack("<I", len(data)) + data for data in images)
    size = {"binary_data_size": len(raw)}
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(images)], "parameters": size}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"}
    return header + raw, headers


async def closed_loop(
    send: Callable[[int], Awaitable[bool]], concurrency: int, duration_s: float
) -> tuple[list[float], int]:
    """`concurrency` workers calling send(i) until the time is up; latencies of successes, error count."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration_s

    async def worker(offset: int) -> None:
        nonlocal errors
        i = offset
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            if await send(i):
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            i += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return latencies, errors


async def bench(args: argparse.Namespace, url: str, grpc_address: str) -> list[FrontEndResult]:
    import tritonclient.grpc.aio as tgrpc_aio

    photos = list(load_input_set(args.inputs).images)
    n = args.images_per_request
    bodies = [v2_body([photos[(i + k) % len(photos)] for k in range(n)]) for i in range(len(photos))]
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as web:
        grpc_client = tgrpc_aio.InferenceServerClient(grpc_address)

        async def detect(i: int) -> bool:
            photo = photos[i % len(photos)]
            response = await web.post("/detect", content=photo, headers={"content-type": "image/jpeg"})
            return response.status_code == 200

        async def v2_http(i: int) -> bool:
            body, headers = bodies[i % len(bodies)]
            response = await web.post(f"/v2/models/{args.model}/infer", content=body, headers=headers)
            return response.status_code == 200

        async def v2_grpc(i: int) -> bool:
            tensor = tgrpc_aio.InferInput("image", [n], "BYTES")
            tensor.set_data_from_numpy(np.array([photos[(i + k) % len(photos)] for k in range(n)], dtype=object))
            try:
                await grpc_client.infer(args.model, [tensor], client_timeout=args.timeout)
            except Exception:  # noqa: BLE001 - any failure is an error of the run
                return False
            return True

        sends = {"detect": detect, "v2-http": v2_http, "v2-grpc": v2_grpc}
        per_request = {"detect": 1, "v2-http": n, "v2-grpc": n}
        rates: dict[str, list[float]] = {name: [] for name in args.front_ends}
        latencies: dict[str, list[float]] = {name: [] for name in args.front_ends}
        errors = dict.fromkeys(args.front_ends, 0)
        batches: dict[str, list[float]] = {name: [] for name in args.front_ends}
        try:
            for _ in range(args.rounds):
                for name in args.front_ends:
                    await closed_loop(sends[name], args.concurrency, args.warmup)
                    before = parse_samples((await web.get("/metrics")).text)
                    started = time.perf_counter()
                    done, failed = await closed_loop(sends[name], args.concurrency, args.duration)
                    elapsed = time.perf_counter() - started
                    after = parse_samples((await web.get("/metrics")).text)
                    rates[name].append(len(done) * per_request[name] / elapsed)
                    latencies[name].extend(done)
                    errors[name] += failed
                    batches[name].append(server_stats(before, after).mean_batch_size)
        finally:
            await grpc_client.close()
    results = []
    for name in args.front_ends:
        summary = summarize_latencies(latencies[name])
        results.append(
            FrontEndResult(
                front_end=name,
                concurrency=args.concurrency,
                images_per_request=per_request[name],
                images_per_s=round(statistics.median(rates[name]), 2),
                images_per_s_rounds=tuple(round(rate, 2) for rate in rates[name]),
                p50_ms=round(summary.p50_ms, 2),
                p99_ms=round(summary.p99_ms, 2),
                errors=errors[name],
                mean_batch_size=round(statistics.fmean(batches[name]), 2),
            )
        )
    return results


@contextlib.contextmanager
def own_server(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    from benchmarks.server_proc import running_server
    from server.testing import free_port

    port = free_port()
    settings: dict[str, object] = {"grpc_port": port, "max_batch_size": args.max_batch_size}
    with running_server(settings) as server:
        yield server.url, f"127.0.0.1:{port}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.v2_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", help="a running server (loopback); default: start one with gRPC on a free port")
    p.add_argument("--grpc", help="its gRPC host:port (with --url; default: the URL's host, port 8001)")
    p.add_argument("--model", default=MODEL, help=f"model name (default {MODEL})")
    p.add_argument("-c", "--concurrency", type=int, default=8, help="clients per front end (default 8)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per front end and round")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--images-per-request", type=int, default=1, help="v2 requests: images per request (default 1)")
    p.add_argument("--front-ends", type=lambda t: tuple(t.split(",")), default=FRONT_ENDS,
                   help=f"comma list of {', '.join(FRONT_ENDS)}")
    p.add_argument("--inputs", default="photos", help="benchmarks.inputs set (default photos: 640x480 JPEGs)")
    p.add_argument("--max-batch-size", type=int, default=32, help="own server's SSD_MAX_BATCH_SIZE")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--json", type=Path, help="write the results to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = set(args.front_ends) - set(FRONT_ENDS)
    if unknown or args.concurrency < 1 or args.rounds < 1 or not 0 < args.duration <= 600:
        print("error: bad --front-ends, --concurrency, --rounds or --duration", file=sys.stderr)
        return 2
    if args.url:
        check_loopback(args.url)
        host = httpx.URL(args.url).host
        context: contextlib.AbstractContextManager[tuple[str, str]] = contextlib.nullcontext(
            (args.url, args.grpc or f"{host}:8001")
        )
    else:
        context = own_server(args)
    with context as (url, grpc_address):
        results = asyncio.run(bench(args, url, grpc_address))
    print("| front end | concurrency | images/request | images/s (median) | p50 ms | p99 ms | mean batch | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.front_end} | {r.concurrency} | {r.images_per_request} | {r.images_per_s:.1f} | {r.p50_ms:.1f} "
            f"| {r.p99_ms:.1f} | {r.mean_batch_size:.2f} | {r.errors} |"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
