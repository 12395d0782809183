"""`edgemoe list` and `edgemoe rm`: what the store holds, by the names users type (stage: models.py)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Annotated

import typer

from ..errors import EdgeMoEError
from ..units import human_bytes
from .common import console, emit_json, json_option


def list_store(as_json: bool = json_option("the store contents")) -> None:
    """List what the local store holds, as you type it: NAME for a pulled checkpoint, NAME:TAG for each GGUF.

    Every command that takes a model accepts these: `edgemoe run NAME:edge-balanced`, `edgemoe quantize NAME`.
    States: pulled (a verified pull manifest; files in the Hugging Face cache), converted (gguf/NAME/*.gguf from
    `edgemoe convert`), quantized (a GGUF whose manifest names a recipe), pruned (from `edgemoe prune`). The store
    is $EDGEMOE_HOME (default ~/.cache/edgemoe).
    """
    from rich.table import Table

    from ..models import store_items

    items = store_items()
    if as_json:
        emit_json([asdict(i) for i in items])
        return
    if not items:
        console.print("the store is empty — try `edgemoe pull NAME` (see `edgemoe models`)")
        return
    table = Table("model", "state", "size", "detail", "path", box=None, header_style="bold")
    table.columns[0].no_wrap = True
    for it in items:
        table.add_row(it.ref, it.state, human_bytes(it.size), it.detail, it.path)
    console.print(table)


ModelArg = Annotated[
    str,
    typer.Argument(help="NAME (everything the store holds for it) or NAME:TAG (one GGUF), as `edgemoe list` shows."),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before deleting.")]


def rm(
    model: ModelArg,
    yes: YesOpt = False,
    as_json: bool = json_option("what was deleted (needs --yes)"),
) -> None:
    """Free disk: delete a model (or one of its GGUFs) from the store.

    Only files inside the store are deleted. A pulled checkpoint's files live in the Hugging Face cache, which other
    tools share: rm forgets the pull (its manifest) and names those files; `hf cache delete` removes them.
    """
    from ..models import plan_removal, remove

    removal = plan_removal(model)
    if not yes:
        if as_json or not sys.stdin.isatty():
            raise EdgeMoEError(
                f"rm {model} would delete {len(removal.paths)} path(s); not asking without a terminal", "add --yes"
            )
        for path in removal.paths:
            console.print(f"  {path}", highlight=False)
        if not typer.confirm(f"delete these ({human_bytes(removal.bytes)})?", default=False):
            raise typer.Exit(1)
    remove(removal)
    if as_json:
        emit_json(removal)
        return
    console.print(f"removed {removal.ref} ({human_bytes(removal.bytes)} freed)", highlight=False)
    for path in removal.kept:
        console.print(f"[dim]kept (outside the store): {path}[/]", highlight=False)
