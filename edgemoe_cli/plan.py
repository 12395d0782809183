"""`plan`: choose a type per tensor that minimises predicted quality loss (KL divergence) under a size budget.

Budget. What the GGUF may occupy is
    file budget = RAM budget - kv_cache_bytes(ctx) - RUNTIME_RESERVE_BYTES
with ernie21b.kv_cache_bytes (f16 K and V for `ctx` tokens, this model's layers/KV heads/head size from its GGUF)
and ernie21b.RUNTIME_RESERVE_BYTES (compute buffers, process, OS minimum) — the same numbers `doctor` uses.

Prediction (measured, not a fixed table). For every quantizable tensor W and candidate type t:
1. error: quantize W to t (llama.cpp's own ggml_quantize_chunk, with the imatrix), dequantize it and compute the
   imatrix-weighted squared error  E(W,t) = sum_e sum_j s_ej * sum_rows (W_q - W)_rj^2 / N,
   where s_ej is the imatrix's sum of x_j^2 over the tokens routed to expert e and N the tokens seen: the expected
   squared norm of the output error ||(W_q - W) x||^2 per token (diagonal approximation of E[x x^T]).
   Tensors without activations in the imatrix (the token embedding, a lookup table) get s = 1.
   Quantization is per row, so E is estimated from a stratified sample of rows (every expert sampled, --error-sample
   of the rows, at least qerror.MIN_ROWS per tensor), quantized in process: edgemoe_cli/qerror.py, whose rows'
   bytes are llama.cpp's and whose estimate at fraction 1 is tensor_errors' on llama.cpp's output (tested);
   bench/qerror_convergence.md shows the sample's error.
2. calibration: KL divergence is second order in a small output perturbation, so dKLD ~ g * E. One gain g per
   tensor role (attn_q, ffn_down_exps, token_embd, ...) is measured: lower only that role's tensors, in every
   layer, to the calibration type (Q3_K), measure the KLD against the unquantized model on the calibration text,
   g_role = KLD / sum E. One depth factor per layer is measured the same way (only that layer lowered), because an
   absolute error matters more where the residual stream is still small; with a layer stride k > 1 only the dense
   layers, the first routed layer, every k-th after it and the last are measured, and the factors of the layers in
   between are interpolated geometrically (they fall smoothly with depth: on the fixtures, layer 2's KLD predicted
   from its interpolated factor is within 8% of the measured one; bench/quality.md). The last layer's routed experts
   get a factor of their own from one more run (only they lowered): one factor for that whole layer underestimated
   them 1.17-1.55x on the fixtures (bench/plan_prediction.md). The KLD evals read `max_chunks`
   chunks of 512 tokens spaced evenly over the calibration text and score their second half (CALIBRATION_WARMUP).
   The prediction for any tensor and type is g_role(W) * f_layer(W) * E(W,t); a mix is predicted as the sum over
   tensors (independent errors' cross terms vanish in expectation; bench/quality.md checks this), plus, with
   --floor, a floor: the measured KLD of the all-Q8_0 model beyond its prediction (quantized matmuls also quantize
   their activations), the same for every mix, so it changes no choice and is opt-in (DEFAULT_FLOOR).
3. choice: an exact multiple-choice knapsack (dynamic programming over bytes in 1/4000ths of the budget) picks one
   type per tensor minimising the summed prediction with total bytes <= budget.
Cost. Step 1 quantizes only the sample; llama.cpp quantizes the whole model only to the calibration type (and to
Q8_0 for a Q8_0 reference or the floor), and every calibration model of step 2 is assembled from those, not
re-quantized: its tensors are the bytes of the kept Q3_K quantization (the lowered ones) and of the reference (the
rest) — quantization is per tensor, so this is exactly the model llama.cpp would write for that mix
(tests/test_plan.py checks it). Nor is it copied per run: it
is a split GGUF of one shard per lowerable tensor, each written once in both versions, and a run re-points the
shards' names (CalibrationModel). What remains is one KLD eval per role, per measured layer (and for the floor).
The measurements are cached per (model, imatrix, text) in <store>/cache/plan/, so planning again for another
budget takes seconds; each step of a measurement (the errors, a run's KLD) is kept the moment it finishes, so an
interrupted plan resumes, and the same list of steps (measure_steps) gives plan --dry-run its predicted time
(plan_steps.py). Cost on ERNIE-4.5-21B-A3B: README `### quantize and plan`, bench/plan_cost.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import memwatch
from .errors import EdgeMoEError
from .memwatch import MemoryPeak, MemoryWatch
from .plan_steps import (
    STAGES,
    PlanPrediction,
    Rate,
    Step,
    StepCache,
    content_key,
    measured_rates,
    pending,
    predict,
    record_rates,
)
from .progress import Progress
from .recipe import Recipe, Rule, TensorInfo, quantizable, read_tensors, tensor_bytes
from .store import atomic_output, home, refuse_input_as_output, sha256_file
from .units import human_bytes, parse_size

DEFAULT_TYPES = ("q2_k", "q3_k", "iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0")
ARM_FAST_TYPES = ("q4_0", "iq4_nl", "q8_0")
CALIBRATION_TYPE = "q3_k"
# Below ~4 bits a tensor every token uses can wreck rare tokens: on the fixture, blk.0.attn_output at Q3_K alone
# left the mean KLD prediction intact but put one token at KLD 0.58 (bench/quality.md). The mean-squared error
# the gains scale cannot see such tails, and these tensors are ~7% of ERNIE-21B's bytes, so plan keeps them >= Q4.
MIN_EVERY_TOKEN = "q4_k"
ARM_FAST_CALIBRATION_TYPE = "q4_0"
# The types whose matmuls quantize their activations to Q8_0 (ggml-cpu's vec_dot_type); the k-quants and IQ4_XS
# quantize them to Q8_K, one scale per 256 values instead of 32: a step from Q8_0 to a k-quant costs that activation
# error too, which no weight error shows. On the fixtures the Q8_0 -> Q6_K step of the tensors every token uses cost
# 2.2-3.0x its weight-error prediction, the k-quant steps below it 0.6-1.1x (bench/plan_hightype.md). Two runs price
# it (Measurements.activation_excess): those tensors at ACTIVATION_RUNS' types, the rest kept.
Q8_0_ACTIVATION = frozenset({"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"})
ACTIVATION_RUNS = ("q8_0", "q6_k")
# How much calibration plan buys by default: chunks of 512 tokens per KLD eval, and the layer stride of the depth
# runs (measured_layers). bench/quality.md's trade-off tables are why these values: on three choices of calibration
# chunks per fixture, 4 chunks keep the plan at Q4_K_M's size within 10% of plan before issue 14 every time since
# the activation runs price the Q8_0 -> k-quant step (worst 1.00x Thinking, 1.01x PT; it left PT 12% behind on one
# draw before: bench/plan_miss.md); 8 chunks too (1.05x / 1.01x), at twice the evals' tokens.
DEFAULT_CHUNKS = 4
DEFAULT_LAYER_STRIDE = 4
# Which positions of a calibration chunk are scored: all from ctx // CALIBRATION_WARMUP on; 2 is `edgemoe eval`'s
# second half (llama-perplexity's protocol). measure(score_from=...) takes any other first position.
CALIBRATION_WARMUP = 2
# Whether plan measures the all-Q8_0 floor by default: it costs a whole-model Q8_0 quantization (at 21B 23 GB more
# on disk) and one eval, and it changes no choice (the same constant is added to every mix's prediction); what it
# buys is an absolute predicted KLD. bench/plan_cost.md prices it; --floor measures it.
DEFAULT_FLOOR = False


def calibration_score_from(ctx: int, score_from: int | None = None) -> int:
    """The first position plan's calibration evals score in a chunk of `ctx` tokens (evaluate's score_from)."""
    from .evaluate import check_score_from

    return check_score_from(ctx, ctx // CALIBRATION_WARMUP if score_from is None else score_from)


def layer(name: str) -> str:
    """The block index of a tensor as a string ("" for token_embd and other global tensors)."""
    m = re.match(r"^blk\.(\d+)\.", name)
    return m.group(1) if m else ""


def role(name: str) -> str:
    """A tensor's role without its layer: blk.3.ffn_down_exps.weight -> ffn_down_exps."""
    return re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight")


# ---- measurements ----


