"""The FastAPI app: `create_app(settings)`; routes stay thin, the work is in `server.pipeline`.

The lifespan starts loading in the background (export on first start, engine load, warm-up, batcher), so
/healthz answers at once and /readyz turns 200 when the model can serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import annotate, browser, connections, requestid, uploads
from server.admission import TICKET_KEY, AdmissionMiddleware, RequestedTimeout, Ticket, admitted
from server.allocator import trim_when_idle
from server.engines.base import Engine
from server.errors import ServerError, install_error_handlers
from server.metrics import Metrics
from server.models import ModelRegistry
from server.schemas import BatchResponse, DetectResponse, ErrorResponse, Health, ModelInfo, Readiness
from server.settings import Settings
from server.v2 import http as v2_http

logger = logging.getLogger("server.app")

ENDPOINTS = frozenset(
    {"/detect", "/detect/batch", "/detect/annotated", "/metrics", "/healthz", "/readyz", "/v1/model"}
)
DETECT_ENDPOINTS = frozenset({"/detect", "/detect/batch", "/detect/annotated"})
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "application/octet-stream")
_BINARY = {"schema": {"type": "string", "format": "binary"}}
DETECT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["image"], "properties": {"image": _BINARY["schema"]}}
            },
            **{media: _BINARY for media in IMAGE_TYPES},
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {"images": {"type": "array", "items": _BINARY["schema"]}},
                }
            }
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "empty body, not an image, truncated or corrupt image",
        413: "body or image too large",
        415: "unsupported content type",
        422: "missing field or bad query parameter",
        503: "overloaded or queue full (Retry-After), model not ready, or shutting down",
        504: "the request's deadline passed (request_timeout_ms, or the client's X-Request-Timeout-Ms / timeout_ms)",
    }.items()
}

ScoreThreshold = Query(None, ge=0.0, le=1.0, description="keep detections scoring at least this (default: the model's)")
MaxDetections = Query(None, ge=1, description="at most this many detections, highest first (default: the model's K)")
ModelName = Query(None, description="the model to use, by name (GET /v1/models); default: the first model")


def _dumps_stdlib(content: Any) -> bytes:
    return json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()


try:  # orjson writes the same JSON ~10x faster (0.04 vs 0.4 ms for 200 detections); optional
    from orjson import dumps as _dumps
except ImportError:  # pragma: no cover - depends on the environment
    _dumps = _dumps_stdlib


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(_dumps(content), status_code=status_code, media_type="application/json")


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    engine_factory: Callable[[], Engine] | None = None,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app for `settings`. `engine_factory` replaces the registry's engine (tests); `on_load_failure` is
    called with the reason if the model cannot be loaded (the CLI uses it to exit)."""
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    models = ModelRegistry(settings, metrics, engine_factory)
    pipeline = models.default

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics.event_loop_cpu.watch_current_thread()  # the lifespan runs on the event loop's thread

        async def load() -> None:
            await models.start()
            if models.status == "failed" and on_load_failure is not None:
                on_load_failure(models.error or "unknown error")

        grpc_server = None
        if settings.grpc_port:
            from server.v2.grpc import GrpcServer  # imported only when served: grpcio and the v2 messages

            grpc_server = GrpcServer(models, metrics, settings.host, settings.grpc_port, settings.max_body_bytes)
            await grpc_server.start()
        loading = asyncio.create_task(load(), name="load-model")
        trimming = asyncio.create_task(trim_when_idle(lambda: models.admission.arrivals), name="malloc-trim")
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop()
            loading.cancel()
            trimming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await models.stop()

    app = FastAPI(
        title="ssd-serve",
        summary="SSD object detection over HTTP with dynamic batching",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # offline docs: server.browser
        redoc_url=None,  # its page loads a logo from a CDN
    )
    app.state.settings, app.state.metrics, app.state.pipeline = settings, metrics, pipeline
    app.state.models = models
    app.state.cors_headers = browser.early_cors_headers(settings.cors_origins)  # for server.connections' answers
    app.state.answer_at_arrival = arrival_refusals(models, metrics, settings.access_log, app.state.cors_headers)
    install_error_handlers(app, on_reject=metrics.reject)
    app.add_middleware(uploads.BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, on_reject=metrics.reject)
    app.add_middleware(connections.RequestGuard, on_reject=metrics.reject)  # client gone: 499, work cancelled
    app.add_middleware(  # 503 at arrival, before routing and before the body is read
        AdmissionMiddleware, admission=lambda: models.admission, admits=is_admitted, on_reject=metrics.reject
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # sees every response, 413s and 503s included
    app.add_middleware(requestid.RequestIdMiddleware, endpoints=ENDPOINTS, access_log=settings.access_log)  # outermost
    browser.install(app, settings.cors_origins)
    model_limits_in_openapi(app, pipeline)

    @app.post("/detect", response_model=DetectResponse, responses=ERRORS, openapi_extra=DETECT_BODY)
    async def detect(
        request: Request,
        score_threshold: float | None = ScoreThreshold,
        max_detections: int | None = MaxDetections,
        model: str | None = ModelName,
        timeout_ms: float | None = RequestedTimeout,
    ) -> Response:
        """Detect objects in one image: multipart field `image`, or the raw body with an image content type."""
        ticket = admitted(request.scope)  # by AdmissionMiddleware, at arrival
        ticket.shorten(timeout_ms)
        pipeline = models.get(model)
        options = pipeline.options(score_threshold, max_detections)
        upload = await uploads.single_image(request)
        return json_response(await pipeline.detect(upload, options, ticket=ticket))

    @app.post(
        "/detect/annotated",
        response_class=Response,
        responses={200: {"content": {annotate.JPEG: {}, annotate.PNG: {}}}, **ERRORS},
        openapi_extra=DETECT_BODY,
    )
    async def detect_annotated(
        request: Request,
        score_threshold: float | None = ScoreThreshold,
        max_detections: int | None = MaxDetections,
        model: str | None = ModelName,
        timeout_ms: float | None = RequestedTimeout,
    ) -> Response:
        """/detect's detections drawn on the image at its original size: JPEG, or PNG if `Accept` prefers it."""
        ticket = admitted(request.scope)
        ticket.shorten(timeout_ms)
        pipeline = models.get(model)
        options = pipeline.options(score_threshold, max_detections)
        upload = await uploads.single_image(request)
        result = await pipeline.detect(upload, options, ticket=ticket)
        body, media = await annotate.annotated(
            upload.data, result, request.headers.get("accept"), max_pixels=settings.max_image_pixels
        )
        headers = {"Vary": "Accept", "X-Detections": str(len(result["detections"]))}
        return Response(body, media_type=media, headers=headers)

    @app.post("/detect/batch", response_model=BatchResponse, responses=ERRORS, openapi_extra=BATCH_BODY)
    async def detect_batch(
        request: Request,
        score_threshold: float | None = ScoreThreshold,
        max_detections: int | None = MaxDetections,
        model: str | None = ModelName,
        timeout_ms: float | None = RequestedTimeout,
    ) -> Response:
        """Several images (multipart parts `images`), one result per image in order; a bad image gets its own
        error entry `{error, detail, status}` and the others are answered normally."""
        ticket = admitted(request.scope)  # by AdmissionMiddleware, at arrival
        ticket.shorten(timeout_ms)
        pipeline = models.get(model)
        options = pipeline.options(score_threshold, max_detections)
        parts = await uploads.batch_images(request, settings.max_images_per_request)
        ticket.reserve(len(parts))
        outcomes = await asyncio.gather(
            *(pipeline.detect(part, options, ticket=ticket) for part in parts), return_exceptions=True
        )
        results = [batch_entry(outcome, metrics) for outcome in outcomes]
        return json_response({"model": pipeline.ready()[0].model, "results": results})

    @app.get("/v1/model", response_model=ModelInfo, responses={503: ERRORS[503]})
    async def model_info(model: str | None = ModelName) -> dict[str, Any]:
        """One model (default: the first)."""
        return describe(model)

    @app.get("/v1/models", response_model=list[ModelInfo], responses={503: ERRORS[503]})
    async def model_list() -> list[dict[str, Any]]:
        """Every model served, the default first; `name` is what ?model= and /v2/models/NAME take."""
        return [describe(name) for name, _ in models.items()]

    def describe(model: str | None) -> dict[str, Any]:
        pipeline = models.get(model)
        metadata, _ = pipeline.ready()
        return {
            "name": model or models.default_name,
            "labels": list(metadata.labels),
            "input_size": metadata.input_size,
            "score_threshold": metadata.score_threshold,
            "iou_threshold": metadata.iou_threshold,
            "max_detections": metadata.max_detections,
            "engine": settings.engine,
            "device": settings.device,
            "max_batch_size": settings.max_batch_size,
            "weights_source": metadata.weights_source,
            "file": str(pipeline.model_path),
        }

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz() -> JSONResponse:
        """Liveness: the process answers; 503 only when the model failed to load."""
        failed = models.status == "failed"
        return JSONResponse({"status": "failed" if failed else "ok"}, status_code=503 if failed else 200)

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz() -> JSONResponse:
        """Readiness: 200 once every model is loaded and warmed up; 503 while loading, after a failure, or draining."""
        draining = models.admission.draining
        ready = models.status == "ready" and not draining
        return JSONResponse(
            {"status": "draining" if draining else models.status, "detail": models.error},
            status_code=200 if ready else 503,
            headers=None if ready else {"Retry-After": "1"},
        )

    app.include_router(v2_http.router)

    @app.get("/metrics", response_class=Response)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def model_limits_in_openapi(app: FastAPI, pipeline: Pipeline) -> None:
    """/openapi.json states the loaded model's bounds (score_threshold >= its threshold, max_detections <= its K),
    which the server enforces; until the model is loaded it gives the static ones and is not cached."""
    generate = app.openapi
    limits = {"score_threshold": "minimum", "max_detections": "maximum"}

    def openapi() -> dict[str, Any]:
        metadata = pipeline.metadata
        if metadata is None or pipeline.status != "ready":
            app.openapi_schema = None  # not cached: the bounds come with the model
            return generate()
        schema = generate()  # FastAPI's cached schema, bounds written into it (idempotent)
        bound = {"score_threshold": metadata.score_threshold, "max_detections": metadata.max_detections}
        for operation in (op for item in schema.get("paths", {}).values() for op in item.values()):
            for parameter in operation.get("parameters", []) if isinstance(operation, dict) else []:
                if parameter.get("name") in limits:
                    for sub in [parameter["schema"], *parameter["schema"].get("anyOf", [])]:
                        if sub.get("type") in ("number", "integer"):
                            sub[limits[parameter["name"]]] = bound[parameter["name"]]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def batch_entry(outcome: dict[str, Any] | BaseException, metrics: Metrics) -> dict[str, Any]:
    """A /detect/batch result entry: the detection, or this image's own error (other errors fail the request)."""
    if isinstance(outcome, ServerError):
        if outcome.reject_reason is not None:
            metrics.reject(outcome.reject_reason)
        return {**outcome.body(), "status": outcome.status}
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


class MetricsMiddleware:
    """ssd_requests_total{endpoint,code}, ssd_request_duration_seconds{endpoint}, ssd_requests_in_flight."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_of(scope["path"])
        in_flight = endpoint in DETECT_ENDPOINTS or endpoint == v2_http.INFER_ENDPOINT
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if in_flight:
            self.metrics.requests_in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            if in_flight:
                self.metrics.requests_in_flight.dec()
            self.metrics.count_request(endpoint, status, time.perf_counter() - started)


def is_admitted(path: str) -> bool:
    """Whether requests to `path` hold images in flight (admission at arrival, server.admission)."""
    return path in DETECT_ENDPOINTS or v2_http.is_infer_path(path)


def arrival_refusals(
    models: ModelRegistry,
    metrics: Metrics,
    access_log: bool,
    cors_headers: Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]],
) -> Callable[[Scope], connections.EarlyResponse | None]:
    """Admission at arrival for uvicorn's protocol (server.connections), from a request's headers: None for a
    request admitted (its ticket goes into the scope, for AdmissionMiddleware) or not admitted at all (paths
    other than the detection endpoints), else the refusal to answer with: the 503 AdmissionMiddleware would give,
    with what the stack around it adds (request id, metrics, access log, CORS), sent before any ASGI work: no
    task, no middleware, no request cycle (BENCHMARKS.md section 3, `refusal_cost`, for what a refusal costs).
    Its `ssd_request_duration_seconds` is the decision's, not the wait for its turn in the RefusalGate: counting
    it once sent cost the 200-connection flood 3-4% of its goodput (78-79% against 81-83%, interleaved)."""

    def refuse(scope: Scope) -> connections.EarlyResponse | None:
        path = scope["path"]
        if not is_admitted(path):
            return None
        refusal = models.admission.acquire_or_refusal()
        if isinstance(refusal, Ticket):
            scope[TICKET_KEY] = refusal  # for AdmissionMiddleware: admitted here, from the headers
            return None
        started = time.perf_counter()
        metrics.reject(refusal.reject_reason or "overloaded")
        request_id = requestid.incoming_id(scope)
        body = _dumps({**refusal.body(), "request_id": request_id})
        headers = [
            (b"content-type", b"application/json"),
            (b"retry-after", b"%d" % refusal.retry_after_s),
            (requestid.HEADER_KEY, request_id.encode()),
            *cors_headers(scope["headers"]),
        ]
        elapsed = time.perf_counter() - started
        metrics.count_request(endpoint_of(path), refusal.status, elapsed)
        if access_log:
            requestid.log_access(scope, requestid.RequestRecord(request_id), refusal.status, elapsed, 0, ENDPOINTS)
        return connections.EarlyResponse(refusal.status, headers, body)

    return refuse


def endpoint_of(path: str) -> str:
    """The `endpoint` label of a request path (one value for every v2 infer path; "other" for the unknown)."""
    return path if path in ENDPOINTS else v2_http.INFER_ENDPOINT if v2_http.is_infer_path(path) else "other"
