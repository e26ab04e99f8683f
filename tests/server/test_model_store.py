"""The first-start export: a subprocess whose progress goes to the log; only the default model is exported."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
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


def test_no_model_and_no_exporter_is_refused_before_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no weights/ here: the default model file is missing
    monkeypatch.setattr(model_store, "EXPORTER_MODULES", ("torch", "ssd_serve_no_such_module"))
    reason = model_store.unavailable_reason(Settings())
    assert reason is not None and "ssd_serve_no_such_module not installed" in reason
    assert reason.endswith("pass --model FILE.onnx, or install '.[export]' to export the default model")
    with pytest.raises(ModelUnavailable, match=r"install '\.\[export\]'"):
        asyncio.run(ensure_model(Settings()))
    monkeypatch.setattr(model_store, "EXPORTER_MODULES", ("json",))  # importable: the exporter would run
    assert model_store.unavailable_reason(Settings()) is None
    assert model_store.unavailable_reason(Settings(model=tmp_path / "mine.onnx")) is None  # not the default


def test_python_m_server_without_model_or_exporter_exits_2_with_one_line(tmp_path: Path) -> None:
    """The real entry point, in a fresh process whose exporter modules are absent (as in a '.[server]' install)."""
    script = (
        "import sys, server.model_store as store; store.EXPORTER_MODULES = ('ssd_serve_no_such_module',); "
        "from server.__main__ import main; sys.exit(main([]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSD_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # this checkout's server, run from tmp_path
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 30
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pass --model FILE.onnx, or install '.[export]'" in lines[0], result.stderr
