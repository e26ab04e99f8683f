"""Imports go one way (DESIGN.md "Layering"): `model_export` never imports `server`, and `server` imports only the
contract (the package `model_export.contract`: metadata schema and tensor names, input resize) from `model_export`.

Every import statement of every module is read from its syntax tree, wherever it sits (module level or inside a
function), and so is every `importlib.import_module("...")` / `__import__("...")` with a literal name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTRACT = "model_export.contract"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted name) for everything `path` imports; `from a import b` yields a.b (b may be a module)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{source}.{alias.name}" if alias.name != "*" else source
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def sources(package: str) -> list[Path]:
    found = sorted((REPO / package).rglob("*.py"))
    assert found, f"no modules under {package}/"
    return found


# The one exception, by design: the PyTorch engine runs the exporter's own module (it rebuilds the network the
# file was exported from, with its weights), so it needs the exporter and the `[export]` extra. It imports these
# inside `TorchEngine.load`, only when `--engine torch` is chosen; test_the_exception_stays_lazy holds that.
EXPORTER_RUNNER = "server/engines/torch.py"
EXPORTER_RUNNER_IMPORTS = frozenset({"model_export.exportable.ExportableSSD", "model_export.models.REGISTRY",
                                     "model_export.spec.PostprocessOptions"})


def violations(package: str) -> list[str]:
    """`path:line: imports name` for every import in `package` that breaks its rule."""
    return [
        f"{path.relative_to(REPO)}:{line}: imports {name}"
        for path in sources(package)
        for line, name in imported_names(path)
        if _breaks_rule(package, name)
        and not (path.relative_to(REPO).as_posix() == EXPORTER_RUNNER and name in EXPORTER_RUNNER_IMPORTS)
    ]


def _breaks_rule(package: str, name: str) -> bool:
    top = name.split(".")[0]
    if package == "model_export":
        return top == "server"
    if package == "server":
        return top == "model_export" and name != CONTRACT and not name.startswith(CONTRACT + ".")
    raise ValueError(package)


def test_model_export_never_imports_server() -> None:
    found = violations("model_export")
    assert found == [], "model_export must not import server:\n" + "\n".join(found)


def test_server_imports_only_the_contract_from_model_export() -> None:
    found = violations("server")
    assert found == [], "server may import only model_export.contract from model_export:\n" + "\n".join(found)


def test_the_exception_stays_lazy() -> None:
    """The torch engine's exporter imports sit inside a function: importing the engine module needs no exporter."""
    tree = ast.parse((REPO / EXPORTER_RUNNER).read_text(encoding="utf-8"))
    module_level = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert not {name for name in module_level if name.startswith("model_export") and not name.startswith(CONTRACT)}
    found = {name for _, name in imported_names(REPO / EXPORTER_RUNNER) if _breaks_rule("server", name)}
    assert found == EXPORTER_RUNNER_IMPORTS, found


@pytest.mark.parametrize("path", sources("model_export/contract"), ids=lambda p: p.name)
def test_the_contract_imports_nothing_heavy_and_no_other_project_module(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]  # TYPE_CHECKING blocks: not run
    names = {alias.name for n in top_level if isinstance(n, ast.Import) for alias in n.names}
    names |= {n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)}
    heavy_or_project = {"torch", "torchvision", "onnx", "onnxruntime", "tensorrt", "tflite", "server"}
    assert not {name.split(".")[0] for name in names} & heavy_or_project, names
    assert all(not name.startswith("model_export") or name.startswith(CONTRACT) for name in names), names


@pytest.mark.parametrize(("statement", "expected"), [
    ("import server.errors", "server.errors"),
    ("from server import preprocess", "server.preprocess"),
    ("from ..tensorrt import device", "model_export.tensorrt.device"),  # relative, from model_export/sub/m.py
    ("importlib.import_module('server.app')", "server.app"),
])
def test_the_scan_sees_every_form(tmp_path: Path, statement: str, expected: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    module = tmp_path / "model_export" / "sub" / "m.py"
    module.parent.mkdir(parents=True)
    module.write_text(f"def f():\n    {statement}\n")  # inside a function: still found
    assert [found for _, found in imported_names(module)] == [expected]


def test_the_rules() -> None:
    assert _breaks_rule("model_export", "server.preprocess") and not _breaks_rule("model_export", "numpy")
    assert not _breaks_rule("server", "model_export.contract.ModelMetadata")
    assert _breaks_rule("server", "model_export.models.REGISTRY") and _breaks_rule("server", "model_export")
    assert not _breaks_rule("server", "server.errors")


def test_the_server_and_the_contract_load_without_torch() -> None:
    code = (
        "import sys, server.app, server.engines.onnxruntime, model_export.contract; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'onnx', 'tflite'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing the server pulled in {result.stdout.strip()}"
