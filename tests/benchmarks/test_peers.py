"""benchmarks.peers: its input photo and its refusals (the full side-by-side run is a benchmark, not a test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from benchmarks.peers import PHOTOS, c1_summary, main, vga_jpeg, wrk_result


def test_vga_jpeg_is_640x480_rgb(tmp_path: Path) -> None:
    photos = sorted(PHOTOS.glob("*.jpg"))
    if not photos:
        pytest.skip("shared photos missing")
    out = vga_jpeg(photos[0], tmp_path / "vga.jpg")
    with Image.open(out) as image:
        assert (image.format, image.size, image.mode) == ("JPEG", (640, 480), "RGB")


def test_missing_peers_python_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--peers-python", str(tmp_path / "nope" / "python")]) == 2
    assert "no peers Python at" in capsys.readouterr().err


def test_wrk_result_reads_post_luas_line() -> None:
    out = "Running 5s test\n  1 threads and 1 connections\nRESULT rps=75.3 p50_ms=13.0 p99_ms=19.3 errors=0 non2xx=2\n"
    assert wrk_result(out) == {"rps": 75.3, "p50_ms": 13.0, "p99_ms": 19.3, "errors": 0.0, "non2xx": 2.0}
    with pytest.raises(RuntimeError, match="no RESULT line"):
        wrk_result("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_c1_summary_counts_the_rounds_ssd_serve_was_not_slower() -> None:
    def run(p50: float, failed: int = 0) -> dict[str, float]:
        return {"rps": 1000 / p50, "p50_ms": p50, "p99_ms": 2 * p50, "errors": 0.0, "non2xx": float(failed)}

    line = c1_summary([(run(12.0), run(13.0)), (run(13.5, failed=2), run(13.0)), (run(12.5), run(12.5))])
    assert "ssd-serve median 12.5 (12.0-13.5) vs naive median 13.0 (12.5-13.0)" in line
    assert line.endswith("at most the naive peer's in 2 of 3; ssd-serve errors and non-2xx 2")


def test_c1_only_needs_rounds(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--peers-python", str(tmp_path / "python"), "--c1-only"])
