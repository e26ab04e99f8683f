"""Shared fixtures: a REAL ssd-serve process on a free loopback port, with the real default model.

    def test_something(server_url):              # the session's default server (default settings, ready)
        httpx.get(f"{server_url}/readyz")

    def test_custom(server_factory):             # another server with settings of its own
        srv = server_factory({"max_queue_size": 4, "max_batch_size": 1})
        httpx.get(f"{srv.url}/readyz")            # stopped at the end of the session (or srv.stop())

`server_factory(settings, *, cwd=..., extra_env=..., args=..., wait_ready=True)` takes the keyword arguments of
`server.testing.start_server`; settings become SSD_<NAME> variables. The default model is
weights/ssd_mobilenet_v1_coco.onnx: if it is missing, the first server exports it (as `python -m server` does on
a first start), with SSD_WEIGHTS_MIRROR defaulting to ../shared/models when that folder exists. SSD_MODEL in the
environment points every server at another file. Helpers live in `server.testing` so any test can import them
(`from conftest import ...` is ambiguous with several conftest.py files).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import pytest

from server.testing import ServerProcess, start_server


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """Start extra servers; every server started here is stopped when the session ends."""
    log_dir = tmp_path_factory.mktemp("server-logs")
    started: list[ServerProcess] = []

    def start(settings: Mapping[str, object] | None = None, **kwargs: object) -> ServerProcess:
        kwargs.setdefault("log_dir", log_dir)
        server = start_server(settings, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """The session's default server: real default model, default settings, ready."""
    return server_factory()


@pytest.fixture(scope="session")
def server_url(server: ServerProcess) -> str:
    return server.url
