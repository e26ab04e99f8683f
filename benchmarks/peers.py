"""ssd-serve side by side with the peers (LiteRT servers a user could write), in one command.

    python -m benchmarks.peers --peers-python PEERS_VENV/bin/python [--seconds 10] [--image photo.jpg]

Runs `../shared/peers/side_by_side.sh` from the repository root: the same 640x480 JPEG to each server, one server
at a time (ssd-serve's `python -m server` with its defaults, a naive FastAPI + LiteRT server, LitServe + LiteRT with
2 workers), wrk closed loop at concurrency 1, 8 and 32, then a summary line: saturated img/s of each, the ratio to
the best peer, c=1 p50s and ssd-serve's non-2xx count. Without --image, the first shared photo is re-encoded at
640x480 (JPEG quality 90) into a temporary folder. The peers' Python needs litserve and ai-edge-litert; wrk must be
on PATH. Takes about 3 servers x 3 levels x --seconds, plus start-up (~2 minutes at 10 s).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SCRIPT = SHARED / "peers" / "side_by_side.sh"
PHOTOS = SHARED / "data" / "images"


def vga_jpeg(source: Path, out: Path) -> Path:
    """`source` as a 640x480 RGB JPEG (quality 90) at `out`."""
    from PIL import Image, ImageOps

    with Image.open(source) as image:
        ImageOps.exif_transpose(image).convert("RGB").resize((640, 480), Image.Resampling.BILINEAR).save(
            out, format="JPEG", quality=90
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers-python", type=Path, required=True, help="Python of a venv with litserve and ai-edge-litert")
    p.add_argument("--seconds", type=int, default=10, help="wrk duration per concurrency level (default 10)")
    p.add_argument("--image", type=Path, help="JPEG to send (default: the first shared photo at 640x480)")
    args = p.parse_args(argv)
    needed = (("side-by-side script", SCRIPT), ("peers Python", args.peers_python))
    problems = [f"no {what} at {path}" for what, path in needed if not path.exists()]
    if shutil.which("wrk") is None:
        problems.append("wrk is not on PATH")
    if problems:
        print("benchmarks.peers: " + "; ".join(problems), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        image = args.image
        if image is None:
            photos = sorted(PHOTOS.glob("*.jpg"))
            if not photos:
                print(f"benchmarks.peers: no photos in {PHOTOS}; pass --image", file=sys.stderr)
                return 2
            image = vga_jpeg(photos[0], Path(folder) / "vga.jpg")
        # The script starts the peers from its own folder: a relative --peers-python would no longer point at the
        # venv there. absolute(), not resolve(): a venv's python is a symlink, and resolving it leaves the venv.
        peers_python = args.peers_python.absolute()
        command = ["bash", str(SCRIPT), sys.executable, str(peers_python), str(image.resolve()), str(args.seconds)]
        return subprocess.run(command, cwd=REPO_ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
