"""The `edgemoe` command line: parse, call one stage function, render its result. No logic lives here.

Here: the app, `main`, and the list of commands. Each command is a module of this package named after the stage
module it calls (`run` in generate.py, `doctor` in board.py, `list` and `rm` in models.py, ...); what they share
(consoles, --json, --threads, --ctx, model names, the progress display) is in common.py; a stage's logic lives in
that stage module. User mistakes arrive as EdgeMoEError and leave as one red line on stderr with exit code 2.
"""

from __future__ import annotations

import inspect
import sys
from typing import Annotated

import typer

from .. import __version__
from ..errors import EdgeMoEError
from . import (
    bench,
    board,
    build,
    cluster,
    compare,
    convert,
    evaluate,
    generate,
    hub,
    imatrix,
    models,
    plan,
    profile,
    prune,
    quantize,
    recipe,
    registry,
    serve,
)
from .common import console, err_console

app = typer.Typer(
    name="edgemoe",
    help="ERNIE-4.5-21B-A3B (Thinking and PT) from the Hugging Face Hub onto Armv9 boards with llama.cpp.\n\n"
    "pull -> convert -> plan -> quantize -> build -> run / compare / bench; doctor tells what the board can do.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        console.print(f"edgemoe {__version__}")
        raise typer.Exit()


VersionOpt = Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")]


@app.callback()
def _root(
    version: VersionOpt = False,
) -> None:
    pass


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


# The commands, one module each, named after the stage module it calls, registered in the order of `edgemoe --help`.
app.command()(convert.convert)
app.command()(board.doctor)
app.command()(generate.run)
app.command()(serve.serve)
app.command()(cluster.worker)
app.command()(build.build)
app.command()(hub.pull)
app.command()(registry.models)
app.command("list")(models.list_store)
app.command("rm")(models.rm)
app.add_typer(recipe.recipe_app, name="recipe")
app.command()(quantize.quantize)
app.command("imatrix")(imatrix.imatrix_cmd)
app.command("eval")(evaluate.eval_cmd)
app.command("plan")(plan.plan_cmd)
app.command()(profile.profile)
app.command()(prune.prune)
app.command()(compare.compare)
app.command()(bench.bench)

_unwrap_all_help(app)