@dataclass
class Measurements:
    model: str
    imatrix: str
    text: str
    types: list[str]
    calibration_type: str
    errors: dict[str, dict[str, float]]  # tensor -> type -> E(W, t)
    gains: dict[str, float]  # role -> g
    calibration_kld: dict[str, float]  # role -> measured KLD with only that role lowered
    layer_factors: dict[str, float] = field(default_factory=dict)  # block index -> depth correction
    layer_kld: dict[str, float] = field(default_factory=dict)  # block index -> measured KLD, only that layer lowered
    floor_kld: float = 0.0  # measured KLD of the all-Q8_0 model beyond its prediction (activation quantization)
    seconds: dict[str, float] = field(default_factory=dict)  # quantize, errors, assemble, eval
    work: dict[str, int] = field(default_factory=dict)  # assembled_bytes, eval_tokens, runs: what the seconds bought
    error_sample: float = 1.0  # fraction of rows E was estimated from (qerror; 1.0: every row)
    layer_stride: int = 1  # 1: every layer measured; k: see measured_layers, the others' factors interpolated
    # standard error of each measured KLD ("role:R", "layer:B", "floor"): how much the chunks evaluated pin it down
    kld_stderr: dict[str, float] = field(default_factory=dict)
    # the first scored position of a calibration chunk (None: measured before it was recorded, the second half)
    score_from: int | None = None
    floor_measured: bool = True  # False: no floor eval ran (floor_kld 0: predictions leave it out)
    # block index -> the depth factor of that layer's routed experts, which replaces the layer's for them
    # (expert_factor_layers: the last layer), and the measured KLD it is fitted to (only those experts lowered)
    expert_factors: dict[str, float] = field(default_factory=dict)
    expert_kld: dict[str, float] = field(default_factory=dict)
    # the KLD a type with Q8_K activations adds over Q8_0's, per unit of a tensor's predicted Q8_0 KLD (gain x
    # factor x E(W, q8_0), which scales with its weights' size as the activation error's effect does), fitted to the
    # "activation" runs' measured KLDs beyond their prediction (activation_kld); 0: not measured
    activation_excess: float = 0.0
    activation_kld: dict[str, float] = field(default_factory=dict)  # type -> measured KLD of that run
    from_cache: bool = False  # read whole from the cache: nothing was measured by this run

    def weight_predicted(self, tensor: str, type_: str) -> float:
        """The KLD of the tensor's weight error at `type_` (gain x depth factor x E(W, t))."""
        return (
            self.gains[role(tensor)]
            * depth_factor(tensor, self.layer_factors, self.expert_factors)
            * (self.errors[tensor][type_])
        )

    def predicted(self, tensor: str, type_: str) -> float:
        """The weight error's KLD plus, for a type with Q8_K activations, their excess over Q8_0's. At the
        calibration type (a k-quant) the gains already hold it; added to every k-quant alike, it moves no choice
        among them, only their steps to Q8_0 (and the Q8_0-activation types)."""
        kld = self.weight_predicted(tensor, type_)
        if self.activation_excess and type_ not in Q8_0_ACTIVATION and "q8_0" in self.errors[tensor]:
            kld += self.activation_excess * self.weight_predicted(tensor, "q8_0")
        return kld


def depth_factor(tensor: str, layer_factors: dict[str, float], expert_factors: dict[str, float]) -> float:
    """A tensor's depth factor: its layer's, or for routed experts of a layer in expert_factors, theirs."""
    b = layer(tensor)
    if "_exps" in tensor and b in expert_factors:
        return expert_factors[b]
    return layer_factors.get(b, 1.0)


def _dequantized(reader_tensor) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(np.asarray(reader_tensor.data), reader_tensor.tensor_type).astype(np.float32)


def tensor_errors(source: Path, quantized: Path, imatrix, names: list[str]) -> dict[str, float]:
    """E(W, t) for the tensors `names` of `quantized` against `source` (see the module docstring)."""
    import gguf

    src = {t.name: t for t in gguf.GGUFReader(source).tensors}
    dst = {t.name: t for t in gguf.GGUFReader(quantized).tensors}
    n_tokens = max((float(e.counts[0]) for e in imatrix.entries.values() if e.counts.size == 1), default=1.0)
    out = {}
    for name in names:
        w = _dequantized(src[name])
        d = _dequantized(dst[name]) - w
        d = d.reshape(-1, d.shape[-2], d.shape[-1]) if d.ndim >= 2 else d.reshape(1, 1, -1)
        sq = (d.astype(np.float64) ** 2).sum(axis=1)  # [experts, columns]
        entry = imatrix.entries.get(name)
        if entry is not None and entry.sums.shape == sq.shape:
            out[name] = float((sq * entry.sums).sum() / n_tokens)
        else:
            out[name] = float(sq.sum())
    return out


def _model_id(model: Path) -> str:
    # the model by path, size and mtime (hashing a 44 GB source would cost minutes before the first step; a changed
    # file changes its size or mtime); the imatrix and text, small, by their sha256
    st = model.stat()
    return f"{model.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def check_error_sample(fraction: float | None) -> float | None:
    """--error-sample as given, or an EdgeMoEError when it is no fraction of the rows."""
    if fraction is not None and not 0 < fraction <= 1:
        raise EdgeMoEError(f"--error-sample {fraction:g} is not in (0, 1]", "e.g. 0.0625, or 1 for every row")
    return fraction


def _cache_path(
    model: Path,
    imatrix: Path,
    text: Path,
    types,
    cal_type,
    max_chunks,
    reference,
    error_sample: float = 1.0,
    layer_stride: int = 1,
    ctx: int = 512,
    score_from: int | None = None,
    floor: bool = True,
) -> Path:
    from .qerror import MIN_ROWS

    h = hashlib.sha256()
    # v8: the routed experts' role runs lower them only in the measured layers (measure_steps' probe)
    h.update(f"v8|{_model_id(model)}|{','.join(types)}|{cal_type}|{max_chunks}|{reference}|{layer_stride}|".encode())
    if ctx != 512:  # the chunk length the KLDs were measured over (512, plan's own, keeps the keys it always had)
        h.update(f"ctx|{ctx}|".encode())
    if score_from is not None and score_from != ctx // 2:  # the second half, scored before, keeps its keys
        h.update(f"score from|{score_from}|".encode())
    if not floor and reference == "source":  # a measurement with the floor keeps the key it always had
        h.update(b"no floor|")
    if error_sample < 1:  # every row (1.0) is what llama-quantize measures: the same numbers, the same key
        h.update(f"sample|{error_sample!r}|{MIN_ROWS}|ratio|".encode())
    h.update(sha256_file(imatrix).encode())
    h.update(sha256_file(text).encode())
    return home() / "cache" / "plan" / f"{h.hexdigest()[:20]}.json"


def _mix(base_reader, swaps: dict[str, Path], readers: dict) -> tuple[list, dict]:
    """The tensors of `base_reader` with those named in `swaps` taken from the file given for each, and the keys to
    change: general.file_type becomes that of the file supplying the most quantized tensors."""
    import gguf

    from .ggufcopy import OutTensor

    by_name = {p: {t.name: t for t in readers[p].tensors} for p in set(map(Path, swaps.values()))}
    tensors, quantized = [], {}
    for t in base_reader.tensors:
        src = t
        if t.name in swaps:
            src = by_name[Path(swaps[t.name])].get(t.name)
            if src is None or list(src.shape) != list(t.shape):
                raise EdgeMoEError(
                    f"{swaps[t.name]} has no tensor {t.name} of shape {list(t.shape)}",
                    "assemble only whole-model quantizations of the same model",
                )
        if src.tensor_type not in (
            gguf.GGMLQuantizationType.F32,
            gguf.GGMLQuantizationType.F16,
            gguf.GGMLQuantizationType.BF16,
        ):
            origin = Path(swaps[t.name]) if t.name in swaps else None
            quantized[origin] = quantized.get(origin, 0) + 1
        tensors.append(OutTensor(src))
    values = {}
    if quantized:
        main = max(quantized, key=quantized.get)
        field_ = (base_reader if main is None else readers[main]).get_field(gguf.Keys.General.FILE_TYPE)
        if field_ is not None and base_reader.get_field(gguf.Keys.General.FILE_TYPE) is not None:
            values[gguf.Keys.General.FILE_TYPE] = field_.contents()
    return tensors, values


def _readers(paths, readers: dict | None) -> dict:
    import gguf

    readers = {} if readers is None else readers
    for p in map(Path, paths):
        if p not in readers:
            readers[p] = gguf.GGUFReader(p)
    return readers


def copy_tensors(model: str | Path, names: list[str], out: str | Path, readers: dict | None = None) -> int:
    """Write `out`: `model`'s keys and only its tensors named in `names`, as they are (llama.cpp quantizes such a
    file as it would the whole model, tensor by tensor). Returns the tensor bytes written."""
    from .ggufcopy import OutTensor, write_gguf

    reader = _readers([model], readers)[Path(model)]
    picked = set(names)
    chosen = [OutTensor(t) for t in reader.tensors if t.name in picked]
    write_gguf(reader, out, chosen)
    return sum(int(t.source.n_bytes) for t in chosen)


def assemble(base: str | Path, swaps: dict[str, Path], out: str | Path, readers: dict | None = None) -> int:
    """Write `out`: `base`'s keys and tensors, except the tensors named in `swaps`, whose bytes are copied from the
    file given for each (a whole-model quantization). The result is byte for byte, tensor for tensor, what
    llama.cpp would write for that mix with the same imatrix: quantization is per tensor. general.file_type is that
    of the file supplying the most quantized tensors (llama.cpp names a mixed file after its most common type).
    Returns the bytes of tensor data written. `readers` (path -> GGUFReader, filled as needed) lets many
    assemblies share the parsed files: parsing a 100k-token vocabulary costs more than copying a tiny model."""
    from .ggufcopy import write_gguf

    readers = _readers([base, *swaps.values()], readers)
    tensors, values = _mix(readers[Path(base)], swaps, readers)
    write_gguf(readers[Path(base)], out, tensors, values)
    return sum(int(t.source.n_bytes) for t in tensors)


