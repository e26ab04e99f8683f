"""Benchmark input sets: real photos re-encoded as JPEG at a fixed size, kept in memory (optionally cached in /tmp).

- `photos`: every photo of the shared test data (`images/*.jpg`, `voc2012_sample/JPEGImages/*.jpg`),
  resized to 640x480 and re-encoded as JPEG (quality 90), so every request costs the same to decode.
- `large`: the first few of those photos upscaled to 4000x3000 (12 Mpx) and re-encoded, to show decode cost.

The photos come from `--data DIR` (`data_dir`); by default from the repository's own `data/` folder or the
shared test data beside the checkout (`../shared/data`), whichever exists first. Nothing here is ever written
into the repository: the optional cache lives under the system temp dir.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

REPO_ROOT = Path(__file__).resolve().parents[1]
# Where the photos are looked for when no --data is given, in order.
DEFAULT_DATA_DIRS: tuple[Path, ...] = (REPO_ROOT / "data", REPO_ROOT.parent / "shared" / "data")
SOURCE_GLOBS: tuple[str, ...] = ("images/*.jpg", "voc2012_sample/JPEGImages/*.jpg")
JPEG_QUALITY = 90


@dataclass(frozen=True)
class InputSpec:
    name: str
    size: tuple[int, int]  # (W, H) of the re-encoded JPEG
    max_images: int | None  # None: every source photo


INPUT_SETS: dict[str, InputSpec] = {
    "photos": InputSpec("photos", (640, 480), None),
    "large": InputSpec("large", (4000, 3000), 6),
}


@dataclass(frozen=True)
class InputSet:
    name: str
    size: tuple[int, int]  # (W, H)
    images: tuple[bytes, ...]  # JPEG bytes
    sources: tuple[str, ...]  # source file names, same order

    @property
    def mean_bytes(self) -> float:
        return sum(len(b) for b in self.images) / len(self.images)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "count": len(self.images),
            "width": self.size[0],
            "height": self.size[1],
            "jpeg_quality": JPEG_QUALITY,
            "mean_kib": round(self.mean_bytes / 1024, 1),
        }


class NoPhotos(FileNotFoundError):
    """No source photos where they were looked for; the message names the --data flag."""


def default_data_dir(candidates: Sequence[Path] = DEFAULT_DATA_DIRS) -> Path:
    """The first default folder that exists; NoPhotos (naming --data) when none does."""
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise NoPhotos(f"no benchmark photos: pass --data DIR (looked in {', '.join(map(str, candidates))})")


def source_photos(data_dir: Path | None = None) -> list[Path]:
    """The real photos under `data_dir` (None: the default folder), in a stable order."""
    folder = default_data_dir() if data_dir is None else data_dir
    found: list[Path] = []
    for pattern in SOURCE_GLOBS:
        found.extend(sorted(folder.glob(pattern)))
    if not found:
        raise NoPhotos(f"no photos under {folder} (looked for {', '.join(SOURCE_GLOBS)}): pass --data DIR")
    return found


def reencode(path: Path, size: tuple[int, int], quality: int = JPEG_QUALITY) -> bytes:
    """Decode (EXIF-orient, RGB), resize to exactly `size` (W, H) with bicubic, encode as baseline JPEG."""
    with Image.open(path) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    resized = rgb.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    resized.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _cache_file(cache_dir: Path, path: Path, size: tuple[int, int]) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{size}|{JPEG_QUALITY}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"{path.stem}-{size[0]}x{size[1]}-{digest}.jpg"


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "ssd-bench-inputs"


def load_input_set(
    name: str,
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    max_images: int | None = None,
) -> InputSet:
    """Build (or read back from the temp cache) one named input set. `data_dir=None`: the default folder;
    `cache_dir=None` keeps it in memory only."""
    if name not in INPUT_SETS:
        raise ValueError(f"unknown input set {name!r}; choose from {sorted(INPUT_SETS)}")
    spec = INPUT_SETS[name]
    paths = source_photos(data_dir)
    limit = max_images if max_images is not None else spec.max_images
    if limit is not None:
        paths = paths[:limit]
    images: list[bytes] = []
    for path in paths:
        if cache_dir is None:
            images.append(reencode(path, spec.size))
            continue
        cached = _cache_file(cache_dir, path, spec.size)
        if cached.is_file():
            images.append(cached.read_bytes())
            continue
        data = reencode(path, spec.size)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(cached)
        images.append(data)
    return InputSet(spec.name, spec.size, tuple(images), tuple(p.name for p in paths))
