"""Start ssd-serve in a subprocess on a free loopback port (for the sweep), and stop it again.

The server binds port 0 (SSD_PORT=0) and uvicorn logs the port it got, so there is no race for a port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from benchmarks.loadgen import wait_ready

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MIRROR = REPO_ROOT.parent / "shared" / "models"  # the offline weights mirror, as tests/conftest.py uses
_LISTENING = re.compile(r"Uvicorn running on http://([\d.]+):(\d+)")


@dataclass(frozen=True)
class ServerHandle:
    url: str
    pid: int
    log_path: Path


def server_env(settings: Mapping[str, object]) -> dict[str, str]:
    """The environment for one server: loopback, any free port (logged by uvicorn), SSD_<NAME> per setting."""
    env = dict(os.environ)
    if "SSD_WEIGHTS_MIRROR" not in env and DEFAULT_MIRROR.is_dir():
        env["SSD_WEIGHTS_MIRROR"] = str(DEFAULT_MIRROR)
    env.update({"SSD_HOST": "127.0.0.1", "SSD_PORT": "0", "SSD_GRPC_PORT": "0", "PYTHONUNBUFFERED": "1"})
    for name, value in settings.items():
        env[f"SSD_{name.upper()}"] = str(value)
    return env


@contextlib.contextmanager
def running_server(
    settings: Mapping[str, object],
    model: Path | None = None,
    ready_timeout_s: float = 900.0,
) -> Iterator[ServerHandle]:
    """`python -m server` with `settings` (and `model`) as SSD_* variables, on a free loopback port, ready;
    stopped on exit (SIGINT, then SIGKILL after 20 s). The ready timeout is generous because a first start
    exports the default model from the offline weights mirror.
    """
    if model is not None:
        settings = {**settings, "model": Path(model).resolve()}  # the server runs in the repository root
    log_file = tempfile.NamedTemporaryFile(prefix="ssd-bench-server-", suffix=".log", delete=False)  # noqa: SIM115
    log_path = Path(log_file.name)
    proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=REPO_ROOT, env=server_env(settings),
                            stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    clean = False
    try:
        try:
            url = _wait_listening(proc, log_path, timeout_s=120.0)
            asyncio.run(_ready_or_exit(url, proc, ready_timeout_s))
        except (TimeoutError, RuntimeError) as exc:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server did not become ready ({exc}); log {log_path}:\n{tail}") from exc
        yield ServerHandle(url=url, pid=proc.pid, log_path=log_path)
        clean = True
    finally:
        stop(proc, signal.SIGINT, timeout_s=20.0)
        if clean:  # the log is kept only when something went wrong
            log_path.unlink(missing_ok=True)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for a program that cannot bind port 0 and say so)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
    """Send `sig` to `proc` if it still runs, wait up to `timeout_s`, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _wait_listening(proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = _LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            return f"http://{match.group(1)}:{match.group(2)}"
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        time.sleep(0.05)
    raise TimeoutError(f"server not listening after {timeout_s:.0f}s")


async def _ready_or_exit(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    ready = asyncio.create_task(wait_ready(url, timeout_s))
    while not ready.done():
        if proc.poll() is not None:
            ready.cancel()
            raise RuntimeError(f"server exited with code {proc.returncode}")
        await asyncio.sleep(0.2)
    ready.result()
