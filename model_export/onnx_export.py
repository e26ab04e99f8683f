"""ExportableSSD -> one self-describing ONNX file (dynamic batch, standard NonMaxSuppression, checker-clean)."""

from __future__ import annotations

import io
import os
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch

from model_export.errors import ExportError
from model_export.exportable import ExportableSSD
from model_export.contract.metadata import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, ModelMetadata, sidecar_path
from model_export.onnx_fallback import splice_fallback
from model_export.postprocess import FALLBACK_DOMAIN, SSDPostprocess
from model_export.spec import PostprocessOptions, SSDModel

DEFAULT_OPSET = 17


def describe(model: SSDModel, options: PostprocessOptions, opset: int) -> ModelMetadata:
    return ModelMetadata(
        model=model.name,
        input_size=model.input_size,
        labels=model.labels,
        score_threshold=options.score_threshold,
        iou_threshold=options.iou_threshold,
        candidates_per_class=options.candidates_per_class,
        max_detections=options.max_detections,
        score_activation=model.score_activation,
        weights_source=model.weights_source,
        weights_sha256=model.weights_sha256,
        opset=opset,
        extra=dict(model.extra_metadata),
    )


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch(exist_ok=False)  # created with the usual permissions, unlike mkstemp's 0600
    except OSError as exc:
        raise ExportError(f"cannot write to {path}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_onnx(
    model: SSDModel, options: PostprocessOptions, out: Path, opset: int = DEFAULT_OPSET
) -> ModelMetadata:
    """Trace the exportable module to `out`, embed its description, check it, and write the sidecar."""
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: the contract needs opset 17 or later")
    module = ExportableSSD(model, options).eval()
    height, width = model.input_size
    example = torch.zeros((2, height, width, 3), dtype=torch.uint8)
    metadata = describe(model, options, opset)
    dynamic = {INPUT_NAME: {0: "batch"}} | {name: {0: "batch"} for name in OUTPUT_NAMES}

    with atomic_output(out) as tmp, warnings.catch_warnings():
        # The TorchScript-based exporter is the one that carries custom symbolics (our NonMaxSuppression).
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        fallback = module.postprocess.has_fallback
        _trace(module, (example,), tmp, [INPUT_NAME], dynamic, opset, {FALLBACK_DOMAIN: 1} if fallback else None)
        proto = onnx.load(str(tmp))
        if fallback:
            splice_fallback(proto, _trace_full_path(module.postprocess, opset))
        proto.doc_string = f"ssd-serve export of {model.name}"
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, metadata.to_json()
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
        with atomic_output(sidecar_path(out)) as side:
            side.write_text(metadata.to_json() + "\n")
    return metadata


def _trace(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    out: Path | io.BytesIO,
    input_names: list[str],
    dynamic: dict[str, dict[int, str]],
    opset: int,
    custom_opsets: dict[str, int] | None = None,
) -> None:
    with torch.no_grad():
        torch.onnx.export(
            module,
            example,
            out if isinstance(out, io.BytesIO) else str(out),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            do_constant_folding=True,
            custom_opsets=custom_opsets,  # the If placeholder's domain (model_export.onnx_fallback)
            # Our autograd Functions all have a `symbolic`: no need to trace their eager bodies (which
            # the TorchScript peephole pass can trip over, e.g. on the integer conv's `- 0`).
            autograd_inlining=False,
        )


class _FullPath(torch.nn.Module):
    def __init__(self, postprocess: SSDPostprocess) -> None:
        super().__init__()
        self.postprocess = postprocess

    def forward(self, scores: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.postprocess.full_path(scores, boxes)


def _trace_full_path(postprocess: SSDPostprocess, opset: int) -> onnx.ModelProto:
    """The post-processing's full path alone, (scores [B, K, N], boxes [B, N, 4]) -> the contract outputs."""
    example = (
        torch.zeros((2, postprocess.num_classes, postprocess.num_anchors)),
        torch.zeros((2, postprocess.num_anchors, 4)),
    )
    dynamic = {"scores": {0: "batch"}, "boxes": {0: "batch"}} | {name: {0: "batch"} for name in OUTPUT_NAMES}
    buffer = io.BytesIO()
    _trace(_FullPath(postprocess).eval(), example, buffer, ["scores", "boxes"], dynamic, opset)
    return onnx.load_from_string(buffer.getvalue())
