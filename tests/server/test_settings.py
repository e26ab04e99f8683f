"""Settings: defaults, SSD_* variables, flags over variables, and refusals (server.settings, server.__main__)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.__main__ import build_parser, load_settings, main
from server.settings import DEFAULT_MODEL_PATH, REFUSALS_PER_S_PER_CORE, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SSD_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = Settings()
    assert s.model == (DEFAULT_MODEL_PATH,) and s.model_file == DEFAULT_MODEL_PATH and s.is_default_model
    assert s.grpc_port == 8001
    assert (s.engine, s.device, s.host, s.port) == ("onnxruntime", "cpu", "127.0.0.1", 8000)
    assert (s.max_batch_size, s.max_queue_delay_ms, s.max_queue_size) == (32, 2.0, 256)
    assert s.request_timeout_ms == 10_000
    assert s.max_body_bytes == 20 * 1024 * 1024 and s.max_image_pixels == 40_000_000
    assert s.weights_mirror is None and s.log_level == "info"
    assert s.effective_decode_workers >= 1
    assert s.effective_refusal_rate == REFUSALS_PER_S_PER_CORE * (os.cpu_count() or 1)


def test_the_refusal_rate_can_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(refusal_rate=750).effective_refusal_rate == 750
    monkeypatch.setenv("SSD_REFUSAL_RATE", "1200")
    assert load_settings([]).effective_refusal_rate == 1200
    assert load_settings(["--refusal-rate", "300"]).effective_refusal_rate == 300


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSD_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("SSD_MAX_QUEUE_DELAY_MS", "0")
    monkeypatch.setenv("SSD_WEIGHTS_MIRROR", "../shared/models")
    monkeypatch.setenv("SSD_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("SSD_WARMUP", "false")
    s = Settings()
    assert (s.max_batch_size, s.max_queue_delay_ms, s.weights_mirror, s.log_level, s.warmup) == (
        8,
        0.0,
        "../shared/models",
        "debug",
        False,
    )


def test_flags_win_over_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSD_PORT", "9000")
    monkeypatch.setenv("SSD_MAX_BATCH_SIZE", "8")
    s = load_settings(["--port", "9100", "--model", "x.onnx", "--no-warmup", "--intra-op-threads", "2"])
    assert (s.port, s.max_batch_size, s.model, s.warmup, s.intra_op_threads) == (9100, 8, (Path("x.onnx"),), False, 2)
    assert not s.is_default_model


def test_several_models_by_repeated_flag_or_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(["--model", "a/first.onnx", "--model", "b/second.onnx,third.onnx"])
    assert s.model == (Path("a/first.onnx"), Path("b/second.onnx"), Path("third.onnx"))
    assert s.model_file == Path("a/first.onnx") and s.for_model(Path("third.onnx")).model == (Path("third.onnx"),)
    monkeypatch.setenv("SSD_MODEL", "weights/ssd_mobilenet_v1_coco.onnx, /tmp/other.onnx")
    s = Settings()
    assert s.model == (DEFAULT_MODEL_PATH, Path("/tmp/other.onnx")) and s.is_default_model
    assert not s.for_model(Path("/tmp/other.onnx")).is_default_model


def test_two_models_may_not_share_a_name() -> None:
    with pytest.raises(ValidationError, match="served as x"):
        Settings(model=["a/x.onnx", "b/x.onnx"])


def test_every_setting_has_a_flag() -> None:
    flags = {a.dest for a in build_parser()._actions}
    assert set(Settings.model_fields) <= flags


def test_a_tensorrt_engine_file_picks_the_tensorrt_engine_on_cuda() -> None:
    assert (Settings(model=Path("m.engine")).engine, Settings(model=Path("m.engine")).device) == ("tensorrt", "cuda")
    assert Settings(model=Path("m.plan"), device="cuda:1").device == "cuda:1"
    assert Settings(engine="tensorrt").device == "cuda"
    with pytest.raises(ValidationError, match="runs on a GPU"):
        Settings(model=Path("m.plan"), device="cpu")
    assert Settings(model=Path("m.engine"), engine="onnxruntime").engine == "onnxruntime"  # named: kept (load refuses)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"engine": "tflite"},
        {"device": "gpu"},
        {"device": "cpu:1"},
        {"max_batch_size": 0},
        {"max_queue_delay_ms": -1},
        {"port": 70000},
        {"fp16": True},  # on the CPU: refused, not quietly ignored
        {"fp16": True, "device": "cuda", "engine": "onnxruntime"},
        {"log_level": "loud"},
        {"refusal_rate": -1},
        {"unknown_setting": 1},
    ],
)
def test_nonsense_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**kwargs)  # type: ignore[arg-type]


def test_batching_off_is_valid() -> None:
    s = Settings(max_batch_size=1, max_queue_delay_ms=0)
    assert (s.max_batch_size, s.max_queue_delay_ms) == (1, 0)


def test_cli_reports_bad_settings_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


def test_jpeg_draft_is_off_by_default_and_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().jpeg_draft is False
    monkeypatch.setenv("SSD_JPEG_DRAFT", "1")
    assert Settings().jpeg_draft is True
    assert load_settings(["--no-jpeg-draft"]).jpeg_draft is False
    monkeypatch.delenv("SSD_JPEG_DRAFT")
    assert load_settings(["--jpeg-draft"]).jpeg_draft is True
    assert "BENCHMARKS.md" in (Settings.model_fields["jpeg_draft"].description or "")
