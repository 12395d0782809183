"""`edgemoe run`: ask a GGUF one question and stream the reply (stage: generate.py)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EdgeMoEError
from .common import (
    MemoryOpt,
    WarmOpt,
    console,
    ctx_option,
    emit_json,
    err_console,
    json_option,
    run_model,
    threads_option,
)

ModelArg = Annotated[
    str,
    typer.Argument(
        help="A GGUF file, or NAME[:TAG] from `edgemoe list` (NAME alone: the GGUF you made last, else the pulled one)."
    ),
]
PromptOpt = Annotated[Optional[list[str]], typer.Option("-p", "--prompt", help="The user message.")]
PromptFileOpt = Annotated[
    Optional[Path], typer.Option("-f", "--file", help="Read the user message from FILE (- = stdin).")
]
SystemOpt = Annotated[
    Optional[str], typer.Option("--system", help="A system message, placed as the chat template says.")
]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Stop after this many generated tokens.")]
TempOpt = Annotated[float, typer.Option("--temp", min=0.0, help="Sampling temperature; 0 = greedy and deterministic.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed, for repeatable runs at --temp > 0.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also print the library loaded and its system_info.")]


WorkersOpt = Annotated[
    Optional[str],
    typer.Option(
        "--workers",
        help="HOST:PORT,... of `edgemoe worker`s: split the "
        "model's layers across them and this machine by free memory.",
    ),
]


def run(
    model: ModelArg,
    prompt: PromptOpt = None,
    prompt_file: PromptFileOpt = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = 512,
    threads: Optional[int] = threads_option(),
    ctx: int = ctx_option(4096, "Context length in tokens (0 = the model's own).", minimum=0),
    temp: TempOpt = 0.8,
    seed: SeedOpt = None,
    verbose: VerboseOpt = False,
    as_json: bool = json_option("the reply and its timings, without streaming,"),
    workers: WorkersOpt = None,
    memory: MemoryOpt = None,
    warm: WarmOpt = None,
) -> None:
    """Ask a GGUF model one question, with its own chat template, and stream the reply.

    The prompt is rendered with the chat template stored in the GGUF (tokenizer.chat_template): a PT model gets
    `User: ...\\nAssistant: `, a Thinking model `<|im_start|>user ... <|im_start|>assistant\\n<think>\\n`. A
    Thinking reply is split into its reasoning (shown dimmed) and its answer (shown plain); the `</think>` and
    `<response>` tags are not shown. Generation stops at end-of-sequence (`</s>`, `<|end_of_sentence|>`,
    `<|im_end|>`) or after --max-tokens.

    The reply goes to stdout, one line of timings to stderr: prompt tokens and tokens/s, generated tokens and tokens/s
    (decode steps after the first token, as llama-bench counts them), time to first token, peak resident memory.

    --json prints {reasoning, answer, raw, prompt_tokens, completion_tokens, ttft_s, prompt_tps, gen_tps,
    peak_rss_bytes, tool_call, finish_reason, library, streaming} instead of streaming; `streaming` (and the timing
    line) report the expert cache of --memory, which runs a larger model within SIZE, experts read as needed.

    Examples: edgemoe run model.gguf -p "What is 51 - 29?" --temp 0
              edgemoe run model.gguf -f question.txt --system "Be brief." --json
    """
    from .. import cluster, generate

    if prompt and len(prompt) > 1:
        raise EdgeMoEError(
            f"run asks one question, and -p was given {len(prompt)} times",
            "ask them one run at a time, or all at once with `edgemoe compare -p A -p B`",
        )
    text = generate.read_prompt(prompt[0] if prompt else None, prompt_file)
    worker_list = cluster.parse_workers(workers) if workers is not None else None
    _one_of_memory_and_workers(memory, worker_list)
    if worker_list and not cluster.supervised():  # the child does the run; this process names a worker that dies
        raise typer.Exit(cluster.supervise(sys.argv[1:], worker_list))
    model_path = run_model(model)
    if verbose and not as_json:
        _say_library(generate.binding_info())
    settings = dict(system=system, max_tokens=max_tokens, threads=threads, ctx=ctx, temp=temp, seed=seed)
    on_text = None if as_json else _streamer()
    if worker_list:
        result, split = cluster.run_split(model_path, text, worker_list, on_text=on_text, **settings)
    else:
        result, split = generate.run(model_path, text, on_text=on_text, memory=memory, warm=warm, **settings), None
    if as_json:
        emit_json({**asdict(result), "split": asdict(split)} if split else result)
        return
    sys.stdout.write("\n")
    _print_timings(result, split)


def _one_of_memory_and_workers(memory: Optional[str], worker_list) -> None:
    if worker_list and memory is not None:
        raise EdgeMoEError("--memory and --workers do not combine yet", "give one of the two")


def _say_library(info) -> None:
    err_console.print(
        f"[dim]libllama: {info.library} ({info.source})\n{info.system_info}[/]", highlight=False, soft_wrap=True
    )


def _print_timings(result, split) -> None:
    """One line on stderr: prompt and generation speed, time to first token, peak memory (and the layer split)."""
    gen = f"{result.gen_tps:.1f} tok/s" if result.gen_tps is not None else "-"
    cut = " [yellow](stopped at --max-tokens)[/]" if result.finish_reason == "length" else ""
    err_console.print(
        f"[dim]prompt {result.prompt_tokens} tok @ {result.prompt_tps:.1f} tok/s · "
        f"generated {result.completion_tokens} tok @ {gen} · TTFT {result.ttft_s:.3f} s · "
        f"peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB{_streaming_note(result.streaming)}[/]{cut}",
        highlight=False,
        soft_wrap=True,
    )
    if split:
        err_console.print(
            "[dim]layers: " + ", ".join(f"{p.device} {p.layers}" for p in split.parts) + "[/]", highlight=False
        )


def _streaming_note(streaming: Optional[dict]) -> str:
    """The timing line's part for a run that streamed experts (--memory): cache, hits, reads, wait vs compute."""
    if not streaming:
        return ""
    compute = streaming.get("compute_s")
    return (
        f" · experts: cache {streaming['cache_bytes'] / 2**20:.0f} MiB, hits {streaming['hit_rate']:.0%}, "
        f"read {streaming['bytes_read_per_token'] / 2**20:.1f} MiB/tok, waited {streaming['read_wait_s']:.2f} s"
        + (f" vs computed {compute:.2f} s" if compute is not None else "")
    )


def _streamer():
    """on_text for generate.run: reasoning dimmed (on a terminal), a blank line, then the answer, as it comes."""
    out = sys.stdout
    styled = console.is_terminal and not console.no_color
    last_kind = [None]

    # plain writes, not rich: a console.print per token would cost a visible share of tokens/s
    def on_text(kind: str, piece: str) -> None:
        if last_kind[0] == "reasoning" and kind == "answer":
            out.write("\n\n")
        last_kind[0] = kind
        out.write(f"\x1b[2m{piece}\x1b[0m" if styled and kind == "reasoning" else piece)
        out.flush()

    return on_text
