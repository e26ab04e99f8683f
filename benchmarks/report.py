"""Human-readable tables and JSON files for benchmark results."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> str:
    """A plain fixed-width table (also valid GitHub Markdown)."""
    cells = [[_fmt(v, digits) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    # text columns left-aligned, numbers right-aligned
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(headers))]
    body = [
        "| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)) + " |"
        for row in cells
    ]
    return "\n".join([line, sep, *body])


def load_run_table(runs: Sequence[dict[str, Any]], label_key: str | None = None) -> str:
    """One row per HTTP run (dicts as produced by RunResult.as_dict, optionally with a `label`)."""
    headers = ["run", "mode", "conc", "req/s", "img/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors",
               "srv batch", "srv queue ms", "srv loop cpu %", "client cpu %"]
    rows = []
    for run in runs:
        cfg, lat, srv = run["config"], run["latency"], run.get("server") or {}
        errors = ", ".join(f"{k}:{v}" for k, v in run["errors"].items()) or "0"
        mode = cfg["mode"] if cfg["mode"] == "closed" else f"open@{cfg['rate']:g}/s"
        rows.append([
            run.get(label_key or "label", run["inputs"]["name"]), mode, cfg["concurrency"],
            run["requests_per_s"], run["images_per_s"], lat["p50_ms"], lat["p90_ms"], lat["p99_ms"], lat["max_ms"],
            errors, srv.get("mean_batch_size"), srv.get("mean_queue_wait_ms"),
            _event_loop_percent(srv, run), 100.0 * run["client_cpu_fraction"],
        ])
    out = table(headers, rows)
    for run in runs:
        ol = run.get("open_loop")
        if ol:
            out += (
                f"\nopen loop: scheduled {ol['scheduled']}, sent {ol['sent']}, dropped {ol['dropped']}, "
                f"late {ol['late']} (> {ol['late_threshold_ms']:g} ms; mean lag {_fmt(ol['mean_send_lag_ms'], 2)} ms,"
                f" max {_fmt(ol['max_send_lag_ms'], 2)} ms); latency measured from the scheduled send time"
            )
        for note in run.get("notes", []):
            out += f"\nnote: {note}"
    return out


def _event_loop_percent(server: dict[str, Any], run: dict[str, Any]) -> float | None:
    """The server's event loop thread's CPU over the run, in % of one core (None where the run has no figure)."""
    seconds, elapsed = server.get("event_loop_cpu_s"), run.get("elapsed_s")
    return 100.0 * seconds / elapsed if seconds is not None and elapsed else None


def engine_table(results: Sequence[dict[str, Any]]) -> str:
    headers = ["inputs", "batch", "decode", "img/s", "batch p50 ms", "batch p99 ms", "per-image ms", "batches"]
    rows = [
        [r["inputs"]["name"], r["batch_size"], r["decode"], r["images_per_s"], r["latency"]["p50_ms"],
         r["latency"]["p99_ms"], 1000.0 / r["images_per_s"] if r["images_per_s"] else math.nan, r["batches"]]
        for r in results
    ]
    return table(headers, rows, digits=1)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    flags = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "arch": platform.machine(),
        "avx512_vnni": "avx512_vnni" in flags,
        "python": platform.python_version(),
        "onnxruntime": ort,
        "loadavg": list(os.getloadavg()),  # other work on the machine while measuring
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_relative(path: Path | str) -> str:
    """A path as results record it: relative to the repository when inside it, else as given (no machine paths)."""
    resolved = Path(path).resolve()
    if resolved.is_relative_to(REPO_ROOT):
        return str(resolved.relative_to(REPO_ROOT))
    return str(path)


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(payload) + "\n")


def to_json(payload: Any) -> str:
    """Strict JSON: NaN / infinity become null."""
    plain = json.loads(json.dumps(payload, default=_json_default, allow_nan=True))
    return json.dumps(_strip_nan(plain), indent=2, allow_nan=False)


def _strip_nan(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strip_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strip_nan(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
