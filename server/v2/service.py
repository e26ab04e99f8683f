"""The model's KServe v2 interface, the same for HTTP and gRPC: metadata, and one inference request's trip.

Inputs (one of):
  image   BYTES [N]            each element one encoded image file, decoded and resized as by /detect
  images  UINT8 [N, H, W, 3]   RGB already at the model's input size (the exported model's own input)
Outputs (the model contract's tensors; rows past num_detections are zero):
  num_detections INT32 [N], boxes FP32 [N, K, 4] (x1, y1, x2, y2 normalised to the input image),
  scores FP32 [N, K], classes INT32 [N, K]; and labels BYTES [N, K] when asked for by name.
Request parameters: score_threshold, max_detections, with /detect's meaning and limits.

Every element goes through the pipeline on its own (Pipeline.infer_upload / infer_pixels), so it batches with
whatever else is in flight, /detect included.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from model_export.contract.metadata import ModelMetadata
from server.batcher import ImageResult
from server.errors import InvalidParameter, InvalidTensor, ModelNotFound, ServerError, TooManyImages
from server.pipeline import DetectOptions, Pipeline
from server.uploads import Upload
from server.v2.codec import BYTES, InferRequest, Tensor

SERVER_NAME = "ssd-serve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data",)
MODEL_VERSION = "1"
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torch": "pytorch_onnx"}
ENCODED_INPUT, PIXELS_INPUT = "image", "images"
DEFAULT_OUTPUTS = ("num_detections", "boxes", "scores", "classes")
OUTPUTS = (*DEFAULT_OUTPUTS, "labels")


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}


def check_version(name: str, version: str | None) -> None:
    """Each model has one version, "1"; an empty or absent version means it."""
    if version not in (None, "", MODEL_VERSION):
        raise ModelNotFound(f"model {name!r} has no version {version!r}; its only version is {MODEL_VERSION}")


def model_metadata(name: str, pipeline: Pipeline) -> dict[str, Any]:
    """ModelMetadataResponse as a dict (the HTTP body; gRPC copies it into its message)."""
    metadata, _ = pipeline.ready()
    height, width = metadata.input_size
    k = metadata.max_detections

    def spec(tensor: str, datatype: str, shape: list[int]) -> dict[str, Any]:
        return {"name": tensor, "datatype": datatype, "shape": shape}

    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORMS.get(pipeline.settings.engine, pipeline.settings.engine),
        "inputs": [spec(ENCODED_INPUT, BYTES, [-1]), spec(PIXELS_INPUT, "UINT8", [-1, height, width, 3])],
        "outputs": [
            spec("num_detections", "INT32", [-1]),
            spec("boxes", "FP32", [-1, k, 4]),
            spec("scores", "FP32", [-1, k]),
            spec("classes", "INT32", [-1, k]),
            spec("labels", BYTES, [-1, k]),
        ],
    }


async def infer(pipeline: Pipeline, request: InferRequest, ticket: Ticket) -> list[Tensor]:
    """Run a v2 request: every element through the pipeline, within the admitted `ticket`'s deadline; the
    requested outputs, in the order asked."""
    metadata, _ = pipeline.ready()
    options = pipeline.options(
        _parameter(request.parameters, "score_threshold", (int, float)),
        _parameter(request.parameters, "max_detections", (int,)),
    )
    names = [output.name for output in request.outputs] or list(DEFAULT_OUTPUTS)
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown:
        raise InvalidTensor(f"unknown output {unknown[0]!r}; the model's outputs are {', '.join(OUTPUTS)}")
    tensor = _the_input(request, metadata, pipeline.settings.max_images_per_request)
    ticket.reserve(len(tensor.data))  # the request holds one image per element (server.admission)
    if tensor.name == ENCODED_INPUT:
        assert isinstance(tensor.data, list)
        jobs = [_second(pipeline.infer_upload(Upload(data=item, content_type=None), ticket)) for item in tensor.data]
    else:
        assert isinstance(tensor.data, np.ndarray)
        jobs = [pipeline.infer_pixels(pixels, ticket) for pixels in tensor.data]
    outcomes = await asyncio.gather(*jobs, return_exceptions=True)
    results: list[ImageResult] = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, ServerError):
            raise type(outcome)(f"element {index} of input {tensor.name!r}: {outcome.detail}") from outcome
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    outputs = detection_tensors(results, options, metadata.labels, with_labels="labels" in names)
    return [outputs[name] for name in names]


async def _second(job: Any) -> ImageResult:
    _, result = await job
    return result


def _parameter(parameters: dict[str, Any], name: str, types: tuple[type, ...]) -> Any:
    value = parameters.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
        kind = "an integer" if types == (int,) else "a number"
        raise InvalidParameter(f"parameter {name} must be {kind}, got {value!r}")
    return value


def _the_input(request: InferRequest, metadata: ModelMetadata, max_images: int) -> Tensor:
    """The request's one input, checked against the model's interface."""
    height, width = metadata.input_size
    expected = f"{ENCODED_INPUT!r} (BYTES [N]) or {PIXELS_INPUT!r} (UINT8 [N, {height}, {width}, 3])"
    if len(request.inputs) != 1:
        raise InvalidTensor(f"the model takes one input, {expected}; got {len(request.inputs)}")
    (tensor,) = request.inputs
    if tensor.name == ENCODED_INPUT:
        if tensor.datatype != BYTES or len(tensor.shape) != 1:
            got = f"{tensor.datatype} {list(tensor.shape)}"
            raise InvalidTensor(f"input {ENCODED_INPUT!r} must be BYTES [N], got {got}")
    elif tensor.name == PIXELS_INPUT:
        if tensor.datatype != "UINT8" or tensor.shape[1:] != (height, width, 3) or len(tensor.shape) != 4:
            raise InvalidTensor(
                f"input {PIXELS_INPUT!r} must be UINT8 [N, {height}, {width}, 3] (the model's input size), "
                f"got {tensor.datatype} {list(tensor.shape)}"
            )
    else:
        raise InvalidTensor(f"unknown input {tensor.name!r}; the model takes {expected}")
    count = tensor.shape[0]
    if count < 1:
        raise InvalidTensor(f"input {tensor.name!r} has no elements")
    if count > max_images:
        raise TooManyImages(f"{count} images in one request; the limit is {max_images}")
    return tensor


def detection_tensors(
    results: list[ImageResult], options: DetectOptions, labels: tuple[str, ...], *, with_labels: bool
) -> dict[str, Tensor]:
    """Per-image results -> the output tensors, each image's rows filtered as /detect filters them."""
    n, k = len(results), results[0].scores.shape[0]
    num = np.zeros(n, dtype=np.int32)  # [N]
    boxes = np.zeros((n, k, 4), dtype=np.float32)  # [N, K, 4]
    scores = np.zeros((n, k), dtype=np.float32)  # [N, K]
    classes = np.zeros((n, k), dtype=np.int32)  # [N, K]
    for i, result in enumerate(results):
        count = max(0, min(result.num_detections, k))
        valid = result.scores[:count]
        order = np.argsort(-valid, kind="stable")  # as server.postprocess.select_detections
        order = order[valid[order] >= options.score_threshold][: options.max_detections]  # [m]
        m = order.shape[0]
        num[i] = m
        boxes[i, :m] = result.boxes[order]
        scores[i, :m] = valid[order]
        classes[i, :m] = result.classes[order]
    outputs = {
        "num_detections": Tensor("num_detections", "INT32", (n,), num),
        "boxes": Tensor("boxes", "FP32", (n, k, 4), boxes),
        "scores": Tensor("scores", "FP32", (n, k), scores),
        "classes": Tensor("classes", "INT32", (n, k), classes),
    }
    if with_labels:
        names = [label.encode() for label in labels]
        items = [
            (names[c] if 0 <= c < len(names) else str(c).encode()) if j < num[i] else b""
            for i in range(n)
            for j, c in enumerate(classes[i].tolist())
        ]
        outputs["labels"] = Tensor("labels", BYTES, (n, k), items)
    return outputs
