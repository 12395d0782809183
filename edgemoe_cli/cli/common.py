"""What the command modules share: the consoles, --json output, the options every command spells the same way,
model names resolved and said, and the one progress display. (The app and `main` are in __init__.py, which imports
the command modules; they import this, never the package, so nothing imports back.)"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import ProgressColumn, TaskID
from rich.table import Column
from rich.text import Text

from ..progress import Progress
from ..units import human_bytes

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


# --memory on run, compare and serve: the same option, read by generate.load_within
MemoryOpt = Annotated[
    Optional[str],
    typer.Option(
        "--memory",
        metavar="SIZE|auto",
        help="Keep resident memory within SIZE (e.g. 6GiB; auto = the RAM available now): a larger model streams "
        "its routed experts from the file.",
    ),
]


# --warm on run and serve: a profile.json whose hottest experts fill the --memory expert cache before the first token
WarmOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--warm",
        metavar="PROFILE.json",
        help="With --memory, when the model streams: read the experts this `edgemoe profile` output routed most "
        "into the expert cache before the first token.",
    ),
]


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


def model_choice(text: str):
    """The GGUF a command runs or measures: a path, NAME or NAME:TAG (models.resolve_gguf), said on stderr."""
    from ..models import resolve_gguf

    choice = resolve_gguf(text)
    say_choice(choice)
    return choice


def run_model(text: str) -> Path:
    """model_choice's file."""
    return model_choice(text).path


def source_model(text: str, progress: Progress | None = None) -> Path:
    """The unquantized GGUF quantize/plan/imatrix start from (models.source_gguf), said on stderr; a name whose store
    has only the pulled checkpoint is converted first, reported to `progress` as a step of its own."""
    from ..models import source_gguf

    choice = source_gguf(text, progress=progress)
    say_choice(choice)
    return choice.path


class _Count(ProgressColumn):
    """done/total as a count, or as sizes for steps that count bytes."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task) -> Text:
        if task.fields.get("unit") == "bytes":
            total = human_bytes(int(task.total)) if task.total is not None else "?"
            return Text(f"{human_bytes(int(task.completed))}/{total}", style="progress.download")
        return Text(
            f"{int(task.completed)}/{int(task.total) if task.total is not None else '?'}", style="progress.download"
        )


class _Eta(ProgressColumn):
    """Time left at the step's own rate so far: the units it did since it started in this run (a resumed step's
    earlier units, done before, do not count) over the time it took."""

    def render(self, task) -> Text:
        from ..units import human_duration

        start = task.fields.get("first_done", 0)
        done = task.completed - start
        if task.total is None or task.finished or done <= 0 or not task.elapsed:
            return Text("")
        left = (task.total - task.completed) * task.elapsed / done
        return Text(f"ETA {human_duration(left)}", style="progress.remaining")


@contextmanager
def progress_bars(disable: bool = False) -> Iterator[Progress]:
    """The one rich display of progress.Progress, on stderr: a line per step (bar, count, detail, elapsed time, and
    the time left at the step's own rate so far), gone when the command ends. `disable` (for --json) keeps stderr
    quiet."""
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bars

    with Bars(
        TextColumn("[bold]{task.description}[/]"),
        BarColumn(),
        _Count(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        _Eta(),
        console=err_console,
        transient=True,
        disable=disable,
    ) as bars:
        tasks: dict[str, TaskID] = {}

        def progress(step: str, done: int, total: int | None, detail: str = "", unit: str = "") -> None:
            if step not in tasks:
                tasks[step] = bars.add_task(step, total=total, completed=done, detail="", unit=unit, first_done=done)
            bars.update(tasks[step], completed=done, total=total, detail=detail[-48:])

        yield progress
