"""Deploy tests: helpers importable whatever pytest's import mode, and the live server's /metrics.

`server_url` (tests/conftest.py) is the real server, started once per session in a subprocess.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from _deploy_helpers import exposed_series_names  # noqa: E402


@pytest.fixture(scope="module")
def live_series(server_url: str) -> set[str]:
    """Series names the running server's /metrics yields (histograms as _bucket/_sum/_count)."""
    import httpx

    response = httpx.get(f"{server_url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    names = exposed_series_names(response.text)
    assert "ssd_requests_total" in names, "the server's /metrics does not look like ssd-serve's"
    return names
