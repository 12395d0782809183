"""plan's quantization error E(W, t), measured in process on a stratified sample of each tensor's rows.

What it computes is plan's E (plan.py's docstring): E(W,t) = sum_e sum_j s_ej * sum_rows (W_q - W)_rj^2 / N.
How: llama.cpp quantizes a tensor row by row — llama-quant.cpp hands ggml_quantize_chunk slabs of whole rows, each
with its expert's slice of the importance vector (in_sum2/counts, as quantize.imatrix_array passes it) — so the
bytes of one row depend on that row and that slice only. This module reads chosen source rows straight from the
GGUF (pread: only those rows, not a whole tensor, are in memory), converts them to f32 exactly as llama.cpp
does (bf16/f16 widening is exact), quantizes them with the same build's ggml (`ggml_quantize_chunk` from
libggml-base beside the libllama the binding loads, through ctypes), dequantizes them with ggml's own `to_float`
and accumulates the squared error per column and expert. tests/test_qerror.py checks that the sampled rows' bytes
are byte for byte llama.cpp's and that a full sample gives plan.tensor_errors' values for every candidate type.

Sample. Each stratum — an expert of a 3-D tensor, or a 2-D tensor — is cut into k equal runs of consecutive rows
and one row is drawn from each (seeded by the tensor's name and the stratum: the same rows for every type and on
every run), k = ceil(fraction x rows) but at least MIN_ROWS per tensor (spread over its experts), at most every
row. Every expert is sampled because the imatrix weights differ per expert. The estimate per stratum is a ratio
estimator: the sampled rows' weighted errors over their weighted energies sum_j s_j W_rj^2, times the energy of
all the stratum's rows (one cheap read of every row, no quantizing) — a row's quantization error scales with its
magnitude, so the ratio varies far less between rows than the error does. Exact at fraction 1.
bench/qerror_convergence.md shows how the estimate converges, on a real-width model and on the trained fixture;
DEFAULT_FRACTION and MIN_ROWS come from there.

Cost and memory: one pass over the model for all candidate types (each sampled row is read and widened once);
work items of at most SLAB_ROWS rows of one stratum run on `threads` threads (ctypes releases the GIL), so memory
is a few slabs, whatever the model.
"""

from __future__ import annotations

import ctypes
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgeMoEError
from .progress import Progress

# bench/qerror_convergence.md: on trained weights (the fixture) a tensor's estimate is within 1.8 % with 32 rows per
# expert (512 a tensor), 3 % with 16; on the real-width model within 0.9 % at any fraction from 1/256. 1/64 gives
# ERNIE-21B's expert tensors 24-40 rows per expert (1536-2560 a tensor) for 2.7 % of its weights quantized per type.
DEFAULT_FRACTION = 1 / 64
MIN_ROWS = 512  # rows per tensor at least (spread over its experts): a tensor's estimate is about as good as its
# total sampled rows (the strata's errors average); at ERNIE-21B's widths this floor is ~1 % of the weights
SLAB_ROWS = 256  # rows of one stratum per work item: bounds memory (256 x 12288 f32 = 12.6 MB, x a few buffers)
SOURCE_TYPES = ("F32", "F16", "BF16")


class _TypeTraits(ctypes.Structure):
    # ggml.h struct ggml_type_traits (this build's layout; _library checks type_size against gguf's table)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_lib: ctypes.CDLL | None = None


def library_path() -> Path:
    """libggml-base of the llama.cpp the binding loads (llamacpp.select_binding_library): the same quantizer code
    as quantize.quantize runs."""
    from .llamacpp import select_binding_library

    candidates = []
    if lib_dir := select_binding_library():
        candidates.append(Path(lib_dir))
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
        if spec and spec.origin:
            candidates.append(Path(spec.origin).parent / "lib")
    except (ImportError, ValueError):
        pass
    for d in candidates:
        for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
            if (d / name).is_file():
                return d / name
    raise EdgeMoEError(
        "llama.cpp's libggml-base library was not found", "run `edgemoe build` (or set LLAMA_CPP_LIB_PATH)"
    )


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        path = library_path()
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise EdgeMoEError(f"cannot load {path} ({e})", "rebuild with `edgemoe build`") from e
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.restype = None
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        _lib = lib
    return _lib


