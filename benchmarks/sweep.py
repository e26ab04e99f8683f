"""Concurrency sweep with batching on and off, the engine-only ceiling, the headline ratios, JSON and a PNG plot.

For each server setting a fresh `python -m server` is started on a free loopback port; the closed-loop load
generator then runs once per concurrency level (each level starts from an idle server and drains at the end).
With the batching-on server still up, `pairs` rounds alternate server and engine-only runs back to back
(see benchmarks.ratios), then one open-loop run and one run on the large JPEGs. The engine-only table is
measured last, in this process, after the servers are stopped, so the two never compete for the CPU.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.engine_only import DecodeMode, LoadedEngine, run_engine_only
from benchmarks.httpclient import Connection, HttpError, check_loopback
from benchmarks.inputs import InputSet, load_input_set
from benchmarks.loadgen import LoadConfig, run_load
from benchmarks.ratios import paired_round, reference_batch, saturation, summarize_pairs, sweep_ratios
from benchmarks.report import machine_info, repo_relative
from benchmarks.server_proc import REPO_ROOT, running_server

DEFAULT_MODEL = REPO_ROOT / "weights" / "ssd_mobilenet_v1_coco.onnx"  # the server's default, built on first start
DEFAULT_CONCURRENCIES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_BATCH = 32
SETTINGS: dict[str, dict[str, Any]] = {
    "batching_on": {"label": "batching on (max 32, 2 ms)", "env": {"max_batch_size": MAX_BATCH, "max_queue_delay_ms": 2}},
    "batching_off": {"label": "batching off (max 1, 0 ms)", "env": {"max_batch_size": 1, "max_queue_delay_ms": 0}},
}

Log = Callable[[str], None]


@dataclass(frozen=True)
class SweepConfig:
    concurrencies: tuple[int, ...] = DEFAULT_CONCURRENCIES
    duration_s: float = 5.0
    warmup_s: float = 1.0  # before the first level of each server only (the server warms every batch size itself)
    request_timeout_s: float = 120.0  # client timeout, and the server's SSD_REQUEST_TIMEOUT_MS (default 10 s)
    settings: tuple[str, ...] = ("batching_off", "batching_on")
    model: Path | None = None  # None: the server's default model (built on first start)
    engine: str = "onnxruntime"
    device: str = "cpu"  # servers and the engine-only ceiling run the same engine on the same device
    engine_duration_s: float = 5.0
    decode_workers: int = 0  # 0: as the server (one per core, at most 8)
    pairs: int = 3  # interleaved server / engine-only rounds for the ratios (0: none)
    large: bool = True  # also measure the 4000x3000 inputs at saturation
    open_loop_fraction: float | None = 0.7  # batching on: one open-loop run at this fraction of saturation
    extra_env: dict[str, str] = field(default_factory=dict)
    data_dir: Path | None = None  # the photos (None: benchmarks.inputs' default folder)

    def estimated_seconds(self) -> float:
        """Rough lower bound: queues at high concurrency drain after each level, which adds to this."""
        level = self.duration_s + 1.0
        engine_run = self.engine_duration_s + 1.5
        http = len(self.settings) * (len(self.concurrencies) * level + self.warmup_s + 10.0)
        pairs = self.pairs * (2 * level + 2 * engine_run)
        extras = (level if self.open_loop_fraction else 0.0) + ((level + 2 * engine_run) if self.large else 0.0)
        return http + pairs + extras + 4 * engine_run


def run_sweep(config: SweepConfig, log: Log = print) -> dict[str, Any]:
    photos = load_input_set("photos", config.data_dir)
    large: InputSet | None = load_input_set("large", config.data_dir) if config.large else None
    log(f"sweep: at least ~{config.estimated_seconds():.0f} s; inputs {photos.describe()}")
    started = time.time()
    result: dict[str, Any] = {
        "kind": "sweep",
        "machine": machine_info(),
        "config": {
            "concurrencies": list(config.concurrencies), "duration_s": config.duration_s, "warmup_s": config.warmup_s,
            "request_timeout_s": config.request_timeout_s, "engine": config.engine, "device": config.device,
            "engine_duration_s": config.engine_duration_s, "decode_workers": config.decode_workers,
            "pairs": config.pairs, "model": repo_relative(config.model or DEFAULT_MODEL),
        },
        "inputs": {"photos": photos.describe(), "large": large.describe() if large else None},
        "settings": {},
        "paired": None,
        "open_loop_run": None,
        "large_server_run": None,
    }
    engine: LoadedEngine | None = None
    ref_batch = MAX_BATCH
    try:
        for name in config.settings:
            setting = SETTINGS[name]
            # At high concurrency on a small CPU a request can queue longer than the server's default 10 s
            # timeout; the sweep measures latency there, so it raises that timeout (and records it).
            env: dict[str, Any] = {
                **setting["env"],
                "request_timeout_ms": int(config.request_timeout_s * 1000),
                "engine": config.engine,
                "device": config.device,
            }
            if config.decode_workers:
                env["decode_workers"] = config.decode_workers
            env.update(config.extra_env)
            with running_server(env, model=config.model) as server:
                log(f"[{name}] server pid {server.pid} at {server.url}, log {server.log_path}")
                result["model"] = result.get("model") or _model_info(server.url)
                runs = [_closed(server.url, c, config, photos, name, config.warmup_s if i == 0 else 0.0, log)
                        for i, c in enumerate(config.concurrencies)]
                result["settings"][name] = {"label": setting["label"], "env": env, "runs": runs}
                sat = saturation(runs)
                if name != "batching_on" or sat is None:
                    continue
                ref_batch = reference_batch((sat.get("server") or {}).get("mean_batch_size"), MAX_BATCH)
                engine = _load_engine(result, config)
                sat_c = sat["config"]["concurrency"]
                if config.pairs:
                    result["paired"] = _paired(server.url, engine, photos, sat_c, ref_batch, config, log)
                if config.open_loop_fraction:
                    result["open_loop_run"] = _open(server.url, config.open_loop_fraction * sat["requests_per_s"],
                                                    config, photos, log)
                if large is not None:
                    result["large_server_run"] = _closed(server.url, sat_c, config, large, "batching_on/large",
                                                         config.warmup_s, log)
        engine = engine or _load_engine(result, config)
        result["engine_only"] = _engine_table(engine, photos, large, ref_batch, config, log)
    finally:
        if engine is not None:
            engine.close()
    result["ratios"] = sweep_ratios(result, ref_batch)
    result["ceiling"] = ceiling_line(result)
    result["wall_s"] = time.time() - started
    result["loadavg_end"] = list(os.getloadavg())
    return result


def ceiling_line(result: dict[str, Any]) -> dict[str, Any] | None:
    """The engine-only ceiling drawn on the plot: the paired rounds' median when there are any."""
    ratios = result.get("ratios") or {}
    batch = ratios.get("engine_batch_size")
    rounds = (result.get("paired") or {}).get("rounds") or []
    values = [r["engine_images_per_s"] for r in rounds if r.get("engine_images_per_s")]
    if values:
        return {"label": f"batch {batch}, decode in pool, median of {len(values)} paired runs",
                "images_per_s": statistics.median(values)}
    if ratios.get("engine_only_images_per_s"):
        return {"label": f"batch {batch}, decode in pool", "images_per_s": ratios["engine_only_images_per_s"]}
    return None


