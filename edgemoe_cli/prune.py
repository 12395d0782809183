"""`edgemoe prune`: drop the least important routed experts of every MoE layer, writing a GGUF stock llama.cpp runs.

In GGUF the experts of a layer are one 3-D tensor per projection (`blk.N.ffn_{gate,up,down}_exps`, experts on the
outermost axis), so pruning is slicing: the kept experts of those three tensors, the same rows of the router
(`ffn_gate_inp`) and entries of the score-correction bias (`exp_probs_b`), in the same order. llama.cpp reads one
`expert_count` for all layers, so every layer keeps the same number of experts (each its own best ones); the
experts used per token stay as they were, so keeping fewer than that is refused. Any quantization type prunes
the same way: an expert's bytes are contiguous whatever the block format.

Importance of an expert, per layer (highest kept):
- `reap` (with --text): REAP saliency — over the tokens the router sends to the expert, the mean of gate weight x
  norm of the expert's output, measured by routing the text inside llama.cpp (profile.trace_routing).
- `usage` (with --usage profile.json): how many tokens `edgemoe profile` saw routed to it.
- `weights` (neither): a data-free proxy, norm of the expert's router row x Frobenius norm of its down projection.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import EdgeMoEError
from .ggufcopy import OutTensor, write_gguf
from .progress import Progress
from .store import refuse_input_as_output, write_manifest
from .units import parse_size

_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.(ffn_(?:gate|up|down)_exps\.weight|ffn_gate_inp\.weight|exp_probs_b\.bias)$")


@dataclass
class PruneResult:
    model: str
    out: str
    score: str  # reap | usage | weights
    n_expert_before: int
    n_expert_after: int
    n_expert_used: int
    bytes_before: int
    bytes_after: int
    kept: dict[str, list[int]]  # block index -> original expert ids kept, in their original order
    seconds: float
    text: str | None = None
    budget_bytes: int | None = None
    manifest: str = ""
    score_share_kept: dict[str, float] = field(default_factory=dict)  # per layer: share of total score kept


def parse_keep(text: str, n_expert: int) -> int:
    """'12' experts, or '75%' of `n_expert` (rounded to the nearest whole expert)."""
    s = str(text).strip()
    try:
        if s.endswith("%"):
            share = float(s[:-1])
            if not 0 <= share <= 100:  # also inf and nan, which round() cannot take
                raise ValueError(s)
            return round(share / 100 * n_expert)
        return int(s)
    except ValueError:
        raise EdgeMoEError(
            f"--keep {str(text)[:40]!r} is not a number of experts or a share of 0-100%",
            "give a count like 48 or a share like 75%",
        ) from None


def _expert_tensors(reader) -> dict[int, dict[str, object]]:
    layers: dict[int, dict[str, object]] = {}
    for t in reader.tensors:
        if m := _EXPERT_TENSOR.match(t.name):
            layers.setdefault(int(m.group(1)), {})[m.group(2).split(".")[0]] = t
    return layers


def check_expert_tensors(reader, path: Path, layers: list[int], n_expert: int) -> None:
    """Every MoE layer has the three stacked expert tensors and the router, each with `n_expert` experts on the
    axis pruning slices: the file's metadata and tensors are data, and a damaged one must not crash the slicing."""
    if not layers:
        raise EdgeMoEError(f"{path} has no routed-expert tensors (blk.N.ffn_gate_exps)", "prune an ERNIE-4.5 MoE GGUF")
    found = _expert_tensors(reader)
    for il in layers:
        for part in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_inp"):
            t = found.get(il, {}).get(part)
            if t is None:
                raise EdgeMoEError(f"{path}: layer {il} has no {part} tensor", "convert the model again")
            shape = t.data.shape
            if len(shape) < 2 or shape[0] != n_expert:
                raise EdgeMoEError(
                    f"{path}: blk.{il}.{part} has shape {list(shape)}, not {n_expert} experts first",
                    "convert the model again",
                )
        bias = found[il].get("exp_probs_b")
        if bias is not None and bias.data.shape[-1:] != (n_expert,):
            raise EdgeMoEError(
                f"{path}: blk.{il}.exp_probs_b has shape {list(bias.data.shape)}, not {n_expert} experts",
                "convert the model again",
            )