@dataclass
class _Kind:
    """One candidate type as ggml knows it."""

    name: str
    id: int
    row_bytes: int
    to_float: object


def _kind(type_: str, n_per_row: int) -> _Kind:
    import gguf

    from .recipe import ggml_type

    lib = _library()
    qt = ggml_type(type_)
    traits = lib.ggml_get_type_traits(int(qt)).contents
    block, size = gguf.GGML_QUANT_SIZES[qt]
    if traits.blck_size != block or traits.type_size != size or not traits.to_float:
        raise EdgeMoEError(
            f"{library_path()} does not describe {type_} as gguf does ({traits.blck_size}/{traits.type_size} vs "
            f"{block}/{size})",
            "rebuild llama.cpp with `edgemoe build` (the library and the gguf package disagree)",
        )
    lib.ggml_quantize_init(int(qt))  # tables of the i-quants; thread-safe, a no-op the second time
    return _Kind(type_, int(qt), int(lib.ggml_row_size(int(qt), n_per_row)), _TO_FLOAT(traits.to_float))


def quantize_rows(kind: _Kind, src: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """[rows, row_bytes] uint8: ggml_quantize_chunk of f32 rows `src` [rows, n] with one importance vector [n]."""
    lib = _library()
    src = np.ascontiguousarray(src, dtype=np.float32)
    rows, n = src.shape
    if importance is None and lib.ggml_quantize_requires_imatrix(kind.id):
        raise EdgeMoEError(f"{kind.name} needs an imatrix for every tensor", "compute one with `edgemoe imatrix`")
    out = np.empty((rows, kind.row_bytes), dtype=np.uint8)
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    written = lib.ggml_quantize_chunk(
        kind.id, src.ctypes.data, out.ctypes.data, 0, rows, n, None if imp is None else imp.ctypes.data
    )
    if written != out.nbytes:
        raise EdgeMoEError(f"ggml wrote {written} bytes for {rows} rows of {kind.name}, not {out.nbytes}", "")
    return out


def dequantize_rows(kind: _Kind, q: np.ndarray, n_per_row: int) -> np.ndarray:
    """[rows, n] f32 from quantized rows (ggml's own to_float)."""
    out = np.empty((q.shape[0], n_per_row), dtype=np.float32)
    kind.to_float(q.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)
    return out


def rows_per_stratum(n_rows: int, n_strata: int, fraction: float, min_rows: int = MIN_ROWS) -> int:
    """k: fraction x n_rows, but at least min_rows / n_strata (the floor is per tensor), at most every row."""
    return min(n_rows, max(math.ceil(fraction * n_rows), math.ceil(min_rows / n_strata), 1))


def sample_rows(
    name: str, stratum: int, n_rows: int, n_strata: int, fraction: float, seed: int = 0, min_rows: int = MIN_ROWS
):
    """(sorted row indices, weights) of one stratum of `n_rows` rows: one row drawn from each of k equal runs, weight
    = the run's length; k = fraction x n_rows, but at least min_rows / n_strata (and at most every row)."""
    k = rows_per_stratum(n_rows, n_strata, fraction, min_rows)
    edges = (np.arange(k + 1, dtype=np.int64) * n_rows) // k
    lengths = edges[1:] - edges[:-1]
    if k == n_rows:
        return edges[:-1], lengths.astype(np.float64)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), stratum])
    rows = edges[:-1] + (rng.random(k) * lengths).astype(np.int64)
    return rows, lengths.astype(np.float64)


