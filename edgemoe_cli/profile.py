"""`edgemoe profile`: which routed experts a text really uses, layer by layer.

The router is observed inside llama.cpp itself: a `cb_eval` callback on the scheduler reads three tensors of every
MoE layer as they are computed — the selected experts (`ffn_moe_topk-N`), their normalized gate weights
(`ffn_moe_weights_norm-N`) and each selected expert's output (`ffn_moe_down-N`). So the counts are exactly the
routing the model does at run time (score-correction bias included), and the same pass gives prune's REAP score
(gate weight x expert output norm, averaged over the tokens routed to an expert).

From the counts: per-layer entropy and effective number of experts (exp of entropy), the share of routed tokens the
k most used experts take, and a fit of usage against rank — a power law (log usage linear in log rank, what the
EdgeMoE paper reports) against an exponential (log usage linear in rank), whichever explains more variance.
"""

from __future__ import annotations

import ctypes
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import EdgeMoEError
from .gguffile import ERNIE_MOE_ARCH, find_gguf, gguf_moe_shape, moe_shape, open_gguf  # noqa: F401 (profile.*: its API too)
from .progress import Progress
from .store import atomic_output

_TRACED = re.compile(rb"^ffn_moe_(topk|weights_norm|down)-(\d+)$")
_GGML_F32, _GGML_I32 = 0, 26
_DTYPES = {_GGML_F32: np.float32, _GGML_I32: np.int32}


class _GGMLTensor(ctypes.Structure):
    # ggml.h `struct ggml_tensor` of the pinned llama.cpp; only the fields up to `name` are read
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


def _tensor_array(t: _GGMLTensor) -> np.ndarray:
    """A copy of a host tensor's data in numpy order (ne reversed), honouring its strides (views are strided)."""
    dtype = np.dtype(_DTYPES[t.type])
    ne, nb = list(t.ne), list(t.nb)
    span = sum((n - 1) * s for n, s in zip(ne, nb)) + dtype.itemsize
    base = np.frombuffer((ctypes.c_char * span).from_address(t.data), dtype=dtype)
    return np.array(np.lib.stride_tricks.as_strided(base, shape=ne[::-1], strides=nb[::-1]))


@dataclass
class RoutingTrace:
    """Routing of one text through every MoE layer: arrays are [moe layer, expert]."""

    model: str
    text: str
    n_tokens: int
    layers: list[int]  # block index of each MoE layer
    n_expert: int
    n_expert_used: int
    counts: np.ndarray  # tokens routed to the expert
    gate_sum: np.ndarray  # sum of normalized gate weights the expert received
    reap_sum: np.ndarray  # sum of gate weight x ||expert output|| over routed tokens

    def reap(self) -> np.ndarray:
        """REAP saliency: mean gate-weighted output norm over the tokens routed to each expert (0 if none)."""
        return np.divide(self.reap_sum, self.counts, out=np.zeros_like(self.reap_sum), where=self.counts > 0)


