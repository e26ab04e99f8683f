"""Make sure the model file exists: the default model is exported on first start, anything else must be there.

The export is the project's own command, run as a subprocess so the server process never imports torch:

    python -m model_export --model ssd_mobilenet_v1_coco --weights coco --out weights/ssd_mobilenet_v1_coco.onnx

Its progress lines go to the server log as they come. `SSD_WEIGHTS_MIRROR` (settings.weights_mirror) is
passed on, so an offline machine fetches the weights from a local folder.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
from pathlib import Path

from server.settings import DEFAULT_MODEL_NAME, Settings

logger = logging.getLogger("server.model_store")
MIRROR_ENV = "SSD_WEIGHTS_MIRROR"
# What `python -m model_export` needs for the default model (the `export` extra); the server-only install lacks it.
EXPORTER_MODULES = ("torch", "onnx", "tflite")
NO_EXPORTER_HINT = "pass --model FILE.onnx, or install '.[export]' to export the default model"


class ModelUnavailable(RuntimeError):
    """The configured model file does not exist and cannot be made."""


def missing_exporter_modules() -> list[str]:
    """The exporter's modules this interpreter cannot import (found without importing them: torch is slow)."""
    return [name for name in EXPORTER_MODULES if importlib.util.find_spec(name) is None]


def unavailable_reason(settings: Settings) -> str | None:
    """Why the model can never be loaded, known before the server starts: no file and no way to make it."""
    if settings.model_file.is_file() or not settings.is_default_model:
        return None  # a missing non-default file is reported by ensure_model, as before
    missing = missing_exporter_modules()
    if not missing:
        return None
    return f"no model file at {settings.model_file} and no exporter ({', '.join(missing)} not installed): {NO_EXPORTER_HINT}"


def export_command(out: Path, model_name: str = DEFAULT_MODEL_NAME) -> list[str]:
    return [sys.executable, "-m", "model_export", "--model", model_name, "--weights", "coco", "--out", str(out)]


async def ensure_model(settings: Settings) -> Path:
    """The path of a model file that exists, exporting the default model first if needed."""
    path = settings.model_file
    if path.is_file():
        return path
    if not settings.is_default_model:
        raise ModelUnavailable(f"model file not found: {path}")
    reason = unavailable_reason(settings)
    if reason is not None:
        raise ModelUnavailable(reason)
    logger.info("%s is missing: exporting %s (first start; this takes a minute)", path, DEFAULT_MODEL_NAME)
    await run_export(export_command(path), settings.weights_mirror)
    if not path.is_file():
        raise ModelUnavailable(f"the exporter finished but {path} does not exist")
    logger.info("exported %s", path)
    return path


async def run_export(command: list[str], weights_mirror: str | None) -> None:
    """Run the exporter, streaming its output lines to the log; ModelUnavailable if it fails."""
    env = dict(os.environ)
    if weights_mirror:
        env[MIRROR_ENV] = weights_mirror
    env.setdefault("PYTHONUNBUFFERED", "1")
    logger.info("running: %s", " ".join(command))
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    assert process.stdout is not None
    tail: list[str] = []
    try:
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                logger.info("export | %s", line)
                tail = (tail + [line])[-5:]
        code = await process.wait()
    except asyncio.CancelledError:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    if code != 0:
        raise ModelUnavailable(f"exporting the default model failed (exit code {code}): {' | '.join(tail)}")
