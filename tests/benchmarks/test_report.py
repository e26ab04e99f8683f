"""Plot and tables from a synthetic sweep (no server needed)."""

import json

from PIL import Image

from benchmarks.__main__ import sweep_summary
from benchmarks.plot import plot_sweep
from benchmarks.report import engine_table, to_json, write_json


def _run(c, ips, p50, p99, batch, label):
    return {
        "label": label, "config": {"mode": "closed", "concurrency": c, "rate": None},
        "inputs": {"name": "photos"}, "requests_per_s": ips, "images_per_s": ips, "ok": 10, "requests": 10,
        "latency": {"count": 10, "mean_ms": p50, "p50_ms": p50, "p90_ms": p99, "p99_ms": p99, "max_ms": p99},
        "errors": {}, "client_cpu_fraction": 0.1, "server": {"mean_batch_size": batch, "mean_queue_wait_ms": 1.0},
        "open_loop": None, "notes": [],
    }


def _engine(batch, decode, ips, p50):
    return {"inputs": {"name": "photos"}, "batch_size": batch, "decode": decode, "images_per_s": ips,
            "latency": {"p50_ms": p50, "p99_ms": p50 * 1.2}, "batches": 100}


SWEEP = {
    "settings": {
        "batching_on": {
            "label": "on",
            "runs": [_run(c, 10 * c**0.5, 5 * c**0.5, 9 * c**0.5, c**0.5, "batching_on") for c in (1, 2, 4)],
        },
        "batching_off": {"label": "off", "runs": [_run(c, 10, 5 * c, 5 * c, 1.0, "batching_off") for c in (1, 2, 4)]},
    },
    "engine_only": [_engine(2, "pool", 25.0, 80.0), _engine(1, "loop", 12.0, 4.0)],
    "ceiling": {"label": "batch 2", "images_per_s": 25.0},
    "ratios": {"engine_batch_size": 2, "server_vs_engine": 0.8, "c1_overhead_ms": {"batching_on": 1.0, "batching_off": None},
               "batching_gain": 2.0},
    "large_server_run": None,
}


def test_plot_writes_png(tmp_path):
    out = plot_sweep(SWEEP, tmp_path / "s.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 400


def test_sweep_summary_and_json(tmp_path):
    text = sweep_summary(SWEEP)
    assert "batching gain" in text and "0.800" in text
    assert "pool" in engine_table(SWEEP["engine_only"])
    write_json(tmp_path / "s.json", {"x": float("nan"), **SWEEP})
    assert json.loads((tmp_path / "s.json").read_text())["x"] is None
    assert "NaN" not in to_json({"y": float("inf")})