def _closed(url: str, c: int, config: SweepConfig, inputs: InputSet, label: str, warmup_s: float,
            log: Log) -> dict[str, Any]:
    run = run_load(LoadConfig(url=url, mode="closed", concurrency=c, duration_s=config.duration_s,
                              warmup_s=warmup_s, timeout_s=config.request_timeout_s), inputs).as_dict()
    run["label"] = label
    run["loadavg_1m_after"] = os.getloadavg()[0]
    log(_one_line(label, run))
    return run


def _open(url: str, rate: float, config: SweepConfig, inputs: InputSet, log: Log) -> dict[str, Any]:
    run = run_load(LoadConfig(url=url, mode="open", rate=round(rate, 2), concurrency=256, duration_s=config.duration_s,
                              warmup_s=0.0, timeout_s=config.request_timeout_s), inputs).as_dict()
    run["label"] = f"batching_on/open@{config.open_loop_fraction:g}xsat"
    log(_one_line(run["label"], run))
    return run


def _paired(url: str, engine: LoadedEngine, photos: InputSet, sat_c: int, ref_batch: int, config: SweepConfig,
            log: Log) -> dict[str, Any]:
    """Rounds of: server c=1 | engine batch 1 + decode loop | server c=sat | engine batch ref + decode pool."""
    rounds = []
    for k in range(config.pairs):
        c1 = _closed(url, 1, config, photos, f"paired{k}/c1", 0.5, log)
        floor = _engine(engine, photos, 1, "loop", config, log)
        sat = _closed(url, sat_c, config, photos, f"paired{k}/sat", 0.0, log)
        ceiling = _engine(engine, photos, ref_batch, "pool", config, log)
        rounds.append(paired_round(c1, floor, sat, ceiling))
    summary = summarize_pairs(rounds)
    log(f"[paired] c1 overhead median {summary['c1_overhead_ms_median']} ms, "
        f"server/engine median {summary['server_vs_engine_median']}")
    return summary


