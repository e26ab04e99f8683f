"""Metric names (a contract with docker/prometheus and docker/grafana), buckets, and the throughput window."""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import BATCH_BUCKETS, TIME_BUCKETS, EventLoopCpu, Metrics, ThroughputWindow

EXPECTED = {
    "ssd_requests": "counter",
    "ssd_request_duration_seconds": "histogram",
    "ssd_queue_wait_seconds": "histogram",
    "ssd_decode_duration_seconds": "histogram",
    "ssd_inference_duration_seconds": "histogram",
    "ssd_batch_size": "histogram",
    "ssd_images_processed": "counter",
    "ssd_images_per_second": "gauge",
    "ssd_requests_in_flight": "gauge",
    "ssd_queue_depth": "gauge",
    "ssd_rejected_requests": "counter",
    "ssd_model_info": "gauge",
}


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _cpu(collector: EventLoopCpu) -> float:
    return next(iter(collector.collect())).samples[0].value


def test_every_metric_is_exposed_with_its_type() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.requests.labels(endpoint="/detect", code="200").inc()
    metrics.request_duration.labels(endpoint="/detect").observe(0.01)
    metrics.for_model("m").set_model("onnxruntime", (300, 300))
    families = {f.name: f.type for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    for name, kind in EXPECTED.items():
        assert families.get(name) == kind, name


def test_buckets() -> None:
    assert TIME_BUCKETS[0] == 0.0001 and TIME_BUCKETS[-1] == 10
    assert BATCH_BUCKETS == (1, 2, 4, 8, 16, 32, 64, 128)
    metrics = Metrics(CollectorRegistry())
    metrics.for_model("m").observe_batch(3, 0.02)
    registry = metrics.registry
    assert registry.get_sample_value("ssd_batch_size_bucket", {"model": "m", "le": "2.0"}) == 0
    assert registry.get_sample_value("ssd_batch_size_bucket", {"model": "m", "le": "4.0"}) == 1
    assert registry.get_sample_value("ssd_inference_duration_seconds_bucket", {"model": "m", "le": "0.0001"}) == 0
    assert registry.get_sample_value("ssd_inference_duration_seconds_bucket", {"model": "m", "le": "0.025"}) == 1
    assert registry.get_sample_value("ssd_images_processed_total", {"model": "m"}) == 3


def test_rejections_by_reason_start_at_zero() -> None:
    metrics = Metrics(CollectorRegistry())
    for reason in ("queue_full", "timeout", "invalid_image", "unsupported_media_type", "payload_too_large"):
        assert metrics.registry.get_sample_value("ssd_rejected_requests_total", {"reason": reason}) == 0
    metrics.reject("queue_full")
    metrics.reject("queue_full")
    assert metrics.registry.get_sample_value("ssd_rejected_requests_total", {"reason": "queue_full"}) == 2


def test_model_info_names_the_model() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.for_model("ssd_mobilenet_v1_coco").set_model("onnxruntime", (300, 300))
    labels = {"model": "ssd_mobilenet_v1_coco", "engine": "onnxruntime", "input_size": "300x300"}
    assert metrics.registry.get_sample_value("ssd_model_info", labels) == 1


def test_two_apps_do_not_share_metrics() -> None:
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.for_model("m").images_processed.inc(5)
    b.for_model("m")
    assert b.registry.get_sample_value("ssd_images_processed_total", {"model": "m"}) == 0


def test_throughput_window_slides() -> None:
    now = [100.0]
    window = ThroughputWindow(window_s=10.0, clock=lambda: now[0])
    window.add(30)
    now[0] = 105.0
    window.add(20)
    assert window.rate() == 5.0
    now[0] = 112.0  # the first 30 left the window
    assert window.rate() == 2.0
    now[0] = 200.0
    assert window.rate() == 0.0


def test_images_per_second_gauge_reads_the_window() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.for_model("m").observe_batch(20, 0.1)
    assert metrics.registry.get_sample_value("ssd_images_per_second", {"model": "m"}) == 2.0


def test_each_model_has_its_own_series() -> None:
    metrics = Metrics(CollectorRegistry())
    first, second = metrics.for_model("first"), metrics.for_model("second")
    first.observe_batch(4, 0.01)
    second.observe_batch(1, 0.01)
    first.set_model("onnxruntime", (300, 300))
    second.set_model("onnxruntime", (320, 320))
    sample = metrics.registry.get_sample_value
    assert (sample("ssd_batch_size_sum", {"model": "first"}), sample("ssd_batch_size_sum", {"model": "second"})) == (
        4,
        1,
    )
    assert sample("ssd_model_info", {"model": "first", "engine": "onnxruntime", "input_size": "300x300"}) == 1
    assert sample("ssd_model_info", {"model": "second", "engine": "onnxruntime", "input_size": "320x320"}) == 1


def test_event_loop_cpu_counts_the_watched_thread_alone() -> None:
    collector = EventLoopCpu()
    assert list(collector.collect()) == []  # nothing before the lifespan names the thread
    burned, release = threading.Event(), threading.Event()

    def loop_thread() -> None:
        collector.watch_current_thread()
        _burn(0.3)
        burned.set()
        release.wait(10)  # alive while read: /proc/self/task/<id> goes with the thread

    thread = threading.Thread(target=loop_thread)
    thread.start()
    try:
        assert burned.wait(10)
        seconds = _cpu(collector)
        assert 0.25 <= seconds <= 0.6  # clock ticks: 10 ms steps
        _burn(0.3)  # another thread's CPU is not counted
        assert _cpu(collector) == seconds
    finally:
        release.set()
        thread.join(10)


def test_event_loop_cpu_is_exposed_as_a_counter() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.event_loop_cpu.watch_current_thread()
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    assert families["ssd_event_loop_cpu_seconds"].type == "counter"
    assert families["ssd_event_loop_cpu_seconds"].samples[0].name == "ssd_event_loop_cpu_seconds_total"
