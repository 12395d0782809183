"""`edgemoe eval`: PPL, KLD and top-1 agreement against a base model (stage: evaluate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, ctx_option, emit_json, json_option, progress_bars, run_model, source_model, threads_option

ModelArg = Annotated[str, typer.Argument(help="The GGUF to judge (e.g. a quantization), or NAME[:TAG].")]
BaseOpt = Annotated[
    str,
    typer.Option("--base", help="The reference GGUF (the unquantized model), or a model NAME (its unquantized GGUF)."),
]
TextOpt = Annotated[
    Path, typer.Option("--text", help="Evaluation text; keep it disjoint from the imatrix's calibration text.")
]
ChunksOpt = Annotated[Optional[int], typer.Option("--chunks", min=1, help="Use at most this many chunks.")]


def eval_cmd(
    model: ModelArg,
    base: BaseOpt,
    text: TextOpt,
    ctx: int = ctx_option(512, "Chunk length in tokens; the second half of each chunk is scored.", minimum=16),
    chunks: ChunksOpt = None,
    threads: Optional[int] = threads_option("all CPUs"),
    as_json: bool = json_option(),
) -> None:
    """Perplexity, KL divergence to the base model (mean, median, p99, max) and top-1 agreement.

    Both models read the same chunks of the text (llama-perplexity's protocol: chunks of --ctx tokens starting with
    BOS, second half scored). The base model's log-probabilities are cached in the store, so comparing many
    quantizations against one base runs the base once. KLD is in nats per token; top-1 agreement is the share of
    positions where both models' most likely next token is the same.

    Example: edgemoe eval ernie-q4.gguf --base ernie-bf16.gguf --text data/calib/evaluation.txt
    """
    from ..evaluate import evaluate

    with progress_bars(as_json) as progress:
        model_path, base_path = run_model(model), source_model(base, progress)
        result = evaluate(model_path, base_path, text, ctx=ctx, threads=threads, max_chunks=chunks, progress=progress)
    if as_json:
        emit_json(result)
        return
    console.print(
        f"{model_path.name} vs {base_path.name} on {result.tokens_scored} tokens ({result.chunks} chunks of {ctx}):\n"
        f"  PPL {result.ppl:.4f} (base {result.base_ppl:.4f})\n"
        f"  KLD mean {result.kld_mean:.6f} ± {result.kld_stderr:.6f}, median {result.kld_median:.6f}, "
        f"p99 {result.kld_p99:.6f}, max {result.kld_max:.4f}\n"
        f"  top-1 agreement {result.top1_agreement:.2%}",
        highlight=False,
    )
