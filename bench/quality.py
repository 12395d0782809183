#!/usr/bin/env python3
"""File size vs quality loss on the tiny ERNIE fixtures: stock llama.cpp mixes, our recipes, and `plan`
-> bench/quality.md

usage: .venv/bin/python bench/quality.py [--variants thinking pt] [--chunks 8] [--threads 2] [--work DIR]
                                        [--plan-chunks N] [--layer-stride K] [--tradeoff 16x1 4x1 2x2 ...]

For each variant:
1. convert the fixture to f32 GGUF: the reference every KLD is measured against;
2. split /work/shared/fixtures/calib.txt at a line near 100 KB: the first part is the calibration text (imatrix and
   plan's KLD calibration), the rest the evaluation text — nothing is ever evaluated on calibration text;
3. `edgemoe imatrix` (llama-imatrix) on the calibration part;
4. quantize with every stock llama.cpp mix that applies, all with that imatrix; with our built-in recipes; and with
   `plan` at the file size of each stock K-quant mix (plan --max-size = that file's size);
5. `edgemoe eval` on the evaluation part: mean KLD (± standard error), p99 KLD, top-1 agreement, PPL;
6. the trade-off: plan measured with each --tradeoff setting (CHUNKSxLAYER_STRIDE[cCTX][wFROM]: chunks of 512
   tokens, or CTX, per calibration eval, layer stride, scored from position FROM on rather than the second half),
   its eval cost, and its plan's measured KLD at Q4_K_M's, Q3_K_M's and community-q4's sizes; the --rotated
   settings also on --rotations - 1 rotations of the calibration part (its text from k/9 of the way on, then its
   start: other chunks of the same text for the spread calibration evals, the imatrix unchanged), so that each
   setting's plan KLD is a spread over chunk choices, not one draw.
Every number in bench/quality.md and bench/quality.png comes from this script; raw rows go to bench/quality.json.
Finished evaluations are kept in --work (results.json) so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgemoe_cli import evaluate, imatrix, plan, quantize  # noqa: E402
from edgemoe_cli.convert import convert  # noqa: E402
from edgemoe_cli.recipe import read_tensors  # noqa: E402
from edgemoe_cli.report import _pyplot, _save, markdown_table, write_json, write_text  # noqa: E402
from edgemoe_cli.units import human_bytes  # noqa: E402

FIXTURES = Path(os.environ.get("EDGEMOE_SHARED_FIXTURES", REPO.parent / "shared" / "fixtures"))
STOCK = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_XS", "IQ4_NL", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
# plan at these files' sizes: stock mixes and our hand-written recipes
PLAN_AT = (
    "stock:Q2_K",
    "stock:Q3_K_M",
    "edge-small",
    "stock:Q4_K_M",
    "stock:Q5_K_M",
    "arm-fast",
    "community-q4",
    "stock:Q6_K",
)
NO_FLOOR_AT = ("edge-small", "stock:Q4_K_M")  # the ablation: plan with min_every_token=None
RECIPES = ("q4_0-uniform", "edge-small", "edge-balanced", "arm-fast", "community-q4")
TRADEOFF_AT = ("stock:Q4_K_M", "stock:Q3_K_M", "community-q4")  # plan's KLD at these sizes per calibration setting
# the settings of the trade-off table: CHUNKSxSTRIDE[cCTX][wFROM] (parse_setting); 16x1 was plan's default before
# issue 14, 4x1 what this bench measured plan with until then; wFROM scores each calibration chunk from position FROM
# on instead of its second half
TRADEOFF = ("4x4", "16x1", "4x1", "2x4", "2x1", "1x1", "8x4", "16x4", "8x4c256", "4x4w64", "3x4w64", "8x4w64")
# settings also measured on rotated calibration text (ROTATION_STEP of it per rotation): 1/9 is no multiple of the
# spacing of 2, 4, 8 or 16 spread chunks, so each rotation evaluates other chunks
ROTATED = ("4x4", "2x4", "8x4", "16x4", "8x4c256", "4x4w64", "3x4w64", "8x4w64")
ROTATION_STEP = 1 / 9
# plan's KLD at stock Q4_K_M's size before issue 14's cuts (16 first chunks, every layer, every row's error): the
# quality target is within 10% of it (issue 14)
BEFORE_ISSUE14 = {"thinking": 0.00106, "pt": 0.00107}
ERNIE_21B_LAYERS, ERNIE_21B_ROLES, ERNIE_21B_FIRST_ROUTED = 28, 14, 1
CALIB_BYTES = 100_000


def split_text(src: Path, work: Path) -> tuple[Path, Path]:
    text = src.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, CALIB_BYTES) + 1
    calib, held_out = work / "calibration-part.txt", work / "evaluation-part.txt"
    calib.write_text(text[:cut], encoding="utf-8")
    held_out.write_text(text[cut:], encoding="utf-8")
    return calib, held_out


def plan_at_size(m, tensors, overhead, size: int, name: str, work: Path, **solve):
    """plan's recipe for a file of `size` bytes from measurement `m`, written to work/NAME.toml: (plan, its path).
    `solve`: further plan_from_measurements options (min_every_token=None: the ablation without the floor)."""
    p = plan.plan_from_measurements(m, tensors, overhead, size, f"--max-size {size}", name, **solve)
    recipe_path = work / f"{name}.toml"
    recipe_path.write_text(p.recipe_toml)
    return p, recipe_path


def run_variant(variant: str, work: Path, args, results: dict, save) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    calib, held_out = split_text(FIXTURES / "calib.txt", work)
    f32 = work / "f32.gguf"
    if not f32.is_file():
        convert(FIXTURES / f"tiny-ernie-{variant}", f32, "f32")
    im_path = work / "imatrix.gguf"
    t0 = time.perf_counter()
    if not im_path.is_file():
        imatrix.compute_imatrix(f32, calib, im_path, ctx=512, threads=args.threads)
    info = {"imatrix_seconds": round(time.perf_counter() - t0, 1)}

    def measure(kind: str, name: str, recipe, extra: dict | None = None, key: str | None = None) -> dict:
        key = key or f"{variant}/{name}/c{args.chunks}"
        if key in results:
            return results[key]
        out = work / f"{name.replace(':', '-')}.gguf"
        quantize.quantize(f32, recipe, out=out, imatrix=im_path, threads=args.threads, manifest=False)
        e = evaluate.evaluate(out, f32, held_out, ctx=512, threads=args.threads, max_chunks=args.chunks)
        row = {
            "variant": variant,
            "kind": kind,
            "name": name,
            "bytes": out.stat().st_size,
            "kld": e.kld_mean,
            "kld_se": e.kld_stderr,
            "kld_p99": e.kld_p99,
            "top1": e.top1_agreement,
            "ppl": e.ppl,
            "base_ppl": e.base_ppl,
            "tokens": e.tokens_scored,
            **(extra or {}),
        }
        results[key] = row
        save()
        print(
            f"{key:36} {row['bytes']:>10,} B  KLD {row['kld']:.5f} ± {row['kld_se']:.5f}  top1 {row['top1']:.3f}",
            flush=True,
        )
        out.unlink(missing_ok=True)
        return row

    for ft in STOCK:
        measure("stock", f"stock:{ft}", f"stock:{ft}")
    for r in RECIPES:
        measure("recipe", r, r)
    config = plan_config(args)
    info_key = f"{variant}/info3/{config}"
    if info_key in results:
        info = results[info_key]
    t0 = time.perf_counter()
    m = plan.measure(
        f32,
        im_path,
        calib,
        max_chunks=args.plan_chunks,
        ctx=args.plan_ctx,
        threads=args.threads,
        workdir=work,
        progress=lambda s, d, n, *_: print(f"  plan {s} {d}/{n}", flush=True),
        layer_stride=args.layer_stride,
        score_from=args.plan_score_from,
        floor=True,  # for the predicted KLD and the additivity check below; it changes no choice
    )
    info["plan_measure_seconds"] = m.seconds
    info["plan_work"] = m.work  # bytes assembled, tokens evaluated, runs: with the seconds, the rates for 21B
    info["plan_gains"] = m.gains
    info["plan_calibration_kld"] = m.calibration_kld
    info.pop("calibration_run_seconds", None)  # the old per-run split; m.seconds now keeps it
    tensors, overhead = read_tensors(f32)
    info["plan_layer_factors"] = m.layer_factors
    info["plan_layer_kld"] = m.layer_kld
    info["plan_floor_kld"] = m.floor_kld
    for at in PLAN_AT:
        size = results[f"{variant}/{at}/c{args.chunks}"]["bytes"]
        label = at.removeprefix("stock:")
        p, recipe_path = plan_at_size(m, tensors, overhead, size, f"plan-at-{label}", work)
        measure(
            "plan",
            f"plan@{label}",
            recipe_path,
            {"budget": size, "predicted_kld": p.predicted_kld, "predicted_bytes": p.predicted_bytes, "config": config},
            key=f"{variant}/plan@{label}/{config}/c{args.chunks}",
        )
    # ablation: the same plans without the floor for tensors every token uses (plan.MIN_EVERY_TOKEN)
    for at in NO_FLOOR_AT:
        size = results[f"{variant}/{at}/c{args.chunks}"]["bytes"]
        label = at.removeprefix("stock:")
        p, recipe_path = plan_at_size(
            m, tensors, overhead, size, f"plan-nofloor-at-{label}", work, min_every_token=None
        )
        measure(
            "plan-nofloor",
            f"plan-nofloor@{label}",
            recipe_path,
            {"budget": size, "predicted_kld": p.predicted_kld, "predicted_bytes": p.predicted_bytes, "config": config},
            key=f"{variant}/plan-nofloor@{label}/{config}/c{args.chunks}",
        )
    info["plan_solve_note"] = "plan_from_measurements per budget takes well under a second once measured"
    # how well the additive prediction ranks the stock K-quant mixes it can express (all types in its candidate set)
    info.setdefault("stock_predicted", {})
    for ft in STOCK:
        q = work / "stock-types.gguf"
        if ft in ("IQ4_NL", "Q4_0") or ft in info["stock_predicted"]:
            continue
        quantize.quantize(f32, f"stock:{ft}", out=q, imatrix=im_path, threads=args.threads, manifest=False)
        types = {t.name: t.type for t in read_tensors(q)[0]}
        q.unlink()
        try:
            info["stock_predicted"][ft] = sum(m.predicted(n, t) for n, t in types.items() if n in m.errors)
        except KeyError:  # a type outside the candidate set (e.g. q4_1, q5_0)
            continue
    tensors_active = sum(t.n_elements * (4 / 16 if "_exps" in t.name else 1) for t in tensors)
    info.update(
        n_params=sum(t.n_elements for t in tensors),
        n_active=tensors_active,
        plan_types=len(m.types),
        plan_roles=len(m.gains),
        plan_chunks=args.plan_chunks,
        plan_layer_stride=args.layer_stride,
        plan_ctx=args.plan_ctx,
        plan_score_from=args.plan_score_from,
    )
    results[info_key] = info
    save()
    for cfg in args.tradeoff:
        for k in range(args.rotations if cfg in args.rotated else 1):
            text = calib if k == 0 else rotated_text(calib, k)
            tradeoff(variant, cfg, k, work, f32, im_path, text, tensors, overhead, args, results, save, measure)
    return info


def rotated_text(calib: Path, k: int) -> Path:
    """The calibration part from k x ROTATION_STEP of its length on (cut at a line), then its beginning."""
    text = calib.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * k * ROTATION_STEP)) + 1
    out = calib.with_name(f"{calib.stem}.rot{k}.txt")
    if not out.is_file():
        out.write_text(text[cut:] + text[:cut], encoding="utf-8")
    return out


DEFAULT_CTX = getattr(plan, "DEFAULT_CALIBRATION_CTX", 512)


def setting_name(chunks: int, stride: int, ctx: int = 512, score_from: int | None = None) -> str:
    """CHUNKSxSTRIDE[cCTX][wFROM]: cCTX unless chunks of 512 tokens, wFROM unless the second half is scored."""
    return (
        f"{chunks}x{stride}"
        + ("" if ctx == 512 else f"c{ctx}")
        + ("" if score_from is None or score_from == ctx // 2 else f"w{score_from}")
    )


def parse_setting(cfg: str) -> tuple[int, int, int, int]:
    """CHUNKSxSTRIDE[cCTX][wFROM] -> (chunks, layer stride, tokens a chunk: 512 unless given, first scored position
    of a chunk: its second half unless given)."""
    m = re.fullmatch(r"(\d+)x(\d+)(?:c(\d+))?(?:w(\d+))?(?:q8)?", cfg)
    if not m:
        raise SystemExit(f"calibration setting {cfg!r} is not CHUNKSxSTRIDE[cCTX][wFROM][q8]")
    chunks, stride, ctx = int(m[1]), int(m[2]), int(m[3] or 512)
    return chunks, stride, ctx, int(m[4]) if m[4] else ctx // 2


def setting_reference(cfg: str) -> str:
    """plan's --reference for a setting: q8_0 for a setting ending in q8 (the gains measured against the model at
    Q8_0, as a board without the memory for the bf16 model runs plan), else the source."""
    parse_setting(cfg)
    return "q8_0" if cfg.endswith("q8") else "source"


def setting_label(cfg: str) -> str:
    """A setting as the tables name it: '4 x 4', '8 x 4 (256-token chunks)', '4 x 4 (scored from 64)',
    '4 x 4 (Q8_0 reference)'."""
    chunks, stride, ctx, score_from = parse_setting(cfg)
    return (
        f"{chunks} x {stride}"
        + (f" ({ctx}-token chunks)" if ctx != 512 else "")
        + (f" (scored from {score_from})" if score_from != ctx // 2 else "")
        + (" (Q8_0 reference)" if setting_reference(cfg) == "q8_0" else "")
    )


DEFAULT_SETTING = setting_name(
    plan.DEFAULT_CHUNKS, plan.DEFAULT_LAYER_STRIDE, DEFAULT_CTX, plan.calibration_score_from(DEFAULT_CTX)
)


def setting_key(cfg: str, k: int) -> str:
    """results' name for a trade-off setting on rotation k (rotation 0, the calibration part as it is: cfg)."""
    return cfg if k == 0 else f"{cfg}-r{k}"


