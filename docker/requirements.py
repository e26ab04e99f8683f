"""Print the pip requirements of ssd-serve (core + chosen extras) from pyproject.toml, one per line.

`make lock` writes the images' lock inputs with it (docker/requirements-*.in) and compiles them with pip-compile
into docker/requirements-*.lock, which the Dockerfiles install in a layer of their own, before the sources are
copied. Usage (from the directory holding pyproject.toml):

    python docker/requirements.py --extras server,export,gpu --exclude onnxruntime --exclude tensorrt

--exclude NAME          drop a distribution (the CPU `onnxruntime` when `onnxruntime-gpu` provides the same
                        `onnxruntime` module: installing both makes one overwrite the other's files)
--skip-installed NAME   drop a distribution when this interpreter can already import it
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"cannot read a distribution name from {requirement!r}")
    return normalise(match.group(1))


def requirements(pyproject: Path, extras: list[str], exclude: set[str], skip_installed: set[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise ValueError(f"unknown extras {unknown}; pyproject.toml defines {sorted(optional)}")
    wanted = list(project.get("dependencies", []))
    for extra in extras:
        wanted += optional[extra]
    dropped = {normalise(name) for name in exclude}
    dropped |= {normalise(name) for name in skip_installed if importlib.util.find_spec(name) is not None}
    seen: set[str] = set()
    result = []
    for requirement in wanted:
        if requirement_name(requirement) in dropped or requirement in seen:
            continue
        seen.add(requirement)
        result.append(requirement)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    p.add_argument("--extras", default="", help="comma-separated extras, e.g. server,export")
    p.add_argument("--exclude", action="append", default=[], metavar="NAME")
    p.add_argument("--skip-installed", action="append", default=[], metavar="NAME")
    args = p.parse_args(argv)
    extras = [extra.strip() for extra in args.extras.split(",") if extra.strip()]
    try:
        lines = requirements(args.pyproject, extras, set(args.exclude), set(args.skip_installed))
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
