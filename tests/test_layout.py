"""The layout the packages keep, read from every module's imports (no module is run).

edge and cloud run on different machines and meet only through proto/ (the wire)
and common/ (what every daemon shares); sim/ (link-sim, latency emulation) stands
below both; common/, kernels/ and proto/ stand below everything of ours that runs;
no daemon needs the benchmarks, the deployment scripts or the tests.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge", "cloud", "common", "sim", "kernels", "proto", "bench", "deploy", "tests")
NOT_FOR_DAEMONS = {"bench", "deploy", "tests"}
# package -> the packages of ours it must never import
FORBIDDEN = {
    "edge": {"cloud"} | NOT_FOR_DAEMONS,
    "cloud": {"edge"} | NOT_FOR_DAEMONS,
    "sim": {"edge", "cloud"} | NOT_FOR_DAEMONS,
    "common": {"edge", "cloud", "sim"} | NOT_FOR_DAEMONS,
    "kernels": {"edge", "cloud", "sim", "common"} | NOT_FOR_DAEMONS,
    "proto": {"edge", "cloud", "sim", "common"} | NOT_FOR_DAEMONS,
    "deploy": {"edge", "cloud", "bench", "tests"},
    "bench": {"deploy", "tests"},
    "tests": set(),
}


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def imported(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import in the module, those inside
    functions and `importlib.import_module("...")` with a literal name included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:          # relative: stays inside its own package
                continue
            found.add((node.module.split(".")[0], node.lineno))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add((node.args[0].value.split(".")[0], node.lineno))
    return found


def test_the_walk_sees_every_package():
    seen = {p.relative_to(ROOT).parts[0] for p in modules()}
    assert seen == set(PACKAGES)
    assert imported(ROOT / "edge" / "cli.py"), "edge/cli.py imports things: the walk must see them"


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_layout(package):
    broken = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for top, line in sorted(imported(path)):
            if top in FORBIDDEN[package]:
                broken.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    assert not broken, f"{package}/ must not import {', '.join(sorted(FORBIDDEN[package]))}:\n" + "\n".join(broken)
