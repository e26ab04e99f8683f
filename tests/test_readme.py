"""README.md works as written: every ```bash block runs against a fresh real server, unless it says what it needs.

A block whose first line is `# needs: X[, Y]` names what it needs beyond a CPU machine with this checkout:
  network, gpu, docker, kubernetes, peers   not available to the tests: the block is skipped, saying why;
  mirror                                    weights from SSD_WEIGHTS_MIRROR (default ../shared/models): run
                                            when that folder exists, else skipped;
  data                                      photos from ../shared/data: run when it exists, else skipped.
Every other block runs with `bash -euo pipefail` in the repository root, each in a fresh shell, with:
  - `127.0.0.1:8000` / `localhost:8000` rewritten to the address of this module's own server (a fresh
    `python -m server` process on a free port, default model and settings);
  - `.venv/bin/` rewritten to the bin folder of the interpreter running the tests (`make test` runs them with
    .venv's, so that is the same venv; elsewhere, the one in use);
  - a line `make TARGET...` checked with `make -n TARGET...` instead of run: `make serve` would block and
    `make test` would run this test again;
  - a time limit (BLOCK_TIMEOUT_S): a command that does not finish fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.testing import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHARED = REPO.parent / "shared"
UNAVAILABLE = {"network", "gpu", "docker", "kubernetes", "peers"}
WHERE_PRESENT = {"mirror": SHARED / "models", "data": SHARED / "data"}
BLOCK_TIMEOUT_S = 900
_NEEDS = re.compile(r"#\s*needs:\s*(.+)")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    body: str
    needs: tuple[str, ...]

    @property
    def label(self) -> str:
        first = next((ln for ln in self.body.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
        return f"L{self.line}: {first.strip()[:50]}"


def bash_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start = i
            i += 1
            body: list[str] = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"README.md line {start + 1}: unclosed ```bash block"
            match = _NEEDS.fullmatch(body[0].strip()) if body else None
            needs = tuple(n.strip() for n in match.group(1).split(",")) if match else ()
            blocks.append(Block(start + 1, "\n".join(body), needs))
        i += 1
    return blocks


BLOCKS = bash_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_blocks_and_every_tag_is_known() -> None:
    assert len(BLOCKS) >= 5, "no ```bash blocks found in README.md"
    known = UNAVAILABLE | set(WHERE_PRESENT)
    for block in BLOCKS:
        assert set(block.needs) <= known, f"README.md line {block.line}: unknown needs {block.needs}; known {known}"
    assert any(not block.needs for block in BLOCKS), "every block is tagged: nothing would be checked"


def test_the_two_commands_are_there() -> None:
    bodies = [block.body.strip() for block in BLOCKS]
    assert "make serve" in bodies and "make test" in bodies


@pytest.fixture(scope="module")
def readme_server(server_factory) -> ServerProcess:  # noqa: ANN001 - the conftest fixture
    """A fresh server for this module: default model and settings, HTTP and gRPC ports of its own."""
    return server_factory({"grpc_port": free_port()})


def commands(body: str) -> list[str]:
    """The block's commands, continuation lines joined, comments and blank lines dropped."""
    out: list[str] = []
    pending = ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending = f"{pending} {line.strip()}" if pending else line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        out.append(pending)
        pending = ""
    return out


def rewrite(command: str, address: str, bin_dir: Path, grpc_port: object = 8001) -> str:
    command = re.sub(r"\b(?:127\.0\.0\.1|localhost):8000\b", address, command)
    command = re.sub(r"\b(?:127\.0\.0\.1|localhost):8001\b", f"127.0.0.1:{grpc_port}", command)
    return re.sub(r"(?<![\w/.-])\.venv/bin/", f"{bin_dir}/", command)


def check_make(command: str) -> None:
    """`make TARGET...`: the target exists and its recipe is what the README says it does (dry run)."""
    words = shlex.split(command)
    dry = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, f"`{command}`: make -n failed:\n{dry.stdout}{dry.stderr}"
    expected = {"serve": "-m server", "test": "-m pytest"}
    for target in words[1:]:
        if target in expected:
            assert expected[target] in dry.stdout, f"`make {target}` does not run {expected[target]}:\n{dry.stdout}"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.label for block in BLOCKS])
def test_readme_block(block: Block, request: pytest.FixtureRequest) -> None:
    unavailable = [need for need in block.needs if need in UNAVAILABLE]
    if unavailable:
        pytest.skip(f"README.md line {block.line} needs {', '.join(unavailable)}, which the tests do not have")
    for need in block.needs:
        if not WHERE_PRESENT[need].is_dir():
            pytest.skip(f"README.md line {block.line} needs {need}: no {WHERE_PRESENT[need]}")
    script = commands(block.body)
    assert script, f"README.md line {block.line}: an empty block"
    makes = [c for c in script if c.startswith("make ")]
    for command in makes:
        check_make(command)
    rest = [c for c in script if not c.startswith("make ")]
    if not rest:
        return
    server: ServerProcess = request.getfixturevalue("readme_server")
    address = server.url.removeprefix("http://")
    env = {key: value for key, value in os.environ.items() if not key.startswith("SSD_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    if WHERE_PRESENT["mirror"].is_dir():
        env["SSD_WEIGHTS_MIRROR"] = str(WHERE_PRESENT["mirror"])  # as the Makefile sets it
    script_text = "\n".join(rewrite(c, address, Path(sys.executable).parent, server.settings["grpc_port"]) for c in rest)
    try:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script_text], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"README.md line {block.line} ran over {BLOCK_TIMEOUT_S} s:\n{script_text}\n{exc.stdout or ''}")
    assert result.returncode == 0, (
        f"README.md line {block.line} failed (exit {result.returncode}):\n{script_text}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
    assert server.alive(), "the server died while the README's commands ran"


def test_rewrites() -> None:
    bin_dir = Path("/v/bin")
    assert rewrite("curl -s 'http://127.0.0.1:8000/detect?x=1'", "127.0.0.1:5555", bin_dir) == \
        "curl -s 'http://127.0.0.1:5555/detect?x=1'"
    assert rewrite(".venv/bin/ssd-bench --url http://localhost:8000", "h:1", bin_dir) == \
        "/v/bin/ssd-bench --url http://h:1"
    assert rewrite("python3 -m venv .venv-server && .venv-server/bin/pip x", "h:1", bin_dir) == \
        "python3 -m venv .venv-server && .venv-server/bin/pip x"
    assert commands("# needs: data\na \\\n    b\n\n# note\nc") == ["a b", "c"]
    parsed = bash_blocks("x\n```bash\n# needs: docker, gpu\ndocker compose up\n```\n```bash\nmake test\n```\n")
    assert [(b.line, b.needs) for b in parsed] == [(2, ("docker", "gpu")), (6, ())]