def _rows_f32(tensor, stratum: int, rows: np.ndarray | slice, n_per_row: int, fd: int | None = None) -> np.ndarray:
    """Rows (indices, or a slice: one contiguous read) of one stratum of a GGUFReader tensor as f32 (exact for
    f32/f16/bf16). Read with pread from the tensor's file (`fd`, else opened here), not through the reader's memory
    map: mapped pages a process has touched count as its resident memory, read ones stay in the page cache."""
    if fd is None:
        fd = os.open(tensor.data.filename, os.O_RDONLY)
        try:
            return _rows_f32(tensor, stratum, rows, n_per_row, fd)
        finally:
            os.close(fd)
    kind = tensor.tensor_type.name
    item = 4 if kind == "F32" else 2
    row_bytes = n_per_row * item
    n_rows = int(tensor.shape[1]) if len(tensor.shape) > 1 else 1
    base = int(tensor.data_offset) + stratum * n_rows * row_bytes
    if isinstance(rows, slice):
        starts = [(rows.start, rows.stop - rows.start)]
    else:
        starts = [(int(r), 1) for r in rows]
    raw = np.empty((sum(n for _, n in starts), row_bytes), dtype=np.uint8)
    at = 0
    for first, count in starts:
        want = count * row_bytes
        got = os.preadv(fd, [memoryview(raw[at : at + count]).cast("B")], base + first * row_bytes)
        if got != want:
            raise EdgeMoEError(f"{tensor.name}: the file ends inside the tensor's data", "convert the model again")
        at += count
    n = raw.shape[0]
    if kind == "F32":
        return raw.view(np.float32).reshape(n, n_per_row)
    if kind == "F16":
        return raw.view(np.float16).reshape(n, n_per_row).astype(np.float32)
    bits = np.empty((n, n_per_row), dtype=np.uint32)
    np.left_shift(raw.view(np.uint16).reshape(n, n_per_row), 16, out=bits, dtype=np.uint32)
    return bits.view(np.float32)


def n_tokens(imatrix) -> float:
    """N of E: the tokens the imatrix saw (a dense tensor's count; 1 without one)."""
    return max((float(e.counts[0]) for e in imatrix.entries.values() if e.counts.size == 1), default=1.0)


def _importance(name: str, entry, n_strata: int, n_per_row: int) -> np.ndarray | None:
    """[strata, n] f32 importance per expert as llama.cpp gets it (quantize.imatrix_array), or None."""
    if entry is None:
        return None
    imp = entry.importance()
    if imp.size != n_strata * n_per_row:
        raise EdgeMoEError(
            f"the imatrix has {imp.size} values for {name}, the model needs {n_strata * n_per_row}",
            "compute the imatrix on this model (`edgemoe imatrix`)",
        )
    return np.ascontiguousarray(imp.reshape(n_strata, n_per_row), dtype=np.float32)


@dataclass
class SampledTensor:
    name: str
    errors: dict[str, float]  # type -> E estimate
    rows: int  # rows quantized per type
    total_rows: int


def _row_energy(src: np.ndarray, s: np.ndarray) -> np.ndarray:
    """p_r = sum_j s_j W_rj^2 per row: the ratio estimator's auxiliary variable. In f32 (a proxy: the sample's and
    the total's use the same values); einsum, not BLAS, whose threads for small matrices cost more than the sum."""
    return np.einsum("ij,ij,j->i", src, src, s.astype(np.float32))


