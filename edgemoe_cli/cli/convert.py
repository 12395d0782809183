"""`edgemoe convert`: a Hugging Face checkpoint to GGUF (stage: convert/)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import console, emit_json, json_option, progress_bars

SrcArg = Annotated[
    str,
    typer.Argument(
        help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.model), or a "
        "model name from `edgemoe models` (pulled or local)."
    ),
]
OutOpt = Annotated[
    Path, typer.Option("--out", "-o", help="GGUF file to write (written as OUT.part, renamed when complete).")
]
OuttypeOpt = Annotated[str, typer.Option("--outtype", help="Weight type: f32, f16, bf16 or q8_0.")]


def convert(
    src: SrcArg,
    out: OutOpt,
    outtype: OuttypeOpt = "f16",
    as_json: bool = json_option(),
) -> None:
    """Convert an ERNIE-4.5 checkpoint (MoE or dense) from Hugging Face layout to GGUF, without torch.

    SRC is a checkpoint directory or the name of a pulled model. Reads config.json, model.safetensors or its shards
    (with model.safetensors.index.json), tokenizer.model, tokenizer_config.json and generation_config.json, and
    writes the same file llama.cpp's convert_hf_to_gguf.py would, byte for byte: a layer's experts stacked into
    blk.N.ffn_{gate,up,down}_exps, norms, router and score bias in f32, the SentencePiece vocabulary, special tokens
    and the chat template.

    The conversion streams a block of rows at a time, so memory stays around 100-200 MB whatever the model. OUT is
    written as OUT.part and renamed when complete; on any error nothing is left under OUT.

    Example: edgemoe convert ernie-4.5-21b-a3b-pt --out pt.gguf --outtype bf16
    """
    from ..convert import convert as run_convert
    from ..models import checkpoint_dir

    with progress_bars(as_json) as progress:
        result = run_convert(checkpoint_dir(src), out, outtype, progress=progress)
    if as_json:
        emit_json(result)
        return
    console.print(
        f"wrote [bold]{result.out}[/] ({result.arch}, {result.outtype}, {result.n_tensors} tensors, "
        f"{result.n_params / 1e6:.1f}M params, {result.n_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s"
    )
