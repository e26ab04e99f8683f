"""Prometheus metrics, built against an injected CollectorRegistry (one per app; tests read them back).

The names are a contract with docker/prometheus and docker/grafana: do not rename them.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

# 100 us .. 10 s
TIME_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
THROUGHPUT_WINDOW_S = 10.0


class ThroughputWindow:
    """Images per second over the last `window_s` seconds (read when Prometheus scrapes)."""

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.window_s = window_s
        self._clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()  # scrapes run in a worker thread

    def add(self, count: int) -> None:
        with self._lock:
            self._events.append((self._clock(), count))
            self._trim()

    def rate(self) -> float:
        with self._lock:
            self._trim()
            return sum(count for _, count in self._events) / self.window_s

    def _trim(self) -> None:
        horizon = self._clock() - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()


def cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds in a /proc stat file: a process's (/proc/<pid>/stat) or one thread's
    (/proc/<pid>/task/<tid>/stat)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, in clock ticks


class EventLoopCpu:
    """ssd_event_loop_cpu_seconds_total: CPU time of the thread that runs the server's event loop (HTTP parsing,
    routing, JSON), read from /proc at each scrape. Its rate near 1.0 means the loop is saturated: this process
    answers no faster whatever the engine does, and more replicas are the way to more throughput. Absent until
    `watch_current_thread` runs (the app's lifespan) and where /proc is not (non-Linux)."""

    NAME = "ssd_event_loop_cpu_seconds"
    HELP = "CPU seconds used by the thread running the event loop (HTTP, routing, JSON); rate 1.0: saturated"

    def __init__(self) -> None:
        self._stat: Path | None = None

    def watch_current_thread(self) -> None:
        stat = Path(f"/proc/self/task/{threading.get_native_id()}/stat")
        self._stat = stat if stat.exists() else None

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.NAME, self.HELP)

    def collect(self) -> Iterator[CounterMetricFamily]:
        if self._stat is None:
            return
        try:
            seconds = cpu_seconds(self._stat)
        except OSError:
            return
        yield CounterMetricFamily(self.NAME, self.HELP, value=seconds)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.event_loop_cpu = EventLoopCpu()
        registry.register(self.event_loop_cpu)
        self._request_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._reject_children: dict[str, Any] = {}
        self.requests = Counter(
            "ssd_requests", "HTTP requests by endpoint and status code", ["endpoint", "code"], registry=registry
        )
        self.request_duration = Histogram(
            "ssd_request_duration_seconds",
            "Time from request start to response sent, by endpoint",
            ["endpoint"],
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        per_model = ["model"]  # one series per served model (server.models)
        self.queue_wait = Histogram(
            "ssd_queue_wait_seconds",
            "Time an image waited in the batcher's queue",
            per_model,
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        self.decode_duration = Histogram(
            "ssd_decode_duration_seconds",
            "Decode + orientation + resize time per image",
            per_model,
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "ssd_inference_duration_seconds",
            "Engine time per batch",
            per_model,
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "ssd_batch_size", "Images per engine batch", per_model, buckets=BATCH_BUCKETS, registry=registry
        )
        self.images_processed = Counter(
            "ssd_images_processed", "Images that went through the engine", per_model, registry=registry
        )
        self.images_per_second = Gauge(
            "ssd_images_per_second",
            f"Images through the engine per second over the last {THROUGHPUT_WINDOW_S:g} s",
            per_model,
            registry=registry,
        )
        self.requests_in_flight = Gauge("ssd_requests_in_flight", "Detection requests being handled", registry=registry)
        self.images_in_flight = Gauge(
            "ssd_images_in_flight", "Images admitted and not yet answered (server.admission)", registry=registry
        )
        self.admission_bound = Gauge(
            "ssd_admission_bound",
            "Images that may be in flight now: max_in_flight, or fewer when the engines' rate would not finish "
            "them within the deadline (server.admission)",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "ssd_queue_depth", "Images waiting in the batcher's queue", per_model, registry=registry
        )
        self.rejected = Counter(
            "ssd_rejected_requests", "Requests (or batch items) refused, by reason", ["reason"], registry=registry
        )
        self.model_info = Gauge(
            "ssd_model_info", "The model being served (value 1)", ["model", "engine", "input_size"], registry=registry
        )
        for reason in (
            "queue_full",
            "timeout",
            "invalid_image",
            "unsupported_media_type",
            "payload_too_large",
            "overloaded",
            "client_disconnect",
            "client_timeout",
        ):
            self.rejected.labels(reason=reason)  # present at 0 from the start

    def for_model(self, model: str) -> ModelMetrics:
        """The per-model series of `model` (what its pipeline and batcher record into)."""
        return ModelMetrics(self, model)

    def reject(self, reason: str) -> None:
        child = self._reject_children.get(reason)  # looked up once per reason, as in count_request
        if child is None:
            child = self._reject_children[reason] = self.rejected.labels(reason=reason)
        child.inc()

    def count_request(self, endpoint: str, status: int, seconds: float) -> None:
        """ssd_requests_total{endpoint,code} and ssd_request_duration_seconds{endpoint} for one answered request.
        The labelled children are looked up once per (endpoint, status): a lookup takes a lock and costs more
        than the increment, and a flood of refusals comes through here."""
        children = self._request_children.get((endpoint, status))
        if children is None:
            children = self.request_duration.labels(endpoint=endpoint), self.requests.labels(endpoint, str(status))
            self._request_children[endpoint, status] = children
        children[0].observe(seconds)
        children[1].inc()


class ModelMetrics:
    """One model's children of the per-model families (label model=NAME), with Metrics' attribute names."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.model = model
        self.registry = metrics.registry
        self._model_info = metrics.model_info
        self.queue_wait = metrics.queue_wait.labels(model=model)
        self.decode_duration = metrics.decode_duration.labels(model=model)
        self.inference_duration = metrics.inference_duration.labels(model=model)
        self.batch_size = metrics.batch_size.labels(model=model)
        self.images_processed = metrics.images_processed.labels(model=model)
        self.queue_depth = metrics.queue_depth.labels(model=model)
        self.throughput = ThroughputWindow()
        metrics.images_per_second.labels(model=model).set_function(self.throughput.rate)
        self.reject = metrics.reject

    def set_model(self, engine: str, input_size: tuple[int, int]) -> None:
        """ssd_model_info{model, engine, input_size} = 1; `model` is the served name, as in every family."""
        self._model_info.labels(model=self.model, engine=engine, input_size=f"{input_size[0]}x{input_size[1]}").set(1)

    def observe_batch(self, size: int, inference_s: float) -> None:
        self.batch_size.observe(size)
        self.inference_duration.observe(inference_s)
        self.images_processed.inc(size)
        self.throughput.add(size)
