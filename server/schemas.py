"""Response models: they document /docs (OpenAPI). The hot path builds the same shapes as plain dicts."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Box(BaseModel):
    x1: float = Field(description="left, in pixels of the original image (after EXIF orientation)")
    y1: float = Field(description="top")
    x2: float = Field(description="right")
    y2: float = Field(description="bottom")


class Detection(BaseModel):
    class_id: int = Field(description="class id in the model's label space (index into /v1/model labels)")
    label: str
    score: float
    box: Box


class Timings(BaseModel):
    decode: float = Field(description="decode + orientation + resize, ms")
    queue: float = Field(description="waiting for a batch, ms")
    inference: float = Field(description="the engine's time for the whole batch this image was in, ms")
    total: float = Field(description="request received -> response ready, ms")


class DetectResponse(BaseModel):
    model: str
    width: int = Field(description="width of the original image (after EXIF orientation)")
    height: int
    detections: list[Detection] = Field(description="highest score first")
    timings_ms: Timings


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable code, e.g. invalid_image, queue_full")
    detail: str
    request_id: str | None = Field(None, description="the request's X-Request-ID (echoed, or generated)")


class BatchItemError(ErrorResponse):
    status: int = Field(description="the HTTP status this image alone would have got")


class BatchResponse(BaseModel):
    model: str
    results: list[DetectResponse | BatchItemError] = Field(description="one entry per image, in request order")


class ModelInfo(BaseModel):
    name: str
    labels: list[str] = Field(description="labels[class_id]; '' or '???' for ids the model never returns")
    input_size: tuple[int, int] = Field(description="(height, width) the images are resized to")
    score_threshold: float = Field(description="lowest score the model returns (the floor of ?score_threshold)")
    iou_threshold: float
    max_detections: int = Field(description="K: most detections per image (the ceiling of ?max_detections)")
    engine: str
    device: str
    max_batch_size: int
    weights_source: str
    file: str


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="ready | loading | failed")
    detail: str | None = None
