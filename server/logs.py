"""Logging for the server process, uvicorn's loggers included: `--log-format text` (human lines) or `json`.

JSON: one object per line with `ts`, `level`, `logger`, `message`, the `request_id` of the request the record was
written in (if any), and for access lines (`server.access`) the request's fields: method, path, endpoint,
status, latency_ms, body_bytes, images (decoded sizes, "WxH"), client.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from server import requestid
from server.settings import LogFormat
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s%(request_id_suffix)s"


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (None outside a request) and its text form to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None) or requestid.current()
        record.request_id = request_id
        record.request_id_suffix = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        http = getattr(record, "http", None)
        if isinstance(http, dict):
            entry.update(http)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def logging_config(log_format: LogFormat, level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict: one stderr handler for the root, uvicorn's loggers propagate to it."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            }
        },
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {
            name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }
