"""The `edgemoe` command line: parse, call one stage function, render its result. No logic lives here.

Every command lives in its own section below; a stage's logic lives in its module. User mistakes arrive as
EdgeMoEError and leave as one red line on stderr with exit code 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import __version__
from .errors import EdgeMoEError

app = typer.Typer(
    name="edgemoe",
    help="ERNIE-4.5-21B-A3B (Thinking and PT) from the Hugging Face Hub onto Armv9 boards with llama.cpp.\n\n"
    "pull -> convert -> plan -> quantize -> build -> run / compare / bench; doctor tells what the board can do.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def emit_json(result) -> None:
    """Machine output for --json: a dataclass (or dict) as one JSON document on stdout."""
    data = asdict(result) if is_dataclass(result) else result
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _version(value: bool) -> None:
    if value:
        console.print(f"edgemoe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


# ---- commands (one section each; keep each section's logic in its stage module) ----


def main() -> None:
    try:
        app(standalone_mode=False)
    except EdgeMoEError as e:
        hint = f" — {e.hint}" if e.hint else ""
        err_console.print(f"[bold red]error:[/] {e.message}{hint}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("[red]aborted[/]")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # click usage errors come here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.UsageError):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
