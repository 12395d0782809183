"""Every TOML read goes through tomlfile.load_toml, which must work on Python 3.10 (no tomllib, tomli instead)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgemoe_cli.errors import EdgeMoEError
from edgemoe_cli.tomlfile import load_toml

REPO = Path(__file__).resolve().parents[1]


def test_load_toml_parses_and_names_the_file_on_bad_syntax():
    assert load_toml('a = 1\n[b]\nc = "x"\n', "x.toml") == {"a": 1, "b": {"c": "x"}}
    with pytest.raises(EdgeMoEError, match=r"recipe r\.toml is not valid TOML"):
        load_toml("a = = 1", "recipe r.toml")


def test_no_module_imports_tomllib_but_tomlfile():
    users = [
        p.relative_to(REPO)
        for p in (REPO / "edgemoe_cli").rglob("*.py")
        if "tomllib" in p.read_text() and p.name != "tomlfile.py"
    ]
    assert users == []


def test_recipes_registry_boards_and_prompts_load_with_tomllib_hidden():
    """Python 3.10 has no tomllib: hide it (as 3.10 would not have it) and read every kind of TOML file."""
    pytest.importorskip("tomli")
    code = textwrap.dedent("""
        import sys
        sys.modules["tomllib"] = None  # `import tomllib` now raises ImportError, as on Python 3.10
        sys.version_info = (3, 10, 0, "final", 0)
        from edgemoe_cli import board, compare, recipe, registry, tomlfile
        assert tomlfile._toml.__name__ == "tomli", tomlfile._toml
        assert recipe.load_recipe("edge-balanced").rules
        assert "tiny-ernie-thinking" in registry.load()
        assert board.load_board("radxa-orion-o6").ram_bytes > 0
        assert compare.load_prompts(None)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
