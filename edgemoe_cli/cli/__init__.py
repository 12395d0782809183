"""The `edgemoe` command line: parse, call one stage function, render its result. No logic lives here.

Here: the app, `main`, and what every command shares (JSON output, model names, progress bars). Each command is a
module of this package named after the stage module it calls (`run` in generate.py, `doctor` in board.py, `list`
and `rm` in models.py, ...); a stage's logic lives in that stage module. User mistakes arrive as EdgeMoEError and
leave as one red line on stderr with exit code 2.
"""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import asdict, is_dataclass
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.progress import ProgressColumn, TaskID
from rich.table import Column
from rich.text import Text

from .. import __version__
from ..errors import EdgeMoEError
from ..progress import Progress
from ..units import human_bytes

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


# ---- options every command spells the same way (declared here once; the wording of `what` may vary) ----


def json_option(what: str = "the result") -> Any:
    """--json: machine output instead of tables."""
    return typer.Option(False, "--json", help=f"Print {what} as one JSON document on stdout.")


def threads_option(default: str = "the physical cores this process may use") -> Any:
    """--threads / -t: CPU threads for llama.cpp; None lets the stage choose."""
    return typer.Option(None, "--threads", "-t", min=1, help=f"CPU threads (default: {default}).")


def ctx_option(default: int, what: str, minimum: int = 1) -> Any:
    """--ctx / -c: a length in tokens (the context window, or the chunk a tool evaluates at once)."""
    return typer.Option(default, "--ctx", "-c", min=minimum, help=what)


def say_choice(choice) -> None:
    """Tell on stderr which store GGUF a model name resolved to, and why that one (nothing for a path)."""
    if choice.by_name:
        err_console.print(f"[dim]model {choice.ref} ({choice.path}): {choice.why}[/]", highlight=False, soft_wrap=True)


def run_model(text: str) -> Path:
    """The GGUF a command runs or measures: a path, NAME or NAME:TAG (models.resolve_gguf), said on stderr."""
    from ..models import resolve_gguf

    choice = resolve_gguf(text)
    say_choice(choice)
    return choice.path


def source_model(text: str, progress: Progress | None = None) -> Path:
    """The unquantized GGUF quantize/plan/imatrix start from (models.source_gguf), said on stderr; a name whose store
    has only the pulled checkpoint is converted first, reported to `progress` as a step of its own."""
    from ..models import source_gguf

    choice = source_gguf(text, progress=progress)
    say_choice(choice)
    return choice.path


def _version(value: bool) -> None:
    if value:
        console.print(f"edgemoe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


class _Count(ProgressColumn):
    """done/total as a count, or as sizes for steps that count bytes."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task) -> Text:
        if task.fields.get("unit") == "bytes":
            total = human_bytes(int(task.total)) if task.total is not None else "?"
            return Text(f"{human_bytes(int(task.completed))}/{total}", style="progress.download")
        return Text(f"{int(task.completed)}/{int(task.total) if task.total is not None else '?'}",
                    style="progress.download")


@contextmanager
def progress_bars(disable: bool = False) -> Iterator[Progress]:
    """The one rich display of progress.Progress, on stderr: a line per step (bar, count, detail, elapsed time),
    gone when the command ends. `disable` (for --json) keeps stderr quiet."""
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bars

    with Bars(TextColumn("[bold]{task.description}[/]"), BarColumn(), _Count(), TextColumn("{task.fields[detail]}"),
              TimeElapsedColumn(), console=err_console, transient=True, disable=disable) as bars:
        tasks: dict[str, TaskID] = {}

        def progress(step: str, done: int, total: int | None, detail: str = "", unit: str = "") -> None:
            if step not in tasks:
                tasks[step] = bars.add_task(step, total=total, detail="", unit=unit)
            bars.update(tasks[step], completed=done, total=total, detail=detail[-48:])

        yield progress


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

        # typer >= 0.2x raises its own vendored copy of click's exceptions (typer._click), not click's
        typer_click = getattr(getattr(typer, "_click", None), "exceptions", click.exceptions)
        if isinstance(e, (click.exceptions.UsageError, typer_click.UsageError)):
            e.show()
            sys.exit(2)
        if isinstance(e, (click.exceptions.ClickException, typer_click.ClickException)):
            e.show()
            sys.exit(e.exit_code)
        raise


def unwrap_help(doc: str) -> str:
    """A command's docstring as --help should take it: each paragraph (and each `- ` item) one line, so rich wraps
    it at the terminal's width instead of breaking the source's lines again; example paragraphs stay as written."""
    paragraphs = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = para.split("\n")
        indented = not lines[0].startswith("- ") and any(line.startswith(" ") for line in lines)
        if indented or any(line.lstrip().startswith(("edgemoe ", "$ ", "Example")) for line in lines):
            paragraphs.append(para)
            continue
        items: list[str] = []
        for line in lines:
            if line.startswith("- ") or not items:
                items.append(line.strip())
            else:
                items[-1] += " " + line.strip()
        paragraphs.append("\n".join(items))
    return "\n\n".join(paragraphs)


def _unwrap_all_help(typer_app: typer.Typer) -> None:
    for command in typer_app.registered_commands:
        if command.help is None and command.callback is not None and command.callback.__doc__:
            command.help = unwrap_help(command.callback.__doc__)
    for group in typer_app.registered_groups:
        _unwrap_all_help(group.typer_instance)


# The commands, one module each, named after the stage module it calls; importing one registers it on `app`
# (the order here is the order of `edgemoe --help`).
from . import (  # noqa: E402, F401
    convert, board, generate, serve, cluster, build, hub, registry, models, recipe, quantize, imatrix, evaluate, plan,
    profile, prune, compare, bench,
)

_unwrap_all_help(app)
