"""What a browser gets from the server: the demo page at `/`, offline API docs at `/docs`, CORS.

- The demo page (server/static/) is plain HTML, JS and CSS with no external resource; it calls the public API
  (`GET /v1/model`, `POST /detect`) like any client.
- Swagger UI loads its assets from the app (the files the `fastapi-offline` package ships, MIT), not from a
  CDN, so the docs work with no internet; FastAPI's documented `get_swagger_ui_html` pattern. There is no
  /redoc: ReDoc's page fetches its logo from its CDN whatever it is told.
- CORS (`SSD_CORS_ORIGINS`, comma-separated; empty: off) is Starlette's CORSMiddleware.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

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

    origins = cors_origins(cors)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=[HEADER],
        )