def tradeoff(variant, cfg, k, work, f32, im_path, calib, tensors, overhead, args, results, save, measure) -> None:
    """One row of the trade-off table: plan measured with `cfg` (CHUNKSxSTRIDE) on calibration text `calib`
    (rotation k), what its evals cost, and its plan's measured KLD on the evaluation text at each TRADEOFF_AT size."""
    chunks, stride, ctx, score_from = parse_setting(cfg)
    name = setting_key(cfg, k)
    if f"{variant}/tradeoff-info/{name}" in results and all(
        f"{variant}/tradeoff/{name}/{at.removeprefix('stock:')}/c{args.chunks}" in results for at in TRADEOFF_AT
    ):
        return
    m = plan.measure(
        f32,
        im_path,
        calib,
        max_chunks=chunks,
        ctx=ctx,
        threads=args.threads,
        workdir=work,
        progress=lambda s, d, n, *_: print(f"  plan {name} {s} {d}/{n}", flush=True),
        layer_stride=stride,
        score_from=score_from,
        reference=setting_reference(cfg),
        floor=True,  # as every setting was measured (the floor changes no choice; against Q8_0 there is none)
    )
    measured = {
        **{f"role:{r}": k for r, k in m.calibration_kld.items()},
        **{f"layer:{b}": k for b, k in m.layer_kld.items()},
    }
    rel = sorted(m.kld_stderr[k] / v for k, v in measured.items() if k in m.kld_stderr and v > 0)
    cal = m.calibration_type
    # the KLD of each layer the fit interpolated, as predicted (sum over its tensors of gain x factor x error), to
    # set beside the KLD measured for it at stride 1
    interpolated = {
        b: sum(m.predicted(n, cal) for n in m.errors if plan.layer(n) == b and cal in m.errors[n])
        for b in m.layer_factors
        if b not in m.layer_kld
    }
    results[f"{variant}/tradeoff-info/{name}"] = {
        "chunks": chunks,
        "layer_stride": stride,
        "score_from": score_from,
        "seconds": m.seconds,
        "work": m.work,
        "kld_rel_se_median": rel[len(rel) // 2] if rel else None,
        "layer_kld": m.layer_kld,
        "layer_factors": m.layer_factors,
        "interpolated_layer_kld": interpolated,
        "error_sample": getattr(m, "error_sample", 1.0),
    }
    save()
    for at in TRADEOFF_AT:
        size = results[f"{variant}/{at}/c{args.chunks}"]["bytes"]
        label = at.removeprefix("stock:")
        p, recipe_path = plan_at_size(m, tensors, overhead, size, f"plan-{name}-at-{label}", work)
        measure(
            "tradeoff",
            f"plan {name}@{label}",
            recipe_path,
            {"budget": size, "predicted_kld": p.predicted_kld, "config": cfg, "rotation": k, "at": at},
            key=f"{variant}/tradeoff/{name}/{label}/c{args.chunks}",
        )


def evals_21b(chunks: int, stride: int, ctx: int = 512) -> tuple[int, int]:
    """(KLD evals, tokens evaluated) of plan on ERNIE-4.5-21B-A3B with these settings (plan_evals)."""
    n = plan_evals(ERNIE_21B_LAYERS, ERNIE_21B_ROLES, ERNIE_21B_FIRST_ROUTED, stride)
    return n, n * chunks * ctx


def plan_evals(layers: int, roles: int, first_routed: int, stride: int) -> int:
    """plan's KLD evals with the floor: one per role, per measured layer, per layer whose routed experts get a
    factor of their own (the last), the activation runs, the Q8_0 floor and the reference's own pass."""
    blocks = list(range(layers))
    measured = plan.measured_layers(blocks, stride, first_routed)
    experts = len(plan.expert_factor_layers(blocks, blocks[first_routed:]))
    return roles + len(measured) + experts + len(plan.ACTIVATION_RUNS) + 1 + 1


def eval_rate_21b() -> float:
    """This box's extrapolated 21B prompt-processing rate (tokens/s) from bench/plan_cost.json."""
    try:
        return float(json.loads((REPO / "bench" / "plan_cost.json").read_text())["predicted"]["r_pp_21b_box"])
    except (OSError, ValueError, KeyError):
        return 41.34  # bench/plan_cost.md as of issue 14's first deliverable


ORION_O6_PP512 = 38.51  # tok/s, ERNIE-4.5-21B-A3B-Thinking Q4_0, 8 threads, Arm Learning Path (bench.EXTERNAL_ORION_O6)


def o6_eval_rate_21b() -> float:
    """The O6's rate for plan's evals from bench/plan_cost.json: its pp512 less the head's matmul for the scored
    positions (llama-bench runs it for one); the quoted pp512 where that file has no such figure."""
    try:
        return float(json.loads((REPO / "bench" / "plan_cost.json").read_text())["predicted"]["o6_eval_rate"])
    except (OSError, ValueError, KeyError):
        return ORION_O6_PP512


def extrapolate(info: dict) -> str:
    """What plan's measurement took on this fixture, and where the 21B's cost is: this fixture's rates carry its
    per-call overheads and its tiny widths, so the 21B is priced from real-width measurements (bench/plan_cost.md),
    not from these."""
    sec, work = info["plan_measure_seconds"], info["plan_work"]
    if not all(sec.get(stage, 0) > 0 for stage in ("quantize", "errors", "assemble", "eval")):
        return (
            "\nplan's cost is not extrapolated from this fixture: its measurement reused steps an earlier setting had "
            "finished (the error stage is the same for every calibration setting), so not every stage was timed "
            "here; the 21B's cost, measured at real widths, is bench/plan_cost.md's.\n"
        )
    return (
        f"\nplan's measurement on this fixture ({info['n_params'] / 1e6:.1f}M weights, 2 shared cores): whole-model "
        f"quantizations {sec['quantize']:.1f} s, the sampled error stage {sec['errors']:.1f} s, {work['runs']} "
        f"calibration runs assembled ({work['assembled_bytes'] / 1e6:.0f} MB) in {sec['assemble']:.1f} s and "
        f"evaluated ({work['eval_tokens']} tokens) in {sec['eval']:.1f} s. These rates carry the fixture's per-call "
        "overheads; the 21B's cost is priced from stages measured at real widths in bench/plan_cost.md.\n"
    )


def tradeoff_section(args, results: dict) -> str:
    """The trade-off table over both fixtures: eval cost of each calibration setting vs its plan's measured KLD."""
    variants = [v for v in args.variants if f"{v}/tradeoff-info/{args.tradeoff[0]}" in results]
    if not variants:
        return ""
    rate, o6_rate = eval_rate_21b(), o6_eval_rate_21b()
    head = [
        "chunks x layer stride",
        "fixture: evals x tokens",
        "fixture eval s (T / PT)",
        "21B: evals x tokens",
        "21B evals, this box / O6",
    ]
    for v in variants:
        head += [f"{'PT' if v == 'pt' else v.capitalize()} @Q4_K_M", "@Q3_K_M", "@community-q4"]
    head += ["median rel. se of a calibration KLD", "E(W,t) from"]
    lines = []
    for cfg in args.tradeoff:
        infos = {v: results.get(f"{v}/tradeoff-info/{cfg}") for v in variants}
        if not all(infos.values()):
            continue
        chunks, stride, ctx, _ = parse_setting(cfg)
        n21, tok21 = evals_21b(chunks, stride, ctx)
        any_info = next(iter(infos.values()))
        # the setting's evals on the fixtures (4 layers, the first routed 1), not those this run did: a run kept
        # from another setting (16 x 4's layer runs serve 16 x 1) is not done again
        runs = plan_evals(4, ERNIE_21B_ROLES, 1, stride)  # the fixtures have the 21B's 14 roles
        if setting_reference(cfg) == "q8_0":  # no floor, and the Q8_0 activation run is the reference itself
            runs, n21 = runs - 2, n21 - 2
            tok21 = n21 * chunks * ctx
        row = [
            setting_label(cfg)
            + (" (old default)" if cfg == "16x1" else "")
            + (" (default)" if cfg == DEFAULT_SETTING else ""),
            f"{runs} x {chunks * ctx}",
            " / ".join(f"{infos[v]['seconds']['eval']:.0f}" for v in variants),
            f"{n21} x {chunks * ctx}",
            f"{tok21 / rate / 3600:.2f} h / {tok21 / o6_rate / 3600:.2f} h",
        ]
        for v in variants:
            for at in TRADEOFF_AT:
                r = results.get(f"{v}/tradeoff/{cfg}/{at.removeprefix('stock:')}/c{args.chunks}")
                if r is None:
                    row.append("")
                    continue
                row.append(f"{r['kld']:.5f}")
        row.append(" / ".join(f"{infos[v]['kld_rel_se_median']:.1%}" for v in variants))
        sample = any_info.get("error_sample", 1.0)  # absent: measured before plan sampled rows (every row)
        row.append("every row" if sample >= 1 else f"1/{round(1 / sample)} of the rows")
        lines.append(row)
    out = [
        "\n## Calibration cost vs plan quality (both fixtures)\n\n",
        "plan measured with each setting (chunks of 512 calibration tokens per KLD eval x layer stride; each "
        'chunk\'s second half scored, as `edgemoe eval` does, unless the setting says "scored from 64": every '
        'position from 64 on, ~1.75x the scored tokens per evaluated token; a setting with "Q8_0 reference" is '
        "plan --reference q8_0, as a board without the memory for the bf16 model runs it: gains measured against "
        "the model at Q8_0, no floor, one activation run fewer, two evals fewer), then planned "
        "at the file size of stock Q4_K_M, stock Q3_K_M and community-q4, quantized and evaluated on the held-out "
        f"text like every row above (mean KLD, {args.chunks} chunks). Evals: one per role, per measured layer, one "
        "for the last layer's routed experts, the Q8_0 floor and the reference's own pass; a layer stride k "
        "measures the dense layer, the first MoE layer, "
        "every k-th after it and the last, and interpolates the others (the fixtures have 4 layers: any stride "
        "above 1 skips only layer 2; at 21B stride 4 measures 9 of 28). 21B: the same count at 28 layers and 14 "
        f"roles, hours at this box's extrapolated {rate:.1f} tokens/s (bench/plan_cost.md) and the Orion O6's "
        f"quoted pp512 of {ORION_O6_PP512} tokens/s less the head's matmul for the scored positions, {o6_rate:.2f} "
        "tokens/s (bench/plan_cost.md's low bound). The last column: the median over the calibration runs of "
        "their KLD's standard error (per token) relative to the KLD. The fixture's seconds are as measured, on a "
        "shared 2-core box whose speed varied up to ~8x between runs (the same evals took 49 s in one and 7 s in "
        "another), and count only the evals that setting's measurement ran: a step another setting had kept (the "
        "same run at the same chunks, e.g. 16 x 4's layer runs for 16 x 1) is read, not run again. The evals x "
        "tokens are the cost.\n\n",
        markdown_table(head, lines, align="lrrrr" + "r" * (3 * len(variants)) + "rl"),
    ]
    out.append(rotation_section(args, results, variants))
    checks = []
    for v in variants:
        for cfg in args.tradeoff:
            info = results.get(f"{v}/tradeoff-info/{cfg}")
            if not info or not info["interpolated_layer_kld"]:
                continue
            # measured at stride 1 with the same chunks and scored positions (none for a setting without one)
            _, _, ctx, score_from = parse_setting(cfg)
            ref = results.get(f"{v}/tradeoff-info/{setting_name(info['chunks'], 1, ctx, score_from)}")
            for b, pred in info["interpolated_layer_kld"].items():
                if ref and b in ref["layer_kld"]:
                    checks.append(
                        [v, cfg, b, f"{pred:.5f}", f"{ref['layer_kld'][b]:.5f}", f"{pred / ref['layer_kld'][b]:.2f}"]
                    )
    if checks:
        out.append(
            "\nInterpolated layers: the KLD the stride fit predicts for a layer it did not measure (its tensors at "
            "Q3_K, gain x interpolated factor x error) against that layer's KLD measured at stride 1 with the same "
            "chunks:\n\n"
        )
        out.append(
            markdown_table(
                ["fixture", "setting", "layer", "predicted (interpolated)", "measured at stride 1", "ratio"],
                checks,
                align="lllrrr",
            )
        )
    return "".join(out)


def rotation_section(args, results: dict, variants: list[str]) -> str:
    """plan's KLD at Q4_K_M's size for each --rotated setting on every rotation of the calibration text, against
    issue 14's target (within 10% of BEFORE_ISSUE14) and the hand recipe at its size."""
    head = ["chunks x layer stride"]
    for v in variants:
        name = "PT" if v == "pt" else v.capitalize()
        head += [f"{name} @Q4_K_M per rotation", "mean", "worst / before", "@community-q4 worst / recipe"]
    lines = []
    for cfg in args.rotated:
        row = [setting_label(cfg) + (" (default)" if cfg == DEFAULT_SETTING else "")]
        for v in variants:
            klds = [
                results.get(f"{v}/tradeoff/{setting_key(cfg, k)}/Q4_K_M/c{args.chunks}") for k in range(args.rotations)
            ]
            community = [
                results.get(f"{v}/tradeoff/{setting_key(cfg, k)}/community-q4/c{args.chunks}")
                for k in range(args.rotations)
            ]
            recipe = results.get(f"{v}/community-q4/c{args.chunks}")
            if not all(klds) or not all(community) or recipe is None:
                row += ["", "", "", ""]
                continue
            q4 = [r["kld"] for r in klds]
            row += [
                " / ".join(f"{x:.5f}" for x in q4),
                f"{sum(q4) / len(q4):.5f}",
                f"{max(q4) / BEFORE_ISSUE14[v]:.2f}",
                f"{max(r['kld'] for r in community) / recipe['kld']:.2f}",
            ]
        lines.append(row)
    if not any(any(c for c in row[1:]) for row in lines):
        return ""
    before = ", ".join(f"{'PT' if v == 'pt' else v.capitalize()} {BEFORE_ISSUE14[v]:.5f}" for v in variants)
    return (
        "\nThe same settings on rotations of the calibration part (rotation k: its text from "
        f"k/{round(1 / ROTATION_STEP)} of the way on, then its start; rotation 0 is the table above), so the spread "
        "calibration evals read other chunks of the same text and the imatrix stays: plan's measured KLD at stock "
        f"Q4_K_M's size per rotation, its mean, the worst rotation against plan before issue 14's cuts ({before}; "
        "the target is <= 1.10), and the worst rotation's plan at community-q4's size against that recipe:\n\n"
        + markdown_table(head, lines, align="l" + "lrrr" * len(variants))
    )


def plan_config(args) -> str:
    """The plan rows' calibration setting as the trade-off table names it: CHUNKSxSTRIDE[cCTX][wFROM]."""
    return setting_name(args.plan_chunks, args.layer_stride, args.plan_ctx, args.plan_score_from)


def write_report(args, results: dict, infos: dict, seconds: float) -> None:
    config = plan_config(args)
    rows = [
        r
        for k, r in results.items()
        if "/info" not in k
        and "/tradeoff" not in k
        and k.endswith(f"/c{args.chunks}")
        and r.get("config", config) == config
    ]
    write_json({"rows": rows, "info": infos}, REPO / "bench" / "quality.json")
    plt = _pyplot()
    variants = [v for v in args.variants if any(r["variant"] == v for r in rows)]
    fig, axes = plt.subplots(1, len(variants), figsize=(6.5 * len(variants), 4.8), squeeze=False)
    md = [
        "# Quality vs size: stock llama.cpp mixes, edgemoe recipes, and `edgemoe plan`\n",
        "Made by `.venv/bin/python bench/quality.py` (" + f"{args.threads} threads; finished evaluations are "
        "reused from --work, so reruns only add what is missing). Reference: the f32 GGUF of each "
        "fixture. Calibration (imatrix, plan's KLD gains): "
        f"the first {CALIB_BYTES:,} characters of fixtures/calib.txt (cut at a line); evaluation: the rest of it "
        f"({args.chunks} chunks of 512 tokens, second halves scored). All quantizations use the same imatrix. "
        "KLD = mean KL(f32 || model) in nats/token, ± its standard error. plan rows: measured with "
        f"`--chunks {args.plan_chunks} --layer-stride {args.layer_stride} --floor` ({args.plan_chunks} chunks of "
        f"{args.plan_ctx} tokens a calibration eval, spaced evenly over the calibration part, "
        + (
            "second halves scored"
            if args.plan_score_from == args.plan_ctx // 2
            else f"scored from position {args.plan_score_from} on"
        )
        + "; the errors E(W,t) from plan's default row sample, qerror; the all-Q8_0 floor measured, which makes "
        "the predicted KLD absolute and changes no choice).\n",
    ]
    for ax, v in zip(axes[0], variants):
        vr = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["bytes"])
        stock = [r for r in vr if r["kind"] == "stock"]
        ks = [r for r in stock if r["name"].split(":")[1] in STOCK]
        ax.plot([r["bytes"] / 2**20 for r in ks], [r["kld"] for r in ks], "o-", color="grey", label="stock llama.cpp")
        for r in stock:
            ax.annotate(
                r["name"].split(":")[1],
                (r["bytes"] / 2**20, r["kld"]),
                fontsize=7,
                color="dimgrey",
                textcoords="offset points",
                xytext=(3, 3),
            )
        rec = [r for r in vr if r["kind"] == "recipe"]
        ax.plot(
            [r["bytes"] / 2**20 for r in rec], [r["kld"] for r in rec], "s", color="tab:blue", label="edgemoe recipes"
        )
        for r in rec:
            ax.annotate(
                r["name"],
                (r["bytes"] / 2**20, r["kld"]),
                fontsize=7,
                color="tab:blue",
                textcoords="offset points",
                xytext=(3, -9),
            )
        pl = [r for r in vr if r["kind"] == "plan"]
        ax.plot([r["bytes"] / 2**20 for r in pl], [r["kld"] for r in pl], "D-", color="tab:red", label="edgemoe plan")
        ax.set_yscale("log")
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel("mean KLD vs f32 (nats/token, log)")
        ax.set_title(f"tiny-ernie-{v}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)

        md.append(f"\n## tiny-ernie-{v}\n")
        md.append(
            markdown_table(
                [
                    "model",
                    "kind",
                    "size",
                    "mean KLD",
                    "± se",
                    "p99 KLD",
                    "top-1",
                    "PPL (f32: %.3f)" % vr[0]["base_ppl"],
                ],
                [
                    [
                        r["name"],
                        r["kind"],
                        human_bytes(r["bytes"]),
                        f"{r['kld']:.5f}",
                        f"{r['kld_se']:.5f}",
                        f"{r['kld_p99']:.4f}",
                        f"{r['top1']:.1%}",
                        f"{r['ppl']:.3f}",
                    ]
                    for r in vr
                ],
                align="llrrrrrr",
            )
        )
        by = {r["name"]: r for r in vr}
        lines = []
        for at in PLAN_AT:
            ft = at.removeprefix("stock:")
            s, p = by.get(at), by.get(f"plan@{ft}")
            if s and p:
                below = p["kld"] + p["kld_se"] < s["kld"] - s["kld_se"]
                lines.append(
                    [
                        ft,
                        human_bytes(s["bytes"]),
                        human_bytes(p["bytes"]),
                        f"{s['kld']:.5f}",
                        f"{p['kld']:.5f}",
                        f"{p['kld'] / s['kld']:.2f}",
                        f"{p['predicted_kld']:.5f}",
                        "yes" if below else "no",
                    ]
                )
        for at in NO_FLOOR_AT:
            ft = at.removeprefix("stock:")
            s, p = by.get(at), by.get(f"plan-nofloor@{ft}")
            if s and p:
                lines.append(
                    [
                        f"{ft} (plan without the >= Q4_K floor)",
                        human_bytes(s["bytes"]),
                        human_bytes(p["bytes"]),
                        f"{s['kld']:.5f}",
                        f"{p['kld']:.5f}",
                        f"{p['kld'] / s['kld']:.2f}",
                        f"{p['predicted_kld']:.5f}",
                        "yes" if p["kld"] + p["kld_se"] < s["kld"] - s["kld_se"] else "no",
                    ]
                )
        md.append("\n`plan` at each stock mix's and recipe's file size (budget = that file's size):\n\n")
        md.append(
            markdown_table(
                [
                    "mix",
                    "its size",
                    "plan size",
                    "its KLD",
                    "plan KLD",
                    "plan/it",
                    "plan predicted KLD (calibration text)",
                    "below beyond ±1 se",
                ],
                lines,
                align="lrrrrrrl",
            )
        )
        info = infos.get(v, {})
        if info.get("stock_predicted"):
            floor = info.get("plan_floor_kld", 0.0)
            pred = [
                [
                    ft,
                    f"{info['stock_predicted'][ft] + floor:.5f}",
                    f"{by[f'stock:{ft}']['kld']:.5f}",
                    f"{by[f'stock:{ft}']['kld'] / (info['stock_predicted'][ft] + floor):.2f}",
                ]
                for ft in info["stock_predicted"]
                if f"stock:{ft}" in by
            ]
            md.append(
                "\nAdditivity check: plan's prediction (sum over tensors of role gain x layer factor x error, "
                "plus the Q8_0 floor, all fitted on the calibration text) against the measured KLD of stock "
                "mixes it never saw (evaluation text):\n\n"
            )
            md.append(
                markdown_table(["stock mix", "predicted KLD", "measured KLD", "measured/predicted"], pred, align="lrrr")
            )
        if info.get("plan_gains"):
            md.append(
                "\nMeasured KLD when only one role (all layers) or one layer (all roles) is Q3_K, on the "
                "calibration text — what the gains and depth factors are fitted to:\n\n"
            )
            md.append(
                markdown_table(
                    ["role", "KLD with only this role at Q3_K", "fitted gain"],
                    [
                        [k, f"{info['plan_calibration_kld'][k]:.5f}", f"{info['plan_gains'][k]:.3g}"]
                        for k in sorted(info["plan_gains"], key=lambda k: -info["plan_calibration_kld"][k])
                    ],
                    align="lrr",
                )
            )
            md.append(
                "\n"
                + markdown_table(
                    ["layer", "KLD with only this layer at Q3_K", "fitted depth factor"],
                    [
                        [
                            b,
                            f"{info['plan_layer_kld'][b]:.5f}" if b in info["plan_layer_kld"] else "not measured",
                            f"{f:.3g}" + ("" if b in info["plan_layer_kld"] else " (interpolated)"),
                        ]
                        for b, f in info["plan_layer_factors"].items()
                    ],
                    align="lrr",
                )
            )
            md.append(f"\nFloor (all-Q8_0 KLD beyond its prediction): {info['plan_floor_kld']:.5f}.\n")
            md.append(extrapolate(info))
    md.append(tradeoff_section(args, results))
    fig.suptitle("file size vs mean KLD (lower is better)", fontsize=11)
    _save(fig, REPO / "bench" / "quality.png")
    md.append("\n![size vs KLD](quality.png)\n")
    write_text("".join(md), REPO / "bench" / "quality.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["thinking", "pt"], choices=("thinking", "pt"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=8, help="evaluation chunks of 512 tokens (at most)")
    ap.add_argument(
        "--plan-chunks", type=int, default=plan.DEFAULT_CHUNKS, help="calibration chunks per plan gain measurement"
    )
    ap.add_argument("--layer-stride", type=int, default=plan.DEFAULT_LAYER_STRIDE, help="plan's layer stride")
    ap.add_argument(
        "--plan-ctx",
        type=int,
        default=DEFAULT_CTX,
        help="tokens a calibration chunk (plan's default)",
    )
    ap.add_argument(
        "--plan-score-from",
        type=int,
        default=None,
        help="first scored position of a calibration chunk (default: plan's, calibration_score_from)",
    )
    ap.add_argument(
        "--tradeoff", nargs="*", default=list(TRADEOFF), help="calibration settings CHUNKSxSTRIDE to compare"
    )
    ap.add_argument("--rotations", type=int, default=3, help="calibration text rotations per --rotated setting")
    ap.add_argument("--rotated", nargs="*", default=list(ROTATED), help="settings measured on every rotation")
    ap.add_argument("--report-only", action="store_true", help="write the report from --work's results.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgemoe-bench-quality"))
    args = ap.parse_args()
    args.plan_score_from = plan.calibration_score_from(args.plan_ctx, args.plan_score_from)
    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}

    def save():
        store.write_text(json.dumps(results, indent=1))

    if args.report_only:
        key = f"info3/{plan_config(args)}"
        infos = {v: results[f"{v}/{key}"] for v in args.variants if f"{v}/{key}" in results}
    else:
        infos = {v: run_variant(v, args.work / v, args, results, save) for v in args.variants}
    write_report(args, results, infos, time.time() - t0)


if __name__ == "__main__":
    main()