def read_text(path: str | Path, hint: str = "give a UTF-8 text file with --text") -> str:
    """The UTF-8 text of `path`; EdgeMoEError (with `hint`) when it is missing, unreadable or blank."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgeMoEError(f"{path}: no such file", hint) from None
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeMoEError(f"cannot read {path} as UTF-8 text ({e})", hint) from e
    if not text.strip():
        raise EdgeMoEError(f"{path} is empty", hint)
    return text


def trace_routing(
    model: str | Path,
    text_file: str | Path,
    max_tokens: int = 8192,
    ctx: int = 512,
    threads: int | None = None,
    progress: Progress | None = None,
) -> RoutingTrace:
    """Run the first `max_tokens` tokens of `text_file` through `model` in windows of `ctx`, recording routing."""
    from .generate import default_threads, load_model
    from .llamacpp import import_binding

    _, n_expert, n_used, layers = gguf_moe_shape(model)
    text = read_text(text_file)
    llama_cpp = import_binding()
    llm = load_model(model, ctx=ctx, threads=threads)
    row = {il: i for i, il in enumerate(layers)}
    counts = np.zeros((len(layers), n_expert), dtype=np.int64)
    gate_sum = np.zeros((len(layers), n_expert), dtype=np.float64)
    reap_sum = np.zeros((len(layers), n_expert), dtype=np.float64)
    pending: dict[int, dict[str, np.ndarray]] = {}

    def observe(t_ptr, ask, _user):
        t = _GGMLTensor.from_address(t_ptr)
        m = _TRACED.match(t.name)
        if ask:
            return m is not None and int(m.group(2)) in row
        what, il = m.group(1).decode(), int(m.group(2))
        got = pending.setdefault(il, {})
        got[what] = _tensor_array(t)
        if what == "down":  # the last of the three in graph order: account this ubatch for layer il
            top = got["topk"].reshape(-1, n_used)  # [tokens, used]
            w = got["weights_norm"].reshape(top.shape)
            norms = np.linalg.norm(got["down"].reshape(top.shape[0], n_used, -1), axis=-1)
            r = row[il]
            np.add.at(counts[r], top.ravel(), 1)
            np.add.at(gate_sum[r], top.ravel(), w.ravel())
            np.add.at(reap_sum[r], top.ravel(), (w * norms).ravel())
            pending.pop(il)
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(observe)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = ctx
    params.n_threads = params.n_threads_batch = threads or default_threads()
    params.cb_eval = callback
    params.cb_eval_user_data = None
    cctx = llama_cpp.llama_init_from_model(llm.model, params)
    batch = llama_cpp.llama_batch_init(ctx, 0, 1)
    try:
        if not cctx:
            raise EdgeMoEError("llama.cpp could not create a context for routing", "try a smaller --ctx")
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:max_tokens]
        memory = llama_cpp.llama_get_memory(cctx)
        done = 0
        for start in range(0, len(tokens), ctx):
            window = tokens[start : start + ctx]
            # logits for every token: llama.cpp drops the rows it need not output before the last layer, so
            # asking only for the last token's logits would leave the last MoE layer routing a single token
            batch.n_tokens = len(window)
            for i, tok in enumerate(window):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, 1
                batch.seq_id[i][0] = 0
            llama_cpp.llama_memory_clear(memory, True)
            if llama_cpp.llama_decode(cctx, batch) != 0:
                raise EdgeMoEError("llama.cpp failed to evaluate the text", "try a smaller --ctx")
            done += len(window)
            if progress is not None:
                progress("routing", done, len(tokens), "tokens")
    finally:
        llama_cpp.llama_batch_free(batch)
        if cctx:
            llama_cpp.llama_free(cctx)
        llm.close()
    return RoutingTrace(
        model=str(model),
        text=str(text_file),
        n_tokens=len(tokens),
        layers=layers,
        n_expert=n_expert,
        n_expert_used=n_used,
        counts=counts,
        gate_sum=gate_sum,
        reap_sum=reap_sum,
    )


# ---- statistics of usage ----


@dataclass
class LayerUsage:
    layer: int
    entropy_bits: float  # of the expert usage distribution
    effective_experts: float  # 2**entropy: how many equally used experts would give the same entropy
    top_k_share: float  # share of routed tokens taken by the layer's k most used experts (k = experts per token)
    half_share: float  # share taken by the most used half of the experts
    unused: int  # experts no token was routed to
    power_law_alpha: float  # usage ~ rank**-alpha
    power_law_r2: float
    exponential_r2: float


@dataclass
class ProfileResult:
    model: str
    text: str
    n_tokens: int
    n_expert: int
    n_expert_used: int
    layers: list[LayerUsage]
    counts: list[list[int]]  # [moe layer][expert]
    reap: list[list[float]]
    power_law: dict = field(default_factory=dict)  # pooled fit over all layers and the verdict
    outputs: dict[str, str] = field(default_factory=dict)


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and R^2 of y on x."""
    if len(x) < 3 or np.ptp(x) == 0:
        return 0.0, 0.0
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    total = np.sum((y - y.mean()) ** 2)
    return float(slope), float(1 - np.sum(resid**2) / total) if total > 0 else 1.0


def rank_fits(usage: np.ndarray) -> tuple[float, float, float]:
    """(alpha, power-law R^2, exponential R^2) of usage sorted by rank; experts never used are left out of the logs."""
    used = np.sort(usage[usage > 0])[::-1].astype(np.float64)
    rank = np.arange(1, len(used) + 1, dtype=np.float64)
    slope, r2_power = _fit(np.log(rank), np.log(used))
    _, r2_exp = _fit(rank, np.log(used))
    return -slope, r2_power, r2_exp


