"""The shape of the command line: short command functions, and --help pages that read well at 80 columns."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe_cli.cli import app, unwrap_help

CLI_DIR = Path(__file__).resolve().parents[1] / "edgemoe_cli" / "cli"


def command_paths() -> list[list[str]]:
    paths = []
    for command in app.registered_commands:
        paths.append([command.name or command.callback.__name__.replace("_", "-")])
    for group in app.registered_groups:
        paths += [[group.name, c.name or c.callback.__name__] for c in group.typer_instance.registered_commands]
    return paths


def test_no_function_in_cli_is_longer_than_60_lines():
    too_long = []
    for path in sorted(CLI_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not too_long


def test_unwrap_help_joins_paragraphs_and_keeps_examples_and_items():
    doc = """Summary line.

    A paragraph wrapped
    in the source.

    - one item
      continued
    - another item

    Examples:

        edgemoe run x.gguf
    """
    assert unwrap_help(doc) == (
        "Summary line.\n\nA paragraph wrapped in the source.\n\n- one item continued\n"
        "- another item\n\nExamples:\n\n    edgemoe run x.gguf"
    )


@pytest.mark.parametrize("command", command_paths(), ids=" ".join)
def test_help_at_80_columns_has_no_ragged_lines(command):
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    p = subprocess.run(
        [sys.executable, "-m", "edgemoe_cli.cli", *command, "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    prose = lines[: next(i for i, line in enumerate(lines) if line.startswith("╭"))]
    # where a paragraph goes on, the next word must not have fitted on the line: rich wrapped it, not the source
    for line, after in zip(prose, prose[1:]):
        text, cont = line.strip(), after.strip()
        if text and cont and not after.startswith("   ") and not cont.startswith(("edgemoe ", "- ", "$ ")):
            assert len(line.rstrip()) + 1 + len(cont.split()[0]) > 76, f"ragged: {line!r} then {after!r}"
