"""`edgemoe profile`: which experts a text uses (stage: profile.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, ctx_option, emit_json, json_option, progress_bars, run_model, threads_option

ModelArg = Annotated[str, typer.Argument(help="An ERNIE-4.5 MoE GGUF (any quantization), or NAME[:TAG].")]
TextOpt = Annotated[Path, typer.Option("--text", help="UTF-8 text to route through the model (your workload).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Directory for profile.json and expert-usage.png.")]
MaxTokensOpt = Annotated[
    int, typer.Option("--max-tokens", "-n", min=1, help="Route at most this many tokens of the text.")
]


def profile(
    model: ModelArg,
    text: TextOpt,
    out: OutOpt = Path("profile"),
    max_tokens: MaxTokensOpt = 8192,
    ctx: int = ctx_option(512, "Window length: the text is evaluated in windows this long.", minimum=16),
    threads: Optional[int] = threads_option(),
    as_json: bool = json_option(),
) -> None:
    """Which routed experts a text really uses, layer by layer, measured inside llama.cpp.

    The text runs through the model in llama.cpp; a callback reads every MoE layer's router decision (the experts
    picked per token, with the score-correction bias, exactly as at run time), the normalized gate weights and the
    picked experts' outputs. From that:

    - a heatmap PNG of layers x experts (share of each layer's tokens routed to each expert),

    - per layer: entropy of expert usage, the effective number of experts (2**entropy), the share of routed tokens
    the top-k experts take (k = experts per token), experts never used,

    - whether usage against rank follows a power law (as the EdgeMoE paper reports) or an exponential: both are
    fitted and the better R^2 is named,

    - profile.json with all of it plus the raw counts and REAP scores (`edgemoe prune --usage` reads it).

    Example: edgemoe profile ernie-thinking-q4_0.gguf --text my-prompts.txt --out profile/
    """
    from .. import profile as stage

    with progress_bars(as_json) as progress:
        result = stage.profile(
            run_model(model), text, out, max_tokens=max_tokens, ctx=ctx, threads=threads, progress=progress
        )
    emit_json(result) if as_json else _print_profile(result)


def _print_profile(result) -> None:
    from rich.table import Table

    table = Table(
        title=f"expert usage over {result.n_tokens} tokens ({result.n_expert} experts, top-{result.n_expert_used})"
    )
    for col in (
        "layer",
        "entropy bits",
        "effective experts",
        f"top-{result.n_expert_used} share",
        "top-half share",
        "unused",
        "power-law α",
        "R² power",
        "R² exp",
    ):
        table.add_column(col, justify="right")
    for u in result.layers:
        table.add_row(
            str(u.layer),
            f"{u.entropy_bits:.2f}",
            f"{u.effective_experts:.1f}",
            f"{u.top_k_share:.1%}",
            f"{u.half_share:.1%}",
            str(u.unused),
            f"{u.power_law_alpha:.2f}",
            f"{u.power_law_r2:.3f}",
            f"{u.exponential_r2:.3f}",
        )
    console.print(table)
    console.print(f"all layers: {result.power_law['verdict']}")
    console.print(
        f"wrote {result.outputs['json']}, {result.outputs['heatmap']} and {result.outputs['rank_plot']}",
        highlight=False,
    )