def _dense(t) -> np.ndarray:
    from gguf import quants

    return np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def weight_scores(reader, layers: list[int]) -> np.ndarray:
    """Data-free importance [moe layer, expert]: ||router row|| x ||down projection||_F of each expert."""
    tensors = _expert_tensors(reader)
    rows = []
    for il in layers:
        router = _dense(tensors[il]["ffn_gate_inp"])  # [expert, hidden]
        down = tensors[il]["ffn_down_exps"]
        norms = np.array([np.linalg.norm(_dense_slice(down, e)) for e in range(router.shape[0])])
        rows.append(np.linalg.norm(router, axis=1) * norms)
    return np.stack(rows)


def _dense_slice(t, expert: int) -> np.ndarray:
    from gguf import quants

    return np.asarray(quants.dequantize(t.data[expert], t.tensor_type), dtype=np.float32)


def choose_experts(scores: np.ndarray, keep: int) -> list[list[int]]:
    """Per layer, the `keep` highest-scoring expert ids, in ascending id order (ties go to the lower id)."""
    chosen = []
    for row in scores:
        order = np.lexsort((np.arange(len(row)), -row))  # by score descending, then id ascending
        chosen.append(sorted(int(e) for e in order[:keep]))
    return chosen


def _slice(t, kept: list[int]) -> np.ndarray:
    """The tensor's data with only the kept experts: outermost numpy axis, except the 1-row bias (last axis)."""
    data = t.data
    if t.name.endswith("exp_probs_b.bias"):
        return np.ascontiguousarray(data[..., kept])
    return np.ascontiguousarray(data[kept])


