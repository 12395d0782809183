"""`edgemoe recipe list|show`: quantization recipes (stage: recipe.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..units import human_bytes
from .common import console, emit_json, err_console, json_option

recipe_app = typer.Typer(
    help="Quantization recipes: ordered `pattern -> type` rules over GGUF tensor names.", no_args_is_help=True
)


def _print_problems(problems) -> None:
    for p in problems:
        style = "red" if p.severity == "error" else "yellow"
        err_console.print(f"[{style}]{p.severity}:[/] {p.message}", highlight=False, soft_wrap=True)


@recipe_app.command("list")
def recipe_list(as_json: bool = json_option("the recipes")) -> None:
    """The built-in recipes (configs/recipes/*.toml) and what each is for."""
    from ..recipe import builtin_names, load_recipe

    recipes = [load_recipe(n) for n in builtin_names()]
    if as_json:
        emit_json([{"name": r.name, "description": r.description, "source": r.source} for r in recipes])
        return
    for r in recipes:
        console.print(f"[bold]{r.name}[/]  {r.description}", highlight=False)


NameArg = Annotated[str, typer.Argument(help="A built-in recipe name (`edgemoe recipe list`) or a recipe .toml file.")]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="A GGUF to apply it to (f32/f16/bf16).")]
ImatrixOpt = Annotated[
    bool,
    typer.Option("--imatrix/--no-imatrix", help="Whether you will quantize with an imatrix (IQ2/IQ1 types need one)."),
]
AllTensorsOpt = Annotated[
    bool, typer.Option("--all", help="Also list tensors llama.cpp never quantizes (norms, router).")
]


@recipe_app.command("show")
def recipe_show(
    name: NameArg,
    model: ModelOpt = None,
    imatrix: ImatrixOpt = True,
    all_tensors: AllTensorsOpt = False,
    as_json: bool = json_option("the explanation"),
) -> None:
    """Explain a recipe: its rules, and with --model what every tensor becomes and why.

    Rules are regular expressions searched in GGUF tensor names (blk.N.ffn_down_exps.weight, blk.N.attn_q.weight,
    token_embd.weight, ...); the first rule that matches a tensor decides its type, as in llama-quantize's
    --tensor-type. The token_embedding and output keys take precedence over rules. With --model you get, per tensor,
    the rule that decided, the type, bytes and bits per weight; a summary per group (routed experts, shared experts,
    dense FFN, attention, embeddings, other) and the predicted file size. Problems are reported before any
    quantization: unknown types, rules matching nothing, rows that are not a multiple of the type's block size
    (llama.cpp would silently fall back to another type), very low-bit types without an imatrix, requantizing. Exit
    code 2 when the recipe has errors for this model.

    Example: edgemoe recipe show edge-balanced --model ernie-thinking-bf16.gguf
    """
    from ..recipe import explain, load_recipe

    recipe = load_recipe(name)
    if model is None:
        if as_json:
            emit_json(recipe)
            return
        console.print(f"[bold]{recipe.name}[/] ({recipe.source})\n{recipe.description}", highlight=False)
        console.print(f"default {recipe.default}, token_embedding {recipe.token_embedding}, output {recipe.output}")
        for i, r in enumerate(recipe.rules, 1):
            console.print(f"  rule {i}: {r.pattern!s:40} -> {r.type}", highlight=False)
        return
    ex = explain(recipe, model, have_imatrix=imatrix)
    if as_json:
        emit_json(ex)
    else:
        from rich.table import Table

        table = Table(title=f"{recipe.name} on {model.name}")
        for col in ("tensor", "shape", "type", "decided by", "bytes", "bpw"):
            table.add_column(col, justify="right" if col in ("bytes", "bpw") else "left")
        for t in ex.tensors:
            if all_tensors or t.rule != "not quantized":
                table.add_row(t.name, "x".join(map(str, t.shape)), t.type, t.rule, f"{t.bytes:,}", f"{t.bpw:.2f}")
        console.print(table)
        groups = Table(title="by group")
        for col in ("group", "tensors", "params", "size", "bpw"):
            groups.add_column(col, justify="right")
        for g in ex.groups:
            groups.add_row(g.group, str(g.tensors), f"{g.params:,}", human_bytes(g.bytes), f"{g.bpw:.2f}")
        groups.add_row("total (file)", "", "", human_bytes(ex.total_bytes), f"{ex.bpw:.2f}")
        console.print(groups)
    _print_problems(ex.problems)
    if ex.errors:
        raise typer.Exit(2)
