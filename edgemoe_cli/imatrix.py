"""Importance matrices: compute them with llama-imatrix, read llama.cpp's GGUF imatrix format.

The GGUF imatrix (tools/imatrix/imatrix.cpp) stores, for every weight matrix W that saw activations x:
    `<W>.in_sum2`  f32 [n_mat, n_in]   sum over tokens of x_j^2, one row per expert (n_mat = 1 for dense tensors)
    `<W>.counts`   f32 [n_mat, 1]      how many tokens went through that matrix (for experts: were routed to it)
and `imatrix.chunk_count`, `imatrix.chunk_size`, `imatrix.datasets` in the metadata. llama-quantize uses
in_sum2 / counts per expert as the per-column importance (an expert that saw no token gets importance 1), and so do
we when handing the matrix to the quantizer. The per-expert counts are also the cheapest measurement of routing:
`expert_usage()` turns them into a [layers x experts] table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgeMoEError


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # [n_mat, n_in] float64: sum of squared activations per input column, per expert
    counts: np.ndarray  # [n_mat] float64: tokens seen per expert

    def importance(self) -> np.ndarray:
        """[n_mat, n_in] mean squared activation, as llama-quantize computes it (1 where an expert saw nothing)."""
        out = np.ones_like(self.sums)
        seen = self.counts > 0
        out[seen] = self.sums[seen] / self.counts[seen, None]
        return out


@dataclass
class Imatrix:
    path: str
    entries: dict[str, ImatrixEntry]
    chunk_count: int
    chunk_size: int
    datasets: list[str]


def read_imatrix(path: str | Path) -> Imatrix:
    import gguf

    path = Path(path)
    if not path.is_file():
        raise EdgeMoEError(f"imatrix {path} does not exist", "compute one with `edgemoe imatrix MODEL.gguf`")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise EdgeMoEError(
            f"{path} is not a GGUF imatrix ({e})",
            "use `edgemoe imatrix` (GGUF output); the legacy .dat format is not supported",
        ) from e

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    if field("general.type") != "imatrix":
        raise EdgeMoEError(
            f"{path} is a GGUF file but not an imatrix (general.type={field('general.type')!r})",
            "pass the file `edgemoe imatrix` wrote",
        )
    sums, counts = {}, {}
    for t in reader.tensors:
        data = np.asarray(t.data, dtype=np.float64)
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = data.reshape(-1, int(t.shape[0]))
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = data.reshape(-1)
    entries = {}
    for name, s in sums.items():
        if name not in counts or counts[name].shape[0] != s.shape[0]:
            raise EdgeMoEError(f"{path}: tensor {name} has sums but no matching counts", "recompute the imatrix")
        entries[name] = ImatrixEntry(s, counts[name])
    return Imatrix(
        str(path),
        entries,
        int(field("imatrix.chunk_count", 0)),
        int(field("imatrix.chunk_size", 0)),
        list(field("imatrix.datasets", []) or []),
    )


def expert_usage(imatrix_path: str | Path, projection: str = "ffn_up_exps") -> np.ndarray:
    """[n_layers x n_experts]: each expert's share of its layer's routed token slots on the calibration text.

    Rows sum to 1 for MoE layers; layers without routed experts (ERNIE's dense layer 0) are NaN rows, so the row
    index is the block index. Read from the per-expert counts of `blk.N.<projection>.weight`.
    """
    im = read_imatrix(imatrix_path)
    layers = {}
    for name, e in im.entries.items():
        if m := re.fullmatch(rf"blk\.(\d+)\.{projection}\.weight", name):
            layers[int(m.group(1))] = e.counts
    if not layers:
        raise EdgeMoEError(
            f"{imatrix_path} has no per-expert counts for {projection}",
            "compute the imatrix on a MoE model with `edgemoe imatrix`",
        )
    n_layers = max(max(layers) + 1, _n_layers(im))
    n_experts = max(len(c) for c in layers.values())
    usage = np.full((n_layers, n_experts), np.nan)
    for i, c in layers.items():
        total = c.sum()
        usage[i, : len(c)] = c / total if total > 0 else np.nan
    return usage


def _n_layers(im: Imatrix) -> int:
    blocks = [int(m.group(1)) for n in im.entries if (m := re.match(r"blk\.(\d+)\.", n))]
    return max(blocks) + 1 if blocks else 0


# ---- computing one ----


@dataclass
class ImatrixResult:
    model: str
    text: str
    out: str
    tensors: int
    chunks: int
    chunk_size: int
    seconds: float


def default_calibration_text() -> Path:
    """Our own small calibration text (English and Chinese prose, code, step-by-step reasoning)."""
    from .store import configs_dir

    for candidate in (
        configs_dir().parent / "data" / "calib" / "calibration.txt",
        Path(__file__).resolve().parent / "data" / "calib" / "calibration.txt",
    ):
        if candidate.is_file():
            return candidate
    raise EdgeMoEError("the default calibration text data/calib/calibration.txt is missing", "pass --text FILE")


def imatrix_beside(model: str | Path) -> Path:
    """Where `edgemoe imatrix MODEL` puts its result by default, and where plan looks for it: MODEL.imatrix.gguf."""
    model = Path(model)
    return model.with_name(model.stem + ".imatrix.gguf")


def ensure_imatrix(
    model: str | Path, text: str | Path | None = None, threads: int | None = None, progress=None
) -> Path:
    """The imatrix beside `model`, computed on `text` first when it is not there yet."""
    path = imatrix_beside(model)
    if not path.is_file():
        compute_imatrix(model, text, path, threads=threads, progress=progress)
    return path


def compute_imatrix(
    model: str | Path,
    text: str | Path | None = None,
    out: str | Path | None = None,
    ctx: int = 512,
    threads: int | None = None,
    chunks: int | None = None,
    progress=None,
) -> ImatrixResult:
    """Run llama-imatrix on `text` and write a GGUF imatrix to `out` (atomically).

    `progress` (progress.Progress) gets step "imatrix" and chunks done when llama-imatrix reports them.
    """
    import os
    import time

    from .llamacpp import run_tool
    from .store import atomic_output, refuse_input_as_output

    model, text = Path(model), Path(text) if text else default_calibration_text()
    from .gguffile import open_gguf

    if not model.is_file():
        raise EdgeMoEError(f"model {model} does not exist", "pass a .gguf file (see `edgemoe convert`)")
    open_gguf(model)  # a damaged file is one line here, not a llama.cpp failure later
    if not text.is_file():
        raise EdgeMoEError(f"calibration text {text} does not exist", "pass --text FILE with plain text")
    out = Path(out) if out else imatrix_beside(model)
    refuse_input_as_output(out, [model, text])
    threads = threads or max(1, os.cpu_count() or 1)
    t0 = time.perf_counter()
    total = [None]

    def on_line(line: str) -> None:
        # "compute_imatrix: computing over 53 chunks ..." then "[1]... [2]..." as chunks finish
        if m := re.search(r"computing over (\d+) chunks", line):
            total[0] = int(m.group(1))
        elif progress and (done := re.findall(r"\[(\d+)\]", line)):
            progress("imatrix", int(done[-1]), total[0], "chunks")

    with atomic_output(out) as part:
        # llama-imatrix picks its output format from the file name: keep a .gguf suffix on the part file.
        tmp = part.with_name(part.name + ".gguf")
        args = [
            "-m",
            model,
            "-f",
            text,
            "-o",
            tmp,
            "-c",
            ctx,
            "-t",
            threads,
            "--no-ppl",
            "--output-format",
            "gguf",
            "-ngl",
            "0",
        ] + (["--chunks", chunks] if chunks else [])
        try:
            try:
                run_tool("llama-imatrix", args, on_line=on_line)
            except EdgeMoEError as e:
                raise EdgeMoEError(e.message, "the text needs at least 2 x --ctx tokens; " + e.hint) from e
            if not tmp.is_file():
                raise EdgeMoEError(
                    f"llama-imatrix wrote no imatrix for {model}",
                    "a text shorter than 2 x ctx tokens gives no chunk: pass a longer --text or a lower --ctx",
                )
            os.replace(tmp, part)
        finally:
            tmp.unlink(missing_ok=True)
    im = read_imatrix(out)
    return ImatrixResult(
        str(model),
        str(text),
        str(out),
        len(im.entries),
        im.chunk_count,
        im.chunk_size,
        round(time.perf_counter() - t0, 2),
    )
