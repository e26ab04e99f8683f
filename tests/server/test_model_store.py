"""The first-start export: a subprocess whose progress goes to the log; only the default model is exported."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from server import model_store
from server.model_store import ModelUnavailable, ensure_model, export_command, run_export
from server.settings import DEFAULT_MODEL_PATH, Settings


def test_progress_lines_are_logged_and_the_mirror_is_passed_on(caplog: pytest.LogCaptureFixture) -> None:
    script = (
        "import os; print('- build ...'); print('  done in 1.0 s'); print('mirror', os.environ['SSD_WEIGHTS_MIRROR'])"
    )
    with caplog.at_level(logging.INFO, logger="server.model_store"):
        asyncio.run(run_export([sys.executable, "-c", script], weights_mirror="/offline/models"))
    lines = [r.getMessage() for r in caplog.records]
    assert "export | - build ..." in lines and "export | mirror /offline/models" in lines


def test_a_failed_export_says_why() -> None:
    script = "import sys; print('error: no weights'); sys.exit(3)"
    with pytest.raises(ModelUnavailable, match="exit code 3.*no weights"):
        asyncio.run(run_export([sys.executable, "-c", script], weights_mirror=None))


def test_another_missing_model_is_not_exported(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="not found"):
        asyncio.run(ensure_model(Settings(model=tmp_path / "mine.onnx")))


def test_an_existing_model_is_used_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "mine.onnx"
    path.write_bytes(b"x")
    assert asyncio.run(ensure_model(Settings(model=path))) == path


def test_the_missing_default_model_is_exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default path is relative: weights/ssd_mobilenet_v1_coco.onnx here
    calls: list[tuple[list[str], str | None]] = []

    async def fake_export(command: list[str], weights_mirror: str | None) -> None:
        calls.append((command, weights_mirror))
        (tmp_path / DEFAULT_MODEL_PATH).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / DEFAULT_MODEL_PATH).write_bytes(b"onnx")

    monkeypatch.setattr(model_store, "run_export", fake_export)
    assert asyncio.run(ensure_model(Settings(weights_mirror="../shared/models"))) == DEFAULT_MODEL_PATH
    assert calls == [(export_command(DEFAULT_MODEL_PATH), "../shared/models")]
    assert calls[0][0][1:] == [
        "-m",
        "model_export",
        "--model",
        "ssd_mobilenet_v1_coco",
        "--weights",
        "coco",
        "--out",
        str(DEFAULT_MODEL_PATH),
    ]
