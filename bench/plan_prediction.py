"""How well plan predicts the KLD of the choices it weighs: one routed-expert group lowered alone, measured.

Why: in bench/quality.md every plan at stock Q4_K_M's size that put routed gate/up experts of the last layer at Q3_K
measured 0.00110-0.00124 and every plan that did not 0.00102-0.00108, whatever the calibration setting or draw. So
the misses were a choice the prediction gets wrong, not chunk noise. This measures the prediction piece by piece: on
each fixture, with bench/quality.py's files (f32 GGUF, imatrix, calibration part) and plan's default measurement
(--chunks 8 --layer-stride 4, the floor measured), each MoE layer's routed gate+up experts, and its routed down
experts, are quantized alone to Q3_K (the calibration type), IQ4_XS and Q4_K, and the token embedding (tied: also
the output head) alone to Q3_K, Q4_K, Q6_K and Q8_0 (the rest kept f32), and evaluated as plan's calibration runs
are (the calibration part, 8 chunks of 512 spaced evenly over it, second halves scored, no repacking); the
prediction is plan's gain x depth factor x error summed over the group's tensors. Plan's fit now gives the last
layer's routed experts a factor of their own (plan.expert_factor_layers); the columns "fit before" are the
predictions of the fit with one factor per layer (commit 2003795), against the same measured KLDs.

Run:  .venv/bin/python bench/plan_prediction.py --work /tmp/edgemoe-bench-quality   (bench/quality.py's --work)
Writes bench/plan_prediction.json and bench/plan_prediction.md. With --measured JSON (an earlier run's json, made from
the same f32 GGUF, imatrix and calibration part: a copy of its --work) the measured KLDs are taken from there and
only plan's measurement and predictions are made again: what a change of plan's fit does to its prediction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgemoe_cli import plan  # noqa: E402
from edgemoe_cli.evaluate import evaluate  # noqa: E402
from edgemoe_cli.quantize import quantize  # noqa: E402
from edgemoe_cli.recipe import quantizable, read_tensors  # noqa: E402
from edgemoe_cli.report import markdown_table, write_json, write_text  # noqa: E402

TYPES = ("q3_k", "iq4_xs", "q4_k")
# the token embedding (tied: also the output head) at the types plan chooses it from (>= Q4_K: MIN_EVERY_TOKEN)
EMBEDDING_TYPES = ("q3_k", "q4_k", "q6_k", "q8_0")
# the steps the solver weighs, measured and predicted: group -> (from type, to type)
STEPS = {"token_embd": (("q8_0", "q6_k"), ("q6_k", "q4_k"))}
EXPERT_STEPS = (("iq4_xs", "q3_k"),)
OUT_JSON = ROOT / "bench" / "plan_prediction.json"
GROUPS = {"gate+up exps": ("ffn_gate_exps", "ffn_up_exps"), "down exps": ("ffn_down_exps",)}


def run(variant: str, work: Path, threads: int, measured: dict | None = None) -> list[dict]:
    w = work / variant
    f32, im, cal = w / "f32.gguf", w / "imatrix.gguf", w / "calibration-part.txt"
    for p in (f32, im, cal):
        if not p.is_file():
            raise SystemExit(f"{p} is missing: run bench/quality.py --work {work} first")
    m = plan.measure(f32, im, cal, max_chunks=8, layer_stride=4, threads=threads, workdir=w, floor=True)
    targets = [t for t in read_tensors(f32)[0] if quantizable(t)]
    blocks = sorted({int(plan.layer(t.name)) for t in targets if "_exps" in t.name})
    lowered = [
        (b, group, [f"blk.{b}.{r}.weight" for r in roles], TYPES) for b in blocks for group, roles in GROUPS.items()
    ]
    lowered.append(("-", "token_embd", ["token_embd.weight"], EMBEDDING_TYPES))
    rows = []
    for b, group, members, types in lowered:
        for ty in types:
            if measured is not None and (variant, b, group, ty) in measured:
                kld, se, before = measured[(variant, b, group, ty)]
            else:
                out = w / f"prediction-{b}-{plan.role(members[0])}-{ty}.gguf"
                quantize(f32, plan._uniform(ty, members, keep=targets), out=out, imatrix=im, threads=threads)
                e = evaluate(out, f32, cal, ctx=512, threads=threads, max_chunks=8, spread=True, repack=False)
                out.unlink()
                kld, se, before = e.kld_mean, e.kld_stderr, None
                print(f"{variant} {group} {ty} measured", flush=True)
            rows.append(
                {
                    "variant": variant,
                    "layer": b,
                    "group": group,
                    "type": ty,
                    "kld": kld,
                    "kld_se": se,
                    "predicted": sum(m.predicted(n, ty) for n in members),
                    # with --measured: the earlier run's prediction (plan's fit then)
                    **({"predicted_before": before} if before is not None else {}),
                }
            )
            r = rows[-1]
            print(f"{variant} {b} {group} {ty}: {r['kld']:.6f} vs {r['predicted']:.6f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgemoe-bench-quality"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measured", type=Path, help="take the measured KLDs from this earlier json (same --work files)")
    args = ap.parse_args()
    measured = None
    if args.measured:
        measured = {
            (r["variant"], r["layer"], r["group"], r["type"]): (r["kld"], r["kld_se"], r["predicted"])
            for r in json.loads(args.measured.read_text())["rows"]
        }
    rows = [r for v in ("thinking", "pt") for r in run(v, args.work, args.threads, measured)]
    write_json({"rows": rows, "measured_from": str(args.measured) if args.measured else None}, OUT_JSON)
    table = [
        [
            "PT" if r["variant"] == "pt" else "Thinking",
            r["layer"],
            r["group"],
            r["type"],
            f"{r['kld']:.6f} ± {r['kld_se']:.6f}",
            f"{r['predicted']:.6f}",
            f"{r['kld'] / r['predicted']:.2f}",
        ]
        for r in rows
    ]
    # what the solver trades: a routed group's step from IQ4_XS down to Q3_K, the embedding's Q8_0 -> Q6_K -> Q4_K,
    # measured and predicted
    by = {(x["variant"], x["layer"], x["group"], x["type"]): x for x in rows}
    steps = []
    for r in rows:
        for hi, lo in STEPS.get(r["group"], EXPERT_STEPS):
            if r["type"] != lo:
                continue
            up = by[(r["variant"], r["layer"], r["group"], hi)]
            dm, dp = r["kld"] - up["kld"], r["predicted"] - up["predicted"]
            name = "PT" if r["variant"] == "pt" else "Thinking"
            row = [name, r["layer"], r["group"], f"{hi.upper()} -> {lo.upper()}", f"{dm:.6f}", f"{dp:.6f}"]
            row.append(f"{dm / dp:.2f}")
            if "predicted_before" in r and "predicted_before" in up:
                before = r["predicted_before"] - up["predicted_before"]
                row += [f"{before:.6f}", f"{dm / before:.2f}"]
            elif any("predicted_before" in x for x in rows):
                row += ["", ""]
            steps.append(row)
    then = ["predicted step, fit before", "measured / predicted before"] if steps and len(steps[0]) > 7 else []
    command = "`.venv/bin/python bench/plan_prediction.py --work WORK" + (
        f" --measured {args.measured}`" if args.measured else "`"
    )
    md = [
        "# plan's prediction of a single choice, measured (the fixtures)\n\n",
        f"Written by {command} (bench/quality.py's --work). " + __doc__.split("\n\n")[1].replace("\n", " ") + "\n\n",
        markdown_table(
            ["fixture", "layer", "lowered alone", "type", "measured KLD ± se", "predicted", "measured / predicted"],
            table,
            align="lrllrrr",
        ),
        "\nA group's measured KLD at any type also holds its matmuls' activation quantization (to Q8_K), which "
        "plan leaves to the floor, not to the group's prediction: it weighs most at the 4-bit types' small KLDs. "
        "It cancels in the steps the solver weighs, a routed group's IQ4_XS -> Q3_K and the embedding's Q8_0 -> "
        "Q6_K -> Q4_K (the KLD it accepts there to spend the bytes elsewhere), measured and predicted:\n\n",
        markdown_table(
            ["fixture", "layer", "group", "step", "measured", "predicted", "measured / predicted", *then],
            steps,
            align="lrllrrr" + "rr" * bool(then),
        ),
    ]
    write_text("".join(md), ROOT / "bench" / "plan_prediction.md")
    print("".join(md))


if __name__ == "__main__":
    main()
