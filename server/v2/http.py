"""KServe v2 (Open Inference Protocol) over HTTP/REST, on the same port as /detect.

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready    200, or 503 (not ready / failed)
    GET  /v2/models/{name}[/versions/{v}]      model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer   JSON, or JSON + binary tensor data

Errors are the protocol's `{"error": "<message>"}` with the status of the domain error (a request the
protocol calls malformed is 400, an unknown model or version 404, not ready or queue full 503).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from server.admission import RequestedTimeout, admitted
from server.errors import ServerError
from server.models import ModelRegistry
from server.v2 import codec, service

INFER_ENDPOINT = "/v2/infer"  # the metrics' endpoint label of every model's infer route
INLINE_PARSE_BYTES = 1 << 20  # larger request bodies are parsed in a worker thread


def is_infer_path(path: str) -> bool:
    return path.startswith("/v2/models/") and path.endswith("/infer")


def v2_error(exc: ServerError) -> JSONResponse:
    status = 400 if exc.status == 422 else exc.status  # the protocol's "bad request"
    return JSONResponse({"error": exc.detail}, status_code=status, headers=exc.headers())


class V2Route(APIRoute):
    """Domain errors as v2 errors (`{"error": ...}`), counted as rejections like everywhere else."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ServerError as exc:
                if exc.reject_reason is not None:
                    request.app.state.metrics.reject(exc.reject_reason)
                return v2_error(exc)

        return handle


router = APIRouter(prefix="/v2", tags=["KServe v2"], route_class=V2Route)


def _models(request: Request) -> ModelRegistry:
    return request.app.state.models  # type: ignore[no-any-return]


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return service.server_metadata()


@router.get("/health/live")
async def live(request: Request) -> Response:
    return Response(status_code=503 if _models(request).status == "failed" else 200)


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    models = _models(request)
    ok = models.status == "ready" and not models.admission.draining  # 503 from the first moment of a drain
    return Response(status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "1"})


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    pipeline = _models(request).get(name)
    service.check_version(name, version)
    return service.model_metadata(name, pipeline)


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    pipeline = _models(request).get(name)
    service.check_version(name, version)
    ok = pipeline.status == "ready"
    return Response(status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "1"})


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(
    request: Request, name: str, version: str | None = None, timeout_ms: float | None = RequestedTimeout
) -> Response:
    """One v2 inference request; every element joins the dynamic batcher on its own."""
    ticket = admitted(request.scope)  # by the app's AdmissionMiddleware, at arrival
    ticket.shorten(timeout_ms)
    pipeline = _models(request).get(name)
    service.check_version(name, version)
    body, header_length = await request.body(), request.headers.get(codec.HEADER_LENGTH)
    if len(body) > INLINE_PARSE_BYTES:  # megabytes of JSON numbers take long enough to stall the event loop
        loop = asyncio.get_running_loop()
        infer_request = await loop.run_in_executor(None, codec.parse_http_request, body, header_length)
    else:
        infer_request = codec.parse_http_request(body, header_length)
    outputs = await service.infer(pipeline, infer_request, ticket)
    default_binary = infer_request.parameters.get("binary_data_output") is True
    asked = {output.name: output.binary for output in infer_request.outputs}
    binary = {t.name for t in outputs if (default_binary if asked.get(t.name) is None else asked[t.name])}
    header: dict[str, Any] = {"model_name": name, "model_version": service.MODEL_VERSION}
    if infer_request.id:
        header["id"] = infer_request.id
    content, headers = codec.http_response(header, outputs, binary)
    return Response(content, headers=headers)
