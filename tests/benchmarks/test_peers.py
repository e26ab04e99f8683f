"""benchmarks.peers: its input photo and its refusals (the full side-by-side run is a benchmark, not a test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from benchmarks.peers import PHOTOS, main, vga_jpeg


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
