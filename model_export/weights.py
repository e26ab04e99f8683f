"""What weights exist (model_export/manifest.json) and how to fetch them, checksummed, online or from a mirror.

    python -m model_export.weights list
    python -m model_export.weights fetch ssd_mobilenet_v1_coco [--mirror DIR] [--dest weights/] [--url URL]

A mirror directory (flag, or `SSD_WEIGHTS_MIRROR`) replaces the download. It may hold the extracted layout
`<mirror>/<mirror_subdir>/<member>` (e.g. `coco_ssd_mobilenet_v1/detect.tflite` + `labelmap.txt`, as in
../shared/models, which CI uses), the archive itself (`<mirror>/<archive_name>`), or, for single-file
entries, `<mirror>/<file_name>` under the publisher's own file name (torchvision's
`ssd300_vgg16_coco-b556d3b4.pth`, NVIDIA's `nvidia_ssdpyt_amp_200703.pt`). A given mirror that holds none of
these is an error naming the file to put there, never a silent download. Every `--weights coco` source honours
it: the TFLite import through `fetch`, the torchvision and NVIDIA sources through `fetch_from_mirror`, which
copies the file into torch.hub's cache, where their own loaders look first.

Files land in `<dest>/<name>/` (archives) or `<dest>/` (single files). Every member with a pinned sha256
is checked before it is moved into place (atomic rename); on any failure nothing is left behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from model_export.errors import ExportError

MIRROR_ENV = "SSD_WEIGHTS_MIRROR"
DEST_ENV = "SSD_WEIGHTS_DIR"
MANIFEST = Path(__file__).with_name("manifest.json")  # package data: found from an installed wheel too
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "zip": an archive with members; "file": one file
    url: str
    members: dict[str, str | None] = field(default_factory=dict)  # member -> sha256 (None: not pinned)
    primary: str = ""  # the member (or file name) fetch() returns
    archive_name: str = ""
    mirror_subdir: str = ""
    sha256_prefix: str | None = None  # "file" entries whose full hash is unknown (torchvision's 8 hex digits)


def load_manifest(path: Path = MANIFEST) -> dict[str, Entry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read the weights manifest {path}: {exc}") from exc
    entries = {}
    for name, raw in data["models"].items():
        if raw["kind"] == "zip":
            members = {m: info.get("sha256") for m, info in raw["members"].items()}
            primary = raw["primary"]
        else:
            members = {raw["file_name"]: raw.get("sha256")}
            primary = raw["file_name"]
        entries[name] = Entry(
            name=name,
            kind=raw["kind"],
            url=raw["url"],
            members=members,
            primary=primary,
            archive_name=raw.get("archive_name", ""),
            mirror_subdir=raw.get("mirror_subdir", ""),
            sha256_prefix=raw.get("sha256_prefix"),
        )
    return entries


def default_dest() -> Path:
    """Where fetched weights go: `SSD_WEIGHTS_DIR`, else ./weights (the repository's git-ignored folder)."""
    return Path(os.environ.get(DEST_ENV) or "weights")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check(entry: Entry, member: str, path: Path, origin: str) -> None:
    expected = entry.members.get(member)
    actual = sha256_of(path)
    if expected is not None and actual != expected:
        raise ExportError(
            f"checksum mismatch for {entry.name}/{member} from {origin}: sha256 {actual}, expected {expected}"
        )
    if expected is None and entry.sha256_prefix and not actual.startswith(entry.sha256_prefix):
        raise ExportError(
            f"checksum mismatch for {entry.name}/{member} from {origin}: sha256 {actual[:8]}..., "
            f"expected prefix {entry.sha256_prefix}"
        )


def _final_dir(entry: Entry, dest: Path) -> Path:
    return dest / entry.name if entry.kind == "zip" else dest


def _is_current(entry: Entry, dest: Path) -> bool:
    """Already fetched: every member present, and every pinned one with the right hash."""
    folder = _final_dir(entry, dest)
    for member, expected in entry.members.items():
        path = folder / member
        if not path.is_file() or (expected is not None and sha256_of(path) != expected):
            return False
    return True


@contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A scratch folder inside `dest` (same file system, so the final moves are atomic renames)."""
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest))
    except OSError as exc:
        raise ExportError(f"cannot write to {dest}: {exc.strerror or exc}") from exc
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        if created:
            shutil.rmtree(dest, ignore_errors=True)  # only what this call made
        raise
    shutil.rmtree(scratch, ignore_errors=True)


def _download(url: str, out: Path, name: str) -> None:
    """HTTPS download to `out`, progress on stderr."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, out.open("wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            done, shown = 0, -1
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                f.write(chunk)
                done += len(chunk)
                percent = done * 100 // total if total else -1
                if percent != shown:
                    shown = percent
                    size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
                    print(f"\rdownloading {name}: {size}", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            reason: object = f"HTTP {exc.code} {exc.reason}"
        else:
            reason = getattr(exc, "reason", None) or exc
        raise ExportError(
            f"cannot download {name} from {url}: {reason}. Without internet, pass --mirror DIR "
            f"(or set {MIRROR_ENV}) to a folder holding the files"
        ) from exc


def _extract(entry: Entry, archive: Path, scratch: Path, origin: str) -> None:
    try:
        with zipfile.ZipFile(archive) as z:
            by_name = {Path(info.filename).name: info for info in z.infolist() if not info.is_dir()}
            for member in entry.members:
                if member not in by_name:
                    raise ExportError(f"{origin} has no {member} (has {', '.join(sorted(by_name)) or 'nothing'})")
                with z.open(by_name[member]) as src, (scratch / member).open("wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    except zipfile.BadZipFile as exc:
        raise ExportError(f"{origin} is not a valid zip archive: {exc}") from exc


def _from_mirror(entry: Entry, mirror: Path, scratch: Path) -> None:
    """Copy the entry's files out of a mirror folder into `scratch`."""
    candidates = []
    if entry.kind == "zip":
        extracted = mirror / entry.mirror_subdir if entry.mirror_subdir else mirror
        candidates.append(extracted / entry.primary)
        if (extracted / entry.primary).is_file():
            for member in entry.members:
                src = extracted / member
                if not src.is_file():
                    raise ExportError(f"mirror {extracted} has {entry.primary} but no {member}")
                shutil.copyfile(src, scratch / member)
            return
        archive = mirror / entry.archive_name
        candidates.append(archive)
        if archive.is_file():
            _extract(entry, archive, scratch, str(archive))
            return
    else:
        src = mirror / entry.primary
        candidates.append(src)
        if src.is_file():
            shutil.copyfile(src, scratch / entry.primary)
            return
    raise ExportError(f"mirror {mirror} has no {entry.name}: looked for {' or '.join(map(str, candidates))}")


def fetch(
    name: str,
    dest_dir: Path | str | None = None,
    mirror: Path | str | None = None,
    *,
    url: str | None = None,
    manifest: Path = MANIFEST,
) -> Path:
    """Make `name`'s files present and verified under `dest_dir`; return the primary file's path.

    `mirror`: a folder to take the files from instead of downloading (None: `SSD_WEIGHTS_MIRROR` if set).
    `url`: override the manifest's download address (tests, private mirrors over HTTP).
    Already-present files with the right checksums are reused without any network access.
    """
    entries = load_manifest(manifest)
    if name not in entries:
        raise ExportError(f"unknown weights {name!r}; the manifest lists: {', '.join(sorted(entries))}")
    entry = entries[name]
    dest = Path(dest_dir) if dest_dir is not None else default_dest()
    final = _final_dir(entry, dest)
    if _is_current(entry, dest):
        return final / entry.primary
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None

    with _staging(dest) as scratch:
        staged = scratch / "files"
        staged.mkdir()
        if mirror is not None:
            mirror_dir = Path(mirror)
            if not mirror_dir.is_dir():
                raise ExportError(f"weights mirror {mirror_dir} is not a directory")
            _from_mirror(entry, mirror_dir, staged)
            origin = f"mirror {mirror_dir}"
        else:
            source = url or entry.url
            if entry.kind == "zip":
                archive = scratch / (entry.archive_name or "download.zip")
                _download(source, archive, name)
                _extract(entry, archive, staged, source)
            else:
                _download(source, staged / entry.primary, name)
            origin = source
        for member in entry.members:
            _check(entry, member, staged / member, origin)
        final.mkdir(parents=True, exist_ok=True)
        for member in entry.members:
            os.replace(staged / member, final / member)
    return final / entry.primary


def fetch_from_mirror(name: str, cache_dir: Path) -> Path | None:
    """With `SSD_WEIGHTS_MIRROR` set: `name`'s file copied from it into `cache_dir` (checked); else None."""
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror:
        return None
    return fetch(name, cache_dir, mirror)


def offline_hint(name: str) -> str:
    """Where to put `name`'s file for an offline run (for error messages)."""
    entry = load_manifest()[name]
    return f"offline: put {entry.primary} (from {entry.url}) in a folder and set {MIRROR_ENV} to that folder"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_export.weights", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the manifest's entries")
    get = sub.add_parser("fetch", help="download (or copy from a mirror) and verify one entry")
    get.add_argument("name")
    get.add_argument("--mirror", type=Path, default=None, help=f"offline mirror folder (default: ${MIRROR_ENV})")
    get.add_argument("--dest", type=Path, default=None, help=f"target folder (default: ${DEST_ENV} or ./weights)")
    get.add_argument("--url", default=None, help="download from this address instead of the manifest's")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for entry in load_manifest().values():
                pinned = "sha256 pinned" if any(entry.members.values()) else "no full sha256"
                print(f"{entry.name:40s} {entry.kind:5s} {pinned:15s} {entry.url}")
            return 0
        print(fetch(args.name, args.dest, args.mirror, url=args.url))
        return 0
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
