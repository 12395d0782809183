"""`eval`: how far a quantized model's next-token distributions are from the reference model's, on a text.

Measured through the Python binding (llama-cpp-python, logits of the scored positions), not llama-perplexity:
the binding needs no `edgemoe build`, the base model's log-probabilities are computed once and cached as a float16
array in the store (keyed by base file, text and context), so comparing many candidates against one base — what
`plan` and bench/quality.py do dozens of times — costs one forward pass per candidate and no process start-up,
and every statistic (mean and p99 KLD, top-1 agreement, PPL) comes from the same arrays, computed in numpy.

The protocol is llama-perplexity's: the text is tokenized once and cut into chunks of `ctx` tokens, each chunk is
evaluated on its own starting with BOS, and only the second half of each chunk is scored (every scored token has at
least ctx/2 tokens of context). `plan`'s calibration evals may score from an earlier position (`score_from`): they
rank tensors by how much a quantization moves the distributions, not a perplexity to compare with llama.cpp's, and
the first half of every chunk is evaluated anyway. For each scored position:
    KLD = sum_v p_base(v) * (log p_base(v) - log p_model(v)),   top-1 agreement = [argmax p_model == argmax p_base]
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgeMoEError
from .progress import Progress
from .store import atomic_output, home, sha256_file


@dataclass
class EvalResult:
    model: str
    base: str
    text: str
    ctx: int
    chunks: int
    tokens_scored: int
    ppl: float
    base_ppl: float
    kld_mean: float
    kld_stderr: float
    kld_median: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    seconds: float


def _load(model: Path, ctx: int, threads: int, repack: bool = True):
    """The model for evaluation. `repack=False` turns llama.cpp's extra buffer types off, as `run --memory` does
    (generate._llama_defaults): every weight then stays in the file's layout, pages of the mapped file the kernel
    may drop and read again, instead of an anonymous copy of each repackable tensor (Q4_0, Q4_K, IQ4_NL; Q8_0 too
    on Arm) that must fit in RAM whole. Repacked kernels are faster at prompt processing, so `edgemoe eval`
    keeps them; plan, which must run within the memory it plans for, does not."""
    from .generate import _llama_defaults
    from .llamacpp import import_binding

    llama_cpp = import_binding()
    _check_model(model)
    try:
        with _llama_defaults(llama_cpp, repack, None):
            return llama_cpp.Llama(
                model_path=str(model),
                n_ctx=ctx,
                n_batch=ctx,
                n_ubatch=ctx,
                logits_all=False,  # _chunk_logits asks for the scored positions' logits only
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
                n_gpu_layers=0,
            )
    except (ValueError, RuntimeError) as e:
        raise EdgeMoEError(
            f"llama.cpp cannot load {model} ({e})", "pass a GGUF made by `edgemoe convert/quantize`"
        ) from e


def _check_model(model: Path) -> None:
    if not model.is_file():
        raise EdgeMoEError(f"model {model} does not exist", "pass a .gguf file")


def _check_text(text: Path) -> None:
    if not text.is_file():
        raise EdgeMoEError(f"text {text} does not exist", "pass --text FILE with plain UTF-8 text")


def _chunks(llm, text_path: Path, ctx: int, max_chunks: int | None, spread: bool = False) -> list[list[int]]:
    """The text's chunks of ctx tokens, each starting with BOS: the first `max_chunks` of them, or with `spread`
    that many spaced evenly over the whole text (a calibration text written genre after genre is then sampled in
    every genre, not only in the first)."""
    _check_text(text_path)
    text = text_path.read_text(encoding="utf-8", errors="replace")
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    n = len(tokens) // (ctx - 1)
    starts = list(range(n))
    if max_chunks and max_chunks < n:
        starts = sorted({int(round(x)) for x in np.linspace(0, n - 1, max_chunks)}) if spread else starts[:max_chunks]
    n = len(starts)
    if n == 0:
        raise EdgeMoEError(
            f"{text_path} has {len(tokens)} tokens, fewer than one chunk of {ctx}",
            "pass a longer text or a smaller --ctx",
        )
    bos = llm.token_bos()
    return [[bos] + tokens[i * (ctx - 1) : (i + 1) * (ctx - 1)] for i in starts]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# scored positions turned into log-probs at once: each float32 temporary of the KLD is [_ROWS, vocab], 26 MB at the
# 21B's vocabulary of 103424, where a chunk's 255 rows made each 106 MB and the arithmetic held ~0.5 GB at once
_ROWS = 64


def check_score_from(ctx: int, score_from: int | None) -> int:
    """The first scored position of a chunk of `ctx` tokens: ctx // 2 (llama-perplexity's) unless given."""
    if score_from is None:
        return ctx // 2
    if not 1 <= score_from < ctx - 1:
        raise EdgeMoEError(
            f"scoring from position {score_from} leaves nothing to score in chunks of {ctx}",
            f"use a position from 1 to {ctx - 2}, or none for the second half",
        )
    return score_from


