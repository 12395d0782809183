"""What a step between the high types costs the tensors every token uses, measured and predicted (the fixtures).

Why: bench/plan_miss.md found plan pricing two plans 0.00001 apart that measure 0.00019 apart, the tensors every
token uses one type lower costing 2.84x their predicted change. This lowers those tensors (attention, shared
experts, the dense layer; not the token embedding, whose Q6_K -> Q4_K step is priced right and would dominate every
level) together to each type from Q8_0 down to Q3_K, the rest kept f32, and evaluates them as plan's calibration
runs are (the setting's calibration part and chunks, spread, no repacking), beside plan's prediction from that
setting's measurement, by its weight errors alone (Measurements.weight_predicted) and with the activation term
(Measurements.predicted). A level also holds the activations' quantization, Q8_0's for Q8_0 weights, Q8_K's (one
scale per 256 values) for the k-quants and IQ4_XS: the step between two k-quants cancels it, the step from Q8_0 to
Q6_K does not.

Run:  .venv/bin/python bench/plan_hightype.py --work /tmp/edgemoe-bench-quality [--runs pt:4x4-r2 pt:8x4 ...]
(bench/quality.py's --work and setting names). Writes bench/plan_hightype.json and bench/plan_hightype.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import parse_setting, rotated_text  # noqa: E402

from edgemoe_cli import plan  # noqa: E402
from edgemoe_cli.evaluate import evaluate  # noqa: E402
from edgemoe_cli.quantize import quantize  # noqa: E402
from edgemoe_cli.recipe import quantizable, read_tensors  # noqa: E402
from edgemoe_cli.report import markdown_table, write_json, write_text  # noqa: E402

TYPES = ("q8_0", "q6_k", "q5_k", "q4_k", "iq4_xs", "q3_k")


def measure_run(work: Path, variant: str, setting: str, threads: int) -> list[dict]:
    w = work / variant
    f32, im = w / "f32.gguf", w / "imatrix.gguf"
    tensors, _ = read_tensors(f32)
    cfg, _, k = setting.partition("-r")
    chunks, stride, ctx, score_from = parse_setting(cfg)
    calib = w / "calibration-part.txt"
    text = rotated_text(calib, int(k)) if k else calib
    m = plan.measure(
        f32, im, text, max_chunks=chunks, ctx=ctx, layer_stride=stride, score_from=score_from, workdir=w, floor=True
    )
    members = [
        t.name
        for t in tensors
        if quantizable(t) and "_exps" not in t.name and t.name != "token_embd.weight"
        if all(x in m.errors[t.name] for x in TYPES)
    ]
    others = [t for t in tensors if t.name not in members]
    out = w / "plan-hightype.gguf"
    rows = []
    for ty in TYPES:
        quantize(f32, plan._uniform(ty, members, others), out=out, imatrix=im, threads=threads, manifest=False)
        e = evaluate(
            out,
            f32,
            text,
            ctx=ctx,
            threads=threads,
            max_chunks=chunks,
            spread=True,
            repack=False,
            score_from=score_from,
        )
        out.unlink()
        rows.append(
            {
                "variant": variant,
                "setting": setting,
                "type": ty,
                "kld": e.kld_mean,
                "kld_se": e.kld_stderr,
                "weight_predicted": sum(m.weight_predicted(n, ty) for n in members),
                "predicted": sum(m.predicted(n, ty) for n in members),
                "activation_excess": m.activation_excess,
            }
        )
        print(f"{variant} {setting} {ty}: {e.kld_mean:.6f} ± {e.kld_stderr:.6f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgemoe-bench-quality"))
    ap.add_argument("--runs", nargs="+", default=["pt:4x4-r2", "pt:8x4", "thinking:8x4"], help="VARIANT:SETTING[-rK]")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        variant, _, setting = run.partition(":")
        rows += measure_run(args.work, variant, setting, args.threads)
    write_json({"runs": args.runs, "rows": rows}, ROOT / "bench" / "plan_hightype.json")
    table = []
    for i, r in enumerate(rows):
        prev = (
            rows[i - 1]
            if i and rows[i - 1]["setting"] == r["setting"] and rows[i - 1]["variant"] == r["variant"]
            else None
        )
        step = ["", "", "", ""]
        if prev:
            d = r["kld"] - prev["kld"]
            dw = r["weight_predicted"] - prev["weight_predicted"]
            dp = r["predicted"] - prev["predicted"]
            step = [f"{prev['type'].upper()} -> {r['type'].upper()}", f"{d:.6f}", f"{d / dw:.2f}", f"{d / dp:.2f}"]
        fixture = "PT" if r["variant"] == "pt" else "Thinking"
        table.append(
            [
                f"{fixture} {r['setting']}",
                r["type"].upper(),
                f"{r['kld']:.6f} ± {r['kld_se']:.6f}",
                f"{r['weight_predicted']:.6f}",
                f"{r['predicted']:.6f}",
                *step,
            ]
        )
    excess = ", ".join(
        f"{r['variant']} {r['setting']} {r['activation_excess']:.2f}" for r in rows if r["type"] == TYPES[0]
    )
    md = [
        "# The high-type steps of the tensors every token uses, measured and predicted\n\n",
        f"Written by `.venv/bin/python bench/plan_hightype.py --work WORK --runs {' '.join(args.runs)}` "
        "(bench/quality.py's --work). " + __doc__.split("\n\n")[1].replace("\n", " ") + "\n\n",
        "Attention, shared experts and the dense layer lowered together to each type (the rest f32), KLD on the "
        "setting's calibration part; predicted from that setting's measurement by the weight errors alone and "
        "with the activation term; each step from the type above, measured, and measured / predicted both ways:\n\n",
        markdown_table(
            [
                "fixture, setting",
                "type",
                "measured KLD ± se",
                "predicted (weights)",
                "predicted (+ activations)",
                "step",
                "measured step",
                "/ predicted (weights)",
                "/ predicted (+ activations)",
            ],
            table,
            align="llrrrlrrr",
        ),
        f"\nThe fitted activation excess (Measurements.activation_excess, per unit of predicted Q8_0 KLD): {excess}.\n",
    ]
    write_text("".join(md), ROOT / "bench" / "plan_hightype.md")
    print("".join(md))


if __name__ == "__main__":
    main()
