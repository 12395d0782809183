"""`edgemoe imatrix`: an importance matrix with llama-imatrix (stage: imatrix.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, ctx_option, emit_json, json_option, progress_bars, source_model, threads_option

ModelArg = Annotated[str, typer.Argument(help="The GGUF to measure (f32/f16/bf16 or Q8_0), or a model NAME[:TAG].")]
TextOpt = Annotated[
    Optional[Path], typer.Option("--text", help="Calibration text (default: edgemoe's own data/calib/calibration.txt).")
]
OutOpt = Annotated[
    Optional[Path], typer.Option("--out", "-o", help="Output imatrix (default: MODEL.imatrix.gguf beside the model).")
]
ChunksOpt = Annotated[Optional[int], typer.Option("--chunks", min=1, help="Use at most this many chunks of the text.")]


def imatrix_cmd(
    model: ModelArg,
    text: TextOpt = None,
    out: OutOpt = None,
    ctx: int = ctx_option(512, "Tokens per chunk.", minimum=32),
    chunks: ChunksOpt = None,
    threads: Optional[int] = threads_option("all CPUs"),
    as_json: bool = json_option(),
) -> None:
    """Compute an importance matrix with llama-imatrix (GGUF format, per-expert token counts kept).

    For every weight matrix the sum of squared input activations per column is accumulated over the text, per routed
    expert, with the number of tokens routed to each expert. `quantize --imatrix` uses it to spend precision where
    activations are large; `plan` uses it to weight quantization errors; the per-expert counts are a routing profile
    (imatrix.expert_usage). The default text mixes English and Chinese prose, Python and shell, and step-by-step
    arithmetic. Needs `edgemoe build` (for llama-imatrix).

    Example: edgemoe imatrix ernie-thinking-bf16.gguf --out ernie.imatrix.gguf
    """
    from ..imatrix import compute_imatrix

    with progress_bars(as_json) as progress:
        result = compute_imatrix(
            source_model(model, progress), text, out, ctx=ctx, threads=threads, chunks=chunks, progress=progress
        )
    if as_json:
        emit_json(result)
        return
    console.print(
        f"wrote [bold]{result.out}[/] ({result.tensors} tensors, {result.chunks} chunks of "
        f"{result.chunk_size} tokens) in {result.seconds:.1f} s",
        highlight=False,
    )
