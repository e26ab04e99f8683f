"""Where an exported model's time goes under ONNX Runtime: node time per operator type, from ORT's own profiler.

    python -m benchmarks.ort_profile weights/ssd_mobilenet_v1_coco.onnx --batch-size 1 --runs 200 --threads 1
    python -m benchmarks.ort_profile OLD.onnx NEW.onnx --batch-size 1 --runs 200 --threads 1   # side by side

The session is the server's (`server.engines.onnxruntime.session_options`) plus `enable_profiling`; the inputs are
the benchmark photos, pre-decoded by the server's own preprocessing. Kernel times of nodes inside an `If` count under
their own operator type. Profiling adds some overhead per node, so the total is above a plain run's latency.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def profile(model: Path, batch_size: int, runs: int, threads: int) -> tuple[dict[str, float], float]:
    """(ms per image by operator type, ms of node time per image), over `runs` batches after one warm-up."""
    import onnxruntime as ort

    from benchmarks.inputs import load_input_set
    from server.engines.onnxruntime import session_options_for
    from server.preprocess import preprocess

    options = session_options_for(ort, threads)
    with tempfile.TemporaryDirectory() as folder:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        size = tuple(session.get_inputs()[0].shape[1:3])
        images = [preprocess(data, size).pixels for data in load_input_set("photos").images]
        batches = [
            np.stack([images[(k * batch_size + j) % len(images)] for j in range(batch_size)]) for k in range(runs + 1)
        ]
        session.run(None, {"images": batches[0]})  # warm-up, profiled too: dropped below by run index
        for batch in batches[1:]:
            session.run(None, {"images": batch})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    after_warmup = run_starts[1] if len(run_starts) > 1 else 0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= after_warmup:
            per_op[event["args"]["op_name"]] += event["dur"]
    images_run = runs * batch_size
    per_image = {op: us / images_run / 1000 for op, us in per_op.items()}
    return per_image, sum(per_image.values())


def table(models: list[Path], results: list[tuple[dict[str, float], float]], top: int) -> str:
    ops = sorted({op for per_op, _ in results for op in per_op}, key=lambda op: -max(r[0].get(op, 0.0) for r in results))
    head = "| op | " + " | ".join(f"{m.name} ms/image (share)" for m in models) + " |"
    lines = [head, "|---|" + "---:|" * len(models)]
    for op in ops[:top]:
        cells = [f"{per_op.get(op, 0.0):.2f} ({100 * per_op.get(op, 0.0) / total:.1f}%)" for per_op, total in results]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| all nodes | " + " | ".join(f"{total:.2f}" for _, total in results) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ort_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", type=Path, nargs="+", help="exported .onnx file(s)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--runs", type=int, default=100, help="profiled batches per model (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: steadiest per-op times)")
    p.add_argument("--top", type=int, default=12, help="operator types shown")
    args = p.parse_args(argv)
    missing = [m for m in args.models if not m.is_file()]
    if missing:
        print(f"ort_profile: no model at {missing[0]}", file=sys.stderr)
        return 2
    results = [profile(m, args.batch_size, args.runs, args.threads) for m in args.models]
    print(f"batch {args.batch_size}, {args.runs} runs, {args.threads} intra-op thread(s)")
    print(table(args.models, results, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
