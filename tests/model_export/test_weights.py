"""model_export/manifest.json and `model_export.weights.fetch`: mirror layouts, checksums, downloads, failures.

No outside traffic: downloads go to a throwaway HTTP server on 127.0.0.1 or to a closed local port.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_export import weights
from model_export.errors import ExportError

REPO_ROOT = Path(__file__).resolve().parents[2]
MIRROR = REPO_ROOT.parent / "shared" / "models"
MODEL_DIR = MIRROR / "coco_ssd_mobilenet_v1"
NAME = "ssd_mobilenet_v1_coco"
DETECT_SHA256 = "e4b118e5e4531945de2e659742c7c590f7536f8d0ed26d135abcfe83b4779d13"  # SOURCE.md

needs_mirror = pytest.mark.skipif(not (MODEL_DIR / "detect.tflite").is_file(), reason=f"no shared mirror at {MIRROR}")


@pytest.fixture(autouse=True)
def _no_ambient_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(weights.MIRROR_ENV, raising=False)
    monkeypatch.delenv(weights.DEST_ENV, raising=False)


def _closed_port_url(name: str = "x.zip") -> str:
    with socket.socket() as s:  # bind, read the port, close: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def _leftovers(path: Path) -> list[Path]:
    return sorted(path.rglob("*")) if path.exists() else []


def _official_style_zip(path: Path, detect: bytes, labelmap: str) -> None:
    """The archive's layout: detect.tflite and labelmap.txt at its root."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("detect.tflite", detect)
        z.writestr("labelmap.txt", labelmap)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1 (quietly); yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# -------------------------------------------------------------------------------------------------- manifest


def test_manifest_entries() -> None:
    entries = weights.load_manifest()
    assert set(entries) >= {
        NAME,
        "ssd300_vgg16_coco",
        "ssdlite320_mobilenet_v3_large_coco",
        "nvidia_ssd300_resnet50_coco",
    }
    assert all(e.url.startswith("https://") for e in entries.values())
    tflite = entries[NAME]
    assert tflite.kind == "zip" and tflite.primary == "detect.tflite"
    assert tflite.members["detect.tflite"] == DETECT_SHA256
    assert tflite.url.endswith("/coco_ssd_mobilenet_v1_1.0_quant_2018_06_29.zip")
    raw = json.loads(weights.MANIFEST.read_text())["models"][NAME]
    assert raw["archive_sha256"] is None and "not recorded" in raw["archive_sha256_note"]


def test_manifest_agrees_with_torchvision() -> None:
    from torchvision.models.detection import SSD300_VGG16_Weights, SSDLite320_MobileNet_V3_Large_Weights

    entries = weights.load_manifest()
    for name, enum in (
        ("ssd300_vgg16_coco", SSD300_VGG16_Weights.COCO_V1),
        ("ssdlite320_mobilenet_v3_large_coco", SSDLite320_MobileNet_V3_Large_Weights.COCO_V1),
    ):
        entry = entries[name]
        assert entry.url == enum.url
        assert entry.sha256_prefix and entry.url.endswith(f"-{entry.sha256_prefix}.pth")


# ----------------------------------------------------------------------------------------------- from a mirror


@needs_mirror
def test_fetch_from_extracted_mirror(tmp_path: Path) -> None:
    dest = tmp_path / "weights"
    path = weights.fetch(NAME, dest, mirror=MIRROR)
    assert path == dest / NAME / "detect.tflite"
    assert weights.sha256_of(path) == DETECT_SHA256
    assert (dest / NAME / "labelmap.txt").read_bytes() == (MODEL_DIR / "labelmap.txt").read_bytes()
    assert not [p for p in _leftovers(dest) if p.name.startswith(".fetch-")]
    # Present and verified: reused, no mirror or network needed (the closed port would fail).
    stamp = path.stat().st_mtime_ns
    assert weights.fetch(NAME, dest, url=_closed_port_url()) == path
    assert path.stat().st_mtime_ns == stamp


@needs_mirror
def test_fetch_mirror_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(weights.MIRROR_ENV, str(MIRROR))
    monkeypatch.setenv(weights.DEST_ENV, str(tmp_path / "w"))
    assert weights.fetch(NAME) == tmp_path / "w" / NAME / "detect.tflite"