def scored_rows(ctx: int, score_from: int | None = None) -> int:
    """Positions a chunk of `ctx` tokens scores (each predicts the next token; the last has none)."""
    return ctx - 1 - check_score_from(ctx, score_from)


def _chunk_logits(llm, chunk: list[int], first: int) -> np.ndarray:
    """One chunk evaluated from an empty cache, and the logits [rows, vocab] of its positions `first` to the last
    but one (each predicts the next token): a view of llama.cpp's output buffer, valid until the next decode.
    llama.cpp computes the output norm and head only for the positions asked for, so the positions not scored
    cost no vocabulary-wide matmul (at the 21B's vocabulary of 103424, half a chunk's is ~4% of its compute) and no
    copy; the logits are bitwise those of asking for every position (tests/test_evaluate.py)."""
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    batch = llm._batch
    batch.set_batch(batch=chunk, n_past=0, logits_all=False)
    for i in range(len(chunk)):
        batch.batch.logits[i] = first <= i < len(chunk) - 1
    llm._ctx.decode(batch)
    rows = len(chunk) - 1 - first
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(rows, llm.n_vocab()))


def _forward(llm, chunks: list[list[int]], ctx: int, progress=None, step: str = "eval", score_from: int | None = None):
    """Yield (log-probs [rows, vocab] float32, next-token ids) for each chunk's positions from `score_from` on (its
    second half unless given), _ROWS rows at a time (every statistic is per row)."""
    first = check_score_from(ctx, score_from)
    for i, chunk in enumerate(chunks):
        logits = _chunk_logits(llm, chunk, first)
        following = np.asarray(chunk[first + 1 :], dtype=np.int64)
        for r in range(0, len(following), _ROWS):
            yield _log_softmax(logits[r : r + _ROWS]), following[r : r + _ROWS]
        if progress:
            progress(step, i + 1, len(chunks), "chunks")


# content hash of each file version this process has hashed: (device, inode, size, mtime) -> sha256
_CONTENT: dict[tuple[int, int, int, int], str] = {}


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes, hashed once per file version per process (plan evaluates against one base dozens
    of times)."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _CONTENT:
        _CONTENT[key] = sha256_file(path)
    return _CONTENT[key]


def _cache_key(
    base: Path,
    text: Path,
    ctx: int,
    max_chunks: int | None,
    spread: bool = False,
    repack: bool = True,
    score_from: int | None = None,
) -> str:
    # keyed by what the base holds, not where it is: plan's Q8_0 reference is a new temporary file every run, and a
    # path+mtime key cached its log-probs (~0.8 GB at 21B) anew each time, never to be read again; repacked kernels
    # round differently, so their log-probs are kept apart (the key of a repacked base is unchanged)
    h = hashlib.sha256()
    h.update(f"v2|{content_sha256(base)}|{ctx}|{max_chunks}|{'spread|' if spread else ''}".encode())
    if not repack:
        h.update(b"no repack|")
    # other positions scored are other rows: a cache of one protocol must never serve another (the second half's
    # key is unchanged)
    if check_score_from(ctx, score_from) != ctx // 2:
        h.update(f"score from|{score_from}|".encode())
    h.update(sha256_file(text).encode())
    return h.hexdigest()[:20]


