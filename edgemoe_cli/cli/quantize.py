"""`edgemoe quantize`: a GGUF through a recipe, verified (stage: quantize.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..units import human_bytes
from .common import console, emit_json, err_console, json_option, progress_bars, source_model, threads_option

ModelArg = Annotated[
    str,
    typer.Argument(
        help="The f32/f16/bf16 GGUF to quantize, or a model NAME (its pulled checkpoint is converted "
        "into the store first when needed)."
    ),
]
RecipeOpt = Annotated[
    str,
    typer.Option(
        "--recipe",
        "-r",
        help="Recipe name, recipe .toml file, or stock:FTYPE (llama.cpp's own mix, e.g. stock:Q4_K_M).",
    ),
]
ImatrixOpt = Annotated[
    Optional[Path],
    typer.Option("--imatrix", help="Importance matrix from `edgemoe imatrix` (strongly advised below 5 bits)."),
]
OutOpt = Annotated[
    Optional[Path], typer.Option("--out", "-o", help="Output GGUF (default: <store>/gguf/<model>/<recipe>.gguf).")
]


def quantize(
    model: ModelArg,
    recipe: RecipeOpt = "edge-balanced",
    imatrix: ImatrixOpt = None,
    out: OutOpt = None,
    threads: Optional[int] = threads_option("all CPUs"),
    as_json: bool = json_option(),
) -> None:
    """Quantize a GGUF with a recipe through llama.cpp, then verify every tensor got the recipe's type.

    The recipe is resolved to one explicit type per tensor first (`edgemoe recipe show` prints the same table); any
    problem stops here, before quantizing. llama.cpp's quantizer then runs in-process (llama_model_quantize with one
    anchored pattern per tensor, `pure`, and the imatrix), writing OUT.part; the result is read back with gguf's
    GGUFReader and any tensor whose type differs from the recipe fails the command — no silent fallback. A manifest
    (OUT.manifest.json: source, recipe, imatrix, sha256, types, versions) is written beside the file.

    MODEL may be a name: `edgemoe quantize ernie-4.5-21b-a3b-thinking --recipe edge-balanced` converts the pulled
    checkpoint into the store (gguf/NAME/bf16.gguf) when it is not there yet, then writes
    gguf/NAME/edge-balanced.gguf, which `edgemoe run NAME` then takes.

    Example: edgemoe quantize ernie-thinking-bf16.gguf --recipe edge-balanced --imatrix ernie.imatrix.gguf
    """
    from ..quantize import quantize as run_quantize

    with progress_bars(as_json) as progress:
        source = source_model(model, progress)
        result = run_quantize(source, recipe, out=out, imatrix=imatrix, threads=threads, progress=progress)
    if as_json:
        emit_json(result)
        return
    types = ", ".join(f"{n} {t}" for t, n in sorted(result.types.items(), key=lambda kv: -kv[1]))
    console.print(
        f"wrote [bold]{result.out}[/] ({human_bytes(result.bytes)}, {result.bpw:.2f} bpw; {types}) "
        f"in {result.seconds:.1f} s; verified every tensor's type",
        highlight=False,
    )
    for w in result.warnings:
        err_console.print(f"[yellow]llama.cpp:[/] {w}", highlight=False)
