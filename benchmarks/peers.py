"""ssd-serve side by side with the peers (LiteRT servers a user could write), in one command.

    python -m benchmarks.peers --peers-python PEERS_VENV/bin/python [--seconds 10] [--image photo.jpg]
    python -m benchmarks.peers --peers-python PEERS_VENV/bin/python --c1-rounds 6 [--c1-only]

Runs `../shared/peers/side_by_side.sh` from the repository root: the same 640x480 JPEG to each server, one server
at a time (ssd-serve's `python -m server` with its defaults, a naive FastAPI + LiteRT server, LitServe + LiteRT with
2 workers), wrk closed loop at concurrency 1, 8 and 32, then a summary line: saturated img/s of each, the ratio to
the best peer, c=1 p50s and ssd-serve's non-2xx count. Without --image, the first shared photo is re-encoded at
640x480 (JPEG quality 90) into a temporary folder. The peers' Python needs litserve and ai-edge-litert; wrk must be
on PATH. Takes about 3 servers x 3 levels x --seconds, plus start-up (~2 minutes at 10 s).

--c1-rounds N then compares c=1 without the machine's drift: the script's c=1 runs of ssd-serve and the naive peer
are a minute apart, and a shared VM's speed moves by more than their difference within that. Both servers are up
together (idle, each takes no CPU from the other) and N wrk c=1 runs of --seconds alternate between them; it prints
each round's p50s, their medians and in how many rounds ssd-serve's was at most the peer's (2 x N x --seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SCRIPT = SHARED / "peers" / "side_by_side.sh"
PHOTOS = SHARED / "data" / "images"
POST_LUA = SHARED / "peers" / "post.lua"
TFLITE = SHARED / "models" / "coco_ssd_mobilenet_v1"
_WRK_RESULT = re.compile(r"RESULT rps=([\d.]+) p50_ms=([\d.]+) p99_ms=([\d.]+) errors=(\d+) non2xx=(\d+)")


def vga_jpeg(source: Path, out: Path) -> Path:
    """`source` as a 640x480 RGB JPEG (quality 90) at `out`."""
    from PIL import Image, ImageOps

    with Image.open(source) as image:
        ImageOps.exif_transpose(image).convert("RGB").resize((640, 480), Image.Resampling.BILINEAR).save(
            out, format="JPEG", quality=90
        )
    return out


def wrk_result(output: str) -> dict[str, float]:
    """post.lua's RESULT line -> rps, p50_ms, p99_ms, errors, non2xx."""
    match = _WRK_RESULT.search(output)
    if match is None:
        raise RuntimeError(f"no RESULT line in wrk's output: {output[-500:]!r}")
    return dict(zip(("rps", "p50_ms", "p99_ms", "errors", "non2xx"), map(float, match.groups()), strict=True))


def wrk_c1(url: str, image: Path, seconds: int) -> dict[str, float]:
    """One wrk closed-loop run at concurrency 1 against `url`/detect, as side_by_side.sh runs it."""
    command = ["wrk", "-t1", "-c1", f"-d{seconds}s", "--timeout", "10s", "-s", str(POST_LUA), f"{url}/detect"]
    done = subprocess.run(command, env={**os.environ, "IMG": str(image)}, capture_output=True, text=True, check=False)
    return wrk_result(done.stdout)


def c1_summary(rounds: list[tuple[dict[str, float], dict[str, float]]]) -> str:
    """(ssd-serve's, the naive peer's) `wrk_result` per round -> the summary line."""
    ours, naive = [r[0]["p50_ms"] for r in rounds], [r[1]["p50_ms"] for r in rounds]
    wins = sum(a <= b for a, b in zip(ours, naive, strict=True))
    failed = sum(int(r[0]["errors"] + r[0]["non2xx"]) for r in rounds)
    return (
        f"c=1 p50 ms, {len(rounds)} interleaved rounds: ssd-serve median {statistics.median(ours):.1f} "
        f"({min(ours):.1f}-{max(ours):.1f}) vs naive median {statistics.median(naive):.1f} "
        f"({min(naive):.1f}-{max(naive):.1f}); ssd-serve at most the naive peer's in {wins} of {len(rounds)}; "
        f"ssd-serve errors and non-2xx {failed}"
    )


@contextlib.contextmanager
def naive_peer(peers_python: Path) -> Iterator[str]:
    """`../shared/peers/naive_litert.py` under uvicorn on a free loopback port, ready; stopped on exit."""
    from benchmarks.loadgen import wait_ready
    from benchmarks.server_proc import free_port, stop

    port = free_port()
    env = {**os.environ, "MODEL": str(TFLITE / "detect.tflite"), "LABELS": str(TFLITE / "labelmap.txt"), "THREADS": "2"}
    command = [str(peers_python), "-m", "uvicorn", "naive_litert:app", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(command, cwd=SCRIPT.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_ready(url, 120.0))
        yield url
    finally:
        stop(proc)


def interleaved_c1(
    peers_python: Path, image: Path, rounds: int, seconds: int
) -> list[tuple[dict[str, float], dict[str, float]]]:
    """ssd-serve (defaults) and the naive peer up together; `rounds` pairs of wrk c=1 runs, one on each."""
    from benchmarks.server_proc import running_server

    with running_server({}) as ours, naive_peer(peers_python) as naive:
        for url in (ours.url, naive):
            wrk_c1(url, image, 1)  # warm-up, as the script's first request
        results = []
        for k in range(rounds):
            pair = (wrk_c1(ours.url, image, seconds), wrk_c1(naive, image, seconds))
            print(f"round {k + 1}: c=1 p50 ms ssd-serve {pair[0]['p50_ms']:.1f}, naive {pair[1]['p50_ms']:.1f}",
                  flush=True)
            results.append(pair)
        return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers-python", type=Path, required=True, help="Python of a venv with litserve and ai-edge-litert")
    p.add_argument("--seconds", type=int, default=10, help="wrk duration per concurrency level (default 10)")
    p.add_argument("--image", type=Path, help="JPEG to send (default: the first shared photo at 640x480)")
    p.add_argument("--c1-rounds", type=int, default=0, help="interleaved c=1 rounds after the script (default 0)")
    p.add_argument("--c1-only", action="store_true", help="only the interleaved c=1 rounds, not the script")
    args = p.parse_args(argv)
    if args.c1_only and args.c1_rounds < 1:
        p.error("--c1-only needs --c1-rounds N >= 1")
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
        code = 0 if args.c1_only else subprocess.run(command, cwd=REPO_ROOT, check=False).returncode
        if args.c1_rounds > 0 and code == 0:
            print(c1_summary(interleaved_c1(peers_python, image.resolve(), args.c1_rounds, args.seconds)))
        return code


if __name__ == "__main__":
    sys.exit(main())
