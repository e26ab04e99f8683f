"""The headline ratios of a sweep (pure functions over result dicts; no I/O).

- server images/s at saturation / engine-only images/s at the same batch size, decode included (target >= 0.85)
- p50 latency at concurrency 1 minus (decode + one batch-1 inference) (target <= +3 ms)
- batching gain: images/s at saturation, batching on / batching off

Two estimates are given where the data allow: `sweep` (one run of each, measured minutes apart) and `paired`
(median over rounds that alternate server and engine-only runs back to back, so slow drifts in other load on
the machine hit both sides of each ratio alike). On a shared machine, prefer `paired`.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

SERVER_VS_ENGINE_TARGET = 0.85
C1_OVERHEAD_TARGET_MS = 3.0


def saturation(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run with the highest images/s among those with any success."""
    ok_runs = [r for r in runs if r["ok"] > 0]
    return max(ok_runs, key=lambda r: r["images_per_s"]) if ok_runs else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def difference(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return None
    return a - b


def find_engine_run(runs: list[dict[str, Any]], inputs: str, batch: int, decode: str) -> dict[str, Any] | None:
    for r in runs:
        if r["inputs"]["name"] == inputs and r["batch_size"] == batch and r["decode"] == decode:
            return r
    return None


def reference_batch(mean_batch: float | None, max_batch: int) -> int:
    """The engine-only batch size to compare with: the server's mean batch at saturation, rounded."""
    if mean_batch is None or math.isnan(mean_batch):
        return max_batch
    return max(1, min(max_batch, round(mean_batch)))


def paired_round(c1: dict[str, Any], floor: dict[str, Any], sat: dict[str, Any], ceiling: dict[str, Any]) -> dict[str, Any]:
    """One round: server c=1, engine batch-1 decode loop, server at saturation, engine at the same batch + pool."""
    return {
        "c1_p50_ms": c1["latency"]["p50_ms"],
        "decode_plus_batch1_p50_ms": floor["latency"]["p50_ms"],
        "c1_overhead_ms": difference(c1["latency"]["p50_ms"], floor["latency"]["p50_ms"]),
        "server_images_per_s": sat["images_per_s"],
        "server_mean_batch_size": (sat.get("server") or {}).get("mean_batch_size"),
        "engine_images_per_s": ceiling["images_per_s"],
        "server_vs_engine": ratio(sat["images_per_s"], ceiling["images_per_s"]),
        "errors": sum(c1["errors"].values()) + sum(sat["errors"].values()),
    }


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def summarize_pairs(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    overheads = [r["c1_overhead_ms"] for r in rounds]
    ratios = [r["server_vs_engine"] for r in rounds]
    present = [v for v in ratios if v is not None]
    return {
        "rounds": rounds,
        "c1_overhead_ms_median": _median(overheads),
        "server_vs_engine_median": _median(ratios),
        "server_vs_engine_range": [min(present), max(present)] if present else None,
    }


def sweep_ratios(result: dict[str, Any], ref_batch: int) -> dict[str, Any]:
    on = result["settings"].get("batching_on", {}).get("runs", [])
    off = result["settings"].get("batching_off", {}).get("runs", [])
    on_sat, off_sat = saturation(on), saturation(off)
    engine_runs = result.get("engine_only", [])
    ceiling = find_engine_run(engine_runs, "photos", ref_batch, "pool")
    floor = find_engine_run(engine_runs, "photos", 1, "loop")
    c1_on = next((r for r in on if r["config"]["concurrency"] == 1), None)
    c1_off = next((r for r in off if r["config"]["concurrency"] == 1), None)
    floor_ms = floor["latency"]["p50_ms"] if floor else None
    c1_on_ms = c1_on["latency"]["p50_ms"] if c1_on else None
    c1_off_ms = c1_off["latency"]["p50_ms"] if c1_off else None
    on_ips = on_sat["images_per_s"] if on_sat else None
    off_ips = off_sat["images_per_s"] if off_sat else None
    out: dict[str, Any] = {
        "engine_batch_size": ref_batch,
        "server_saturation": {
            "concurrency": on_sat["config"]["concurrency"] if on_sat else None,
            "images_per_s": on_ips,
            "mean_batch_size": ((on_sat or {}).get("server") or {}).get("mean_batch_size"),
        },
        "engine_only_images_per_s": ceiling["images_per_s"] if ceiling else None,
        "server_vs_engine": ratio(on_ips, ceiling["images_per_s"] if ceiling else None),
        "server_vs_engine_target": SERVER_VS_ENGINE_TARGET,
        "c1_p50_ms": {"batching_on": c1_on_ms, "batching_off": c1_off_ms},
        "decode_plus_batch1_p50_ms": floor_ms,
        "c1_overhead_ms": {"batching_on": difference(c1_on_ms, floor_ms), "batching_off": difference(c1_off_ms, floor_ms)},
        "c1_overhead_target_ms": C1_OVERHEAD_TARGET_MS,
        "batching_gain": ratio(on_ips, off_ips),
        "batching_off_saturation": {
            "concurrency": off_sat["config"]["concurrency"] if off_sat else None,
            "images_per_s": off_ips,
        },
    }
    large_run = result.get("large_server_run")
    large_ceiling = find_engine_run(engine_runs, "large", ref_batch, "pool")
    if large_run and large_ceiling:
        out["large_server_vs_engine"] = ratio(large_run["images_per_s"], large_ceiling["images_per_s"])
    if result.get("paired"):
        out["paired"] = {k: v for k, v in result["paired"].items() if k != "rounds"}
    return out
