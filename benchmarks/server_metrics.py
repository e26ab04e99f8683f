"""Server-side view of a run: scrape GET /metrics before and after, and read means off the histogram deltas."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from prometheus_client.parser import text_string_to_metric_families

# The server's metric names (server/metrics.py); histograms expose <name>_sum and <name>_count.
BATCH_SIZE = "ssd_batch_size"
QUEUE_WAIT = "ssd_queue_wait_seconds"
INFERENCE = "ssd_inference_duration_seconds"
DECODE = "ssd_decode_duration_seconds"
IMAGES = "ssd_images_processed_total"
REQUEST_DURATION = "ssd_request_duration_seconds"
EVENT_LOOP_CPU = "ssd_event_loop_cpu_seconds_total"
DETECT_ENDPOINTS = frozenset({"/detect", "/detect/batch", "/v2/infer"})  # /v2/infer: every model's v2 infer


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample name: value summed over its label sets}.

    Samples with an `endpoint` label count only for the detection endpoints, so the scrapes themselves
    (GET /metrics) do not leak into request-duration means.
    """
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            endpoint = sample.labels.get("endpoint")
            if endpoint is not None and endpoint not in DETECT_ENDPOINTS:
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return totals


@dataclass(frozen=True)
class ServerStats:
    """Means over the run window, from counter deltas; NaN where the server exposed nothing."""

    batches: float
    mean_batch_size: float
    mean_queue_wait_ms: float  # per image
    mean_inference_ms: float  # per batch
    mean_decode_ms: float  # per image
    images_processed: float
    mean_request_duration_ms: float  # /detect, /detect/batch and v2 infer, as the server sees them
    event_loop_cpu_s: float = math.nan  # CPU seconds of the server's event-loop thread (1.0 a second: saturated)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    if name not in after:
        return math.nan
    return after[name] - before.get(name, 0.0)


def _mean(before: dict[str, float], after: dict[str, float], base: str, scale: float = 1.0) -> float:
    count = _delta(before, after, f"{base}_count")
    total = _delta(before, after, f"{base}_sum")
    if math.isnan(count) or math.isnan(total) or count <= 0:
        return math.nan
    return total / count * scale


def server_stats(before: dict[str, float], after: dict[str, float]) -> ServerStats:
    return ServerStats(
        batches=_delta(before, after, f"{BATCH_SIZE}_count"),
        mean_batch_size=_mean(before, after, BATCH_SIZE),
        mean_queue_wait_ms=_mean(before, after, QUEUE_WAIT, 1000.0),
        mean_inference_ms=_mean(before, after, INFERENCE, 1000.0),
        mean_decode_ms=_mean(before, after, DECODE, 1000.0),
        images_processed=_delta(before, after, IMAGES),
        mean_request_duration_ms=_mean(before, after, REQUEST_DURATION, 1000.0),
        event_loop_cpu_s=_delta(before, after, EVENT_LOOP_CPU),
    )
