"""Every module imports, and no module imports another that imports it back (at the top or inside a function)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgemoe_cli"


def module_files() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if parts[-1] != "__main__":
            mods[name] = path
    return mods


MODULES = module_files()


def imports_of(name: str) -> set[str]:
    """The edgemoe_cli modules `name` imports anywhere in its text (top level or inside functions)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    found.add(f"{base}.{alias.name}")
                elif base in MODULES:
                    found.add(base)
    found.discard(name)
    return found


def test_every_module_imports():
    code = "import importlib\nfor name in %r:\n    importlib.import_module(name)\n" % sorted(MODULES)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_no_module_imports_one_that_imports_it_back():
    graph = {name: imports_of(name) for name in MODULES}
    both_ways = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, set())})
    assert not both_ways


def test_the_import_scan_sees_lazy_and_relative_imports():
    # build imports board inside a function, cli.generate imports ..generate: the scan must see both
    assert "edgemoe_cli.board" in imports_of("edgemoe_cli.build")
    assert "edgemoe_cli.generate" in imports_of("edgemoe_cli.cli.generate")
    assert importlib.import_module("edgemoe_cli.cli").app is not None