def base_logprobs(
    base: str | Path,
    text: str | Path,
    ctx: int = 512,
    threads: int | None = None,
    max_chunks: int | None = None,
    progress=None,
    spread: bool = False,
    repack: bool = True,
    score_from: int | None = None,
) -> tuple[Path, list[list[int]]]:
    """The base model's log-probs on `text` at the positions scored from `score_from` (_forward), cached as
    <store>/cache/eval/<key>.npy (float16) and its exact argmax as <key>.top1.npy."""
    base, text = Path(base), Path(text)
    _check_model(base)  # both before their contents are hashed for the cache key
    _check_text(text)
    threads = threads or os.cpu_count() or 1
    scored = scored_rows(ctx, score_from)  # rows a chunk scores (_forward); checks score_from first
    path = home() / "cache" / "eval" / f"{_cache_key(base, text, ctx, max_chunks, spread, repack, score_from)}.npy"
    top1 = path.with_suffix(".top1.npy")
    if path.is_file() and top1.is_file():
        # kept: the chunks need only the vocabulary; loading the base would map (and read) the whole model again
        # for every candidate compared with it
        vocab = _load_vocab(base)
        try:
            return path, _chunks(vocab, text, ctx, max_chunks, spread)
        finally:
            vocab.close()
    llm = _load(base, ctx, threads, repack)
    try:
        chunks = _chunks(llm, text, ctx, max_chunks, spread)
        # written block by block into the file being made: the text's log-probs (53 MB a chunk of 512 at the 21B's
        # vocabulary, 0.85 GB at 16 chunks) are never held in memory, let alone twice as a list and its concatenation
        with atomic_output(path) as part, atomic_output(top1) as part_top1:
            rows = np.lib.format.open_memmap(part, "w+", np.float16, (len(chunks) * scored, llm.n_vocab()))
            best = np.lib.format.open_memmap(part_top1, "w+", np.int32, (len(chunks) * scored,))
            row = 0
            for lp, _ in _forward(llm, chunks, ctx, progress, "eval base", score_from):
                rows[row : row + len(lp)] = lp
                best[row : row + len(lp)] = lp.argmax(axis=1)  # exact: float16 rounding can tie the top two
                row += len(lp)
            rows.flush()
            best.flush()
            del rows, best
    finally:
        llm.close()
    return path, chunks


def _load_vocab(model: Path):
    """The model's vocabulary only (tokenizing needs no weights)."""
    from .llamacpp import load_vocab

    _check_model(model)
    return load_vocab(model)


def evaluate(
    model: str | Path,
    base: str | Path,
    text: str | Path,
    ctx: int = 512,
    threads: int | None = None,
    max_chunks: int | None = None,
    progress: Progress | None = None,
    spread: bool = False,
    repack: bool = True,
    score_from: int | None = None,
) -> EvalResult:
    """PPL of `model` and `base`, KLD(base || model) statistics and top-1 agreement on `text` (its first
    `max_chunks` chunks, or with `spread` that many spaced evenly over it). `repack`: _load. `score_from`: the
    first scored position of each chunk, its second half (llama-perplexity's protocol) unless given; plan's
    calibration evals score from an earlier one (plan.CALIBRATION_SCORE_FROM)."""
    t0 = time.perf_counter()
    model, base, text = Path(model), Path(base), Path(text)
    if ctx < 16:
        raise EdgeMoEError(f"--ctx {ctx} is too small", "use at least 16 (llama-perplexity uses 512)")
    threads = threads or os.cpu_count() or 1
    cache, chunks = base_logprobs(
        base, text, ctx, threads, max_chunks, spread=spread, repack=repack, score_from=score_from
    )
    ref = np.load(cache, mmap_mode="r")
    ref_top1 = np.load(cache.with_suffix(".top1.npy"))
    llm = _load(model, ctx, threads, repack)
    try:
        if llm.n_vocab() != ref.shape[1]:
            raise EdgeMoEError(
                f"{model} has a vocabulary of {llm.n_vocab()}, the base {base} has {ref.shape[1]}",
                "compare quantizations of the same model",
            )
        kld, nll, base_nll, agree = [], [], [], []
        row = 0
        for lp, nxt in _forward(llm, chunks, ctx, progress, score_from=score_from):
            lb = np.asarray(ref[row : row + len(nxt)], dtype=np.float32)
            row += len(nxt)
            pb = np.exp(lb)
            kld.append((pb * (lb - lp)).sum(axis=1))
            idx = np.arange(len(nxt))
            nll.append(-lp[idx, nxt])
            base_nll.append(-lb[idx, nxt])
            agree.append(lp.argmax(axis=1) == ref_top1[row - len(nxt) : row])
    finally:
        llm.close()  # now, not when a reference cycle is collected: the next model must not map beside it
    kld_a = np.maximum(np.concatenate(kld), 0.0)  # float16 storage of the base can give -1e-7 for identical models
    n = kld_a.size
    return EvalResult(
        model=str(model),
        base=str(base),
        text=str(text),
        ctx=ctx,
        chunks=len(chunks),
        tokens_scored=int(n),
        ppl=float(np.exp(np.concatenate(nll).mean())),
        base_ppl=float(np.exp(np.concatenate(base_nll).mean())),
        kld_mean=float(kld_a.mean()),
        kld_stderr=float(kld_a.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
        kld_median=float(np.median(kld_a)),
        kld_p99=float(np.percentile(kld_a, 99)),
        kld_max=float(kld_a.max()),
        top1_agreement=float(np.concatenate(agree).mean()),
        seconds=round(time.perf_counter() - t0, 2),
    )
