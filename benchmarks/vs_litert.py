"""Engine only, in process, pre-decoded: our exported file under ONNX Runtime vs LiteRT on the same .tflite.

    python -m benchmarks.vs_litert --onnx weights/ssd_mobilenet_v1_coco.onnx \\
        --tflite ../shared/models/coco_ssd_mobilenet_v1/detect.tflite --threads 2 --batch-size 1,8,16 --rounds 5
    python -m benchmarks.vs_litert --onnx before.onnx after.onnx --tflite ...   # two exports side by side

Each side with its own post-processing: ours the paper's (200 detections, per-class NMS, in the graph), LiteRT the
file's TFLite_Detection_PostProcess (top 10, one class-agnostic NMS). Same photos (the benchmark's 640x480 set, resized
once by the server's preprocessing), same thread count; ONNX Runtime with the server's session options. Runs alternate
(ORT at each batch size, for each --onnx file in turn, then LiteRT) for --rounds rounds of --seconds each; the
table shows medians and ranges. With several --onnx files, rows are named after each file.
LiteRT's file takes batch 1 only. Needs ai-edge-litert (the test extra).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.__main__ import _positive_int_list


def _rate(step: Callable[[int], None], images_per_step: int, seconds: float) -> float:
    step(0)  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(count)
        count += 1
    return count * images_per_step / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vs_litert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", type=Path, nargs="+", default=[Path("weights/ssd_mobilenet_v1_coco.onnx")])
    p.add_argument("--tflite", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=_positive_int_list, default=(1, 8))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="per run (default 2)")
    p.add_argument("--allow-spinning", action="store_true",
                   help="let ORT's intra-op threads busy-wait during a run, as the server's session for lone images "
                   "does (its other session does not: its decode threads need the cores)")
    args = p.parse_args(argv)
    for path in (*args.onnx, args.tflite):
        if not path.is_file():
            print(f"benchmarks.vs_litert: no file at {path}", file=sys.stderr)
            return 2

    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    from benchmarks.inputs import load_input_set
    from server.engines.onnxruntime import session_options_for
    from server.preprocess import preprocess

    options = session_options_for(ort, args.threads, spin=args.allow_spinning)
    sessions = {
        (path.stem if len(args.onnx) > 1 else "onnxruntime"): ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        for path in args.onnx
    }
    size = tuple(next(iter(sessions.values())).get_inputs()[0].shape[1:3])
    photos = [preprocess(data, size).pixels for data in load_input_set("photos").images]
    interpreter = Interpreter(model_path=str(args.tflite), num_threads=args.threads)
    interpreter.allocate_tensors()
    tensor_in = interpreter.get_input_details()[0]["index"]
    outputs = [o["index"] for o in interpreter.get_output_details()]

    def litert_step(k: int) -> None:
        interpreter.set_tensor(tensor_in, photos[k % len(photos)][None])
        interpreter.invoke()
        for index in outputs:
            interpreter.get_tensor(index)

    def ort_step(session: Any, batch: int) -> Callable[[int], None]:
        stacks = [np.stack([photos[(i + j) % len(photos)] for j in range(batch)]) for i in range(0, 4 * batch, batch)]
        return lambda k: session.run(None, {"images": stacks[k % len(stacks)]})

    runs: dict[str, list[float]] = {f"{name} batch {b}": [] for name in sessions for b in args.batch_size}
    runs["litert batch 1"] = []
    for _ in range(args.rounds):
        for name, session in sessions.items():
            for b in args.batch_size:
                runs[f"{name} batch {b}"].append(_rate(ort_step(session, b), b, args.seconds))
        runs["litert batch 1"].append(_rate(litert_step, 1, args.seconds))
    litert = statistics.median(runs["litert batch 1"])
    spinning = "spinning" if args.allow_spinning else "no spinning"
    print(f"{args.threads} threads (ORT: {spinning}), {args.rounds} interleaved rounds of {args.seconds:g} s, pre-decoded {size} photos")
    print("| engine | img/s median | range | vs LiteRT |\n|---|---:|---:|---:|")
    for name, rates in runs.items():
        median = statistics.median(rates)
        print(f"| {name} | {median:.1f} | {min(rates):.1f}-{max(rates):.1f} | {median / litert:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
