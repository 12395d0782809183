"""`edgemoe prune`: drop the least important experts (stage: prune.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, emit_json, json_option, progress_bars, run_model, threads_option

ModelArg = Annotated[str, typer.Argument(help="An ERNIE-4.5 MoE GGUF (any quantization), or NAME[:TAG].")]
KeepOpt = Annotated[
    Optional[str], typer.Option("--keep", help="Experts to keep per MoE layer: a count (48) or a share (75%).")
]
BudgetOpt = Annotated[
    Optional[str], typer.Option("--budget", help="Keep as many experts as fit this file size (12G, 900M).")
]
TextOpt = Annotated[Optional[Path], typer.Option("--text", help="Score experts by REAP on this text (recommended).")]
UsageOpt = Annotated[
    Optional[Path], typer.Option("--usage", help="Score experts by usage counts from `edgemoe profile`'s profile.json.")
]
OutOpt = Annotated[
    Optional[Path], typer.Option("--out", "-o", help="Output GGUF (default: MODEL.keepN.gguf beside MODEL).")
]
MaxTokensOpt = Annotated[
    int, typer.Option("--max-tokens", "-n", min=1, help="With --text: route at most this many tokens.")
]


def prune(
    model: ModelArg,
    keep: KeepOpt = None,
    budget: BudgetOpt = None,
    text: TextOpt = None,
    usage: UsageOpt = None,
    out: OutOpt = None,
    max_tokens: MaxTokensOpt = 8192,
    threads: Optional[int] = threads_option(),
    as_json: bool = json_option(),
) -> None:
    """Drop the least important routed experts of every MoE layer; the result runs in stock llama.cpp.

    Each MoE layer keeps its own N best experts (llama.cpp needs the same count in every layer): the expert tensors,
    the router's rows and the score-correction bias are sliced consistently and expert_count is set to N. Experts
    per token (top-k) stay as they were, so N must be at least k. Works on any quantization.

    Importance, per layer: with --text, REAP (mean of gate weight x expert output norm over the tokens routed to the
    expert, measured in llama.cpp); with --usage, how often `edgemoe profile` saw the expert picked; with neither, a
    data-free proxy (router row norm x down-projection norm) that is usually worse.

    --budget SIZE picks the largest N whose file fits SIZE. A manifest (OUT.manifest.json) records which original
    experts each layer kept. Measure what pruning costs with `edgemoe eval` before you trust it.

    Examples:

        edgemoe prune ernie-q4_0.gguf --keep 75% --text workload.txt

        edgemoe prune ernie-q4_0.gguf --budget 9G --usage profile/profile.json --out ernie-q4_0-9g.gguf
    """
    from .. import prune as stage

    with progress_bars(as_json) as progress:
        result = stage.prune(
            run_model(model),
            keep=keep,
            budget=budget,
            text=text,
            usage=usage,
            out=out,
            max_tokens=max_tokens,
            threads=threads,
            progress=progress,
        )
    if as_json:
        emit_json(result)
        return
    console.print(
        f"kept {result.n_expert_after} of {result.n_expert_before} experts per layer (score: {result.score}); "
        f"{result.bytes_before / 2**20:.1f} MiB -> {result.bytes_after / 2**20:.1f} MiB\nwrote {result.out}",
        highlight=False,
    )
