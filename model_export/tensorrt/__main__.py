"""python -m model_export.tensorrt --onnx m.onnx --out m.engine [--fp16] [--max-batch 64] [--opt-batch N]

Exit status: 0 built, 1 a reported failure (one message, no traceback unless --verbose), 2 bad arguments.
The engine is built on the current GPU (pick one with CUDA_VISIBLE_DEVICES) and runs only there.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from model_export.contract.errors import ContractError
from model_export.errors import ExportError
from model_export.contract.metadata import sidecar_path
from model_export.tensorrt.build import BuildOptions, build_engine
from model_export.contract.engine import DEFAULT_MAX_BATCH, PRECISIONS, batch_profile


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_export.tensorrt",
        description="Build a TensorRT engine (and its JSON description) from an ssd-serve ONNX export.",
    )
    parser.add_argument("--onnx", type=Path, required=True, help="the exported model (python -m model_export)")
    parser.add_argument("--out", type=Path, help="engine file to write (default: the ONNX path with .engine)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--precision", choices=PRECISIONS, default=None, help="default: fp32")
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="= --precision fp16")
    parser.add_argument(
        "--max-batch", type=_positive_int, default=DEFAULT_MAX_BATCH,
        help=f"largest batch the engine accepts (default: {DEFAULT_MAX_BATCH})",
    )
    parser.add_argument(
        "--opt-batch", type=_positive_int, default=None,
        help="batch size TensorRT tunes for, within [1, max batch] (default: half the max batch)",
    )
    parser.add_argument("--workspace-gb", type=_positive_float, default=None, help="builder workspace limit in GiB")
    parser.add_argument("--verbose", action="store_true", help="TensorRT's INFO messages; tracebacks on failure")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Path, Path, BuildOptions]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        profile = batch_profile(args.max_batch, args.opt_batch)
    except ContractError as exc:
        parser.error(str(exc))
    out = args.out if args.out is not None else args.onnx.with_suffix(".engine")
    options = BuildOptions(
        precision=args.precision or "fp32", profile=profile, workspace_gb=args.workspace_gb, verbose=args.verbose
    )
    return args.onnx, out, options


def main(argv: list[str] | None = None) -> int:
    onnx_path, out, options = parse_args(argv)
    try:
        description = build_engine(onnx_path, out, options)
    except ContractError as exc:
        if options.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - TensorRT's own exceptions: one line for users, the traceback on request
        if options.verbose:
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc} (run with --verbose for the traceback)", file=sys.stderr)
        return 1
    build = description.build
    size_mb = out.stat().st_size / 1e6
    print(f"wrote {out} ({size_mb:.1f} MB, {build.precision}, batch {build.profile.min}..{build.profile.max}, "
          f"TensorRT {build.tensorrt_version}, {build.gpu_name})")
    print(f"wrote {sidecar_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
