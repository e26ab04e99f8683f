"""Run a real `python -m server` process for tests and benchmarks (the way fastapi.testclient serves tests).

    with running_server({"max_batch_size": 8}) as srv:     # SSD_* settings; a free loopback port
        httpx.post(f"{srv.url}/detect", ...)

Settings reach the child as SSD_<NAME> environment variables, as an operator would pass them. The port is
chosen by the server itself (SSD_PORT=0) and read from its log, so there is no race for a free port. gRPC is off
(SSD_GRPC_PORT=0) unless the settings give a port (`free_port()` finds one); `srv.grpc_address` is then set.
httpx is needed (a test dependency); it is imported only when a server is waited for.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_READY_TIMEOUT_S = 900.0  # a first start exports the default model
_LISTENING = re.compile(r"Uvicorn running on http://([\d.]+):(\d+)")
_GRPC_LISTENING = re.compile(r"gRPC listening on ([\d.]+:\d+)")


@dataclass
class ServerProcess:
    """One `python -m server` child process."""

    process: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    grpc_address: str = ""  # host:port when gRPC is on
    settings: dict[str, object] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGINT (graceful shutdown), SIGKILL if it does not exit in time; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def wait_listening(self, timeout_s: float = 60.0) -> str:
        """Block until the log shows the listening address; sets and returns `url`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log())
            if match:
                self.url = f"http://{match.group(1)}:{match.group(2)}"
                grpc_match = _GRPC_LISTENING.search(self.log())
                self.grpc_address = grpc_match.group(1) if grpc_match else ""
                return self.url
            self._check_alive()
            time.sleep(0.05)
        raise TimeoutError(f"the server did not start listening within {timeout_s:.0f} s:\n{self.log()[-4000:]}")

    def wait_ready(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Block until GET /readyz answers 200."""
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url or self.wait_listening(), timeout=5.0) as client:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"the server was not ready within {timeout_s:.0f} s:\n{self.log()[-4000:]}")

    def _check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{self.log()[-4000:]}")


def server_env(settings: Mapping[str, object], extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment + SSD_HOST=127.0.0.1, SSD_PORT=0 and SSD_<NAME> for each setting."""
    env = dict(os.environ)
    mirror = REPO_ROOT.parent / "shared" / "models"  # the offline weights mirror of this workplace and CI
    if "SSD_WEIGHTS_MIRROR" not in env and mirror.is_dir():
        env["SSD_WEIGHTS_MIRROR"] = str(mirror)
    env.update({"PYTHONUNBUFFERED": "1", "SSD_HOST": "127.0.0.1", "SSD_PORT": "0", "SSD_GRPC_PORT": "0"})
    env.setdefault("SSD_DRAIN_SECONDS", "0")  # test servers stop at once unless a test asks for a drain
    for name, value in settings.items():
        env[f"SSD_{name.upper()}"] = str(value)
    env.update(extra_env or {})
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for settings the server cannot choose itself, e.g. grpc_port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(
    settings: Mapping[str, object] | None = None,
    *,
    log_dir: Path | None = None,
    cwd: Path = REPO_ROOT,
    extra_env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    wait_ready: bool = True,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
) -> ServerProcess:
    """Start `python -m server`; wait until it listens, and (by default) until /readyz is 200."""
    settings = dict(settings or {})
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="ssd-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{time.monotonic_ns()}.log"
    env = server_env(settings, extra_env)
    if Path(cwd).resolve() != REPO_ROOT:  # another working directory: keep the package and the mirror reachable
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        if env.get("SSD_WEIGHTS_MIRROR"):
            env["SSD_WEIGHTS_MIRROR"] = str(Path(env["SSD_WEIGHTS_MIRROR"]).resolve())
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = ServerProcess(process=process, log_path=log_path, settings=settings)
    try:
        server.wait_listening()
        if wait_ready:
            server.wait_ready(ready_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_server(settings: Mapping[str, object] | None = None, **kwargs: object) -> Iterator[ServerProcess]:
    """`start_server` as a context manager: the server is stopped on exit."""
    server = start_server(settings, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