def predicted_bytes(reader, n_expert: int, keep: int) -> int:
    """File size after keeping `keep` experts a layer: an upper bound, exact but for a shorter size label.

    The header keeps its length (same keys and tensor names; only general.size_label can lose a digit); the data
    section is every tensor, the per-expert ones cut to keep/n_expert, each padded to the file's alignment.
    """
    field = reader.get_field("general.alignment")
    align = int(field.contents()) if field is not None else 32
    per_expert = {t.name for layer in _expert_tensors(reader).values() for t in layer.values()}
    data = 0
    for t in reader.tensors:
        n = int(t.n_bytes) // n_expert * keep if t.name in per_expert else int(t.n_bytes)
        data += -(-n // align) * align
    return reader.data_offset + data


def keep_for_budget(reader, path: Path, n_expert: int, n_used: int, budget: int) -> int:
    for keep in range(n_expert, 0, -1):
        if predicted_bytes(reader, n_expert, keep) <= budget:
            break
    else:
        keep = 0
    if keep == n_expert:
        raise EdgeMoEError(
            f"{path.name} ({path.stat().st_size:,} bytes) already fits the budget of {budget:,} bytes",
            "nothing to prune: use the model as it is, or give a smaller --budget",
        )
    if keep < n_used:
        need = predicted_bytes(reader, n_expert, n_used)
        raise EdgeMoEError(
            f"a budget of {budget:,} bytes would keep {keep} experts a layer, fewer than the {n_used} used per token",
            f"the smallest prune of {path.name} is {need:,} bytes (keep {n_used}); quantize lower instead",
        )
    return keep


def write_pruned(
    reader,
    out: Path,
    kept: dict[int, list[int]],
    keep: int,
    n_expert: int,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Copy every key and tensor of `reader` to `out`, slicing expert tensors to `kept` and setting expert_count."""
    import gguf

    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    values = {gguf.Keys.LLM.EXPERT_COUNT.format(arch=arch): keep}
    label = reader.get_field(gguf.Keys.General.SIZE_LABEL)
    if label is not None:
        values[gguf.Keys.General.SIZE_LABEL] = re.sub(rf"^{n_expert}x", f"{keep}x", str(label.contents()))
    tensors = []
    for t in reader.tensors:
        m = _EXPERT_TENSOR.match(t.name)
        if m and int(m.group(1)) in kept:
            # shapes only: the sliced copy itself is made when the tensor is written
            shape = list(t.data.shape)
            shape[len(shape) - 1 if t.name.endswith("exp_probs_b.bias") else 0] = keep
            tensors.append(
                OutTensor(
                    t,
                    tuple(shape),
                    int(t.n_bytes) // n_expert * keep,
                    lambda t=t, ids=kept[int(m.group(1))]: _slice(t, ids),
                )
            )
        else:
            tensors.append(OutTensor(t))
    write_gguf(reader, out, tensors, values, progress)


def default_out(model: Path, keep: int) -> Path:
    return model.with_name(f"{model.stem}.keep{keep}.gguf")


def prune(
    model: str | Path,
    keep: str | int | None = None,
    budget: str | int | None = None,
    text: str | Path | None = None,
    usage: str | Path | None = None,
    out: str | Path | None = None,
    max_tokens: int = 8192,
    threads: int | None = None,
    progress: Progress | None = None,
) -> PruneResult:
    """Prune `model` to `keep` experts a layer (or as many as fit `budget` bytes); see the module doc for scores.

    `progress` (progress.Progress) reports the routing pass ("routing", tokens) and the write ("writing", bytes).
    """
    from .gguffile import moe_shape, open_gguf
    from .profile import load_usage, read_text, trace_routing

    t0 = time.perf_counter()
    model = Path(model)
    reader = open_gguf(model)
    _, n_expert, n_used, layers = moe_shape(reader, model)
    check_expert_tensors(reader, model, layers, n_expert)
    if (keep is None) == (budget is None):
        raise EdgeMoEError("give exactly one of --keep and --budget", "e.g. --keep 75% or --budget 10G")
    if text is not None and usage is not None:
        raise EdgeMoEError("give --text or --usage, not both", "--text measures REAP scores; --usage reuses a profile")
    budget_bytes = parse_size(budget) if budget is not None else None
    if keep is not None:
        n_keep = parse_keep(keep, n_expert)
        if n_keep > n_expert:
            raise EdgeMoEError(
                f"--keep {keep} is more than the {n_expert} experts {model.name} has per layer",
                f"keep at most {n_expert - 1} to prune anything",
            )
        if n_keep < n_used:
            raise EdgeMoEError(
                f"--keep {keep} is fewer than the {n_used} experts the router picks per token",
                f"keep at least {n_used}",
            )
        if n_keep == n_expert:
            raise EdgeMoEError(
                f"--keep {keep} keeps all {n_expert} experts: nothing to prune", f"keep fewer than {n_expert}"
            )
    else:
        n_keep = keep_for_budget(reader, model, n_expert, n_used, budget_bytes)
    out = Path(out) if out is not None else default_out(model, n_keep)
    refuse_input_as_output(out, [model, text, usage])

    if text is not None:
        read_text(text)
        trace = trace_routing(model, text, max_tokens=max_tokens, threads=threads, progress=progress)
        scores, method = trace.reap(), "reap"
    elif usage is not None:
        scores, used_layers = load_usage(usage)
        if used_layers != layers or scores.shape[1] != n_expert:
            raise EdgeMoEError(
                f"{usage} profiles a different model ({len(used_layers)} layers x {scores.shape[1]} "
                f"experts, {model.name} has {len(layers)} x {n_expert})",
                f"run `edgemoe profile {model}` and pass its profile.json",
            )
        method = "usage"
    else:
        scores, method = weight_scores(reader, layers), "weights"

    chosen = choose_experts(scores, n_keep)
    kept = dict(zip(layers, chosen))
    write_pruned(
        reader,
        out,
        kept,
        n_keep,
        n_expert,
        progress=(lambda d, t: progress("writing", d, t, "", "bytes")) if progress else None,
    )
    share = {
        str(il): round(float(scores[i, chosen[i]].sum() / max(scores[i].sum(), 1e-30)), 4)
        for i, il in enumerate(layers)
    }
    result = PruneResult(
        model=str(model),
        out=str(out),
        score=method,
        n_expert_before=n_expert,
        n_expert_after=n_keep,
        n_expert_used=n_used,
        bytes_before=model.stat().st_size,
        bytes_after=out.stat().st_size,
        kept={str(k): v for k, v in kept.items()},
        seconds=round(time.perf_counter() - t0, 3),
        text=str(text) if text is not None else (str(usage) if usage is not None else None),
        budget_bytes=budget_bytes,
        score_share_kept=share,
    )
    result.manifest = str(
        write_manifest(
            out,
            stage="prune",
            source=str(model),
            score=method,
            expert_count=n_keep,
            source_expert_count=n_expert,
            kept_experts=result.kept,
            text=result.text,
            bytes=result.bytes_after,
        )
    )
    return result
