"""`python -m model_export`: build a model, export it to ONNX, optionally validate it; each step timed."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from model_export.contract.errors import ContractError
from model_export.errors import ExportError
from model_export.spec import PostprocessOptions

RANDOM_WEIGHTS_WARNING = """\
WARNING: no --weights given: {model} is RANDOMLY INITIALISED.
WARNING: its detections are meaningless. Use this only for tests and benchmarks;
WARNING: pass --weights coco or --weights PATH for a real model."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = PostprocessOptions()
    p = argparse.ArgumentParser(
        prog="python -m model_export",
        description="Export a trained SSD to ONNX with box decoding and batched NMS inside the graph.",
    )
    p.add_argument("--model", required=True, help="model source (see --list-models)")
    p.add_argument("--out", required=True, type=Path, help="path of the .onnx file to write")
    p.add_argument("--weights", help="checkpoint PATH, or 'coco' for the official COCO weights; none = random")
    p.add_argument("--num-classes", type=int, help="classes including background (random or custom weights)")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch the file is meant for (default 64)")
    p.add_argument(
        "--numerics",
        choices=["float", "integer"],
        help="integer: a quantised TFLite file's own uint8 arithmetic (QDQ, ONNX Runtime); float: for TensorRT. "
        "Default: the model's own",
    )
    p.add_argument("--score-threshold", type=float, default=defaults.score_threshold)
    p.add_argument("--iou-threshold", type=float, default=defaults.iou_threshold)
    p.add_argument("--candidates-per-class", type=int, default=defaults.candidates_per_class)
    p.add_argument("--max-detections", type=int, default=defaults.max_detections, help="K rows per image")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--validate", action="store_true", help="compare ONNX Runtime with the reference implementation")
    p.add_argument("--validate-images", type=Path, help="folder of photos for --validate")
    p.add_argument("--verbose", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


@contextmanager
def step(title: str) -> Iterator[None]:
    print(f"- {title} ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)


def run(args: argparse.Namespace) -> None:
    from model_export.models import REGISTRY
    from model_export.onnx_export import export_onnx
    from model_export.validate import load_validation_images, validate_export

    source = REGISTRY.get(args.model)
    if source is None:
        raise ExportError(f"unknown model {args.model!r}; known models: {', '.join(sorted(REGISTRY))}")
    if args.max_batch < 1:
        raise ExportError("--max-batch must be at least 1")
    try:
        options = PostprocessOptions(
            score_threshold=args.score_threshold,
            iou_threshold=args.iou_threshold,
            candidates_per_class=args.candidates_per_class,
            max_detections=args.max_detections,
        )
    except ValueError as exc:
        raise ExportError(str(exc)) from exc

    if args.weights is None:
        print(RANDOM_WEIGHTS_WARNING.format(model=args.model), file=sys.stderr, flush=True)
    with step(f"build {args.model} ({args.weights or 'random weights'})"):
        model = source.build(args.weights, args.num_classes, args.numerics)
        model = model.with_extra(max_batch=str(args.max_batch))
    with step(f"export ONNX opset {args.opset} -> {args.out}"):
        export_onnx(model, options, args.out, opset=args.opset)
    if args.validate:
        with step("validate with ONNX Runtime against the reference at batch 1 and 8"):
            images = load_validation_images(model.input_size, args.validate_images)
            report = validate_export(args.out, model, source.reference, options, images)
            print(f"  {report}", flush=True)
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ContractError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line for users, the traceback on request
        if args.verbose:
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc} (run with --verbose for the traceback)", file=sys.stderr)
        return 1
    return 0