def layer_usage(layer: int, counts: np.ndarray, k: int) -> LayerUsage:
    total = counts.sum()
    p = counts / total if total else np.zeros_like(counts, dtype=np.float64)
    nz = p[p > 0]
    entropy = float(-(nz * np.log2(nz)).sum())
    ordered = np.sort(p)[::-1]
    alpha, r2p, r2e = rank_fits(counts)
    return LayerUsage(
        layer=layer,
        entropy_bits=round(entropy, 4),
        effective_experts=round(2**entropy, 3),
        top_k_share=round(float(ordered[:k].sum()), 4),
        half_share=round(float(ordered[: len(p) // 2].sum()), 4),
        unused=int((counts == 0).sum()),
        power_law_alpha=round(alpha, 3),
        power_law_r2=round(r2p, 4),
        exponential_r2=round(r2e, 4),
    )


def summarize(trace: RoutingTrace) -> ProfileResult:
    layers = [layer_usage(il, trace.counts[i], trace.n_expert_used) for i, il in enumerate(trace.layers)]
    # pooled: every layer's usage as a share of its own tokens, ranked within the layer, fitted together
    xs, ys_log, ranks = [], [], []
    for c in trace.counts:
        used = np.sort(c[c > 0])[::-1] / max(c.sum(), 1)
        r = np.arange(1, len(used) + 1, dtype=np.float64)
        xs.append(np.log(r)), ranks.append(r), ys_log.append(np.log(used))
    alpha, r2p = _fit(np.concatenate(xs), np.concatenate(ys_log)) if xs else (0.0, 0.0)
    _, r2e = _fit(np.concatenate(ranks), np.concatenate(ys_log)) if ranks else (0.0, 0.0)
    verdict = (
        f"power law fits better (R^2 {r2p:.3f} vs exponential {r2e:.3f}), alpha {-alpha:.2f}"
        if r2p > r2e
        else f"no power law: an exponential fits better (R^2 {r2e:.3f} vs power law {r2p:.3f})"
    )
    return ProfileResult(
        model=trace.model,
        text=trace.text,
        n_tokens=trace.n_tokens,
        n_expert=trace.n_expert,
        n_expert_used=trace.n_expert_used,
        layers=layers,
        counts=trace.counts.tolist(),
        reap=np.round(trace.reap(), 6).tolist(),
        power_law={
            "alpha": round(-alpha, 3),
            "r2": round(r2p, 4),
            "exponential_r2": round(r2e, 4),
            "follows_power_law": bool(r2p > r2e),
            "verdict": verdict,
        },
    )


def profile(
    model: str | Path,
    text_file: str | Path,
    out_dir: str | Path,
    max_tokens: int = 8192,
    ctx: int = 512,
    threads: int | None = None,
    progress: Progress | None = None,
) -> ProfileResult:
    """`edgemoe profile`: route `text_file` through `model`; write profile.json, expert-usage.png (heatmap) and
    usage-vs-rank.png to `out_dir`."""
    from . import report

    gguf_moe_shape(model)  # fail on a wrong model before anything is created
    read_text(text_file)
    trace = trace_routing(model, text_file, max_tokens=max_tokens, ctx=ctx, threads=threads, progress=progress)
    result = summarize(trace)
    out_dir = Path(out_dir)
    heatmap, json_path = out_dir / "expert-usage.png", out_dir / "profile.json"
    report.usage_heatmap(
        trace.counts,
        trace.layers,
        heatmap,
        title=f"Expert usage: {Path(model).name} on {Path(text_file).name} ({trace.n_tokens} tokens)",
    )
    rank = report.rank_plot(
        trace.counts,
        trace.layers,
        out_dir / "usage-vs-rank.png",
        title=f"Usage vs rank (log-log; a power law is a line): {result.power_law['verdict']}",
    )
    result.outputs = {"heatmap": str(heatmap), "rank_plot": str(rank), "json": str(json_path)}
    with atomic_output(json_path) as part:
        part.write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    return result


def load_usage(path: str | Path) -> tuple[np.ndarray, list[int]]:
    """Usage counts [moe layer, expert] and block indices from a profile.json written by `edgemoe profile`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return np.asarray(data["counts"], dtype=np.float64), [u["layer"] for u in data["layers"]]
    except FileNotFoundError:
        raise EdgeMoEError(f"{path}: no such file", "run `edgemoe profile MODEL --text FILE` first") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgeMoEError(
            f"{path} is not a profile.json ({e})", "give the profile.json `edgemoe profile` wrote"
        ) from e
