"""Latency (p50, p99) against throughput for each server setting of a sweep, as a PNG (matplotlib, Agg canvas)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLORS = {"batching_on": "tab:blue", "batching_off": "tab:orange"}


def plot_sweep(sweep: dict[str, Any], out: Path, title: str | None = None) -> Path:
    """One line per (setting, percentile); points labelled with their concurrency.

    `sweep["settings"]` maps a setting name to {"label": str, "runs": [RunResult dicts]}; an optional
    `sweep["engine_only"]` ceiling (images/s, decode included) is drawn as a vertical line.
    """
    # A bare Figure on the Agg canvas: no pyplot, no global backend switch, no display needed.
    fig = Figure(figsize=(8, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (name, setting) in enumerate(sweep["settings"].items()):
        runs = setting["runs"]
        if not runs:
            continue
        color = COLORS.get(name, f"C{i}")
        x = [r["images_per_s"] for r in runs]
        for key, style, marker in (("p50_ms", "-", "o"), ("p99_ms", "--", "^")):
            y = [r["latency"][key] for r in runs]
            ax.plot(x, y, style, marker=marker, color=color, label=f"{setting['label']} {key.split('_')[0]}")
        for r, xi in zip(runs, x):
            ax.annotate(str(r["config"]["concurrency"]), (xi, r["latency"]["p50_ms"]), textcoords="offset points",
                        xytext=(3, -10), fontsize=7, color=color)
    ceiling = sweep.get("ceiling")
    if ceiling:
        ax.axvline(ceiling["images_per_s"], color="gray", linestyle=":",
                   label=f"engine-only ceiling ({ceiling['label']})")
    ax.set_yscale("log")
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(title or _default_title(sweep), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _default_title(sweep: dict[str, Any]) -> str:
    title = "ssd-serve: latency vs throughput (closed loop; point labels = concurrency)"
    machine = sweep.get("machine") or {}
    if machine:
        load = machine.get("loadavg") or [float("nan")]
        title += (f"\n{machine.get('cpus')}x {machine.get('cpu_model')}, {machine.get('date_utc', '')[:10]},"
                  f" load average {load[0]:.1f} at start")
    return title


def main(argv: list[str] | None = None) -> int:
    """Re-draw a sweep's PNG from its JSON: python -m benchmarks.plot SWEEP.json [OUT.png]."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m benchmarks.plot SWEEP.json [OUT.png]", file=sys.stderr)
        return 2
    src = Path(args[0])
    out = Path(args[1]) if len(args) > 1 else src.with_suffix(".png")
    sweep = json.loads(src.read_text())
    print(plot_sweep(sweep, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
