"""Smoke test: a short benchmark against the REAL server (tests/conftest.py); checks the report, never speed."""

import json
import math

from benchmarks.__main__ import main
from benchmarks.inputs import load_input_set
from benchmarks.loadgen import LoadConfig, run_load


def _check_latency(lat, count):
    assert lat["count"] == count > 0
    assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]


def test_closed_loop_cli_against_real_server(server_url, tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = main(["--url", server_url, "--duration", "5", "--warmup", "0.5", "--concurrency", "2", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "img/s" in table and "p99 ms" in table

    report = json.loads(out.read_text())
    assert report["kind"] == "http" and report["machine"]["cpus"] >= 1
    run = report["run"]
    assert run["errors"] == {}
    assert run["ok"] == run["requests"] > 0
    assert run["config"]["mode"] == "closed" and run["config"]["concurrency"] == 2
    assert run["inputs"]["width"] == 640 and run["inputs"]["height"] == 480
    assert run["requests_per_s"] > 0 and run["images_per_s"] == run["requests_per_s"]
    _check_latency(run["latency"], run["ok"])
    server = run["server"]  # /metrics deltas over the measured window
    assert server["images_processed"] >= run["ok"]
    assert 1.0 <= server["mean_batch_size"] <= 32
    assert server["mean_queue_wait_ms"] >= 0 and server["mean_inference_ms"] > 0


def test_open_loop_against_real_server(server_url):
    result = run_load(
        LoadConfig(url=server_url, mode="open", rate=4.0, concurrency=16, duration_s=2.0, warmup_s=0, seed=0),
        load_input_set("photos", max_images=4),
    ).as_dict()
    ol = result["open_loop"]
    assert result["errors"] == {}
    assert ol["scheduled"] == ol["sent"] + ol["dropped"] and ol["sent"] == result["requests"]
    assert result["ok"] == result["requests"]
    if result["ok"]:
        _check_latency(result["latency"], result["ok"])
        assert not math.isnan(ol["mean_send_lag_ms"])