class CalibrationModel:
    """plan's calibration models without a whole-model copy per run: the model is a llama.cpp split GGUF with one
    shard per tensor that a run may lower (the first shard holds the keys and the tensors no run lowers). Each such
    shard is written once in two versions, the reference's tensor and the lowered one (more: add_version), and a
    run points the shard's name (a symlink) at one of them: what a run writes is the first shard, keys and small
    tensors, not the model (`assemble` copied all of it: 42 x 43.7 GB for the bf16 21B, ~25 min). llama.cpp loads
    the shards by name, so every tensor's type and bytes, and general.file_type, are those of the file `assemble`
    writes for the same mix (tests/test_plan.py checks both, and that llama.cpp evaluates them the same)."""

    def __init__(self, base: str | Path, lowered: str | Path, workdir: str | Path, readers: dict | None = None):
        self.base, self.lowered, self.dir = Path(base), Path(lowered), Path(workdir) / "calibration-model"
        self.readers = _readers([self.base, self.lowered], readers)
        base_reader = self.readers[self.base]
        # a shard for each matrix llama.cpp could quantize (norms and routers stay in the first): those the lowered
        # file holds get a lowered version, the others (plan probes routed experts only in the layers it measures)
        # only the reference's, so no run rewrites them
        self.sharded = [t.name for t in base_reader.tensors if _is_matrix(t)]
        self.n = len(self.sharded) + 1
        if self.n > 0xFFFF:
            raise EdgeMoEError(f"{self.base} has more tensors than a split GGUF can hold", "")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.written = 0
        self.versions: dict[str, Path] = {}  # version -> the file its shards were copied from
        self.holds: dict[str, set[str]] = {}  # version -> the sharded tensors it has a shard of
        self.add_version("base", self.base)
        self.add_version("low", self.lowered)
        self.path = self.shard(0)

    def add_version(self, version: str, source: str | Path) -> int:
        """Write one more version of the shards: each sharded tensor `source` holds in the reference's shape (the
        activation runs' Q8_0 and Q6_K of the tensors every token uses: quantized alone, not as a whole model).
        Returns the tensor bytes written."""
        import gguf

        from .ggufcopy import OutTensor, write_gguf

        source = Path(source)
        reader = _readers([source], self.readers)[source]
        base_reader = self.readers[self.base]
        shape = {t.name: list(t.shape) for t in base_reader.tensors}
        split = gguf.Keys.Split
        written, held = 0, set()
        base_type = {t.name: t.tensor_type for t in base_reader.tensors}
        for src in reader.tensors:
            if src.name not in self.sharded or list(src.shape) != shape[src.name]:
                continue
            if version != "base" and src.tensor_type == base_type[src.name]:
                continue  # not lowered: the base version is this tensor
            i = self.sharded.index(src.name) + 1
            added = [
                (split.LLM_KV_SPLIT_NO, i, gguf.GGUFValueType.UINT16),
                (split.LLM_KV_SPLIT_COUNT, self.n, gguf.GGUFValueType.UINT16),
                (split.LLM_KV_SPLIT_TENSORS_COUNT, len(base_reader.tensors), gguf.GGUFValueType.INT32),
            ]
            write_gguf(_NoKeys(base_reader), self.dir / f"{i:05d}.{version}.gguf", [OutTensor(src)], added=added)
            written += int(src.n_bytes)
            held.add(src.name)
        self.versions[version], self.holds[version] = source, held
        self.written += written
        return written

    def shard(self, i: int) -> Path:
        return self.dir / f"calibration-{i + 1:05d}-of-{self.n:05d}.gguf"

    def set(self, members: list[str], version: str = "low") -> int:
        """Make the model at `self.path` the one with `members` from `version` (the lowered file unless named), the
        rest from the base; returns the tensor bytes written (the first shard's: the keys and the tensors no run
        lowers)."""
        import gguf

        from .ggufcopy import write_gguf

        base_reader = self.readers[self.base]
        unknown = set(members) - self.holds[version]
        if unknown:
            source = self.versions[version]
            raise EdgeMoEError(f"{source} has no lowered tensor {sorted(unknown)[0]}", "lower only what it holds")
        swaps = {n: self.versions[version] for n in members}
        tensors, values = _mix(base_reader, swaps, self.readers)
        first = [t for t in tensors if t.source.name not in self.sharded]
        split = gguf.Keys.Split
        added = [
            (split.LLM_KV_SPLIT_NO, 0, gguf.GGUFValueType.UINT16),
            (split.LLM_KV_SPLIT_COUNT, self.n, gguf.GGUFValueType.UINT16),
            (split.LLM_KV_SPLIT_TENSORS_COUNT, len(tensors), gguf.GGUFValueType.INT32),
        ]
        write_gguf(base_reader, self.path, first, values, added=added)
        for i, name in enumerate(self.sharded, start=1):
            link, tmp = self.shard(i), self.dir / f".link.{i}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(f"{i:05d}.{version if name in swaps else 'base'}.gguf")
            tmp.replace(link)  # atomic: a shard is never missing
        return sum(int(t.source.n_bytes) for t in first)


def _is_matrix(t) -> bool:
    """Whether a GGUFReader tensor is one llama.cpp's quantizer would touch (recipe.quantizable)."""
    n = int(t.n_elements)
    return quantizable(TensorInfo(t.name, tuple(int(d) for d in t.shape), str(t.tensor_type), n))


class _NoKeys:
    """A GGUFReader seen without its keys (but the architecture): what a split's later shards carry."""

    def __init__(self, reader):
        import gguf

        arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
        self.fields = {arch.name: arch}
        self.endianess = reader.endianess

    def get_field(self, key):
        return self.fields.get(key)


