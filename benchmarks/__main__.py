"""`python -m benchmarks` / `ssd-bench`: load a running server, or measure the engine alone, or sweep.

    ssd-bench --url http://127.0.0.1:8000 --concurrency 8 --duration 10            # closed loop
    ssd-bench --url http://127.0.0.1:8000 --mode open --rate 50 --duration 10      # open loop (Poisson)
    ssd-bench --engine-only --model weights/ssd_mobilenet_v1_coco.onnx --batch-size 8 --decode all
    ssd-bench --sweep --duration 5 --out-dir benchmarks/results                    # starts its own servers
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from benchmarks.engine_only import DECODE_MODES
from benchmarks.httpclient import NotLoopback, check_loopback
from benchmarks.inputs import DEFAULT_DATA_DIRS, INPUT_SETS, NoPhotos, default_cache_dir, load_input_set
from benchmarks.report import engine_table, load_run_table, machine_info, table, write_json


def _positive_int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected positive integers")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssd-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--engine-only", action="store_true", help="run the engine in-process, no HTTP")
    what.add_argument("--sweep", action="store_true", help="concurrency sweep, batching on and off (starts servers)")

    common = p.add_argument_group("common")
    common.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    common.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run (default 1)")
    common.add_argument("--inputs", choices=sorted(INPUT_SETS), default="photos",
                        help="photos: shared photos at 640x480; large: upscaled to 4000x3000")
    common.add_argument("--data", type=Path, default=None, metavar="DIR",
                        help="photos: DIR/images/*.jpg and DIR/voc2012_sample/JPEGImages/*.jpg (default: the first "
                        f"of {', '.join(str(d) for d in DEFAULT_DATA_DIRS)} that exists)")
    common.add_argument("--input-cache", action="store_true", help=f"cache re-encoded inputs in {default_cache_dir()}")
    common.add_argument("--json", type=Path, help="write the full result as JSON to this file")

    http = p.add_argument_group("HTTP load (default)")
    http.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    http.add_argument("--mode", choices=("closed", "open"), default="closed")
    http.add_argument("-c", "--concurrency", type=int, default=None,
                      help="closed: concurrent clients; open: most requests outstanding (default 1; open: 256)")
    http.add_argument("--rate", type=float, help="open loop: mean requests/s (Poisson arrivals)")
    http.add_argument("--seed", type=int, default=0, help="open loop: arrival schedule seed")
    http.add_argument("--late-ms", type=float, default=5.0, help="open loop: a send this late counts as late")
    http.add_argument("--endpoint", choices=("detect", "batch"), default="detect")
    http.add_argument("--images-per-request", type=int, default=1, help="/detect/batch: images per request")
    http.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    http.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                      help="the client's event loop (auto: uvloop where installed; the JSON says which ran)")

    eng = p.add_argument_group("engine only")
    eng.add_argument("--model", type=Path, help="exported model (default weights/ssd_mobilenet_v1_coco.onnx)")
    eng.add_argument("--engine", default="onnxruntime", help="engine registry name (default onnxruntime)")
    eng.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (engine-only, and the sweep's servers)")
    eng.add_argument("--batch-size", type=_positive_int_list, default=(1,), help="batch size(s), comma-separated")
    eng.add_argument("--decode", choices=(*DECODE_MODES, "all"), default="all",
                     help="none: pre-decoded; loop: decode then infer on one thread; pool: decode in a thread pool, "
                          "overlapped with inference (the server's approach)")
    eng.add_argument("--threads", type=int, default=0, help="engine intra-op threads (0: runtime default)")
    eng.add_argument("--decode-workers", type=int, default=0,
                     help="pool decode threads (default 0: as the server, one per CPU core, at most 8)")
    eng.add_argument("--jpeg-draft", action="store_true",
                     help="decode large JPEGs at a reduced DCT scale, as the server's opt-in SSD_JPEG_DRAFT")

    sw = p.add_argument_group("sweep")
    sw.add_argument("--concurrency-list", type=_positive_int_list, default=(1, 2, 4, 8, 16, 32, 64, 128))
    sw.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"), help="where JSON + PNG go")
    sw.add_argument("--tag", default="sweep", help="file name stem for the sweep's JSON and PNG")
    sw.add_argument("--pairs", type=int, default=3,
                    help="rounds alternating server and engine-only runs for the ratios (default 3; 0: none)")
    sw.add_argument("--no-large", action="store_true", help="skip the 4000x3000 inputs")
    sw.add_argument("--no-open-loop", action="store_true",
                    help="skip the open-loop run at 0.7 x the saturation rate (batching on)")
    return p


def _main_http(args: argparse.Namespace) -> int:
    from benchmarks.loadgen import LoadConfig, run_load

    concurrency = args.concurrency if args.concurrency is not None else (1 if args.mode == "closed" else 256)
    config = LoadConfig(
        url=args.url, mode=args.mode, concurrency=concurrency, rate=args.rate, duration_s=args.duration,
        warmup_s=args.warmup, endpoint=args.endpoint, images_per_request=args.images_per_request, seed=args.seed,
        late_threshold_ms=args.late_ms, timeout_s=args.timeout, loop=args.loop,
    )
    try:
        config.validate()
    except ValueError as exc:
        print(f"ssd-bench: {exc}", file=sys.stderr)
        return 2
    inputs = load_input_set(args.inputs, args.data, cache_dir=default_cache_dir() if args.input_cache else None)
    result = run_load(config, inputs).as_dict()
    print(load_run_table([result]))
    if args.json:
        write_json(args.json, {"kind": "http", "command": args.command_line, "machine": machine_info(), "run": result})
    return 1 if result["ok"] == 0 else 0


def _main_engine(args: argparse.Namespace) -> int:
    from benchmarks.engine_only import LoadedEngine, run_engine_only
    from benchmarks.sweep import DEFAULT_MODEL

    model = args.model or DEFAULT_MODEL
    if not model.is_file():
        print(f"ssd-bench: no model at {model} (start the server once to build it, or pass --model)", file=sys.stderr)
        return 2
    inputs = load_input_set(args.inputs, args.data, cache_dir=default_cache_dir() if args.input_cache else None)
    modes = DECODE_MODES if args.decode == "all" else (args.decode,)
    engine = LoadedEngine(
        model, args.engine, threads=args.threads, max_batch_size=max(args.batch_size), device=args.device,
        jpeg_draft=args.jpeg_draft,
    )
    runs = []
    try:
        for batch in args.batch_size:
            for mode in modes:
                runs.append(run_engine_only(engine, inputs, batch, mode, duration_s=args.duration,
                                            warmup_s=args.warmup, decode_workers=args.decode_workers).as_dict())
    finally:
        engine.close()
    print(engine_table(runs))
    if args.json:
        write_json(args.json, {"kind": "engine_only", "command": args.command_line, "machine": machine_info(),
                               "runs": runs})
    return 0


def _main_sweep(args: argparse.Namespace) -> int:
    from benchmarks.plot import plot_sweep
    from benchmarks.sweep import SweepConfig, run_sweep

    config = SweepConfig(
        concurrencies=args.concurrency_list, duration_s=args.duration, warmup_s=args.warmup, model=args.model,
        engine=args.engine, device=args.device, engine_duration_s=args.duration, decode_workers=args.decode_workers,
        large=not args.no_large, open_loop_fraction=None if args.no_open_loop else 0.7, pairs=args.pairs,
        data_dir=args.data,
    )
    result = run_sweep(config, log=lambda msg: print(msg, flush=True))
    result["command"] = args.command_line
    json_path = args.json or args.out_dir / f"{args.tag}.json"
    png_path = args.out_dir / f"{args.tag}.png"
    result["plot"] = str(png_path)
    write_json(json_path, result)
    plot_sweep(result, png_path)
    print(sweep_summary(result))
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def sweep_summary(result: dict) -> str:
    runs = [r for s in result["settings"].values() for r in s["runs"]]
    for extra in ("open_loop_run", "large_server_run"):
        if result.get(extra):
            runs.append(result[extra])
    out = [load_run_table(runs), "", engine_table(result["engine_only"]), ""]
    paired = result.get("paired") or {}
    if paired.get("rounds"):
        out += [table(
            ["round", "c=1 p50 ms", "decode+infer b1 p50 ms", "overhead ms", "server img/s", "srv batch",
             "engine img/s", "server/engine", "errors"],
            [[i, p["c1_p50_ms"], p["decode_plus_batch1_p50_ms"], p["c1_overhead_ms"], p["server_images_per_s"],
              p["server_mean_batch_size"], p["engine_images_per_s"], p["server_vs_engine"], p["errors"]]
             for i, p in enumerate(paired["rounds"])], digits=2), ""]
    r = result["ratios"]
    c1 = r["c1_overhead_ms"]
    pr = r.get("paired") or {}
    batch = r["engine_batch_size"]
    out.append(table(["ratio", "sweep", "paired (median)", "target"], [
        [f"server img/s at saturation / engine-only (batch {batch}, decode in pool)", r["server_vs_engine"],
         pr.get("server_vs_engine_median"), ">= 0.85"],
        ["p50 at c=1 minus (decode + batch-1 inference), batching on, ms", c1["batching_on"],
         pr.get("c1_overhead_ms_median"), "<= +3 ms"],
        ["p50 at c=1 minus (decode + batch-1 inference), batching off, ms", c1["batching_off"], None, "<= +3 ms"],
        ["batching gain (on / off img/s at saturation)", r["batching_gain"], None, "> 1"],
    ], digits=3))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if args.engine_only:
            return _main_engine(args)
        if args.sweep:
            return _main_sweep(args)
        check_loopback(args.url)
        return _main_http(args)
    except (NotLoopback, NoPhotos) as exc:
        print(f"ssd-bench: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