def tensor_sample_errors(
    tensor,
    types: list[str],
    imatrix,
    fraction: float = DEFAULT_FRACTION,
    seed: int = 0,
    pool: ThreadPoolExecutor | None = None,
    tokens: float | None = None,
    estimator: str = "ratio",
    min_rows: int = MIN_ROWS,
) -> SampledTensor:
    """E(W, t) of one GGUFReader tensor (f32/f16/bf16) for each type in `types`, estimated from a row sample.

    estimator "ratio": per stratum, E = P x (sampled weighted errors / sampled weighted energies), where P is the
    stratum's importance-weighted energy sum_r sum_j s_j W_rj^2 over every row (read, not quantized: one pass);
    a row's quantization error scales with its magnitude, so the ratio varies far less between rows than the
    error does (on the trained fixture: coefficient of variation ~0.1 instead of 0.2-1.0). "plain": the sampled
    errors times their run lengths. Both are exact at fraction 1."""
    if tensor.tensor_type.name not in SOURCE_TYPES:
        raise EdgeMoEError(f"{tensor.name} is {tensor.tensor_type.name}, not f32/f16/bf16", "plan from the bf16 GGUF")
    if estimator not in ("ratio", "plain"):
        raise ValueError(estimator)
    shape = [int(x) for x in tensor.shape]  # ne0 (row length), ne1 (rows), ne2 (experts)
    n_per_row, n_rows = shape[0], shape[1] if len(shape) > 1 else 1
    n_strata = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    entry = imatrix.entries.get(tensor.name)
    importance = _importance(tensor.name, entry, n_strata, n_per_row)
    # the error's column weights: the imatrix's sums where its shape is the tensor's (plan.tensor_errors), else 1
    if entry is not None and entry.sums.shape == (n_strata, n_per_row):
        col_weights, divide = np.asarray(entry.sums, dtype=np.float64), tokens or n_tokens(imatrix)
    else:
        col_weights, divide = np.ones((n_strata, n_per_row)), 1.0
    kinds = [_kind(t, n_per_row) for t in types]

    fd = os.open(tensor.data.filename, os.O_RDONLY)

    def sampled(stratum: int, rows: np.ndarray, weights: np.ndarray) -> tuple[int, np.ndarray, float]:
        src = _rows_f32(tensor, stratum, rows, n_per_row, fd)
        imp = None if importance is None else importance[stratum]
        s = col_weights[stratum]
        errs = np.empty(len(kinds))
        for i, kind in enumerate(kinds):
            d = dequantize_rows(kind, quantize_rows(kind, src, imp), n_per_row) - src
            errs[i] = weights @ np.einsum("ij,ij,j->i", d, d, s)  # in f64, as s is
        return stratum, errs, float(weights @ _row_energy(src, s))

    def energy(stratum: int, start: int, stop: int) -> tuple[int, float]:
        src = _rows_f32(tensor, stratum, slice(start, stop), n_per_row, fd)
        return stratum, float(_row_energy(src, col_weights[stratum]).sum())

    jobs, energy_jobs = [], []
    n_sampled = 0
    for s in range(n_strata):
        rows, weights = sample_rows(tensor.name, s, n_rows, n_strata, fraction, seed, min_rows)
        n_sampled += len(rows)
        for a in range(0, len(rows), SLAB_ROWS):
            jobs.append((s, rows[a : a + SLAB_ROWS], weights[a : a + SLAB_ROWS]))
        if estimator == "ratio" and len(rows) < n_rows:
            energy_jobs += [(s, a, min(a + SLAB_ROWS, n_rows)) for a in range(0, n_rows, SLAB_ROWS)]
    err = np.zeros((n_strata, len(kinds)))
    sample_energy = np.zeros(n_strata)
    total_energy = np.full(n_strata, np.nan)  # NaN: stratum taken whole (or plain estimator), no ratio
    run = pool.map if pool is not None else map
    try:
        for s, e, p in run(lambda j: sampled(*j), jobs):
            err[s] += e
            sample_energy[s] += p
        for s, p in run(lambda j: energy(*j), energy_jobs):
            total_energy[s] = (0.0 if np.isnan(total_energy[s]) else total_energy[s]) + p
    finally:
        os.close(fd)
    ratio = ~np.isnan(total_energy) & (sample_energy > 0)
    scale = np.ones(n_strata)
    scale[ratio] = total_energy[ratio] / sample_energy[ratio]
    per_type = (err * scale[:, None]).sum(axis=0) / divide
    return SampledTensor(
        tensor.name, {k.name: float(per_type[i]) for i, k in enumerate(kinds)}, n_sampled, n_rows * n_strata
    )


def sampled_errors(
    model: str | Path,
    imatrix,
    names: list[str],
    types,
    fraction: float = DEFAULT_FRACTION,
    seed: int = 0,
    threads: int | None = None,
    progress: Progress | None = None,
    min_rows: int = MIN_ROWS,
) -> dict[str, dict[str, float]]:
    """E(W, t) for every tensor in `names` and every type in `types` whose block divides the tensor's rows (the
    types plan measures it at), from a `fraction` of its rows. Reads the model once; holds one tensor's sample."""
    import gguf

    if not 0 < fraction <= 1:
        raise EdgeMoEError(f"the error sample {fraction} is not a fraction in (0, 1]", "e.g. --error-sample 0.0625")
    reader = gguf.GGUFReader(model)
    by_name = {t.name: t for t in reader.tensors}
    tokens = n_tokens(imatrix)
    out: dict[str, dict[str, float]] = {}
    threads = max(1, threads or os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        for i, name in enumerate(names):
            if progress:
                progress("errors", i, len(names), name)
            t = by_name[name]
            fits = [
                ty
                for ty in types
                if int(t.shape[0]) % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ty.upper()]][0] == 0
            ]
            out[name] = (
                tensor_sample_errors(t, fits, imatrix, fraction, seed, pool, tokens, min_rows=min_rows).errors
                if fits
                else {}
            )
    if progress:
        progress("errors", len(names), len(names))
    return out
