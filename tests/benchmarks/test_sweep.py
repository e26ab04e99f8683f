"""The sweep's headline ratios, computed from synthetic runs."""

import pytest

from benchmarks.ratios import paired_round, reference_batch, saturation, summarize_pairs, sweep_ratios
from benchmarks.sweep import SweepConfig


def _run(c, ips, p50, batch=1.0, ok=10):
    return {"config": {"concurrency": c}, "images_per_s": ips, "ok": ok, "errors": {},
            "latency": {"p50_ms": p50}, "server": {"mean_batch_size": batch}}


def _eng(inputs, batch, decode, ips, p50):
    return {"inputs": {"name": inputs}, "batch_size": batch, "decode": decode, "images_per_s": ips,
            "latency": {"p50_ms": p50}}


RESULT = {
    "settings": {
        "batching_on": {"runs": [_run(1, 50, 21.5), _run(8, 180, 40, 6.4), _run(16, 170, 90, 12.0)]},
        "batching_off": {"runs": [_run(1, 48, 20.5), _run(8, 60, 130)]},
    },
    "engine_only": [_eng("photos", 6, "pool", 200, 30), _eng("photos", 1, "loop", 55, 19.0)],
}


def test_saturation_is_the_highest_throughput_with_successes():
    runs = RESULT["settings"]["batching_on"]["runs"]
    assert saturation(runs)["config"]["concurrency"] == 8
    assert saturation([_run(1, 0, 1, ok=0)]) is None


def testsweep_ratios():
    r = sweep_ratios(RESULT, ref_batch=6)
    assert r["server_saturation"] == {"concurrency": 8, "images_per_s": 180, "mean_batch_size": 6.4}
    assert r["server_vs_engine"] == pytest.approx(0.9)
    assert r["c1_overhead_ms"]["batching_on"] == pytest.approx(2.5)
    assert r["c1_overhead_ms"]["batching_off"] == pytest.approx(1.5)
    assert r["batching_gain"] == pytest.approx(3.0)
    assert "large_server_vs_engine" not in r


def test_ratios_tolerate_missing_pieces():
    r = sweep_ratios({"settings": {}, "engine_only": []}, ref_batch=1)
    assert r["server_vs_engine"] is None and r["batching_gain"] is None
    assert r["c1_overhead_ms"] == {"batching_on": None, "batching_off": None}


def test_estimate_is_bounded_for_ci_durations():
    quick = SweepConfig(concurrencies=(1, 4), duration_s=2, warmup_s=0.5, engine_duration_s=2, pairs=1)
    assert quick.estimated_seconds() < 120


def test_reference_batch():
    assert reference_batch(6.4, 32) == 6
    assert reference_batch(0.2, 32) == 1
    assert reference_batch(40.0, 32) == 32
    assert reference_batch(None, 32) == 32
    assert reference_batch(float("nan"), 8) == 8


def test_paired_rounds_use_medians():
    rounds = [
        paired_round(_run(1, 50, 22.0), _eng("photos", 1, "loop", 55, 20.0), _run(8, 170, 40, 6.0),
                     _eng("photos", 6, "pool", 200, 30)),
        paired_round(_run(1, 50, 30.0), _eng("photos", 1, "loop", 55, 21.0), _run(8, 90, 40, 6.0),
                     _eng("photos", 6, "pool", 100, 30)),
        paired_round(_run(1, 50, 23.0), _eng("photos", 1, "loop", 55, 20.0), _run(8, 160, 40, 6.0),
                     _eng("photos", 6, "pool", 200, 30)),
    ]
    summary = summarize_pairs(rounds)
    assert summary["c1_overhead_ms_median"] == pytest.approx(3.0)
    assert summary["server_vs_engine_median"] == pytest.approx(0.85)
    assert summary["server_vs_engine_range"] == [pytest.approx(0.8), pytest.approx(0.9)]
    assert rounds[0]["server_mean_batch_size"] == 6.0 and rounds[0]["errors"] == 0
    assert sweep_ratios({**RESULT, "paired": summary}, 6)["paired"]["server_vs_engine_median"] == pytest.approx(0.85)


def test_server_env_is_loopback_with_settings():
    from benchmarks.server_proc import server_env

    env = server_env({"max_batch_size": 1, "max_queue_delay_ms": 0})
    assert env["SSD_HOST"] == "127.0.0.1" and env["SSD_PORT"] == "0"
    assert env["SSD_MAX_BATCH_SIZE"] == "1" and env["SSD_MAX_QUEUE_DELAY_MS"] == "0"
