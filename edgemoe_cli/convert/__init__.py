"""`edgemoe convert`: a Hugging Face ERNIE-4.5 checkpoint -> GGUF, without torch or transformers.

The output is the same file llama.cpp's own convert_hf_to_gguf.py writes (tensor for tensor, key for key), made in
one streaming pass: checkpoint tensors are read through mmap, converted a block of rows at a time and written
straight to their place in a private temp file beside OUT, which is renamed to OUT when complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import gguf

from ..errors import EdgeMoEError
from ..progress import Progress
from ..store import atomic_output, refuse_input_as_output
from .arch import OUTTYPES, add_hparams, check_against_tensors, check_config, hparams, model_arch, plan_tensors
from .safetensors import TensorReader, checkpoint_tensors
from .vocab import build_vocab, read_json_object
from .writer import StreamingGGUFWriter, write_gguf

__all__ = ["ConvertResult", "convert", "OUTTYPES"]


@dataclass
class ConvertResult:
    out: str
    src: str
    hf_arch: str
    arch: str
    outtype: str
    n_tensors: int
    n_params: int
    n_bytes: int
    seconds: float


def read_config(src: Path) -> dict:
    path = src / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeMoEError(f"{path} is missing", "point convert at a Hugging Face checkpoint directory") from None
    except (OSError, ValueError) as e:
        raise EdgeMoEError(f"{path} is not valid JSON ({e})", "download config.json again") from e
    if not isinstance(config, dict):
        raise EdgeMoEError(f"{path} is not a JSON object", "download config.json again")
    text_config = config.get("text_config", {})
    if not isinstance(text_config, dict):
        raise EdgeMoEError(f"{path}: text_config is not an object", "download config.json again")
    merged = {**config, **text_config}
    check_config(merged, path)
    return merged


def _metadata(writer: gguf.GGUFWriter, src: Path) -> None:
    """general.* keys derived as llama.cpp does: model card, config.json and the directory name."""
    total, shared, expert, n_expert = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, src, None, total)
    if meta.name is None:
        meta.name = src.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)


def _tokenizer_files(src: Path) -> list[Path]:
    names = (
        "tokenizer.model",
        "tokenizer_config.json",
        "added_tokens.json",
        "special_tokens_map.json",
        "generation_config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
    )
    return [src / n for n in names if (src / n).exists()]


def _vocab(writer: gguf.GGUFWriter, src: Path, vocab_size: int | None) -> None:
    tokens, scores, types = build_vocab(src, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    # special token ids, add_bos/add_eos and the chat template (tokenizer_config.json, generation_config.json)
    gguf.SpecialVocab(src, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    config = src / "tokenizer_config.json"
    if config.is_file():
        tok_config = read_json_object(config)
        if "add_prefix_space" in tok_config:
            if not isinstance(tok_config["add_prefix_space"], bool):
                raise EdgeMoEError(
                    f"{config}: add_prefix_space is {tok_config['add_prefix_space']!r}, not true/false",
                    "fix or re-download tokenizer_config.json",
                )
            writer.add_add_space_prefix(tok_config["add_prefix_space"])


def convert(src: str | Path, out: str | Path, outtype: str = "f16", progress: Progress | None = None) -> ConvertResult:
    """Convert the checkpoint directory `src` to the GGUF file `out` with weights in `outtype`.

    `progress` (progress.Progress) gets step "convert to OUTTYPE", bytes written of the total, and the tensor.
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if outtype not in OUTTYPES:
        raise EdgeMoEError(f"unknown output type {outtype}", f"use one of {', '.join(OUTTYPES)}")
    if not src.is_dir():
        raise EdgeMoEError(f"{src} is not a directory", "point convert at a Hugging Face checkpoint directory")
    raw_config = read_config(src)
    hf_arch, arch = model_arch(raw_config, src / "config.json")
    config = hparams(raw_config)
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise EdgeMoEError(f"{src / 'config.json'} lacks an integer {key}", "download config.json again")
    if not (src / "tokenizer.model").is_file():
        raise EdgeMoEError(
            f"tokenizer {src / 'tokenizer.model'} is missing", "download tokenizer.model with the checkpoint"
        )
    refs = checkpoint_tensors(src)
    check_against_tensors(arch, config, refs, src / "config.json")
    refuse_input_as_output(out, [src / "config.json", *{r.file for r in refs}, *_tokenizer_files(src)])
    plan = plan_tensors(arch, config, refs, outtype)

    writer = StreamingGGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, "float32", t.nbytes, raw_dtype=t.qtype)
    n_params = writer.get_total_parameter_count()[0]
    _metadata(writer, src)
    add_hparams(writer, arch, config, OUTTYPES[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab(writer, src, config.get("vocab_size"))

    reader = TensorReader()
    try:
        with atomic_output(out) as part:
            step = f"convert to {outtype}"
            write_gguf(
                writer,
                part,
                plan,
                reader,
                progress
                and (lambda done, total, i, n, name: progress(step, done, total, f"{i}/{n} tensors {name}", "bytes")),
            )
    except OSError as e:
        raise EdgeMoEError(f"cannot write {out}: {e.strerror}", "check free disk space and permissions") from e
    finally:
        reader.close()
    return ConvertResult(
        out=str(out),
        src=str(src),
        hf_arch=hf_arch,
        arch=gguf.MODEL_ARCH_NAMES[arch],
        outtype=outtype,
        n_tensors=len(plan),
        n_params=n_params,
        n_bytes=out.stat().st_size,
        seconds=time.perf_counter() - t0,
    )