def _engine(engine: LoadedEngine, inputs: InputSet, batch: int, decode: DecodeMode, config: SweepConfig,
            log: Log) -> dict[str, Any]:
    run = run_engine_only(engine, inputs, batch, decode, duration_s=config.engine_duration_s,
                          warmup_s=0.5, decode_workers=config.decode_workers).as_dict()
    log(f"[engine-only] {inputs.name} batch {batch} decode {decode}: {run['images_per_s']:.1f} img/s, "
        f"batch p50 {run['latency']['p50_ms']:.2f} ms  load {os.getloadavg()[0]:.1f}")
    return run


def _engine_table(engine: LoadedEngine, photos: InputSet, large: InputSet | None, ref_batch: int,
                  config: SweepConfig, log: Log) -> list[dict[str, Any]]:
    plan: list[tuple[InputSet, int, DecodeMode]] = [
        (photos, ref_batch, "pool"), (photos, ref_batch, "none"), (photos, 1, "loop"), (photos, 1, "none"),
    ]
    if large is not None:
        plan += [(large, ref_batch, "pool"), (large, 1, "loop")]
    return [_engine(engine, inputs, batch, decode, config, log) for inputs, batch, decode in plan]


def _load_engine(result: dict[str, Any], config: SweepConfig) -> LoadedEngine:
    """The very file the servers ran (GET /v1/model `file`, relative to the repository root), in-process."""
    served = (result.get("model") or {}).get("file")
    path = Path(served) if served else (config.model or DEFAULT_MODEL)
    path = path if path.is_absolute() else REPO_ROOT / path
    result["config"]["model"] = repo_relative(path)
    return LoadedEngine(path, config.engine, max_batch_size=MAX_BATCH, device=config.device)


def _model_info(url: str) -> dict[str, Any] | None:
    async def get() -> dict[str, Any] | None:
        conn = Connection(check_loopback(url))
        try:
            resp = await conn.request("GET", "/v1/model")
            return json.loads(resp.body) if resp.status == 200 else None
        except (HttpError, OSError, ValueError):  # informational only
            return None
        finally:
            await conn.close()

    info = asyncio.run(get())
    if isinstance(info, dict):  # the model only: no label list, no per-server settings
        info = {k: v for k, v in info.items() if k not in ("labels", "max_batch_size")}
    return info


def _one_line(name: str, run: dict[str, Any]) -> str:
    srv = run.get("server") or {}
    lat = run["latency"]
    nan = float("nan")
    batch = srv.get("mean_batch_size")
    queue = srv.get("mean_queue_wait_ms")
    return (
        f"[{name}] c={run['config']['concurrency']:>3}: {run['images_per_s']:7.1f} img/s"
        f"  p50 {lat['p50_ms']:7.1f} ms  p99 {lat['p99_ms']:7.1f} ms"
        f"  batch {batch if batch is not None else nan:5.2f}  queue {queue if queue is not None else nan:7.2f} ms"
        f"  errors {sum(run['errors'].values())}  load {os.getloadavg()[0]:.1f}"
    )
