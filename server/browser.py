"""What a browser gets from the server: the demo page at `/`, offline API docs at `/docs`, CORS.

- The demo page (server/static/) is plain HTML, JS and CSS with no external resource; it calls the public API
  (`GET /v1/model`, `POST /detect`) like any client.
- Swagger UI loads its assets from the app (the files the `fastapi-offline` package ships, MIT), not from a
  CDN, so the docs work with no internet; FastAPI's documented `get_swagger_ui_html` pattern. There is no
  /redoc: ReDoc's page fetches its logo from its CDN whatever it is told.
- CORS (`SSD_CORS_ORIGINS`, comma-separated; empty: off) is Starlette's CORSMiddleware.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from server.requestid import HEADER

STATIC_DIR = Path(__file__).parent / "static"
DOCS_ASSETS_URL = "/docs-assets"
STATIC_URL = "/static"


def docs_assets_dir() -> Path:
    return Path(str(resources.files("fastapi_offline") / "static"))


def cors_origins(setting: str) -> list[str]:
    """'https://a.example, https://b.example' -> the list; '*' allows any origin; '' -> [] (CORS off)."""
    return [origin.strip() for origin in setting.split(",") if origin.strip()]


def install(app: FastAPI, cors: str) -> None:
    """Add the demo page, the offline docs (create the app with docs_url=None) and CORS."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=docs_assets_dir()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/", include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # the online validator badge would call out
        )

    options = cors_options(cors)
    if options is not None:
        app.add_middleware(CORSMiddleware, **options)


def cors_options(cors: str) -> dict[str, Any] | None:
    """CORSMiddleware's options for the `cors_origins` setting; None: CORS off."""
    origins = cors_origins(cors)
    if not origins:
        return None
    return {
        "allow_origins": origins,
        "allow_methods": ["GET", "POST"],
        "allow_headers": ["*"],
        "expose_headers": [HEADER],
    }


def early_cors_headers(cors: str) -> Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]:
    """request headers -> the CORS headers CORSMiddleware would add to a response to them, for the responses
    sent before any middleware runs (the 503s of admission at arrival, server.app.arrival_refusals): without
    them a browser reports a CORS failure instead of the 503. The rules are the middleware's own (Starlette's
    `CORSMiddleware.send`), read off an instance made with the same options."""
    options = cors_options(cors)
    if options is None:
        return lambda request_headers: []
    rules = CORSMiddleware(app=_never_called, **options)

    def headers(request_headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        origin = next((value.decode("latin-1") for name, value in request_headers if name == b"origin"), None)
        added: dict[str, str] = {}
        if origin is not None:
            added.update(rules.simple_headers)
            explicit = rules.allow_credentials if rules.allow_all_origins else rules.is_allowed_origin(origin=origin)
            if explicit:
                added["Access-Control-Allow-Origin"] = origin
        added["Vary"] = "Origin"
        return [(name.lower().encode(), value.encode("latin-1")) for name, value in added.items()]

    return headers


async def _never_called(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("early_cors_headers' CORSMiddleware only lends its rules")
