"""`edgemoe compare`: PT and Thinking side by side (stage: compare.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    MemoryOpt,
    console,
    ctx_option,
    emit_json,
    json_option,
    progress_bars,
    run_model,
    threads_option,
)

ThinkingOpt = Annotated[Optional[str], typer.Option("--thinking", help="The Thinking model: a GGUF or NAME[:TAG].")]
PtOpt = Annotated[Optional[str], typer.Option("--pt", help="The PT model: a GGUF or NAME[:TAG].")]
PromptsOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--prompts",
        help="Prompt file: TOML [[prompt]] tables or JSON Lines {q, answer} (default: configs/prompts/compare.toml).",
    ),
]
PromptOpt = Annotated[
    Optional[list[str]], typer.Option("-p", "--prompt", help="A prompt instead of a file; repeat -p to ask several.")
]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", min=1, help="Use only the first N prompts of the file.")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Stop each reply after this many tokens.")]
TempOpt = Annotated[
    float, typer.Option("--temp", min=0.0, help="Sampling temperature (default 0: greedy, deterministic).")
]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed, for repeatable runs at --temp > 0.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="A system message for both variants.")]
OutOpt = Annotated[
    Optional[Path], typer.Option("--out", "-o", help="Write a Markdown report here (and its .json twin).")
]
ShowOpt = Annotated[int, typer.Option("--show", min=0, help="Side-by-side panels for at most this many prompts.")]


def compare(
    thinking: ThinkingOpt = None,
    pt: PtOpt = None,
    prompts: PromptsOpt = None,
    prompt: PromptOpt = None,
    limit: LimitOpt = None,
    max_tokens: MaxTokensOpt = 512,
    temp: TempOpt = 0.0,
    seed: SeedOpt = None,
    system: SystemOpt = None,
    threads: Optional[int] = threads_option(),
    ctx: int = ctx_option(4096, "Context length in tokens.", minimum=0),
    memory: MemoryOpt = None,
    out: OutOpt = None,
    show: ShowOpt = 8,
    as_json: bool = json_option("the whole comparison"),
) -> None:
    """Ask ERNIE-4.5 PT and Thinking the same prompts and put the answers, timings and accuracy side by side.

    The variants run one after the other, each in its own process, so only one model is in memory at a time and each
    peak RSS is that model's own. Replies come from the same generator as `edgemoe run` (greedy by default).

    The terminal shows, per prompt, a PT panel (the answer) beside a Thinking panel (the reasoning folded to one
    line, then the answer), then a metrics table: prompt and completion tokens, reasoning vs answer tokens, time to
    first token, generation tokens/s, wall time, load time, peak RSS and accuracy where prompts have expected
    answers (see configs/prompts/compare.toml for the format and the checks). --out writes everything, both replies
    in full, as Markdown plus JSON. --memory SIZE runs each variant within SIZE, as `edgemoe run --memory` does.

    Examples:

        edgemoe compare --pt ernie-pt-q4_0.gguf --thinking ernie-thinking-q4_0.gguf --out compare.md
        edgemoe compare --pt pt.gguf --thinking thinking.gguf --prompts arith-dev.jsonl --limit 50 --max-tokens 256
    """
    from .. import compare as stage

    with progress_bars(as_json) as progress:
        thinking_path, pt_path = (run_model(m) if m is not None else None for m in (thinking, pt))
        generation = dict(max_tokens=max_tokens, temp=temp, seed=seed, system=system, threads=threads, ctx=ctx)
        result = stage.compare(
            thinking_path, pt_path, prompts_file=prompts, prompt=prompt or None, limit=limit, memory=memory,
            out=out, progress=progress, **generation,
        )  # fmt: skip
    if as_json:
        emit_json(result)
        return
    _print_panels(result.items[:show])
    if len(result.items) > show:
        console.print(f"[dim]… {len(result.items) - show} more prompts" + (" in the report" if out else "") + "[/]")
    _print_metrics(*stage.metrics_rows(result))
    if result.outputs:
        console.print(f"wrote {result.outputs['markdown']} and {result.outputs['json']}", highlight=False)


def _print_panels(items) -> None:
    """Per prompt, the PT answer beside the Thinking answer, its reasoning folded to one line."""
    from rich.columns import Columns
    from rich.panel import Panel
    from rich.text import Text

    mark = {True: " [green]✓[/]", False: " [red]✗[/]", None: ""}
    width = max(30, (console.width - 4) // 2)
    for n, it in enumerate(items, 1):
        console.rule(f"{n}. {it.prompt.text.splitlines()[0][: console.width - 10]}", align="left", style="dim")
        folded = Text()
        if it.thinking.reasoning:
            first = " ".join(it.thinking.reasoning.split())
            cut = first if len(first) <= width - 20 else first[: width - 21] + "…"
            folded.append(f"▸ {cut} ({it.thinking.reasoning_tokens} tok)\n", style="dim")
        folded.append(it.thinking.answer or "(no answer)")
        console.print(
            Columns(
                [
                    Panel(Text(it.pt.answer or "(no answer)"), title="PT" + mark[it.pt.correct], width=width),
                    Panel(folded, title="Thinking" + mark[it.thinking.correct], width=width),
                ]
            )
        )


def _print_metrics(headers: list[str], rows: list) -> None:
    from rich.table import Table

    # metrics down, variants across: two value columns fit any terminal width
    table = Table(title="PT vs Thinking (means per prompt; wall and load are totals)")
    table.add_column("metric")
    for row in rows:
        table.add_column("PT" if row[0] == "pt" else "Thinking", justify="right")
    for i, h in enumerate(headers[1:], 1):
        table.add_row(
            h,
            *[
                f"{row[i]:.2f}" if isinstance(row[i], float) else ("–" if row[i] is None else str(row[i]))
                for row in rows
            ],
        )
    console.print(table)