def measure(
    model: str | Path,
    imatrix: str | Path,
    text: str | Path,
    types=DEFAULT_TYPES,
    calibration_type: str = CALIBRATION_TYPE,
    ctx: int = 512,
    max_chunks: int | None = DEFAULT_CHUNKS,
    threads: int | None = None,
    progress: Progress | None = None,
    workdir: str | Path | None = None,
    use_cache: bool = True,
    reference: str = "source",
    error_sample: float | None = None,
    layer_stride: int = DEFAULT_LAYER_STRIDE,
    score_from: int | None = None,
    floor: bool = DEFAULT_FLOOR,
) -> Measurements:
    """Errors of every tensor at every candidate type and one measured KLD gain per tensor role (cached).

    error_sample: the fraction of each tensor's rows its error is estimated from (qerror.sampled_errors; default
    qerror.DEFAULT_FRACTION, 1.0 every row).

    reference="source": gains are measured against the input model, everything else kept in its source type.
    reference="q8_0": against the model at Q8_0, everything else Q8_0 (Q8_0's own KLD is two orders of magnitude
    below the types being chosen). Either is evaluated from the mapped file, never copied into anonymous memory
    (evaluate._load, repacking off): a model larger than RAM is read again for each chunk, and Q8_0 halves that.

    Errors are scored in process on a sample of rows (qerror); llama.cpp quantizes the whole model only to the
    calibration type and Q8_0, kept while measuring: every calibration model is built from them (CalibrationModel:
    raw bytes, no re-quantization, written once). Disk: the source, those two files and the calibration model's
    shards (the reference's quantizable tensors once more, and their Q3_K).

    max_chunks: chunks of 512 tokens per KLD eval, spaced evenly over `text`; layer_stride: see measured_layers;
    score_from: the first position of a chunk its KLD scores (calibration_score_from: ctx // CALIBRATION_WARMUP
    unless given; ctx // 2 is `edgemoe eval`'s second half); floor: also measure the all-Q8_0 floor (reference
    "source" only; DEFAULT_FLOOR).

    Each finished step (the errors, a run's KLD) is kept at once (plan_steps.StepCache), so an interrupted
    measurement resumes where it stopped; use_cache=False measures everything again.
    """
    from .imatrix import read_imatrix
    from .qerror import DEFAULT_FRACTION

    model, imatrix, text = Path(model), Path(imatrix), Path(text)
    _check_inputs(model, imatrix, text, reference)
    reference, _ = resolve_reference(model, reference)
    error_sample = DEFAULT_FRACTION if error_sample is None else check_error_sample(error_sample)
    if layer_stride < 1:
        raise EdgeMoEError(f"layer stride {layer_stride} is below 1", "use 1 to measure every layer, k for every k-th")
    score_from = calibration_score_from(ctx, score_from)
    cache = _cache_path(
        model,
        imatrix,
        text,
        types,
        calibration_type,
        max_chunks,
        reference,
        error_sample,
        layer_stride,
        ctx,
        score_from,
        floor,
    )
    if use_cache and cache.is_file():
        try:
            return Measurements(**{**json.loads(cache.read_text()), "from_cache": True})
        except (OSError, ValueError, TypeError):  # a damaged cache entry is measured again and replaced
            pass
    memwatch.stage("read inputs")
    tensors, _ = read_tensors(model)
    if any(t.type not in ("f32", "f16", "bf16") for t in tensors if quantizable(t)):
        raise EdgeMoEError(f"{model} is already quantized", "plan from the f32/f16/bf16 GGUF `edgemoe convert` wrote")
    steps = measure_steps(
        model,
        tensors,
        imatrix,
        text,
        types,
        calibration_type,
        ctx,
        max_chunks,
        reference,
        error_sample,
        layer_stride,
        score_from,
        floor,
    )
    im = read_imatrix(imatrix)
    # a private work directory per run: two plans of one model at once must not quantize into, assemble or
    # evaluate each other's files (their measurements would be cached for good)
    parent = Path(workdir) if workdir else home() / "cache" / "plan" / "work"
    parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_work(parent)
    work = Path(tempfile.mkdtemp(prefix=f"{model.stem}.", dir=parent))
    (work / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        m = _measure(
            model,
            imatrix,
            text,
            types,
            calibration_type,
            ctx,
            max_chunks,
            threads,
            progress,
            reference,
            tensors,
            im,
            work,
            steps,
            StepCache(read=use_cache),
            error_sample,
            layer_stride,
            score_from,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with atomic_output(cache) as part:
        part.write_text(json.dumps(asdict(m)))
    record_rates(m.seconds, {s: m.work.get(k, 0) for s, k in _STAGE_WORK.items()}, str(model))
    return m


OWNER_FILE = "owner"  # in a run's work directory: "host pid" of the process it belongs to


def remove_abandoned_work(parent: Path) -> list[Path]:
    """Delete the work directories of plans that were killed (their process is gone from this host): a kill skips
    measure's cleanup and would leave whole-model quantizations behind, gigabytes at 21B. A directory whose owner is
    alive, on another host, or unknown is left alone. Returns what was deleted."""
    removed = []
    for d in parent.iterdir():
        try:
            host, pid = (d / OWNER_FILE).read_text().split()
            if host != socket.gethostname() or int(pid) == os.getpid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        except (OSError, ValueError):  # not a run's directory, or its owner is alive (PermissionError: another user's)
            continue
    return removed


# Measurements.work's names for what each stage of plan_steps.STAGES did
_STAGE_WORK = {
    "quantize": "quantized_weights",
    "errors": "scored_weights",
    "assemble": "assembled_bytes",
    "eval": "eval_weight_tokens",
}


def _check_inputs(model: Path, imatrix: Path | None, text: Path, reference: str) -> None:
    for p, what in ((model, "model"), (imatrix, "imatrix"), (text, "text")):
        if p is not None and not p.is_file():
            raise EdgeMoEError(f"{what} {p} does not exist", "check the path")
    if reference not in REFERENCES:
        raise EdgeMoEError(f"unknown reference {reference!r}", "use auto, source or q8_0")


REFERENCES = ("auto", "source", "q8_0")
# what an eval needs beside the model's pages: KV cache and compute buffers of a 512-token chunk, the scored
# positions' logits and log-probs at the vocabulary's width, Python
EVAL_HEADROOM = 2 << 30


def resolve_reference(model: Path, reference: str, available: int | None = None) -> tuple[str, str]:
    """(the reference plan measures against, why). `auto`: the source when its file fits in the memory this process
    may fill (stream.available_memory: the machine's available memory, or its cgroup's headroom) with
    EVAL_HEADROOM to spare, else the model at Q8_0 (about half the bytes: bench/quality.md's `4 x 4 (Q8_0
    reference)` rows keep plan's quality). Evaluating a reference that does not fit would read it from disk in
    every one of plan's ~27 evals."""
    if reference != "auto":
        return reference, f"--reference {reference}"
    from .stream import available_memory

    size = Path(model).stat().st_size
    free = available_memory() if available is None else available
    if size + EVAL_HEADROOM <= free:
        return "source", f"auto: the source ({human_bytes(size)}) fits in the {human_bytes(free)} free"
    return "q8_0", f"auto: the source ({human_bytes(size)}) does not fit in the {human_bytes(free)} free"


def active_weights(model: Path, tensors: list[TensorInfo]) -> int:
    """Weights one token multiplies: every matrix, routed experts at expert_used_count/expert_count, the output
    (the token embedding when tied; as a lookup table it costs nothing)."""
    from .gguffile import open_gguf

    reader = open_gguf(model)

    def value(key):
        f = reader.get_field(key)
        try:
            return f.contents() if f is not None else None
        except (ValueError, IndexError):
            return None

    arch = value("general.architecture")
    used, experts = value(f"{arch}.expert_used_count"), value(f"{arch}.expert_count")
    share = used / experts if isinstance(used, int) and isinstance(experts, int) and 0 < used <= experts else 1.0
    tied = not any(t.name == "output.weight" for t in tensors)
    total = 0
    for t in tensors:
        if len(t.shape) < 2 or (t.name == "token_embd.weight" and not tied):
            continue
        total += int(t.n_elements * share) if "_exps." in t.name else t.n_elements
    return total


def calibration_chunks(model: Path, text: Path, ctx: int, max_chunks: int | None) -> int:
    """How many chunks of `ctx` tokens each calibration eval reads (evaluate's chunking; the vocabulary only)."""
    from .evaluate import _chunks
    from .llamacpp import load_vocab

    llm = load_vocab(model)
    try:
        return len(_chunks(llm, text, ctx, max_chunks, spread=True))
    finally:
        del llm


def measure_steps(
    model: Path,
    tensors: list[TensorInfo],
    imatrix: Path | None,
    text: Path,
    types,
    calibration_type: str,
    ctx: int,
    max_chunks: int | None,
    reference: str,
    error_sample: float,
    layer_stride: int = 1,
    score_from: int | None = None,
    floor: bool = True,
) -> list[Step]:
    """What measure does, step by step, with each step's work and content key (plan_steps): the one list the run,
    its resume and plan --dry-run's prediction all read. `imatrix` None: not computed yet (nothing is cached)."""
    targets = [t for t in tensors if quantizable(t)]
    ids = (_model_id(model), sha256_file(imatrix) if imatrix else "no imatrix yet")
    # evaluated without repacking (evaluate._load): a KLD kept by a plan that repacked was rounded otherwise
    eval_ids = (*ids, sha256_file(text), ctx, max_chunks, "spread", reference, "no repack")
    if (
        score_from is not None and score_from != ctx // 2
    ):  # other rows scored: another KLD (the second half's keys stay)
        eval_ids = (*eval_ids, "score from", score_from)
    tokens = calibration_chunks(model, text, ctx, max_chunks) * ctx
    per_run = tokens * active_weights(model, tensors)
    from .qerror import MIN_ROWS, rows_per_stratum

    # the errors of every type, in one pass over a sample of each tensor's rows (qerror.sampled_errors); its work
    # is the weights quantized and scored: sampled rows x row length x the types that fit the tensor
    scored = 0
    for x in targets:
        n_rows, n_strata = (x.shape[1] if len(x.shape) > 1 else 1), math.prod(x.shape[2:])
        sampled = rows_per_stratum(n_rows, n_strata, error_sample) * n_strata * x.shape[0]
        scored += sampled * sum(x.shape[0] % _block(t) == 0 for t in types)
    key = content_key("errors v2", *ids, *types, repr(error_sample), MIN_ROWS)
    names = [x.name for x in targets]
    steps = [Step("errors", "errors", {"errors": scored}, [], key, "", names)]
    lowerable = [x for x in targets if x.shape[0] % _block(calibration_type) == 0]
    blocks = sorted({int(layer(t.name)) for t in targets if layer(t.name)})
    routed = sorted({int(layer(t.name)) for t in targets if "_exps" in t.name})
    measured = measured_layers(blocks, layer_stride, routed[0] if routed else None)
    # what a run lowers: every lowerable tensor, but routed experts only in the layers whose depth factor is measured
    # (their role runs lower those; the fit knows which, fit_role_layer's role_members). At 21B with stride 4 that
    # is 8 of 27 layers' experts: 7.5 B of 21.8 B weights to quantize, not all
    probe = [x for x in lowerable if "_exps" not in x.name or int(layer(x.name)) in measured]
    # what the calibration models are assembled from: llama.cpp quantizes the probed tensors (copied out of the
    # source) to the calibration type, and the whole model to Q8_0 where the reference or the floor needs it (the
    # matrices Q8_0 cannot take stay: plan._uniform); against the source without the floor no Q8_0 one
    steps.append(
        Step(
            f"quantize {calibration_type}",
            "quantize",
            {
                "quantize": sum(x.n_elements for x in probe),
                "assemble": sum(tensor_bytes(x.n_elements, x.type) for x in probe),
            },
            type=calibration_type,
            members=[x.name for x in probe],
        )
    )
    if reference != "source" or floor:
        fits = [x.name for x in targets if x.shape[0] % _block("q8_0") == 0]
        steps.append(
            Step(
                "quantize q8_0", "quantize", {"quantize": sum(x.n_elements for x in targets)}, type="q8_0", members=fits
            )
        )
    # everything not lowered comes from here: the source, or its Q8_0 quantization (llama.cpp's recipe for both:
    # plan._uniform(cal, members, keep) — the test checks the assembly is byte-identical to it)
    base_needs = [] if reference == "source" else ["quantize q8_0"]
    steps.append(Step("reference", "calibrate", {"eval": per_run}, base_needs, tokens=tokens))
    base_type = {
        t.name: t.type if reference == "source" or not quantizable(t) or t.shape[0] % _block("q8_0") else "q8_0"
        for t in tensors
    }
    # the calibration model (CalibrationModel): one shard per matrix, written once in the reference's type and, for
    # the probed ones, once lowered; a run rewrites only the first shard (the keys, norms and routers)
    probed = {x.name for x in probe if base_type[x.name] != calibration_type}
    shards = sum(tensor_bytes(x.n_elements, base_type[x.name]) for x in targets)
    shards += sum(tensor_bytes(x.n_elements, calibration_type) for x in probe if x.name in probed)
    first = sum(tensor_bytes(t.n_elements, base_type[t.name]) for t in tensors if not quantizable(t))
    needs = [f"quantize {calibration_type}", *base_needs]
    steps.append(Step("calibration model", "calibrate", {"assemble": shards}, needs, type=calibration_type))

    def run(name: str, group: str, members: list[str]) -> Step:
        if not members:
            raise EdgeMoEError(f"no {name} tensor can be {calibration_type}", "choose another calibration type")
        key = content_key("kld v2", *eval_ids, calibration_type, *sorted(members))
        needs = ["calibration model", "reference", *base_needs]
        return Step(name, group, {"assemble": first, "eval": per_run}, needs, key, calibration_type, members, tokens)

    for r in sorted({role(t.name) for t in targets}):
        steps.append(run(f"role {r}", "calibrate", [x.name for x in probe if role(x.name) == r]))
    # depth: the same absolute error matters more where the residual stream is small (early layers), which a
    # role's single gain averages away; one more measurement per (measured) layer gives a role x layer model
    for b in measured:
        steps.append(run(f"layer {b}", "layers", [x.name for x in probe if layer(x.name) == str(b)]))
    # the last layer's routed experts alone: their share of that layer's KLD is not the other layers' (one depth
    # factor for the whole layer underestimated them 1.17-1.55x on the fixtures: bench/plan_prediction.md)
    for b in expert_factor_layers(blocks, routed):
        members = [x.name for x in probe if layer(x.name) == str(b) and "_exps" in x.name]
        steps.append(run(f"experts {b}", "layers", members))
    # the activation runs: the tensors every token uses (all but routed experts) at Q8_0 and at Q6_K, the rest as
    # in the reference: what a step from Q8_0 to a k-quant costs beyond its weight error (Q8_0_ACTIVATION). llama.cpp
    # writes each as a whole model (the rest copied: its work counts every weight, as a quantization's does); against
    # a Q8_0 reference the Q8_0 run is the reference itself
    every = [
        x.name for x in targets if "_exps" not in x.name and all(x.shape[0] % _block(t) == 0 for t in ACTIVATION_RUNS)
    ]
    if every and "q8_0" in types and any(t not in Q8_0_ACTIVATION for t in types):
        # each quantizes those tensors alone (copied out of the source) and writes them as one more version of their
        # shards (CalibrationModel.add_version), then the first shard, as any run
        alone = [x for x in targets if x.name in every]
        copied = sum(tensor_bytes(x.n_elements, x.type) for x in alone)
        for t in ACTIVATION_RUNS if reference == "source" else ACTIVATION_RUNS[1:]:
            key = content_key("activation v1", *eval_ids, t, *sorted(every))
            written = copied + sum(tensor_bytes(x.n_elements, t) for x in alone) + first
            work = {"quantize": sum(x.n_elements for x in alone), "assemble": written, "eval": per_run}
            needs = ["calibration model", "reference", *base_needs]
            steps.append(Step(f"activation {t}", "calibrate", work, needs, key, t, every, tokens))
    # the floor: quantized matmuls also quantize their activations (to Q8_0/Q8_K), an error no weight error shows;
    # the all-Q8_0 model is the kept Q8_0 quantization itself (against a Q8_0 reference there is no floor)
    if reference == "source" and floor:
        key = content_key("floor v2", *eval_ids)
        needs = ["quantize q8_0", "reference"]
        steps.append(Step("floor", "calibrate", {"eval": per_run}, needs, key, "q8_0", tokens=tokens))
    return steps


def _measure(
    model: Path,
    imatrix: Path,
    text: Path,
    types,
    calibration_type: str,
    ctx: int,
    max_chunks,
    threads,
    progress,
    reference: str,
    tensors: list[TensorInfo],
    im,
    work: Path,
    steps: list[Step],
    cache: StepCache,
    error_sample: float = 1.0,
    layer_stride: int = 1,
    score_from: int | None = None,
) -> Measurements:
    from .evaluate import base_logprobs, evaluate
    from .qerror import sampled_errors
    from .quantize import quantize

    targets = [t for t in tensors if quantizable(t)]
    files: dict[str, Path] = {}  # quantize step -> its whole-model quantization
    seconds = dict.fromkeys(STAGES, 0.0)
    done = dict.fromkeys(STAGES, 0)  # work this run did (a resumed run: only the steps it had left)
    eval_tokens = assembled_bytes = 0
    todo = pending(steps, cache)
    names = {s.name for s in todo}
    results = {s.name: cache.get(s) for s in steps if s.key and s.name not in names}
    by_group: dict[str, list[Step]] = {}
    for s in steps:
        by_group.setdefault(s.group, []).append(s)
    calibration = None

    def base() -> Path:
        return model if reference == "source" else files["quantize q8_0"]

    def calibration_eval(name: str, path: Path) -> int:
        """Evaluate one calibration model against the base; record its KLD under `name`; the tokens evaluated."""
        res = evaluate(
            path,
            base(),
            text,
            ctx=ctx,
            threads=threads,
            max_chunks=max_chunks,
            spread=True,
            repack=False,
            score_from=score_from,
        )
        results[name] = {"kld": res.kld_mean, "stderr": res.kld_stderr}
        return res.chunks * ctx

    finished = {s.name for s in steps} - names
    for i, step in enumerate(todo):
        group = by_group[step.group]
        # a group's finished steps, kept ones included, so a resumed plan starts where it stopped (the error pass
        # reports its own tensors)
        if progress and step.name != "errors":
            progress(step.group, sum(s.name in finished for s in group), len(group))
        memwatch.stage(step.name if step.name.startswith(_OWN_STAGE) else "calibration runs")
        t0 = time.perf_counter()
        if step.name.startswith("quantize "):
            out = work / f"{model.stem}.{step.type}.gguf"
            source = model
            if step.type == calibration_type:  # the probed tensors alone, copied out of the source
                source = work / f"{model.stem}.probe-source.gguf"
                assembled_bytes += copy_tensors(model, step.members, source)
                seconds["assemble"] += time.perf_counter() - t0  # the copy is assembly work, timed as such
                t0 = time.perf_counter()
            quantize(
                source, _uniform(step.type, step.members), out=out, imatrix=imatrix, threads=threads, manifest=False
            )
            if source != model:
                source.unlink(missing_ok=True)
            files[step.name] = out
        elif step.name == "errors":
            results[step.name] = sampled_errors(
                model, im, step.members, types, error_sample, threads=threads, progress=progress
            )
        elif step.name == "reference":
            eval_tokens += (
                len(
                    base_logprobs(
                        base(), text, ctx, threads, max_chunks, spread=True, repack=False, score_from=score_from
                    )[1]
                )
                * ctx
            )
        elif step.name.startswith("activation "):
            # the tensors every token uses, copied out of the source and quantized alone (llama.cpp quantizes tensor
            # by tensor: the bytes of a whole-model quantization, tests/test_plan.py), become one more version of
            # their shards; the rest is the reference's. At 21B that quantizes and writes 1.4 B weights, not 21.8 B
            alone = work / f"{model.stem}.activation-source.gguf"
            out = work / f"{model.stem}.activation-{step.type}.gguf"
            assembled_bytes += copy_tensors(model, step.members, alone, calibration.readers)
            t1 = time.perf_counter()
            quantize(
                alone, _uniform(step.type, step.members), out=out, imatrix=imatrix, threads=threads, manifest=False
            )
            t2 = time.perf_counter()
            alone.unlink(missing_ok=True)
            version = f"activation-{step.type}"
            assembled_bytes += calibration.add_version(version, out) + calibration.set(step.members, version)
            calibration.readers.pop(out, None)
            out.unlink(missing_ok=True)
            seconds["quantize"] += t2 - t1
            seconds["assemble"] += time.perf_counter() - t0 - (t2 - t1)
            t0 = time.perf_counter()
            eval_tokens += calibration_eval(step.name, calibration.path)
        elif step.name == "calibration model":
            calibration = CalibrationModel(base(), files[f"quantize {step.type}"], work)
            assembled_bytes += calibration.written
        else:
            if step.name == "floor":
                evaluated = files["quantize q8_0"]
            else:
                assembled_bytes += calibration.set(step.members)
                seconds["assemble"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                evaluated = calibration.path
            eval_tokens += calibration_eval(step.name, evaluated)
        seconds[_stage_of(step)] += time.perf_counter() - t0
        for stage, n in step.work.items():
            done[stage] += n
        if step.key:
            cache.put(step, results[step.name])
        finished.add(step.name)
        if progress and step.name != "errors":
            progress(step.group, sum(s.name in finished for s in group), len(group))
        # a whole-model quantization no step left needs is deleted now: disk holds at most what it held before
        later = {need for s in todo[i + 1 :] for need in s.needs}
        for name in [n for n in files if n not in later]:
            files.pop(name).unlink(missing_ok=True)
    done["assemble"] = assembled_bytes  # what assemble wrote (its steps' work is the same count, predicted)
    if progress:
        for group, members in by_group.items():
            if group != "errors":
                progress(group, len(members), len(members))

    errors: dict[str, dict[str, float]] = {t.name: dict(results["errors"][t.name]) for t in targets}
    kld = {s.name.removeprefix("role "): results[s.name]["kld"] for s in steps if s.name.startswith("role ")}
    layer_kld = {s.name.removeprefix("layer "): results[s.name]["kld"] for s in steps if s.name.startswith("layer ")}
    expert_kld = {
        s.name.removeprefix("experts "): results[s.name]["kld"] for s in steps if s.name.startswith("experts ")
    }
    role_members = {s.name.removeprefix("role "): set(s.members) for s in steps if s.name.startswith("role ")}
    gains, factors, expert_factors = fit_role_layer(
        {n: errors[n][calibration_type] for n in errors if calibration_type in errors[n]},
        kld,
        layer_kld,
        expert_kld,
        role_members=role_members,
    )
    m_partial = Measurements(
        "", "", "", list(types), calibration_type, errors, gains, kld, factors, expert_factors=expert_factors
    )
    activation = {s.type: results[s.name]["kld"] for s in steps if s.name.startswith("activation ")}
    excess = 0.0
    if ACTIVATION_RUNS[1] in activation:
        members = next(s.members for s in steps if s.name.startswith("activation "))

        def beyond(t: str) -> float:  # a run's KLD beyond its weight errors' (the Q8_0 reference's own: 0)
            kld_t = activation.get(t, 0.0)
            return kld_t - sum(m_partial.weight_predicted(n, t) for n in members) if t in activation else 0.0

        unit = sum(m_partial.weight_predicted(n, "q8_0") for n in members)
        excess = max(beyond(ACTIVATION_RUNS[1]) - beyond(ACTIVATION_RUNS[0]), 0.0) / unit if unit > 0 else 0.0
    floor = 0.0
    if "floor" in results:
        q8 = [x.name for x in targets if "q8_0" in errors[x.name]]
        floor = max(results["floor"]["kld"] - sum(m_partial.predicted(n, "q8_0") for n in q8), 0.0)
    runs = [s for s in todo if s.name.startswith(_RUNS) or s.name == "floor"]
    # each measured KLD's standard error ("role:R", "layer:B", "experts:B", "floor"): how much the chunks evaluated
    # pin it down
    stderr = {
        s.name.replace(" ", ":"): results[s.name].get("stderr", 0.0)
        for s in steps
        if s.name.startswith(_RUNS) or s.name == "floor"
    }
    stats = {
        "assembled_bytes": done["assemble"],
        "eval_tokens": eval_tokens,
        "runs": len(runs),
        "cached_steps": len(steps) - len(todo),
        **{_STAGE_WORK[stage]: n for stage, n in done.items()},
    }
    return Measurements(
        str(model),
        str(imatrix),
        str(text),
        list(types),
        calibration_type,
        errors,
        gains,
        kld,
        factors,
        layer_kld,
        floor,
        {k: round(v, 2) for k, v in seconds.items()},
        stats,
        error_sample,
        layer_stride,
        stderr,
        score_from,
        "floor" in results,
        expert_factors=expert_factors,
        expert_kld=expert_kld,
        activation_excess=excess,
        activation_kld=activation,
    )


_RUNS = ("role ", "layer ", "experts ", "activation ")  # the calibration runs' step names (and the floor)


# steps reported as memory stages of their own; each role, layer and floor run is one of the "calibration runs"
_OWN_STAGE = ("errors", "quantize ", "reference", "calibration model")


def _stage_of(step: Step) -> str:
    """The stage a step's timed part belongs to (a calibration run's assembly, an activation run's quantization
    are timed on their own)."""
    if step.name.startswith("activation "):
        return "eval"
    return next(s for s in ("quantize", "errors", "eval", "assemble") if s in step.work)


def measured_layers(blocks: list[int], stride: int, first_routed: int | None) -> list[int]:
    """The layers whose depth factor is measured with a layer stride: all of them for stride 1; else every layer
    before the first routed (MoE) one (dense layers are a different kind: ERNIE's layer 0), the first routed layer,
    every `stride`-th after it, and the last layer, so the others always lie between two measured ones."""
    if stride <= 1 or not blocks:
        return list(blocks)
    start = blocks[0] if first_routed is None else first_routed
    keep = {b for b in blocks if b <= start or (b - start) % stride == 0} | {blocks[-1]}
    return sorted(keep)


def expert_factor_layers(blocks: list[int], routed: list[int]) -> list[int]:
    """The layers whose routed experts get a depth factor of their own (one more calibration run each): the last
    layer, when it has routed experts. Its experts cost more than its one factor said on both fixtures
    (bench/plan_prediction.md), and every plan that lowered them missed by 10-16% (bench/quality.md)."""
    return [blocks[-1]] if blocks and blocks[-1] in routed else []


def interpolate_factors(measured: dict[int, float], blocks: list[int]) -> dict[int, float]:
    """Depth factors for every block from those measured: geometric interpolation between the nearest measured
    layers on either side (a factor falls roughly by a constant ratio per layer; linear where one is 0), the
    nearest measured one beyond the ends."""
    known = sorted(measured)
    out = {}
    for b in blocks:
        if b in measured:
            out[b] = measured[b]
            continue
        lo = max((k for k in known if k < b), default=None)
        hi = min((k for k in known if k > b), default=None)
        if lo is None or hi is None:
            out[b] = measured[hi if lo is None else lo]
            continue
        w = (b - lo) / (hi - lo)
        a, c = measured[lo], measured[hi]
        out[b] = a ** (1 - w) * c**w if a > 0 and c > 0 else a + w * (c - a)
    return out


def fit_role_layer(
    err: dict[str, float],
    role_kld: dict[str, float],
    layer_kld: dict[str, float],
    expert_kld: dict[str, float] | None = None,
    iterations: int = 50,
    role_members: dict[str, set[str]] | None = None,
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Gains g_role, depth factors f_layer and expert factors f_experts with sum_layers g f E = the role's measured
    KLD, sum_roles g f E = the layer's measured KLD and, for each layer in `expert_kld`, sum over its routed experts
    of g f_experts E = their measured KLD (iterative proportional fitting; global tensors have f = 1).
    A layer's routed experts are predicted with its expert factor where it has one (depth_factor), its layer factor
    stays fitted over all its tensors (the run that lowers the whole layer): fitted instead to what the experts
    leave of the layer's KLD it could turn negative, as KLDs are not exactly additive, and the tensors it then
    serves, attention and shared experts, are kept at >= Q4_K anyway (MIN_EVERY_TOKEN).
    Layers of `err` without a measured KLD (a layer stride) get factors interpolated from the measured ones
    (interpolate_factors) at every step, so the role gains are fitted with the depth profile they will be used with.
    `role_members`: the tensors each role run lowered, where not all of the role's (the routed experts are lowered
    only in the measured layers: measure_steps).
    """
    expert_kld = expert_kld or {}
    role_members = role_members or {}
    g = {r: 1.0 for r in role_kld}
    blocks = sorted({int(layer(n)) for n in err if layer(n)} | {int(b) for b in layer_kld})
    f = {str(b): 1.0 for b in blocks}
    fe = {b: 1.0 for b in expert_kld}
    missing = any(str(b) not in layer_kld for b in blocks)
    for _ in range(iterations):
        for r in g:
            lowered = role_members.get(r)
            s = sum(
                depth_factor(n, f, fe) * e for n, e in err.items() if role(n) == r and (lowered is None or n in lowered)
            )
            g[r] = role_kld[r] / s if s > 0 else 0.0
        for b in layer_kld:
            s = sum(g[role(n)] * e for n, e in err.items() if layer(n) == b)
            f[b] = layer_kld[b] / s if s > 0 else 1.0
        for b in expert_kld:
            s = sum(g[role(n)] * e for n, e in err.items() if layer(n) == b and "_exps" in n)
            fe[b] = expert_kld[b] / s if s > 0 else f.get(b, 1.0)
        if missing and layer_kld:
            filled = interpolate_factors({int(b): f[b] for b in layer_kld}, blocks)
            f = {str(b): v for b, v in filled.items()}
    return g, f, fe


def _block(type_: str) -> int:
    from .recipe import block_info

    return block_info(type_)[0]


def _uniform(type_: str, names: list[str], keep: list[TensorInfo] | None = None) -> Recipe:
    """A recipe giving `names` the type `type_`; the `keep` tensors stay in their source type, the rest Q8_0."""
    rules = [Rule("^" + re.escape(n) + "$", type_) for n in names]
    rules += [Rule("^" + re.escape(t.name) + "$", t.type) for t in keep or [] if t.name not in names]
    return Recipe(f"uniform-{type_}", default="q8_0", token_embedding=None, output=None, rules=rules)


# ---- the choice ----


@dataclass
class Choice:
    tensor: str
    type: str
    bytes: int
    predicted_kld: float


@dataclass
class PlanResult:
    model: str
    budget_bytes: int  # what the file may occupy
    budget_formula: str
    predicted_bytes: int
    predicted_kld: float
    types: list[str]
    choices: list[Choice]
    gains: dict[str, float]
    calibration_kld: dict[str, float]
    recipe_toml: str
    out: str | None = None
    quantized: str | None = None
    floor_measured: bool = True  # False: predicted_kld leaves the all-Q8_0 floor out (plan --floor measures it)
    measure_seconds: dict[str, float] = field(default_factory=dict)  # per stage, this run (0 when all cached)
    cached_steps: int = 0  # measurement steps an earlier (maybe interrupted) plan had finished
    measured_from_cache: bool = False  # the whole measurement was cached: only the choice was made
    reference: str = "source"  # what the gains were measured against (resolve_reference), and why
    reference_why: str = ""
    peak_rss_bytes: int = 0  # the larger of this process's and its largest llama.cpp child's peak (kernel's count)
    peak_rss_self_bytes: int = 0
    peak_rss_children_bytes: int = 0
    # the same peak split (memwatch, sampled; this process and its children together): anonymous memory is what a
    # board must have, mapped file pages are page cache it can drop and read again
    peak_anon_bytes: int = 0
    peak_file_bytes: int = 0
    stage_memory: dict[str, MemoryPeak] = field(default_factory=dict)  # per stage (imatrix, errors, quantize ...)


def solve(options: dict[str, dict[str, tuple[int, float]]], budget: int, bins: int = 4000) -> dict[str, str]:
    """Multiple-choice knapsack: one option per group, total bytes <= budget, minimum summed loss.

    options[group][type] = (bytes, loss). Bytes are rounded up to budget/bins units, so the result always fits.
    """
    groups = sorted(options)
    unit = max(budget / bins, 1.0)
    cap = int(budget // unit)
    inf = float("inf")
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    picks = []
    for g in groups:
        new = np.full(cap + 1, inf)
        arg = np.full(cap + 1, -1, dtype=np.int16)
        for k, (t, (b, loss)) in enumerate(options[g].items()):
            w = int(np.ceil(b / unit))
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = dp[: cap + 1 - w] + loss
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        dp = new
        picks.append(arg)
    if not np.isfinite(dp).any():
        raise ValueError("infeasible")
    at = int(np.argmin(dp))
    result = {}
    for g, arg in zip(reversed(groups), reversed(picks)):
        k = int(arg[at])
        t = list(options[g])[k]
        result[g] = t
        at -= int(np.ceil(options[g][t][0] / unit))
    return result


def plan_from_measurements(
    m: Measurements,
    tensors: list[TensorInfo],
    overhead: int,
    budget: int,
    budget_formula: str = "",
    name: str = "plan",
    min_every_token: str | None = MIN_EVERY_TOKEN,
) -> PlanResult:
    """Solve for `budget`. Tensors every token uses (all but routed experts) get no type with fewer bits per weight
    than `min_every_token` (None: no floor)."""
    from .recipe import block_info, group_of

    targets = [t for t in tensors if quantizable(t)]
    fixed = overhead + sum(tensor_bytes(t.n_elements, t.type) for t in tensors if not quantizable(t))
    floor_bpw = 8 * block_info(min_every_token)[1] / block_info(min_every_token)[0] if min_every_token else 0.0

    def allowed(t: TensorInfo, ty: str) -> bool:
        return group_of(t.name) == "experts" or 8 * block_info(ty)[1] / block_info(ty)[0] >= floor_bpw

    options = {
        t.name: {
            ty: (tensor_bytes(t.n_elements, ty), m.predicted(t.name, ty))
            for ty in m.types
            if ty in m.errors[t.name] and allowed(t, ty)
        }
        for t in targets
    }
    if any(not o for o in options.values()):
        raise EdgeMoEError(
            f"no candidate type is at least {min_every_token} for some tensor", "lower --min-every-token"
        )
    smallest = fixed + sum(min(b for b, _ in o.values()) for o in options.values())
    if budget < smallest:
        raise EdgeMoEError(
            f"the file budget {human_bytes(budget)} is below the smallest mix of {', '.join(m.types)} "
            f"({human_bytes(smallest)})",
            "raise --budget, lower --ctx, or allow lower types",
        )
    chosen = solve(options, budget - fixed)
    choices = [Choice(n, chosen[n], options[n][chosen[n]][0], options[n][chosen[n]][1]) for n in chosen]
    choices.sort(key=lambda c: [t.name for t in tensors].index(c.tensor))
    predicted_bytes = fixed + sum(c.bytes for c in choices)
    predicted_kld = sum(c.predicted_kld for c in choices) + m.floor_kld  # 0 when no floor was measured
    recipe = recipe_from_choices(
        choices,
        name,
        f"edgemoe plan: file budget {human_bytes(budget)} ({budget_formula}); "
        f"predicted {human_bytes(predicted_bytes)}, mean KLD {predicted_kld:.5f}",
    )
    return PlanResult(
        m.model,
        budget,
        budget_formula,
        predicted_bytes,
        predicted_kld,
        list(m.types),
        choices,
        m.gains,
        m.calibration_kld,
        recipe.to_toml(),
        floor_measured=m.floor_measured,
    )


def recipe_from_choices(choices: list[Choice], name: str, description: str) -> Recipe:
    """A readable recipe: one rule per (role, type) listing its layers, the token embedding as a default."""
    by_role: dict[tuple[str, str], list[str]] = {}
    embedding = None
    for c in choices:
        if c.tensor == "token_embd.weight":
            embedding = c.type
            continue
        if m := re.match(r"^blk\.(\d+)\.(.+)$", c.tensor):
            by_role.setdefault((m.group(2), c.type), []).append(m.group(1))
        else:
            by_role.setdefault((c.tensor, c.type), []).append("")
    rules = []
    for (rest, type_), layers in by_role.items():
        suffix = re.escape(rest) + "$"
        if layers == [""]:
            rules.append(Rule("^" + suffix, type_))
        else:
            alt = layers[0] if len(layers) == 1 else "(" + "|".join(layers) + ")"
            rules.append(Rule(rf"^blk\.{alt}\." + suffix, type_))
    return Recipe(name, description, default="q8_0", token_embedding=embedding, output=embedding, rules=rules)


def file_budget(
    model: str | Path,
    ram: int | None = None,
    ctx: int = 4096,
    max_size: int | None = None,
    reserve: int | None = None,
    ram_source: str | None = None,
) -> tuple[int, str]:
    """(bytes the GGUF may occupy, the formula with numbers)."""
    from .board import memory
    from .ernie21b import file_budget_bytes
    from .gguffile import open_gguf

    # the model is parsed (and a damaged one refused in one line) even when --max-size needs no key from it
    reader = open_gguf(model)
    if max_size is not None:
        return max_size, f"--max-size {human_bytes(max_size)}"
    arch = _key(reader, model, "general.architecture", str)

    def f(key, required=True):
        return _key(reader, model, f"{arch}.{key}", int, required)

    n_layers, n_kv = f("block_count"), f("attention.head_count_kv")
    head_dim = f("attention.key_length", required=False) or f("embedding_length") // f("attention.head_count")
    source = ram_source or "--budget"
    if ram is None:
        ram, source = memory()[0], "this board's RAM"
    budget, kv, reserve = file_budget_bytes(ram, ctx, n_layers, n_kv, head_dim, reserve)
    return (
        budget,
        f"{source} {human_bytes(ram)} - KV cache for {ctx} tokens {human_bytes(kv)} - runtime reserve "
        f"{human_bytes(reserve)}",
    )


def _key(reader, path: Path, key: str, kind: type, required: bool = True):
    """One metadata value of an open GGUF, of the type the budget needs (a positive int or a string)."""
    import gguf

    field_ = reader.get_field(key)
    value = None
    if field_ is not None and field_.types and field_.types[0] != gguf.GGUFValueType.ARRAY:
        value = field_.contents()
    if value is None and not required:
        return None
    if type(value) is not kind or (kind is int and value <= 0):
        raise EdgeMoEError(
            f"{path}: {key} is {'missing' if field_ is None else repr(value)[:40]}, not a "
            f"{'positive whole number' if kind is int else 'name'}",
            "convert the model again with `edgemoe convert`",
        )
    return value


def budget_options(
    budget: str | None, board: str | None, max_size: str | None, reserve: str | None
) -> tuple[int | None, int | None, int | None, str]:
    """plan's --budget / --board / --max-size / --reserve as typed -> (ram, max_size, reserve, where ram is from).

    Exactly one budget: a RAM size, a board's RAM (`--board this`: this machine's, ram None; else a profile from
    configs/boards/ or a .toml file), or the file size itself."""
    if sum(x is not None for x in (budget, max_size, board)) != 1:
        raise EdgeMoEError("give exactly one of --budget, --board or --max-size", "e.g. --budget 12GiB")

    def size(text):
        return parse_size(text) if text else None

    if board is None or board == "this":
        return size(budget), size(max_size), size(reserve), "--budget" if budget else "this board's RAM"
    from .board import load_board

    profile = load_board(board)
    return profile.ram_bytes, None, size(reserve), f"board {profile.name}'s RAM"


def plan_recipe(result: PlanResult, out: str | Path | None = None) -> Recipe:
    """The plan as a Recipe to quantize with: the TOML written to `out`, else the result's own text."""
    from .recipe import load_recipe, parse_recipe
    from .tomlfile import load_toml

    return load_recipe(out) if out else parse_recipe(load_toml(result.recipe_toml, "plan's recipe"), "plan")


def plan(
    model: str | Path,
    imatrix: str | Path,
    text: str | Path,
    ram: int | None = None,
    ctx: int = 4096,
    max_size: int | None = None,
    reserve: int | None = None,
    arm_fast: bool = False,
    out: str | Path | None = None,
    name: str = "plan",
    threads: int | None = None,
    max_chunks: int | None = DEFAULT_CHUNKS,
    progress: Progress | None = None,
    reference: str = "source",
    min_every_token: str | None = MIN_EVERY_TOKEN,
    ram_source: str | None = None,
    error_sample: float | None = None,
    layer_stride: int = DEFAULT_LAYER_STRIDE,
    floor: bool = DEFAULT_FLOOR,
) -> PlanResult:
    """Measure (or reuse cached measurements), solve for the budget, write the recipe TOML to `out`.

    `ram_source` names where `ram` came from in the budget formula (default "--budget")."""
    model = Path(model)
    if out:
        refuse_input_as_output(out, [model, imatrix, text])
    budget, formula = file_budget(model, ram, ctx, max_size, reserve, ram_source)
    if budget <= 0:
        raise EdgeMoEError(f"nothing is left for the model: {formula}", "raise --budget or lower --ctx")
    _check_inputs(model, Path(imatrix), Path(text), reference)
    reference, why = resolve_reference(model, reference)
    types = ARM_FAST_TYPES if arm_fast else DEFAULT_TYPES
    cal = ARM_FAST_CALIBRATION_TYPE if arm_fast else CALIBRATION_TYPE
    # the CLI's watch covers the imatrix and --quantize too; called on its own, plan watches itself
    with contextlib.ExitStack() as stack:
        watch = memwatch.running() or stack.enter_context(MemoryWatch(first_stage="read inputs"))
        m = measure(
            model,
            imatrix,
            text,
            types,
            cal,
            max_chunks=max_chunks,
            threads=threads,
            progress=progress,
            reference=reference,
            error_sample=error_sample,
            layer_stride=layer_stride,
            floor=floor,
        )
        memwatch.stage("solve")
        tensors, overhead = read_tensors(model)
        result = plan_from_measurements(m, tensors, overhead, budget, formula, name, min_every_token)
        if not m.from_cache:
            result.measure_seconds, result.cached_steps = m.seconds, m.work.get("cached_steps", 0)
        result.measured_from_cache = m.from_cache
        result.reference, result.reference_why = reference, why
        set_peak_rss(result, watch)
    if out:
        with atomic_output(out) as part:
            part.write_text(
                "# Written by `edgemoe plan`: one rule per tensor role and type, layers listed.\n"
                "# Edit freely; `edgemoe recipe show FILE --model MODEL` explains it.\n" + result.recipe_toml
            )
        result.out = str(out)
    return result


# ---- what plan would do, and how long it would take here ----


def dry_run(
    model: str | Path,
    imatrix: str | Path | None,
    text: str | Path,
    arm_fast: bool = False,
    max_chunks: int | None = DEFAULT_CHUNKS,
    reference: str = "source",
    threads: int | None = None,
    probe: bool = True,
    error_sample: float | None = None,
    layer_stride: int = DEFAULT_LAYER_STRIDE,
    floor: bool = DEFAULT_FLOOR,
) -> PlanPrediction:
    """plan's steps (measure_steps, the list the run itself follows) priced with this machine's rates: those the
    last plans here measured, else a probe of a few seconds (probe_rates). Steps an earlier plan finished, or an
    interrupted one kept, cost nothing. `imatrix` None: it is computed first (a step of its own)."""
    from .qerror import DEFAULT_FRACTION

    model, text = Path(model), Path(text)
    imatrix = Path(imatrix) if imatrix else None
    _check_inputs(model, imatrix, text, reference)
    reference, why = resolve_reference(model, reference)
    error_sample = DEFAULT_FRACTION if error_sample is None else check_error_sample(error_sample)
    tensors, _ = read_tensors(model)
    if any(t.type not in ("f32", "f16", "bf16") for t in tensors if quantizable(t)):
        raise EdgeMoEError(f"{model} is already quantized", "plan from the f32/f16/bf16 GGUF `edgemoe convert` wrote")
    types = ARM_FAST_TYPES if arm_fast else DEFAULT_TYPES
    cal = ARM_FAST_CALIBRATION_TYPE if arm_fast else CALIBRATION_TYPE
    ctx = 512  # plan's calibration context (measure's default)
    score_from = calibration_score_from(ctx)
    steps = measure_steps(
        model,
        tensors,
        imatrix,
        text,
        types,
        cal,
        ctx,
        max_chunks,
        reference,
        error_sample,
        layer_stride,
        score_from,
        floor,
    )
    notes = [f"reference {reference} ({why})"]
    cache = StepCache()
    if imatrix is None:
        tokens = calibration_chunks(model, text, ctx, None) * ctx
        work = {"eval": tokens * active_weights(model, tensors)}
        steps.insert(0, Step("imatrix", "imatrix", work, tokens=tokens))
        notes.append("no imatrix yet: llama-imatrix runs over the whole text first (priced at the eval rate)")
    elif _cache_path(
        model, imatrix, text, types, cal, max_chunks, reference, error_sample, layer_stride, ctx, score_from, floor
    ).is_file():
        cache = _Finished()
        notes.append("measured before: plan solves from its cache")
    rates = measured_rates()
    if probe and any(stage not in rates for stage in STAGES):
        probed = probe_rates(
            model, tensors, imatrix, types, cal, error_sample, ctx, max_chunks, text, threads, score_from=score_from
        )
        rates = {**probed, **rates}
    return predict(str(model), steps, cache, rates, notes)


class _Finished(StepCache):
    """Every step done: the whole measurement is cached."""

    def get(self, step):
        return {}


def probe_rates(
    model: Path,
    tensors: list[TensorInfo],
    imatrix: Path | None,
    types,
    calibration_type: str,
    error_sample: float,
    ctx: int,
    max_chunks: int | None,
    text: Path,
    threads: int | None = None,
    sample_weights: int = 1 << 21,
    score_from: int | None = None,
) -> dict[str, Rate]:
    """This machine's rates from a few seconds of plan's own operations at the model's real widths: the error pass
    (qerror.tensor_sample_errors) on the model's largest matrix; rows of it quantized by ggml's quantizer (what
    llama.cpp runs per tensor) to the two types llama.cpp quantizes the whole model to, on `threads` threads; 64 MiB
    of the model copied (assemble); and, when the model is small enough to load in seconds (<= 1 GiB), one chunk of
    the text evaluated with the model loads a calibration run makes. A larger model's eval rate comes only from a
    finished plan."""
    import os
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    import gguf

    from .imatrix import read_imatrix
    from .qerror import _kind, quantize_rows, rows_per_stratum, tensor_sample_errors

    threads = threads or os.cpu_count() or 1
    rates: dict[str, Rate] = {}
    big = max((t for t in tensors if quantizable(t)), key=lambda t: t.n_elements)
    src = next(t for t in gguf.GGUFReader(model).tensors if t.name == big.name)
    im = read_imatrix(imatrix) if imatrix else SimpleNamespace(entries={})  # without one: unweighted, as qerror
    fits = [t for t in types if big.shape[0] % _block(t) == 0]
    n_rows, n_strata = (big.shape[1] if len(big.shape) > 1 else 1), math.prod(big.shape[2:])
    scored = rows_per_stratum(n_rows, n_strata, error_sample) * n_strata * big.shape[0] * len(fits)
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        tensor_sample_errors(src, fits, im, error_sample, pool=pool)
        how = f"{len(fits)} types on a {error_sample:g} row sample of {big.name}"
        rates["errors"] = Rate("errors", scored / (time.perf_counter() - t0), STAGES["errors"], "probe", how)
        # quantize: real rows of it, each thread its share, as llama.cpp splits a tensor's rows
        row = big.shape[0]
        raw = np.asarray(src.data)
        raw = raw.reshape(-1, raw.shape[-1])[: max(threads, sample_weights // row)]
        rows = _dequantized_rows(raw, src.tensor_type)
        kept = [t for t in dict.fromkeys((calibration_type, "q8_0")) if row % _block(t) == 0]
        t0 = time.perf_counter()
        for t in kept:
            kind = _kind(t, row)
            list(pool.map(lambda part: quantize_rows(kind, part, None), np.array_split(rows, threads)))
        compute = (time.perf_counter() - t0) / (rows.size * len(kept))  # seconds per weight
    # assemble: a copy of the model's bytes (from the page cache when it was just read, as plan's copies are)
    n = min(model.stat().st_size, 64 << 20)
    probe_dir = home() / "cache" / "plan" / "work"
    probe_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=probe_dir, prefix="probe.") as dst, open(model, "rb") as f:
        t0 = time.perf_counter()
        left = n
        while left > 0 and (chunk := f.read(min(left, 1 << 22))):
            dst.write(chunk)
            left -= len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
        copy = n / (time.perf_counter() - t0)
    rates["assemble"] = Rate("assemble", copy, STAGES["assemble"], "probe", f"{human_bytes(n)} copied")
    # a whole-model quantization also reads the source and writes its output: those bytes per weight at the copy rate
    source_bytes = sum(tensor_bytes(t.n_elements, t.type) for t in tensors if quantizable(t))
    out_bytes = sum(tensor_bytes(t.n_elements, k) for t in tensors if quantizable(t) for k in kept) / len(kept)
    io = (source_bytes + out_bytes) / sum(t.n_elements for t in tensors if quantizable(t)) / copy
    how = f"{rows.size / 1e6:.1f}M weights of {big.name} to {', '.join(kept)}, + reading and writing at the copy rate"
    rates["quantize"] = Rate("quantize", 1 / (compute + io), STAGES["quantize"], "probe", how)
    if model.stat().st_size <= 1 << 30:
        rates["eval"] = _probe_eval(model, tensors, text, ctx, max_chunks, threads, score_from)
    return rates


def _probe_eval(
    model: Path,
    tensors: list[TensorInfo],
    text: Path,
    ctx: int,
    max_chunks,
    threads: int,
    score_from: int | None = None,
) -> Rate:
    """Weight-tokens/s of a calibration run as evaluate makes one, from one chunk timed part by part: two model
    loads and two tokenizations of the text (the base's, for its tokens, and the candidate's), then per chunk the
    forward pass and the numpy work on the logits of the scored positions (log-softmax, the base's float16
    log-probs, KLD, NLL, top-1)."""
    from .evaluate import _chunk_logits, _chunks, _load, _log_softmax, check_score_from

    t0 = time.perf_counter()
    llm = _load(model, ctx, threads, repack=False)
    chunk = _chunks(llm, text, ctx, max_chunks, spread=True)[0]
    t2 = time.perf_counter()
    first = check_score_from(ctx, score_from)
    lp = _log_softmax(np.asarray(_chunk_logits(llm, chunk, first), dtype=np.float32))
    lb = lp.astype(np.float16).astype(np.float32)
    float((np.exp(lb) * (lb - lp)).sum(axis=1).mean())
    lp.argmax(axis=1)
    t3 = time.perf_counter()
    del llm
    chunks = calibration_chunks(model, text, ctx, max_chunks)
    seconds = 2 * (t2 - t0) + chunks * (t3 - t2)
    how = f"one chunk of {ctx} tokens, its KLD, two loads and tokenizations a run"
    return Rate("eval", chunks * ctx * active_weights(model, tensors) / seconds, STAGES["eval"], "probe", how)


def _dequantized_rows(raw: np.ndarray, tensor_type) -> np.ndarray:
    import gguf

    return np.ascontiguousarray(gguf.quants.dequantize(raw, tensor_type), dtype=np.float32)


def peak_rss() -> tuple[int, int]:
    """(this process's peak resident memory, the largest child's) in bytes: llama.cpp's quantizer and evals run
    in this process, llama-imatrix as a child."""
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale,
    )


def set_peak_rss(result: PlanResult, watch: MemoryWatch) -> None:
    """Fill in the result's peak memory as of now (after --quantize too, when the CLI calls it again): the
    kernel's peaks, and `watch`'s split of them into anonymous memory and file pages, per stage."""
    result.peak_rss_self_bytes, result.peak_rss_children_bytes = peak_rss()
    result.peak_rss_bytes = max(result.peak_rss_self_bytes, result.peak_rss_children_bytes)
    watch.sample()
    result.peak_anon_bytes, result.peak_file_bytes = watch.overall.anon_bytes, watch.overall.file_bytes
    result.stage_memory = {k: MemoryPeak(v.anon_bytes, v.file_bytes) for k, v in watch.peaks.items()}