@needs_mirror
def test_fetch_from_archive_in_mirror(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    labelmap = "???\n" + (MODEL_DIR / "labelmap.txt").read_text()  # the archive's copy has a background row
    _official_style_zip(
        mirror / "coco_ssd_mobilenet_v1_1.0_quant_2018_06_29.zip", (MODEL_DIR / "detect.tflite").read_bytes(), labelmap
    )
    path = weights.fetch(NAME, tmp_path / "dest", mirror=mirror)
    assert weights.sha256_of(path) == DETECT_SHA256
    assert (path.parent / "labelmap.txt").read_text() == labelmap


@needs_mirror
def test_tampered_mirror_copy_is_rejected(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror" / "coco_ssd_mobilenet_v1"
    mirror.mkdir(parents=True)
    data = bytearray((MODEL_DIR / "detect.tflite").read_bytes())
    data[1000] ^= 0xFF
    (mirror / "detect.tflite").write_bytes(bytes(data))
    shutil.copyfile(MODEL_DIR / "labelmap.txt", mirror / "labelmap.txt")
    dest = tmp_path / "dest"
    with pytest.raises(
        ExportError, match=r"checksum mismatch for ssd_mobilenet_v1_coco/detect.tflite .*expected e4b118e5"
    ):
        weights.fetch(NAME, dest, mirror=mirror.parent)
    assert _leftovers(dest) == []  # nothing left behind


@needs_mirror
def test_tampered_archive_is_rejected_and_existing_dest_kept_clean(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _official_style_zip(mirror / "coco_ssd_mobilenet_v1_1.0_quant_2018_06_29.zip", b"not the model", "person\n")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "other.onnx").write_text("kept")
    with pytest.raises(ExportError, match="checksum mismatch"):
        weights.fetch(NAME, dest, mirror=mirror)
    assert _leftovers(dest) == [dest / "other.onnx"]


def test_mirror_without_the_files(tmp_path: Path) -> None:
    with pytest.raises(
        ExportError, match=r"mirror .* has no ssd_mobilenet_v1_coco: looked for .*detect.tflite or .*\.zip"
    ):
        weights.fetch(NAME, tmp_path / "dest", mirror=tmp_path)
    with pytest.raises(ExportError, match="is not a directory"):
        weights.fetch(NAME, tmp_path / "dest", mirror=tmp_path / "absent")
    assert _leftovers(tmp_path / "dest") == []


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"unknown weights 'nope'; the manifest lists: .*ssd_mobilenet_v1_coco"):
        weights.fetch("nope", tmp_path)


# ------------------------------------------------------------------------------------------------- downloading


def test_unreachable_url_without_mirror(tmp_path: Path) -> None:
    url = _closed_port_url()
    dest = tmp_path / "dest"
    with pytest.raises(ExportError, match=rf"cannot download ssd_mobilenet_v1_coco from {url}: .*--mirror DIR"):
        weights.fetch(NAME, dest, url=url)
    assert _leftovers(dest) == []


@needs_mirror
def test_download_over_http(tmp_path: Path, http_root: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    root, base = http_root
    _official_style_zip(root / "model.zip", (MODEL_DIR / "detect.tflite").read_bytes(), "???\nperson\n")
    path = weights.fetch(NAME, tmp_path / "dest", url=f"{base}/model.zip")
    assert weights.sha256_of(path) == DETECT_SHA256
    assert "downloading ssd_mobilenet_v1_coco" in capsys.readouterr().err
    assert sorted(p.name for p in _leftovers(tmp_path / "dest")) == sorted([NAME, "detect.tflite", "labelmap.txt"])


def test_download_of_a_bad_archive(tmp_path: Path, http_root: tuple[Path, str]) -> None:
    root, base = http_root
    (root / "model.zip").write_bytes(b"<html>not a zip</html>")
    with pytest.raises(ExportError, match="is not a valid zip archive"):
        weights.fetch(NAME, tmp_path / "dest", url=f"{base}/model.zip")
    with pytest.raises(ExportError, match=r"cannot download .*HTTP 404"):
        weights.fetch(NAME, tmp_path / "dest", url=f"{base}/missing.zip")
    assert _leftovers(tmp_path / "dest") == []


def test_single_file_entry_checks_the_hash_prefix(tmp_path: Path, http_root: tuple[Path, str]) -> None:
    root, base = http_root
    payload = b"a checkpoint"
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    (root / f"ckpt-{prefix}.pth").write_bytes(payload)
    manifest = tmp_path / "manifest.json"
    entry = {
        "kind": "file",
        "url": f"{base}/ckpt-{prefix}.pth",
        "file_name": f"ckpt-{prefix}.pth",
        "sha256": None,
        "sha256_prefix": prefix,
    }
    manifest.write_text(json.dumps({"format_version": 1, "models": {"ckpt": entry}}))
    assert weights.fetch("ckpt", tmp_path / "dest", manifest=manifest).read_bytes() == payload
    entry["sha256_prefix"] = "00000000"
    manifest.write_text(json.dumps({"format_version": 1, "models": {"ckpt": entry}}))
    with pytest.raises(ExportError, match="expected prefix 00000000"):
        weights.fetch("ckpt", tmp_path / "dest2", manifest=manifest)
    assert _leftovers(tmp_path / "dest2") == []


# --------------------------------------------------------------------------------------------------------- CLI


@needs_mirror
def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert weights.main(["fetch", NAME, "--mirror", str(MIRROR), "--dest", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / NAME / "detect.tflite")
    assert weights.main(["fetch", NAME, "--dest", str(tmp_path / "x"), "--url", _closed_port_url()]) == 1
    assert capsys.readouterr().err.startswith("error: cannot download")
    assert weights.main(["list"]) == 0
    assert NAME in capsys.readouterr().out
