"""What `edgemoe plan` costs per stage at ERNIE-4.5-21B-A3B's real tensor widths, and the 21B's predicted total.

Issue 14, first deliverable. The model is made by /work/shared/tools/make_wide_ernie.py (real 21B shapes: hidden
2560, 64 experts x 1536, dense layer 0 of 12288, only fewer layers and an 8192-token vocabulary; its weights are
random, so its KLDs mean nothing and its costs are real). Each stage runs the functions plan.measure runs, in its
own child process so that its peak RSS (wait4's ru_maxrss, which includes the llama.cpp children it waited for) is
its own:

  convert     edgemoe convert, checkpoint -> bf16 GGUF (before plan; timed for the record)
  imatrix     edgemoe imatrix on --imatrix-chunks chunks (plan needs one; not part of plan's cost)
  quantize/T  quantize.quantize with plan._uniform(T, ...) for each of plan's 7 candidate types, then
              plan.tensor_errors on the result: weights/s quantized and weights/s error-scored, per type
              (how plan measured errors before qerror; plan now quantizes the whole model only to Q3_K and Q8_0)
  errors_sampled  qerror.sampled_errors, plan's error stage now: all 7 types on a row sample (--error-sample,
              default qerror.DEFAULT_FRACTION) of every quantizable tensor, --threads threads
  errors_energy   the same without quantizing (types none): its one full read of the source for the ratio
              estimator's row energies; the rest of errors_sampled is the quantize + score of the sampled rows
  assemble    plan.assemble (the calibration-model copy), twice with shared readers as plan does: bytes/s
  eval_base   evaluate.base_logprobs: the reference's own pass (plan's 44th eval)
  eval        evaluate.evaluate of one assembled calibration model against the reference: tokens/s
  pp512       llama-bench's pp512 of the model at Q4_0: the figure the Orion O6's is published in (predict_board)
  kld_rows    evaluate's numpy work per 512-token chunk at the 21B's vocabulary (the wide model's is 8192), second half
              scored vs from position 64 (plan's calibration evals): what scoring more positions adds to an eval
  NAME@1      a CPU stage on 1 thread: against its 2-thread time, the stage's serial share (Amdahl) for 8 threads
  NAME~K      a repeat: the shared box's other work disturbs single runs; the fastest run is used

By default every stage does its whole work, as plan does it (--sample all). For a model too big to quantize 7 times
in the time at hand, --sample TENSORS (comma-separated; `blk1` = the MoE block's routed gate and down experts,
attention and shared experts: the tensor kinds that are 99% of the 21B) quantizes and scores only those per type,
the other tensors kept in bf16 (plan._uniform's `keep`), and the table says so. Evals use --chunks chunks of 512
tokens (plan's default 16); their rate is scaled to the 21B by active weights per token (the README's method).
The calibration model assembled is a layer run of plan's (blk.1's tensors swapped to Q3_K).

Run:  .venv/bin/python bench/plan_cost.py /work/bench-models/wide-ernie-2L --work /work/bench-models/plan-cost
Writes bench/plan_cost.json and bench/plan_cost.md. Stages already in --state (default WORK/plan_cost.results.json)
are not run again. With --predict-only (and the arguments the stages were measured with) it re-makes the predictions
from the stages bench/plan_cost.json recorded, running only those missing there (kld_rows): for a change of plan's
defaults, which changes what plan does, not what a stage costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgemoe_cli.plan import DEFAULT_TYPES  # noqa: E402

BLK1_SAMPLE = (
    "blk.1.ffn_gate_exps.weight",
    "blk.1.ffn_down_exps.weight",
    "blk.1.attn_q.weight",
    "blk.1.attn_k.weight",
    "blk.1.attn_v.weight",
    "blk.1.attn_output.weight",
    "blk.1.ffn_gate_shexp.weight",
    "blk.1.ffn_up_shexp.weight",
    "blk.1.ffn_down_shexp.weight",
)
O6_PP512 = 38.51  # tokens/s, Radxa Orion O6, Q4_0 (Arm Learning Path; quoted, not measured here)
O6_THREADS = 8  # the quoted pp512's threads: the O6's 8 Cortex-A720 (its 4 A520 left out)
BOX_THREADS = 2
N_TYPES, N_ASSEMBLED, N_EVALS = 7, 42, 44  # README "quantize and plan": 14 roles + 28 layers; + floor + reference
PLAN_CHUNKS = 16  # plan's default --chunks


def _paths(work: Path) -> dict[str, Path]:
    return {
        "bf16": work / "wide-bf16.gguf",
        "imatrix": work / "wide-bf16.imatrix.gguf",
        "calibration": work / "wide-calibration.gguf",  # a layer run: blk.1 lowered to Q3_K
        "calibration_role": work / "wide-calibration-role.gguf",  # a role run: attn_q lowered, the rest bf16
        "calibration_role_q8": work / "wide-calibration-role-q8.gguf",  # the same run against a Q8_0 reference
    }


def _quantized(work: Path, type_: str) -> Path:
    return work / f"wide-sample-{type_}.gguf"


def _elements(path: Path, names) -> int:
    from edgemoe_cli.recipe import read_tensors

    tensors, _ = read_tensors(path)
    return sum(t.n_elements for t in tensors if t.name in set(names))


def _sample(bf16: Path, type_: str, sample) -> tuple[list[str], list]:
    """The sample's tensors (None: all) whose rows fit the type's block (plan's own filter), and the quantizable
    rest."""
    from edgemoe_cli.plan import _block
    from edgemoe_cli.recipe import quantizable, read_tensors

    tensors, _ = read_tensors(bf16)
    targets = [t for t in tensors if quantizable(t)]
    fits = [t.name for t in targets if (sample is None or t.name in sample) and t.shape[0] % _block(type_) == 0]
    rest = [t for t in targets if t.name not in fits]
    return fits, rest


def _sampled_weights(path: Path, names, fraction: float) -> int:
    """Weights qerror quantizes per type for the tensors `names` of a GGUF at `fraction` (its row rule)."""
    from edgemoe_cli.qerror import rows_per_stratum
    from edgemoe_cli.recipe import read_tensors

    total = 0
    for t in read_tensors(path)[0]:
        if t.name in set(names):
            strata = t.shape[2] if len(t.shape) > 2 else 1
            total += rows_per_stratum(t.shape[1], strata, fraction) * strata * t.shape[0]
    return total


def sampled_weights_21b(fraction: float) -> int:
    """The same for ERNIE-4.5-21B-A3B's quantizable tensors (routed experts: 64 strata)."""
    from edgemoe_cli.ernie21b import ernie_tensors
    from edgemoe_cli.qerror import rows_per_stratum

    total = 0
    for name, n, row in ernie_tensors():
        if not name.endswith(".weight") or "_norm." in name or "ffn_gate_inp" in name:
            continue
        strata = 64 if "_exps." in name else 1
        total += rows_per_stratum(n // row // strata, strata, fraction) * strata * row
    return total


def stage(name: str, args) -> dict:
    """One stage, run in this (child) process; returns what it measured. NAME@N: the stage on N threads;
    NAME~K: its K-th repeat (the shared box's other work disturbs single runs; predict_board takes the fastest)."""
    work, threads = Path(args.work), args.threads
    name = name.split("~")[0]
    if "@" in name:
        name, n = name.split("@")
        threads = int(n)
    p = _paths(work)
    t0 = time.perf_counter()
    if name == "pp512":
        # llama.cpp's own prompt-processing figure, for the model at Q4_0: the figure the Orion O6's is quoted in
        import subprocess as sp

        from edgemoe_cli.llamacpp import find_tool
        from edgemoe_cli.quantize import quantize

        q4 = work / "wide-q4_0.gguf"
        if not q4.is_file():
            quantize(p["bf16"], "stock:Q4_0", out=q4, threads=threads, manifest=False)
        cmd = [str(find_tool("llama-bench")), "-m", str(q4), "-p", "512", "-n", "0", "-r", "3", "-t", str(threads)]
        out = sp.run([*cmd, "-o", "json"], check=True, capture_output=True, text=True).stdout
        row = json.loads(out)[0]
        return {"tokens_per_second": row["avg_ts"], "stddev": row["stddev_ts"], "threads": threads, "cmd": cmd}
    if name == "convert":
        from edgemoe_cli.convert import convert

        convert(args.checkpoint, p["bf16"], "bf16")
        return {"seconds": time.perf_counter() - t0, "bytes": p["bf16"].stat().st_size}
    if name == "imatrix":
        from edgemoe_cli.imatrix import compute_imatrix

        compute_imatrix(p["bf16"], args.text, p["imatrix"], ctx=512, threads=threads, chunks=args.imatrix_chunks)
        return {"seconds": time.perf_counter() - t0, "chunks": args.imatrix_chunks}
    if name.startswith("quantize/"):
        from edgemoe_cli.imatrix import read_imatrix
        from edgemoe_cli.plan import _uniform, tensor_errors
        from edgemoe_cli.quantize import quantize

        type_ = name.split("/", 1)[1]
        fits, rest = _sample(p["bf16"], type_, args.sample)
        out = _quantized(work, type_)
        quantize(
            p["bf16"], _uniform(type_, fits, keep=rest), out=out, imatrix=p["imatrix"], threads=threads, manifest=False
        )
        t1 = time.perf_counter()
        tensor_errors(p["bf16"], out, read_imatrix(p["imatrix"]), fits)
        t2 = time.perf_counter()
        if type_ not in ("q3_k", "q8_0"):  # plan keeps only these two for assembling
            out.unlink()
        return {"weights": _elements(p["bf16"], fits), "quantize_seconds": t1 - t0, "error_seconds": t2 - t1}
    if name in ("errors_sampled", "errors_energy"):
        import gguf

        from edgemoe_cli import qerror
        from edgemoe_cli.imatrix import read_imatrix

        fits, _ = _sample(p["bf16"], "q8_0", None)  # every quantizable tensor (all rows are multiples of 32 here)
        im = read_imatrix(p["imatrix"])
        import resource

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        if name == "errors_sampled":
            errors = qerror.sampled_errors(p["bf16"], im, fits, DEFAULT_TYPES, args.error_sample, threads=threads)
            scored = sum(len(v) for v in errors.values())
        else:
            from concurrent.futures import ThreadPoolExecutor

            tensors = {t.name: t for t in gguf.GGUFReader(p["bf16"]).tensors}
            with ThreadPoolExecutor(threads) as pool:
                for f in fits:
                    qerror.tensor_sample_errors(tensors[f], [], im, args.error_sample, pool=pool)
            scored = 0
        seconds = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "seconds": seconds,
            "cpu_seconds": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
            "weights": _elements(p["bf16"], fits),
            "sampled_weights": _sampled_weights(p["bf16"], fits, args.error_sample),
            "fraction": args.error_sample,
            "min_rows": qerror.MIN_ROWS,
            "tensor_types_scored": scored,
        }
    if name == "assemble":
        from edgemoe_cli.plan import assemble

        fits, _ = _sample(p["bf16"], "q3_k", None)
        fits = [f for f in fits if f.startswith("blk.1.")]
        readers: dict = {}
        runs = []
        for _ in range(2):  # the first also parses the files; plan's other 41 reuse the parsed readers
            t = time.perf_counter()
            n = assemble(p["bf16"], {f: _quantized(work, "q3_k") for f in fits}, p["calibration"], readers)
            runs.append({"bytes": n, "seconds": time.perf_counter() - t})
        role_run = [f for f in _sample(p["bf16"], "q3_k", None)[0] if f.endswith(".attn_q.weight")]
        assemble(p["bf16"], {f: _quantized(work, "q3_k") for f in role_run}, p["calibration_role"], readers)
        return {"runs": runs, "file_bytes": p["calibration"].stat().st_size}
    if name == "eval_base":
        from edgemoe_cli.evaluate import _cache_key, base_logprobs
        from edgemoe_cli.store import home

        # the reference's log-probs are cached by content: an earlier run of this script left them; time the pass
        cached = home() / "cache" / "eval" / f"{_cache_key(p['bf16'], Path(args.text), 512, args.chunks)}.npy"
        cached.unlink(missing_ok=True)
        cached.with_suffix(".top1.npy").unlink(missing_ok=True)
        t0 = time.perf_counter()
        _, chunks = base_logprobs(p["bf16"], args.text, 512, threads, args.chunks)
        return {"seconds": time.perf_counter() - t0, "tokens": len(chunks) * 512}
    if name == "kld_rows":
        return kld_rows_seconds()
    if name == "eval_q8":
        # the board's path (--reference q8_0: a 32 GB board has no room for the bf16 21B, 43.7 GB): the role run
        # (attn_q at Q3_K, the rest Q8_0) against the whole model at Q8_0, as plan assembles and evaluates them
        from edgemoe_cli.evaluate import base_logprobs, evaluate
        from edgemoe_cli.plan import assemble

        q8, q3 = _quantized(work, "q8_0"), _quantized(work, "q3_k")
        role_run = [f for f in _sample(p["bf16"], "q3_k", None)[0] if f.endswith(".attn_q.weight")]
        assemble(q8, {f: q3 for f in role_run}, p["calibration_role_q8"])
        t0 = time.perf_counter()
        _, chunks = base_logprobs(q8, args.text, 512, threads, args.chunks, spread=True, repack=False)
        base_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = evaluate(
            p["calibration_role_q8"],
            q8,
            args.text,
            ctx=512,
            threads=threads,
            max_chunks=args.chunks,
            spread=True,
            repack=False,
        )
        return {
            "seconds": time.perf_counter() - t0,
            "tokens": res.chunks * 512,
            "kld_mean": res.kld_mean,
            "reference_seconds": base_s,  # 0 when an earlier run cached its log-probs
            "reference_tokens": len(chunks) * 512,
        }
    if name in ("eval", "eval_layer"):
        from edgemoe_cli.evaluate import evaluate

        model = p["calibration_role"] if name == "eval" else p["calibration"]
        res = evaluate(model, p["bf16"], args.text, ctx=512, threads=threads, max_chunks=args.chunks)
        return {"seconds": time.perf_counter() - t0, "tokens": res.chunks * 512, "kld_mean": res.kld_mean}
    raise SystemExit(f"unknown stage {name}")


# first scored positions of a 512-token chunk whose numpy work kld_rows times: the second half (`edgemoe eval`,
# plan before issue 14's lever) and from 64 (plan's calibration evals scored from ctx // 8)
KLD_ROWS_FROM = (256, 64)
# stages --predict-only runs when bench/plan_cost.json lacks them: seconds each, nothing of the model's
# the two role runs' evals and llama-bench's pp512 alternate, three times each: this VM's speed drifts by 20-30%
# within minutes, and the high bound's eval rate is a ratio of this box's eval rate to its pp512 (the fastest run of
# each is taken, _best and _best_pp512)
PREDICT_ONLY_STAGES = (
    "kld_rows",
    *(f"{name}{rep}" for rep in ("", "~2", "~3") for name in ("pp512", "eval", "eval_q8")),
)


def kld_rows_seconds(repeats: int = 3) -> dict:
    """Seconds of evaluate's numpy work for one 512-token chunk at the 21B's vocabulary, per first scored position:
    the log-softmax of the model's float32 logits, the base's float16 log-probs read back, KLD, NLL and top-1, in
    evaluate's blocks of rows (evaluate._forward and evaluate.evaluate do this per chunk). The wide model's vocabulary
    is 8192, so the eval stage above leaves this term at 21B out; here it is timed on random logits, fastest of
    `repeats`."""
    import numpy as np

    from edgemoe_cli.ernie21b import ERNIE_21B
    from edgemoe_cli.evaluate import _ROWS, _log_softmax, scored_rows

    vocab = ERNIE_21B.vocab
    rng = np.random.default_rng(0)
    out = {"vocab": vocab, "seconds": {}}
    for first in KLD_ROWS_FROM:
        rows = scored_rows(512, first)
        logits = rng.standard_normal((rows, vocab), dtype=np.float32)
        base = _log_softmax(logits + 0.01 * rng.standard_normal((rows, vocab), dtype=np.float32)).astype(np.float16)
        following = rng.integers(0, vocab, rows)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for r in range(0, rows, _ROWS):
                lp = _log_softmax(logits[r : r + _ROWS])
                lb = np.asarray(base[r : r + _ROWS], dtype=np.float32)
                float((np.exp(lb) * (lb - lp)).sum(axis=1).mean())
                idx = np.arange(len(lp))
                nxt = following[r : r + _ROWS]
                float(lp[idx, nxt].sum() + lb[idx, nxt].sum())
                lp.argmax(axis=1)
            best = min(best, time.perf_counter() - t0)
        out["seconds"][str(first)] = best
    return out


def run_stage(name: str, args, results: dict, save) -> dict:
    """The stage in a child process: its result plus its wall time and peak RSS (self and waited-for children)."""
    if name in results:
        return results[name]
    cmd = [
        sys.executable,
        __file__,
        args.checkpoint,
        "--work",
        args.work,
        "--stage",
        name,
        "--threads",
        str(args.threads),
        "--chunks",
        str(args.chunks),
        "--imatrix-chunks",
        str(args.imatrix_chunks),
        "--text",
        str(args.text),
        "--sample",
        args.sample_arg,
        "--error-sample",
        str(args.error_sample),
    ]
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed ({proc.returncode})")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res["wall_seconds"] = time.perf_counter() - t0
    res["peak_rss_bytes"] = usage.ru_maxrss * 1024
    res["load_before"] = load_before
    results[name] = res
    save()
    print(f"{name}: {json.dumps(res)}", file=sys.stderr, flush=True)
    return res


def head_weights(tensors: list[tuple[str, int]]) -> int:
    """The output head's weights: output.weight, else the tied token embedding."""
    named = dict(tensors)
    return named.get("output.weight", named.get("token_embd.weight", 0))


def active_weights(tensors: list[tuple[str, int]], n_used: int = 6, n_expert: int = 64) -> float:
    """Weights one token multiplies: routed experts count top-k/n; the tied embedding once (as the output head)."""
    return sum(n * n_used / n_expert if "_exps." in name else n for name, n in tensors if not name.endswith("bias"))


def predict(results: dict, args) -> dict:
    from edgemoe_cli.ernie21b import ernie_tensors, model_bytes, n_params
    from edgemoe_cli.recipe import read_tensors, tensor_bytes

    weights_21b = n_params()
    per_type = {}
    for t in DEFAULT_TYPES:
        r = results[f"quantize/{t}"]
        per_type[t] = {
            "r_quant": r["weights"] / r["quantize_seconds"],
            "r_error": r["weights"] / r["error_seconds"],
            "peak_rss_bytes": r["peak_rss_bytes"],
        }
    quant_s = sum(weights_21b / v["r_quant"] for v in per_type.values())
    error_s = sum(weights_21b / v["r_error"] for v in per_type.values())
    # plan now: whole-model quantizations only to Q3_K and Q8_0 (the calibration models' parts), errors sampled
    kept_s = sum(weights_21b / per_type[t]["r_quant"] for t in ("q3_k", "q8_0"))
    es, ee = _best(results, "errors_sampled"), results["errors_energy"]
    r_energy = ee["weights"] / ee["seconds"]  # source weights read and energy-summed per second
    r_scored = es["sampled_weights"] / max(es["seconds"] - ee["seconds"], 1e-9)  # sampled weights x 7 types / s
    sampled_21b = sampled_weights_21b(es["fraction"])
    sampled_s = sampled_21b / r_scored + weights_21b / r_energy
    steady = results["assemble"]["runs"][-1]
    r_copy = steady["bytes"] / steady["seconds"]
    ref_bytes = {"source (bf16)": 2 * weights_21b, "q8_0": model_bytes("Q8_0")}
    ev = _best(results, "eval")
    r_pp = ev["tokens"] / ev["seconds"]
    tensors, _ = read_tensors(_paths(Path(args.work))["bf16"])
    wide = [(t.name, t.n_elements) for t in tensors]
    big = [(n, e) for n, e, _ in ernie_tensors()]
    act_wide, act_21b = active_weights(wide), active_weights(big)
    head_wide, head_21b = head_weights(wide), head_weights(big)
    # an eval asks llama.cpp for the logits of the scored positions only (evaluate._chunk_logits): the head's
    # matmul runs for those, the rest of the model for every position
    from edgemoe_cli import plan as plan_mod

    ctx = getattr(plan_mod, "DEFAULT_CALIBRATION_CTX", 512)
    score_from = plan_mod.calibration_score_from(ctx)
    scored_share = (ctx - 1 - score_from) / ctx
    act_wide_eval = act_wide - head_wide * (1 - scored_share)
    act_21b_eval = act_21b - head_21b * (1 - scored_share)
    r_pp_21b = r_pp * act_wide_eval / act_21b_eval
    # llama-bench's pp512 runs the head for one position of 512: the O6's rate for plan's evals is its pp512 less
    # the head's matmul for the scored positions
    o6_eval_rate = O6_PP512 * (act_21b - head_21b) / act_21b_eval
    eval_tokens = N_EVALS * 512 * PLAN_CHUNKS
    assemble_s = {k: N_ASSEMBLED * b / r_copy for k, b in ref_bytes.items()}
    box_old = quant_s + error_s + assemble_s["source (bf16)"] + eval_tokens / r_pp_21b
    o6_old = quant_s + error_s + assemble_s["source (bf16)"] + eval_tokens / o6_eval_rate
    box = kept_s + sampled_s + assemble_s["source (bf16)"] + eval_tokens / r_pp_21b
    o6 = kept_s + sampled_s + assemble_s["source (bf16)"] + eval_tokens / o6_eval_rate
    # plan at today's defaults: the calibration evals of plan.measure_steps (roles, the layers --layer-stride
    # measures, the floor if measured, reference) of --chunks x 512 tokens, and the split calibration model: every
    # lowerable tensor written once in the reference's type and once in Q3_K (3.4375 bits a weight), then only
    # re-pointed; the whole-model Q8_0 quantization only for the floor
    from edgemoe_cli.plan import DEFAULT_CHUNKS, DEFAULT_LAYER_STRIDE, expert_factor_layers, measured_layers

    floor = plan_mod.DEFAULT_FLOOR
    layers_now = measured_layers(list(range(28)), DEFAULT_LAYER_STRIDE, first_routed=1)
    # plus one run per layer whose routed experts get a factor of their own (the last)
    expert_layers_now = expert_factor_layers(list(range(28)), list(range(1, 28)))
    # plus the activation runs (plan.ACTIVATION_RUNS: the tensors every token uses at Q8_0 and at Q6_K): each
    # copies those tensors out of the bf16 source, quantizes them alone (at the type's measured whole-model rate)
    # and writes them as one more version of their shards
    activation_runs = len(plan_mod.ACTIVATION_RUNS) if hasattr(plan_mod, "ACTIVATION_RUNS") else 0
    every_21b = every_token_weights_21b()

    def activation_cost(types) -> tuple[float, float]:  # (bytes copied and written, seconds quantizing)
        copied = sum(tensor_bytes(every_21b, "bf16") + tensor_bytes(every_21b, t) for t in types)
        return copied, sum(every_21b / per_type[t]["r_quant"] for t in types)

    act_bytes, act_quant_s = activation_cost(plan_mod.ACTIVATION_RUNS)
    evals_now = N_EVALS - 28 + len(layers_now) + len(expert_layers_now) + activation_runs - (0 if floor else 1)
    # the calibration type (Q3_K) quantizes the probed tensors only (plan.measure_steps' probe: every lowerable
    # tensor but the routed experts of the layers not measured), copied out of the bf16 source first
    probe_21b = probe_weights_21b(layers_now)
    quant_q3 = probe_21b / per_type["q3_k"]["r_quant"] + 2 * probe_21b / r_copy
    quant_q8 = weights_21b / per_type["q8_0"]["r_quant"]
    quant = {"quantize q3_k": quant_q3, "quantize q8_0": quant_q8}
    kept_now = quant_q3 + (quant_q8 if floor else 0.0)
    eval_tokens_now = evals_now * ctx * DEFAULT_CHUNKS
    # the numpy work of the positions scored beyond the second half, per chunk at the 21B's vocabulary (kld_rows)
    extra_chunk = extra_scoring_seconds(results, score_from)
    extra_box = evals_now * DEFAULT_CHUNKS * extra_chunk
    shard_bytes = ref_bytes["source (bf16)"] + tensor_bytes(probe_21b, "q3_k")
    shards_s = (shard_bytes + act_bytes) / r_copy
    box_now = kept_now + act_quant_s + sampled_s + shards_s + eval_tokens_now / r_pp_21b + extra_box
    o6_now = kept_now + act_quant_s + sampled_s + shards_s + eval_tokens_now / o6_eval_rate + extra_box
    board = predict_board(
        results,
        act_wide - head_wide,
        act_21b - head_21b,
        r_pp_21b,
        quant,
        sampled_s,
        shards_s,
        eval_tokens_now,
        extra_box,
        floor,
        act_quant_s,
        o6_eval_rate,
    )
    # the board's path, --reference q8_0 (a 32 GB board cannot hold the bf16 21B): both whole-model quantizations
    # (Q3_K, and Q8_0 as the reference), shards in Q8_0 and Q3_K, the Q6_K activation run only (the Q8_0 one would be
    # the reference itself), no floor; every eval at the rate measured for a Q8_0 role run (stage eval_q8)
    q8_path = None
    if "eval_q8" in results:
        ev8 = _best(results, "eval_q8")
        r_pp_q8_21b = ev8["tokens"] / ev8["seconds"] * act_wide_eval / act_21b_eval
        act_bytes_q8, act_quant_q8 = activation_cost(plan_mod.ACTIVATION_RUNS[1:])
        shards_q8 = (tensor_bytes(weights_21b, "q8_0") + tensor_bytes(probe_21b, "q3_k") + act_bytes_q8) / r_copy
        evals_q8 = evals_now - (1 if floor else 0) - (len(plan_mod.ACTIVATION_RUNS) - 1)
        tokens_q8 = evals_q8 * ctx * DEFAULT_CHUNKS
        extra_q8 = evals_q8 * DEFAULT_CHUNKS * extra_chunk
        q8_board = predict_board(
            results,
            act_wide - head_wide,
            act_21b - head_21b,
            r_pp_q8_21b,
            quant,
            sampled_s,
            shards_q8,
            tokens_q8,
            extra_q8,
            True,
            act_quant_q8,
            o6_eval_rate,
        )
        q8_path = {
            "board": q8_board,
            "evals": evals_q8,
            "eval_tokens": tokens_q8,
            "r_pp_wide": ev8["tokens"] / ev8["seconds"],
            "r_pp_21b_box": r_pp_q8_21b,
            "total_seconds_box": sum(q8_board["box"].values()),
        }
    return {
        "board": board,
        "q8_path": q8_path,
        "every_token_weights_21b": every_21b,
        "probe_weights_21b": probe_21b,
        "activation_quantize_seconds_21b": act_quant_s,
        "defaults_now": {
            "chunks": DEFAULT_CHUNKS,
            "ctx": ctx,
            "layer_stride": DEFAULT_LAYER_STRIDE,
            "layers": layers_now,
            "expert_layers": expert_layers_now,
            "activation_runs": activation_runs,
            "score_from": score_from,
            "floor": floor,
        },
        "kept_quantize_seconds_now": kept_now,
        "evals_now": evals_now,
        "eval_tokens_now": eval_tokens_now,
        "extra_scoring_seconds_per_chunk": extra_chunk,
        "eval_seconds_now_box": eval_tokens_now / r_pp_21b + extra_box,
        "eval_seconds_now_o6": eval_tokens_now / o6_eval_rate + extra_box,
        "o6_eval_rate": o6_eval_rate,
        "head_21b": head_21b,
        "scored_share": scored_share,
        "shard_bytes_21b": shard_bytes,
        "shard_seconds_21b": shards_s,
        "total_seconds_now_box": box_now,
        "total_seconds_now_o6_evals": o6_now,
        "weights_21b": weights_21b,
        "per_type": per_type,
        "quantize_seconds_21b": quant_s,
        "error_seconds_21b": error_s,
        "r_copy": r_copy,
        "reference_bytes_21b": ref_bytes,
        "assemble_seconds_21b": assemble_s,
        "r_pp_wide": r_pp,
        "active_wide": act_wide,
        "active_21b": act_21b,
        "r_pp_21b_box": r_pp_21b,
        "eval_tokens_21b": eval_tokens,
        "eval_seconds_21b_box": eval_tokens / r_pp_21b,
        "eval_seconds_21b_o6": eval_tokens / o6_eval_rate,
        "total_seconds_box": box,
        "total_seconds_o6_evals": o6,
        "old_total_seconds_box": box_old,
        "old_total_seconds_o6_evals": o6_old,
        "kept_quantize_seconds_21b": kept_s,
        "r_energy": r_energy,
        "r_scored": r_scored,
        "sampled_weights_21b": sampled_21b,
        "sampled_error_seconds_21b": sampled_s,
        "error_fraction": es["fraction"],
    }


def extra_scoring_seconds(results: dict, score_from: int, ctx: int = 512) -> float:
    """Seconds of numpy work per chunk at the 21B's vocabulary that scoring from `score_from` adds to the second
    half's (the eval rate above was measured with the second half scored, at the wide model's small vocabulary):
    linear in the rows scored, from kld_rows' two timings; 0 when kld_rows was not run."""
    from edgemoe_cli.evaluate import scored_rows

    kr = results.get("kld_rows")
    if not kr:
        return 0.0
    (a, ta), (b, tb) = ((int(k), v) for k, v in kr["seconds"].items())
    per_row = (tb - ta) / (scored_rows(ctx, b) - scored_rows(ctx, a))
    return per_row * (scored_rows(ctx, score_from) - scored_rows(ctx, ctx // 2))


def _best(results: dict, name: str) -> dict:
    """A stage's run with the least wall time among its repeats (NAME, NAME~2, ...): the one least disturbed by
    other work on the shared box."""
    runs = [r for k, r in results.items() if k == name or k.startswith(name + "~")]
    return min(runs, key=lambda r: r.get("quantize_seconds", r.get("seconds", 0.0)))


def _best_pp512(results: dict) -> dict:
    """llama-bench's pp512 run with the most tokens/s among its repeats."""
    runs = [r for k, r in results.items() if k == "pp512" or k.startswith("pp512~")]
    return max(runs, key=lambda r: r["tokens_per_second"])


def serial_share(t1: float, t2: float) -> float:
    """Amdahl's serial share s of a stage from its time on 1 and on 2 threads: t2 = t1 (s + (1 - s) / 2)."""
    return min(max(2 * t2 / t1 - 1, 0.0), 1.0)


def on_threads(t2: float, s: float, per_thread: float, threads: int) -> float:
    """A stage measured at t2 seconds on this box's 2 threads, with serial share s, on `threads` threads each
    `per_thread` times as fast as one of this box's."""
    t1 = t2 / (s + (1 - s) / BOX_THREADS)
    return t1 / per_thread * (s + (1 - s) / threads)


def lowerable_21b() -> list[tuple[str, int]]:
    """(name, weights) of the 21B's tensors plan can lower to its calibration type: quantizable, rows a multiple of
    256 (plan.measure_steps' `lowerable`)."""
    from edgemoe_cli.ernie21b import ernie_tensors
    from edgemoe_cli.recipe import TensorInfo, quantizable

    return [
        (name, n)
        for name, n, row in ernie_tensors()
        if n != row and row % 256 == 0 and quantizable(TensorInfo(name, (row, n // row), "bf16", n))
    ]


def probe_weights_21b(measured: list[int]) -> int:
    """The 21B's weights plan quantizes to its calibration type (plan.measure_steps' probe): every lowerable tensor
    but the routed experts of the layers whose depth factor is not measured."""
    from edgemoe_cli.plan import layer

    return sum(n for name, n in lowerable_21b() if "_exps" not in name or int(layer(name)) in measured)


def every_token_weights_21b() -> int:
    """The 21B's weights in the tensors every token uses that plan's activation runs quantize (the lowerable ones
    but routed experts): attention, shared experts, the dense layer, the embedding."""
    return sum(n for name, n in lowerable_21b() if "_exps" not in name)


def predict_board(
    results,
    act_wide,
    act_21b,
    r_pp_21b,
    quant: dict,
    sampled_s,
    shards_s,
    eval_tokens,
    extra_scoring: float = 0.0,
    floor: bool = True,
    act_quant_s: float = 0.0,
    o6_eval_rate: float = O6_PP512,
) -> dict:
    """plan on an Orion O6-class board (8 Cortex-A720 threads), each stage between two stated bounds:

    low: an A720 thread as fast as one of this box's (Zen 5) threads on plan's own code, the stage on 8 of them
      with the serial share measured here (1 vs 2 threads); the evals at the O6's quoted pp512 (Q4_0).
    high: per thread, the O6 as fast relative to this box as in llama.cpp's pp512 of the same model at Q4_0 (the
      O6's quoted, this box's measured on the real-width model and scaled by active weights): every CPU stage at
      that per-thread ratio on 8 threads with its serial share, the evals at this box's measured eval rate x the
      O6:box pp512 ratio.
    The split calibration model (a sequential write) at this box's rate in both. `extra_scoring`: this box's seconds
    of numpy work for the positions scored beyond the second half (one thread, so per-thread speed applies).
    Without the floor the whole-model Q8_0 quantization is no stage: its seconds go to "floor quantize", outside
    the totals (`quant`: this box's seconds of the Q3_K and the Q8_0 quantizations; eval_tokens without the floor's)."""
    pp = _best_pp512(results)
    # scaled by the weights pp512 multiplies for every position (all but the head, which it runs for one)
    box_pp512_21b = pp["tokens_per_second"] * act_wide / act_21b
    ratio = O6_PP512 / box_pp512_21b  # the O6's 8 threads : this box's 2, same model, type and figure
    per_thread_high = ratio * BOX_THREADS / O6_THREADS  # assumes pp512 scales with threads on both
    q3, q3_1 = _best(results, "quantize/q3_k"), _best(results, "quantize/q3_k@1")
    q8, q8_1 = _best(results, "quantize/q8_0"), _best(results, "quantize/q8_0@1")
    es, es_1 = _best(results, "errors_sampled"), _best(results, "errors_sampled@1")
    shares = {
        "quantize q3_k": serial_share(q3_1["quantize_seconds"], q3["quantize_seconds"]),
        "quantize q8_0": serial_share(q8_1["quantize_seconds"], q8["quantize_seconds"]),
        "errors": serial_share(es_1["seconds"], es["seconds"]),
    }
    # the 21B's seconds per CPU stage on this box
    stages_box = {**quant, "errors": sampled_s}
    if act_quant_s:  # the activation runs' tensors, quantized alone by llama.cpp: Q3_K's serial share
        stages_box["quantize activation"] = act_quant_s
        shares["quantize activation"] = shares["quantize q3_k"]
    out = {"low": {}, "high": {}}
    for name, t in stages_box.items():
        out["low"][name] = on_threads(t, shares[name], 1.0, O6_THREADS)
        out["high"][name] = on_threads(t, shares[name], per_thread_high, O6_THREADS)
    for bound in ("low", "high"):
        out[bound]["calibration model"] = shards_s
    out["low"]["evals"] = eval_tokens / o6_eval_rate + extra_scoring
    out["high"]["evals"] = eval_tokens / (r_pp_21b * ratio) + extra_scoring / per_thread_high
    box = {**stages_box, "calibration model": shards_s, "evals": eval_tokens / r_pp_21b + extra_scoring}
    floor_quantize = {}
    for bound, stages in (("box", box), ("low", out["low"]), ("high", out["high"])):
        if not floor:
            floor_quantize[bound] = stages.pop("quantize q8_0")
    for bound in ("low", "high"):
        out[bound]["total"] = sum(out[bound].values())
    return {
        **out,
        "box": box,
        "floor_quantize": floor_quantize,
        "serial_share": shares,
        "box_pp512_wide": pp["tokens_per_second"],
        "box_pp512_21b": box_pp512_21b,
        "pp512_ratio": ratio,
        "per_thread_high": per_thread_high,
        "o6_eval_rate": o6_eval_rate,
        "eval_rate_high": r_pp_21b * ratio,
    }


def _h(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def error_repeats(results: dict) -> str:
    """How the error stage's runs went: the box is shared (tests run beside the lock), so it was run more than once
    on 2 and on 1 thread and the tables use the fastest of each."""

    def runs(name):
        rs = [r for k, r in results.items() if k == name or k.startswith(name + "~")]
        return ", ".join(f"{r['seconds']:.1f} s (CPU {r['cpu_seconds']:.1f} s, load {r['load_before']})" for r in rs)

    return (
        "The error stage ran several times, as other work shares this box's cores outside the benchmark lock: on "
        f"2 threads {runs('errors_sampled')}; on 1 thread {runs('errors_sampled@1')}. The tables use the fastest "
        "run of each."
    )


# the calibration settings of the by-setting table: (--chunks, --layer-stride, first scored position of a chunk,
# --floor); (8, 4, 256, True) is plan's default before the floor became opt-in
SETTINGS = (
    (8, 4, 256, True),
    (8, 4, 256, False),
    (4, 4, 256, False),
    (4, 4, 64, False),
    (3, 4, 64, False),
    (2, 4, 64, False),
    (4, 8, 256, False),
    (8, 8, 256, False),
    (16, 1, 256, True),
)


def settings_rows(p: dict, results: dict) -> list[str]:
    """The 21B's totals for other calibration settings: the evals' tokens at each bound's rate plus the numpy work
    of the positions they score beyond the second half (extra_scoring_seconds); the rest is fixed but for the
    whole-model Q8_0 quantization, which only --floor needs."""
    from edgemoe_cli.plan import expert_factor_layers, measured_layers

    b, d = p["board"], p["defaults_now"]
    expert_runs = len(expert_factor_layers(list(range(28)), list(range(1, 28))))
    expert_runs += d.get("activation_runs", 0)  # the activation runs: their evals, here (their copies: the shards)
    rates = {
        "box": (p["r_pp_21b_box"], 1.0),
        "low": (b["o6_eval_rate"], 1.0),
        "high": (b["eval_rate_high"], b["per_thread_high"]),
    }
    rows = []
    for chunks, stride, first, floor in SETTINGS:
        evals = 14 + len(measured_layers(list(range(28)), stride, first_routed=1)) + expert_runs + 1 + floor
        tokens = evals * chunks * d["ctx"]
        extra = evals * chunks * extra_scoring_seconds(results, first, d["ctx"])
        cells = []
        for bound, (rate, per_thread) in rates.items():
            fixed = sum(v for k, v in b[bound].items() if k not in ("evals", "total", "quantize q8_0"))
            q8 = b[bound].get("quantize q8_0", b["floor_quantize"].get(bound, 0.0))
            cells.append(_h(fixed + (q8 if floor else 0.0) + tokens / rate + extra / per_thread))
        now = (d["chunks"], d["layer_stride"], d.get("score_from", d["ctx"] // 2), d.get("floor", True))
        scored = "second half" if first == d["ctx"] // 2 else f"from {first}"
        rows.append(
            f"| {chunks} x {stride}{' (default)' if (chunks, stride, first, floor) == now else ''} | {scored} | "
            f"{'yes' if floor else 'no'} | {evals} x {chunks * d['ctx']} | " + " | ".join(cells) + " |"
        )
    return rows


def scoring_note(p: dict) -> str:
    """What the evals' row adds for positions scored beyond the second half (nothing when plan scores the second
    half)."""
    d, extra = p["defaults_now"], p.get("extra_scoring_seconds_per_chunk", 0.0)
    if d.get("score_from", d["ctx"] // 2) == d["ctx"] // 2 or not extra:
        return ""
    return (
        f"; each adds, per chunk scored from {d['score_from']}, {extra:.3f} s of numpy work over the second half's "
        "(kld_rows, at the 21B's vocabulary; one thread: this box's speed low, / the per-thread ratio high)"
    )


def floor_note(p: dict) -> str:
    """What the floor costs at the defaults, measured (--floor) or not."""
    b, d = p["board"], p["defaults_now"]
    one_eval = {bound: b[bound]["evals"] / p["evals_now"] for bound in ("box", "low", "high")}
    if d.get("floor", True):
        cost = {bound: b[bound]["quantize q8_0"] + one_eval[bound] for bound in one_eval}
        return (
            "At `--reference source` (the default) the whole-model Q8_0 quantization serves only the floor eval; "
            f"the two cost {_h(cost['box'])} here, {_h(cost['low'])} - {_h(cost['high'])} on the O6, and make "
            "plan's predicted KLD absolute but change no choice (the floor is the same for every mix)."
        )
    cost = {bound: b["floor_quantize"][bound] + one_eval[bound] for bound in one_eval}
    return (
        "The floor is opt-in (`--floor`): at `--reference source` it needs a whole-model Q8_0 quantization (23.2 GB "
        f"more on disk at 21B) and one more eval, {_h(cost['box'])} here, {_h(cost['low'])} - {_h(cost['high'])} on "
        "the O6, not in the totals above. It changes no choice (the same constant is added to every mix's "
        "prediction); without it plan's predicted KLD leaves out the activation quantization's share (on the "
        "fixtures 0.00017-0.00018 of plan's 0.00089-0.00094 predicted at Q4_K_M's size, bench/quality.md)."
    )


def _bounds(p: dict, *stages: str) -> str:
    b = p["board"]
    return " - ".join(_h(sum(b[bound].get(k, 0.0) for k in stages)) for bound in ("low", "high"))


def board_md(p: dict, results: dict) -> list[str]:
    """The "On the board" section: each stage's O6-class seconds between the bounds of predict_board."""
    b = p["board"]
    sh = b["serial_share"]
    pp = _best_pp512(results)
    q3, q3_1 = _best(results, "quantize/q3_k"), _best(results, "quantize/q3_k@1")
    q8, q8_1 = _best(results, "quantize/q8_0"), _best(results, "quantize/q8_0@1")
    es, es_1 = _best(results, "errors_sampled"), _best(results, "errors_sampled@1")
    basis = {
        "quantize q3_k": f"{p['probe_weights_21b'] / 1e9:.2f} B weights at the whole-model rate and their bf16 "
        f"copy; 1 / 2 threads here: {q3_1['quantize_seconds']:.1f} / {q3['quantize_seconds']:.1f} s, "
        f"serial share {sh['quantize q3_k']:.2f}",
        "quantize q8_0": f"{q8_1['quantize_seconds']:.1f} / {q8['quantize_seconds']:.1f} s, serial share "
        f"{sh['quantize q8_0']:.2f} (reading and writing the file)",
        "errors": f"{es_1['seconds']:.1f} / {es['seconds']:.1f} s, serial share {sh['errors']:.2f}",
        "quantize activation": f"{p['every_token_weights_21b'] / 1e9:.2f} B weights per activation run at the "
        "type's whole-model rate; Q3_K's serial share",
        "calibration model": "a sequential write: this box's page-cache rate in both (the O6's NVMe not measured)",
        "evals": f"low: the quoted pp512 {O6_PP512} tokens/s less the head for the scored positions, "
        f"{b['o6_eval_rate']:.2f} tokens/s; high: this box's {p['r_pp_21b_box']:.2f} tokens/s x "
        f"{b['pp512_ratio']:.3f} = {b['eval_rate_high']:.2f} tokens/s" + scoring_note(p),
    }
    label = {
        "quantize q3_k": "Q3_K quantization of the probed tensors (copied out first)",
        "quantize q8_0": "whole-model quantization Q8_0",
        "errors": "error stage (sampled, 7 types)",
        "quantize activation": "the activation runs' tensors quantized alone",
        "calibration model": "split calibration model (with the activation runs' shards)",
        "evals": f"{p['evals_now']} evals x {p['defaults_now']['chunks'] * p['defaults_now']['ctx']} tokens",
    }
    rows = [
        f"| {label[k]} | {_h(b['box'][k])} | {_h(b['low'][k])} | {_h(b['high'][k])} | {basis[k]} |"
        for k in label
        if k in b["box"]
    ]
    return [
        "",
        "## On the board (Orion O6 class: 8 Cortex-A720 threads)",
        "",
        "No stage has been run on an O6. Each gets two bounds from what is measured here and what is published "
        "for the O6:",
        "",
        "- **low**: an A720 thread runs plan's CPU stages as fast as one of this box's (Zen 5, AVX-512) threads, "
        "and each stage runs on 8 of them with the serial share measured here (its time on 1 vs 2 threads, "
        "Amdahl); the evals run at the O6's quoted pp512 for ERNIE-4.5-21B-A3B Q4_0 "
        f"({O6_PP512} tokens/s, 8 threads, Arm Learning Path), i.e. as fast as Q4_0 prompt processing "
        "although plan evaluates bf16 (or Q8_0) calibration models, less the output head's matmul for the "
        f"positions an eval scores ({p['scored_share']:.0%} of them; pp512 runs it for one position; "
        f"{p['head_21b'] / 1e6:.0f} M weights against the {p['active_21b'] / 1e6:.0f} M a token multiplies): "
        f"{b['o6_eval_rate']:.2f} tokens/s. Optimistic on both counts.",
        f"- **high**: per thread, the O6 is as fast relative to this box as in llama.cpp's own pp512 of the same "
        f"model at Q4_0: the O6's quoted {O6_PP512} tokens/s on 8 threads against this box's "
        f"{b['box_pp512_wide']:.0f} tokens/s on 2 threads for the {results['pp512']['threads']}-thread "
        f"llama-bench of the real-width model at Q4_0 (`{' '.join(pp['cmd'][1:]).replace(str(Path.home()), '~')}`), "
        f"scaled by active weights to {b['box_pp512_21b']:.1f} tokens/s for the 21B: ratio "
        f"{b['pp512_ratio']:.3f}, per thread {b['per_thread_high']:.3f} (pp512 taken as linear in threads). "
        "Every CPU stage at that per-thread speed on 8 threads with its serial share; the evals at this box's "
        "measured eval rate x the ratio. This ratio is an int8-matmul one, where this box's AVX-512 VNNI leads "
        "an A720 most; plan's quantizer and error code are float code, where the gap is smaller: pessimistic "
        "for them.",
        "",
        "| stage | this box | O6 low | O6 high | basis |",
        "|---|---:|---:|---:|---|",
        *rows,
        f"| **total** | **{_h(p['total_seconds_now_box'])}** | **{_h(b['low']['total'])}** | "
        f"**{_h(b['high']['total'])}** | |",
        "",
        "The evals dominate on the board under both bounds, and they are set by the calibration setting; the rest "
        "is fixed. The totals by setting (bench/quality.md measures each setting's plan quality on the fixtures; "
        "the layer stride above 4 is not distinguishable there, as the fixtures have 4 layers):",
        "",
        "| --chunks x --layer-stride | positions scored | --floor | evals x tokens | this box | O6 low | O6 high |",
        "|---|---|---|---:|---:|---:|---:|",
        *settings_rows(p, results),
        "",
        "Which settings keep plan's quality is bench/quality.md's rotation table (issue 14's target, within 10% of "
        "plan before its cuts at Q4_K_M's size on three chunk draws per fixture): with the activation runs pricing "
        "the step from Q8_0 to a k-quant and the routed experts probed in the measured layers only, 4 chunks yes "
        "(worst 1.00x Thinking, 1.02x PT), 8 chunks 1.05x / 1.10x, 3 chunks (second half) 0.99x / 1.10x: at the "
        "line, not taken; the same 4 x 4 against a Q8_0 reference 1.07x / 1.05x; the other settings were measured "
        "before the activation runs (bench/quality.md at 01b06d2: 16 chunks yes; 3 chunks scored from 64 PT 15% "
        "over, 2 chunks 12%). "
        "The high bound cannot reach 30 minutes by any calibration setting: its stages outside the evals "
        f"alone take {_h(sum(v for k, v in b['high'].items() if k not in ('evals', 'total')))}.",
        "",
        floor_note(p),
        "",
        "Memory, not time, also decides the O6's settings: the bf16 21B (43.7 GB) as the calibration reference "
        "needs a 64 GB board; on 32 GB plan needs the model at Q8_0 (23.2 GB) as its reference, which "
        "`--reference auto` (the default) takes when the source does not fit, and which drops the floor eval.",
        "",
        *q8_path_md(p, results),
    ]


def q8_path_md(p: dict, results: dict) -> list[str]:
    """The board's own path, --reference q8_0: its stages on this box and between the O6 bounds."""
    q = p.get("q8_path")
    if not q:
        return []
    b, ev8 = q["board"], _best(results, "eval_q8")
    runs = {
        name: ", ".join(f"{r['seconds']:.1f}" for k, r in results.items() if k == name or k.startswith(name + "~"))
        for name in ("eval", "eval_q8")
    }
    label = {
        "quantize q3_k": "Q3_K quantization of the probed tensors (copied out first)",
        "quantize q8_0": "whole-model quantization Q8_0 (the reference)",
        "errors": "error stage (sampled, 7 types)",
        "quantize activation": "the Q6_K activation run's tensors quantized alone",
        "calibration model": "split calibration model (Q8_0 and Q3_K shards, the activation run's)",
        "evals": f"{q['evals']} evals x {p['defaults_now']['chunks'] * p['defaults_now']['ctx']} tokens",
    }
    rows = [
        f"| {label[k]} | {_h(b['box'][k])} | {_h(b['low'][k])} | {_h(b['high'][k])} |" for k in label if k in b["box"]
    ]
    return [
        "### The board's path: `--reference q8_0`",
        "",
        "A 32 GB O6 plans against the model at Q8_0. Its calibration models are Q8_0 with one role or layer at "
        "Q3_K, which on Arm go through the same repacked int8 (i8mm) matmuls as the Q4_0 model the O6's pp512 is "
        "quoted for (ggml repacks Q8_0 and Q4_0 alike), so there the low bound's eval rate is the quoted figure "
        "for the kind of model evaluated, not an optimistic stand-in for bf16. Its evals measured here: the role run "
        f"(attn_q at Q3_K, the rest Q8_0) against the Q8_0 model, {ev8['tokens']} tokens in {ev8['seconds']:.1f} s "
        f"= {q['r_pp_wide']:.0f} tokens/s on the real-width model (the bf16 role run: "
        f"{p['r_pp_wide']:.0f} tokens/s), {q['r_pp_21b_box']:.2f} tokens/s scaled to the 21B (stage `eval_q8`; "
        f"the fastest of runs alternating with the bf16 one's, seconds {runs['eval_q8']} against {runs['eval']}). One "
        "activation run fewer (the Q8_0 one is the reference itself), no floor; plan's quality on this path is "
        "bench/quality.md's `4 x 4 (Q8_0 reference)` rows.",
        "",
        "| stage | this box | O6 low | O6 high |",
        "|---|---:|---:|---:|",
        *rows,
        f"| **total** | **{_h(q['total_seconds_box'])}** | **{_h(b['low']['total'])}** | "
        f"**{_h(b['high']['total'])}** |",
        "",
    ]


def header_from_md(path: Path) -> dict:
    """The measuring run's command and load averages, from the report it wrote (reports before --predict-only kept
    them only there)."""
    import re

    m = re.search(
        r"Written by `bench/plan_cost.py` \(`([^`]+)`\); load average before/after: ([\d. ]+) / ([\d. ]+) \(",
        path.read_text(),
    )
    if not m:
        raise SystemExit(f"{path} does not say which command measured its stages; run the stages again")
    return {"command": m[1], "load": [m[2], m[3]]}


def write_md(
    results: dict, pred: dict, args, command: str, load: tuple, path: Path, predicted_by: str | None = None
) -> None:
    gb = 1e9
    r = results
    if args.sample is None:
        scope = (
            f"**Every stage measured whole**, as plan runs it on this model: each type quantizes and scores all "
            f"{r['quantize/q8_0']['weights'] / 1e6:.0f} M quantizable weights; assembly writes the whole model with "
            f"blk.1 swapped to Q3_K (one of plan's layer runs); evals of {args.chunks} x 512 tokens"
            + (
                " (plan's default before issue 14; what counts is the rate per token)"
                if args.chunks == PLAN_CHUNKS
                else ""
            )
            + ". What is not measured: the 21B itself."
        )
    else:
        scope = (
            f"**Measured on part of a stage only**: quantize and error passes ran on a sample, not the whole model: "
            f"{', '.join(args.sample)} ({r['quantize/q8_0']['weights'] / 1e6:.0f} M weights; the other tensors kept "
            f"in bf16). Assembly wrote the whole model once with blk.1 swapped; evals of {args.chunks} x 512 tokens."
        )
    lines = [
        "# What `edgemoe plan` costs at ERNIE-4.5-21B-A3B's widths (issue 14)",
        "",
        f"Written by `bench/plan_cost.py` (`{command}`); load average before/after: "
        f"{load[0]} / {load[1]} (2-core x86 box, nothing else running)."
        + (
            f" The predictions re-made from the stages it recorded (bench/plan_cost.json) by `{predicted_by}`, "
            "which runs only the stages missing there (kld_rows)."
            if predicted_by
            else ""
        )
        + " Model: `make_wide_ernie.py "
        f"--layers {args.layers_note} --router-skew 0.05 --vocab 8192` (real 21B tensor shapes, random weights), "
        f"converted to bf16 by edgemoe ({r['convert']['bytes'] / gb:.2f} GB). Each stage calls the function plan "
        "calls, in its own process; peak RSS is that process's and its llama.cpp children's.",
        "",
        scope,
        "",
        "## Per stage",
        "",
        "| stage | what the rate is | work measured | seconds | rate | peak RSS |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines.append(
        f"| convert (before plan) | checkpoint -> bf16 GGUF | {r['convert']['bytes'] / gb:.2f} GB | "
        f"{r['convert']['seconds']:.1f} | {r['convert']['bytes'] / r['convert']['seconds'] / 1e6:.0f} MB/s | "
        f"{r['convert']['peak_rss_bytes'] / gb:.2f} GB |"
    )
    lines.append(
        f"| imatrix (plan's input) | llama-imatrix, {args.imatrix_chunks} x 512 tokens | "
        f"{args.imatrix_chunks * 512} tokens | {r['imatrix']['seconds']:.1f} | "
        f"{args.imatrix_chunks * 512 / r['imatrix']['seconds']:.1f} tokens/s | "
        f"{r['imatrix']['peak_rss_bytes'] / gb:.2f} GB |"
    )
    for t in DEFAULT_TYPES:
        q = r[f"quantize/{t}"]
        lines.append(
            f"| quantize {t} | weights/s llama.cpp quantizes (imatrix, 2 threads, incl. load/write) | "
            f"{q['weights'] / 1e6:.0f} M weights | {q['quantize_seconds']:.1f} | "
            f"{q['weights'] / q['quantize_seconds'] / 1e6:.1f} M/s | {q['peak_rss_bytes'] / gb:.2f} GB |"
        )
        lines.append(
            f"| error pass {t} | weights/s plan.tensor_errors scores (dequantize + imatrix-weighted error) | "
            f"{q['weights'] / 1e6:.0f} M weights | {q['error_seconds']:.1f} | "
            f"{q['weights'] / q['error_seconds'] / 1e6:.1f} M/s | (same process) |"
        )
    es, ee = _best(r, "errors_sampled"), r["errors_energy"]
    lines.append(
        f"| **error stage now** (qerror, fraction {es['fraction']:g}, >= {es['min_rows']} rows a tensor) | model "
        f"weights/s covered, all 7 types ({es['sampled_weights'] / 1e6:.0f} M weights quantized per type) | "
        f"{es['weights'] / 1e6:.0f} M weights | {es['seconds']:.1f} | {es['weights'] / es['seconds'] / 1e6:.1f} M/s | "
        f"**{es['peak_rss_bytes'] / gb:.2f} GB** |"
    )
    lines.append(
        f"| of which the energy pass (every row read once, not quantized) | source weights/s | "
        f"{ee['weights'] / 1e6:.0f} M weights | {ee['seconds']:.1f} | {ee['weights'] / ee['seconds'] / 1e6:.1f} M/s | "
        f"{ee['peak_rss_bytes'] / gb:.2f} GB |"
    )
    for i, run in enumerate(r["assemble"]["runs"]):
        lines.append(
            f"| assemble, run {i + 1}{' (parses the files)' if i == 0 else ' (readers reused, as plan)'} | "
            f"tensor bytes/s plan.assemble writes (page cache) | {run['bytes'] / gb:.2f} GB | {run['seconds']:.1f} | "
            f"{run['bytes'] / run['seconds'] / 1e6:.0f} MB/s | {r['assemble']['peak_rss_bytes'] / gb:.2f} GB |"
        )
    for key, label in (
        ("eval_base", "reference pass (bf16; also caches its log-probs)"),
        ("eval", "role run (attn_q at Q3_K, rest bf16) vs reference"),
        ("eval_layer", "layer run (blk.1 at Q3_K) vs reference"),
    ):
        e = r[key]
        lines.append(
            f"| eval: {label} | tokens/s of this {args.layers_note}-layer model, incl. load | {e['tokens']} tokens | "
            f"{e['seconds']:.1f} | {e['tokens'] / e['seconds']:.1f} tokens/s | {e['peak_rss_bytes'] / gb:.2f} GB |"
        )
    p = pred
    evals = (
        f"| 44 evals x 8192 tokens | {_h(p['eval_seconds_21b_box'])} at {p['r_pp_21b_box']:.2f} tokens/s "
        f"(measured {p['r_pp_wide']:.1f} tokens/s (role run) x active weights {p['active_wide'] / 1e6:.0f} M / "
        f"{p['active_21b'] / 1e6:.0f} M) | {_h(p['eval_seconds_21b_o6'])} at pp512 {O6_PP512} tokens/s (quoted) |"
    )
    assemblies = [
        f"| 42 assemblies, reference bf16 ({p['reference_bytes_21b']['source (bf16)'] / gb:.1f} GB) at "
        f"{p['r_copy'] / 1e6:.0f} MB/s | {_h(p['assemble_seconds_21b']['source (bf16)'])} | (this box's rate) |",
        f"| (42 assemblies with --reference q8_0, {p['reference_bytes_21b']['q8_0'] / gb:.1f} GB) | "
        f"{_h(p['assemble_seconds_21b']['q8_0'])} | |",
    ]
    d = p["defaults_now"]
    lines += [
        "",
        f"## Predicted for ERNIE-4.5-21B-A3B (28 layers, {p['weights_21b'] / 1e9:.2f} B weights)",
        "",
        f"plan at today's defaults (`--error-sample {p['error_fraction']:g} --chunks {d['chunks']} --layer-stride "
        f"{d['layer_stride']}`, {d['ctx']} tokens a chunk): the sampled error stage and "
        + (
            "the Q3_K quantization of the probed tensors and the whole-model Q8_0 one"
            if d.get("floor", True)
            else f"the Q3_K quantization of the probed tensors ({p['probe_weights_21b'] / 1e9:.2f} B weights: every "
            "lowerable tensor but the routed experts of the layers not measured; no floor: no Q8_0 one)"
        )
        + " as below; the split calibration model written once (every matrix in bf16, the probed ones also in "
        f"Q3_K, {p['shard_bytes_21b'] / gb:.1f} GB) instead of 42 copies; {p['evals_now']} evals (14 roles, the "
        f"{len(d['layers'])} layers {d['layers']} the stride measures, "
        + "".join(f"layer {b}'s routed experts, " for b in d.get("expert_layers", []))
        + (
            f"{d['activation_runs']} activation runs (each quantizes the "
            f"{p['every_token_weights_21b'] / 1e9:.2f} B weights every token uses alone and writes them as shards), "
            if d.get("activation_runs")
            else ""
        )
        + ("floor, " if d.get("floor", True) else "")
        + f"reference) of {d['chunks']} x "
        f"{d['ctx']} tokens, "
        + (
            "each chunk's second half scored"
            if d.get("score_from", d["ctx"] // 2) == d["ctx"] // 2
            else f"each chunk scored from position {d['score_from']} on (`edgemoe eval` scores the second half)"
        )
        + ". Every rate on this box is this page's, measured at real widths, the eval rate "
        "extrapolated by active weights; the O6's bounds are those of the next section.",
        "",
        "| term | this box | Orion O6, low - high |",
        "|---|---:|---:|",
        (
            f"| Q3_K of the probed tensors, whole-model Q8_0 | {_h(p['kept_quantize_seconds_now'])} | "
            if d.get("floor", True)
            else f"| Q3_K quantization of the probed tensors | {_h(p['kept_quantize_seconds_now'])} | "
        )
        + f"{_bounds(p, 'quantize q3_k', 'quantize q8_0')} |",
        f"| error stage (sampled, 7 types) | {_h(p['sampled_error_seconds_21b'])} | {_bounds(p, 'errors')} |",
        f"| the activation runs' tensors quantized alone | {_h(p['activation_quantize_seconds_21b'])} | "
        f"{_bounds(p, 'quantize activation')} |",
        f"| split calibration model at {p['r_copy'] / 1e6:.0f} MB/s | {_h(p['shard_seconds_21b'])} | "
        f"{_bounds(p, 'calibration model')} |",
        f"| {p['evals_now']} evals x {d['chunks'] * d['ctx']} tokens | {_h(p['eval_seconds_now_box'])} at "
        f"{p['r_pp_21b_box']:.2f} tokens/s | {_bounds(p, 'evals')} |",
        f"| **total** | **{_h(p['total_seconds_now_box'])}** | **{_bounds(p, 'total')}** |",
        "",
        *board_md(p, results),
        "With the sampled error stage but the earlier calibration (44 evals x 8192 tokens, 42 copies):",
        "",
        f"formula: `2 x W / r_quant (Q3_K, Q8_0) + S / r_scored + W / r_energy + 42 x reference bytes / r_copy + "
        f"44 x 512 x 16 / r_pp`, S = the weights qerror quantizes per type at --error-sample {p['error_fraction']:g} "
        f"(>= {r['errors_sampled']['min_rows']} rows a tensor): {p['sampled_weights_21b'] / 1e9:.2f} B of the 21B's "
        f"{p['weights_21b'] / 1e9:.2f} B.",
        "",
        "| term | this box | Orion O6 |",
        "|---|---:|---:|",
        f"| 2 whole-model quantizations (Q3_K, Q8_0: what the calibration models are assembled from) | "
        f"{_h(p['kept_quantize_seconds_21b'])} | (this box's rate: not measured on O6) |",
        f"| error stage: {p['sampled_weights_21b'] / 1e9:.2f} B weights x 7 types at r_scored "
        f"{p['r_scored'] / 1e6:.1f} M/s + the energy read of all weights at {p['r_energy'] / 1e6:.0f} M/s | "
        f"**{_h(p['sampled_error_seconds_21b'])}** | (this box's rate) |",
        *assemblies,
        evals,
        f"| **total** | **{_h(p['total_seconds_box'])}** | **{_h(p['total_seconds_o6_evals'])}** "
        "(evals at O6 rate, the rest at this box's) |",
        "",
        "Before qerror (plan at a098810: every candidate type quantized whole by llama.cpp, then scored whole; "
        "README formula `7 x W x (1/r_quant + 1/r_error) + ...` with each type's own rates):",
        "",
        "| term | this box | Orion O6 |",
        "|---|---:|---:|",
        f"| 7 whole-model quantizations | {_h(p['quantize_seconds_21b'])} | (this box's rate: not measured on O6) |",
        f"| 7 error passes | {_h(p['error_seconds_21b'])} | (this box's rate) |",
        f"| error side in all | **{_h(p['quantize_seconds_21b'] + p['error_seconds_21b'])}** (now "
        f"{_h(p['kept_quantize_seconds_21b'] + p['sampled_error_seconds_21b'])}) | |",
        *assemblies,
        evals,
        f"| **total** | **{_h(p['old_total_seconds_box'])}** | **{_h(p['old_total_seconds_o6_evals'])}** |",
        "",
        "r_scored = S_wide / (seconds of the error stage - seconds of its energy pass), S_wide the weights qerror "
        "quantized per type on this model (all 7 types are scored on each sampled row, so the rate is per weight "
        "for all 7); r_energy = the model's weights / seconds of the energy pass (page cache; at 21B the 43.7 GB "
        "source is read from disk once more, as each whole-model quantization reads it). " + error_repeats(r),
        "",
        "What the rates are: r_quant = weights quantized / wall time of `quantize.quantize` (llama.cpp in-process with "
        "the imatrix; includes reading the bf16 file and writing the output, so any tensor kept in bf16 is copied in "
        "it); r_error = weights scored / time of `plan.tensor_errors`; r_copy = tensor bytes written by "
        "`plan.assemble` / its time, source and quantized file in page cache (on a slower disk divide by its rate); "
        "r_pp = evaluated tokens / wall time of `evaluate.evaluate` on the role run (model load included, base "
        "log-probs cached): at 21B, 41 of plan's 42 calibration models lower one role or one layer out of 28 and "
        "keep the rest in the reference's type, so the mostly-bf16 role run is the representative one, not the "
        "layer run (here blk.1 is most of the model). Peak RSS counts the pages of the GGUFs a process maps and "
        "touches (file-backed, reclaimable), e.g. the source and the quantized file in the error pass. "
        "The 21B eval rate on this box is an extrapolation by active weights (compute-bound prompt processing, "
        "as llama.cpp's pp512 is): the 21B in bf16 (43.7 GB), even at Q8_0 (23.2 GB), does not fit this box's "
        "23 GiB, so plan's evals could not run here from RAM at all; streamed from disk they would be slower.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a make_wide_ernie.py output directory")
    ap.add_argument("--work", required=True, help="where the GGUFs go (outside git)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunks", type=int, default=16, help="512-token chunks per eval (plan's default: 16)")
    ap.add_argument("--imatrix-chunks", type=int, default=2)
    ap.add_argument("--text", default=str(ROOT / "data" / "calib" / "calibration.txt"))
    ap.add_argument("--sample", default="all", help="all, blk1, or comma-separated tensors quantized per type")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "plan_cost.md"))
    ap.add_argument("--error-sample", type=float, default=None, help="plan's --error-sample (default: plan's)")
    ap.add_argument("--state", help="the stages' results file (default WORK/plan_cost.results.json)")
    ap.add_argument(
        "--predict-only",
        action="store_true",
        help="predict from the stages recorded in --out's .json (the other arguments as they were measured with); "
        "run only the stages missing there",
    )
    args = ap.parse_args()
    if args.error_sample is None:
        from edgemoe_cli.qerror import DEFAULT_FRACTION

        args.error_sample = DEFAULT_FRACTION
    args.sample_arg = args.sample
    args.sample = {"all": None, "blk1": list(BLK1_SAMPLE)}.get(args.sample, args.sample.split(","))
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.stage:
        print(json.dumps(stage(args.stage, args)))
        return
    recorded = Path(args.out).with_suffix(".json")
    this_command = "python bench/plan_cost.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.predict_only:
        kept = json.loads(recorded.read_text())
        results = kept["results"]
        header = kept.get("header") or header_from_md(Path(args.out))
        for name in PREDICT_ONLY_STAGES:
            run_stage(name, args, results, lambda: None)
        config = json.loads((Path(args.checkpoint) / "config.json").read_text())
        args.layers_note = config["num_hidden_layers"]
        pred = predict(results, args)
        recorded.write_text(json.dumps({"results": results, "predicted": pred, "header": header}, indent=1))
        write_md(results, pred, args, header["command"], header["load"], Path(args.out), this_command)
        print(Path(args.out).read_text())
        return
    state = Path(args.state) if args.state else Path(args.work) / "plan_cost.results.json"
    results = json.loads(state.read_text()) if state.is_file() else {}

    def save():
        state.write_text(json.dumps(results, indent=1))

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for name in [
        "convert",
        "imatrix",
        *(f"quantize/{t}" for t in DEFAULT_TYPES),
        "assemble",
        "eval_base",
        "eval",
        "eval_layer",
        "errors_sampled",
        "errors_energy",
        # the board: this box's pp512 (the figure the O6's is quoted in) and each CPU stage on 1 thread, whose
        # time against 2 threads' gives the stage's serial share (bench/plan_cost.md, "On the board")
        "pp512",
        "quantize/q3_k@1",
        "quantize/q8_0@1",
        "errors_sampled@1",
        "errors_sampled~2",
        "errors_sampled@1~2",
        "errors_sampled~3",
        *PREDICT_ONLY_STAGES,
    ]:
        run_stage(name, args, results, save)
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results.setdefault("load_before", load_before)
    save()
    config = json.loads((Path(args.checkpoint) / "config.json").read_text())
    args.layers_note = config["num_hidden_layers"]
    pred = predict(results, args)
    header = {"command": this_command, "load": [results["load_before"], load_after]}
    recorded.write_text(json.dumps({"results": results, "predicted": pred, "header": header}, indent=1))
    write_md(results, pred, args, this_command, header["load"], Path(args.out))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
