"""`python -m server` / `ssd-serve`: settings from flags and SSD_* variables, then uvicorn.

Every setting has a flag (`--max-batch-size 16`) and a variable (`SSD_MAX_BATCH_SIZE=16`); a flag wins.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import types
import typing

from pydantic import ValidationError

from server import logs
from server.allocator import tune_malloc
from server.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssd-serve",
        description="Serve an exported SSD detector over HTTP (POST /detect). "
        "Each flag also reads from the SSD_<NAME> environment variable.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"SSD_{name.upper()}"
        default = field.default
        help_text = f"{field.description} (env {env}; default {default})"
        if _is_bool(field.annotation):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(field.annotation) is tuple:  # repeatable: --model a.onnx --model b.onnx
            parser.add_argument(flag, dest=name, action="append", default=None, metavar=name.upper(), help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)
    return parser


def _is_bool(annotation: object) -> bool:
    if annotation is bool:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return bool in typing.get_args(annotation)
    return False


def load_settings(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    tune_malloc()  # before numpy, onnxruntime or any thread allocates (see server/allocator.py)
    try:
        settings = load_settings(argv)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            print(f"error: {where}: {error['msg']}", file=sys.stderr)
        return 2

    from server.model_store import unavailable_reason

    reason = unavailable_reason(settings)
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2

    # Before anything imports onnxruntime (a first-start export validates with it): no telemetry database.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import uvicorn

    from server import connections
    from server.app import create_app

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_failure(reason: str) -> None:
        failure.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=logs.logging_config(settings.log_format, settings.log_level),  # every logger, uvicorn's too
        log_level=settings.log_level,
        access_log=False,  # server.requestid writes the access log (with request ids, latency, image size)
        # After the drain: no request outlives its deadline, so in-flight ones are done within it (+1 s).
        timeout_graceful_shutdown=math.ceil(settings.request_timeout_ms / 1000) + 1,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works
        limit_concurrency=settings.effective_max_connections,
        http=connections.protocol_class(
            settings.client_timeout_s,
            settings.max_header_bytes,
            settings.effective_refusal_rate,
            on_reject=app.state.metrics.reject,
            answer_at_arrival=app.state.answer_at_arrival,
            cors_headers=app.state.cors_headers,
        ),
    )

    def drain() -> None:
        app.state.models.admission.draining = True

    server = connections.DrainingServer(config, drain_s=settings.drain_seconds, on_drain=drain)
    server.run()
    if failure:
        logging.getLogger("server").error("exiting: the model could not be loaded: %s", failure[0])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
