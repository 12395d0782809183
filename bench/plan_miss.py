"""Where a plan that missed loses its KLD: two of bench/quality.py's plans at one size, one group of choices swapped
at a time, measured and predicted.

Why: after the last layer's routed experts got a depth factor of their own (plan.expert_factor_layers), --chunks 4
still missed issue 14's target on one PT draw (bench/quality.md: 4 x 4 on the calibration part rotated by 2/9,
0.00120 at stock Q4_K_M's size against 0.00101 for the draw rotated by 1/9, at the same size). The two recipes
differ in many tensors. This splits the difference: the tensors where plan A (the miss) and plan B (the hit) differ
are grouped (routed experts, the token embedding, every other tensor: attention, shared experts, the dense layer),
and A is quantized and evaluated with each group switched to B's types, as bench/quality.py evaluates (the
evaluation part, 8 chunks of 512, second halves scored). Beside each measured change, plan's predicted change from
the measurement A was planned from (the same setting and calibration text); a group's bytes change too, so the
rows are no budget-neutral trade, but each says how well the prediction prices that group's choices.

Run:  .venv/bin/python bench/plan_miss.py --work /tmp/edgemoe-bench-quality [--variant pt] [--a 4x4-r2] [--b 4x4-r1]
Writes bench/plan_miss.json and bench/plan_miss.md.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import parse_setting, rotated_text  # noqa: E402

from edgemoe_cli import plan  # noqa: E402
from edgemoe_cli.evaluate import evaluate  # noqa: E402
from edgemoe_cli.quantize import quantize  # noqa: E402
from edgemoe_cli.recipe import Rule, load_recipe, quantizable, read_tensors, resolve  # noqa: E402
from edgemoe_cli.report import markdown_table, write_json, write_text  # noqa: E402

AT = "Q4_K_M"


def group(name: str) -> str:
    if name == "token_embd.weight":
        return "token embedding"
    return "routed experts" if "_exps" in name else "the rest (attention, shared experts, dense layer)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgemoe-bench-quality"))
    ap.add_argument("--variant", default="pt", choices=("thinking", "pt"))
    ap.add_argument("--a", default="4x4-r2", help="the plan that missed: SETTING[-rK] as bench/quality.py names it")
    ap.add_argument("--b", default="4x4-r1", help="the plan it is compared with")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    w = args.work / args.variant
    f32, im, held_out = w / "f32.gguf", w / "imatrix.gguf", w / "evaluation-part.txt"
    tensors, _ = read_tensors(f32)
    recipes = {k: load_recipe(w / f"plan-{name}-at-{AT}.toml") for k, name in (("a", args.a), ("b", args.b))}
    types = {k: {p.name: p.type.lower() for p in resolve(r, tensors)[0]} for k, r in recipes.items()}
    differ = [t.name for t in tensors if quantizable(t) and types["a"][t.name] != types["b"][t.name]]
    groups = sorted({group(n) for n in differ})
    # the measurement plan A was made from: its setting on its rotation of the calibration part
    cfg, _, k = args.a.partition("-r")
    chunks, stride, ctx, score_from = parse_setting(cfg)
    calib = w / "calibration-part.txt"
    text = rotated_text(calib, int(k)) if k else calib
    m = plan.measure(
        f32, im, text, max_chunks=chunks, ctx=ctx, layer_stride=stride, score_from=score_from, workdir=w, floor=True
    )

    def with_b(names: list[str]):
        r = copy.deepcopy(recipes["a"])
        r.rules[:0] = [Rule("^" + re.escape(n) + "$", types["b"][n]) for n in names if n != "token_embd.weight"]
        if "token_embd.weight" in names:
            r.token_embedding = r.output = types["b"]["token_embd.weight"]
        return r

    def measured(recipe) -> tuple[int, float, float]:
        out = w / "plan-miss.gguf"
        quantize(f32, recipe, out=out, imatrix=im, threads=args.threads, manifest=False)
        e = evaluate(out, f32, held_out, ctx=512, threads=args.threads, max_chunks=8)
        size = out.stat().st_size
        out.unlink()
        return size, e.kld_mean, e.kld_stderr

    base = measured(recipes["a"])
    rows = [{"swap": f"none: plan {args.a}", "bytes": base[0], "kld": base[1], "kld_se": base[2], "tensors": []}]
    for g in [*groups, "all: plan " + args.b]:
        names = differ if g.startswith("all") else [n for n in differ if group(n) == g]
        size, kld, se = measured(with_b(names) if not g.startswith("all") else recipes["b"])
        predicted = sum(m.predicted(n, types["b"][n]) - m.predicted(n, types["a"][n]) for n in names)
        rows.append(
            {
                "swap": g,
                "bytes": size,
                "kld": kld,
                "kld_se": se,
                "measured_change": kld - base[1],
                "predicted_change": predicted,
                "tensors": [f"{n}: {types['a'][n]} -> {types['b'][n]}" for n in names],
            }
        )
        print(f"{g}: {kld:.5f} ({kld - base[1]:+.5f}, predicted {predicted:+.5f})", flush=True)
    write_json({"variant": args.variant, "a": args.a, "b": args.b, "rows": rows}, ROOT / "bench" / "plan_miss.json")
    fixture = "PT" if args.variant == "pt" else "Thinking"
    table = [
        [
            r["swap"],
            f"{r['bytes']:,}",
            f"{r['kld']:.5f} ± {r['kld_se']:.5f}",
            f"{r['measured_change']:+.5f}" if "measured_change" in r else "",
            f"{r['predicted_change']:+.5f}" if "predicted_change" in r else "",
            f"{r['measured_change'] / r['predicted_change']:.2f}"
            if r.get("predicted_change") and "measured_change" in r
            else "",
        ]
        for r in rows
    ]
    swaps = "\n".join(f"- {r['swap']}: " + ", ".join(r["tensors"]) for r in rows[1:-1])
    md = [
        "# Where a plan that missed loses its KLD\n\n",
        f"Written by `.venv/bin/python bench/plan_miss.py --work WORK --variant {args.variant} --a {args.a} "
        f"--b {args.b}` (bench/quality.py's --work). " + __doc__.split("\n\n")[1].replace("\n", " ") + "\n\n",
        f"{fixture}, plan {args.a} (A) and plan {args.b} (B) at stock {AT}'s size; A with one group of its choices "
        f"switched to B's, KLD on the evaluation part, the predicted change from A's measurement ({args.a}):\n\n",
        markdown_table(
            [
                "A with B's types for",
                "file bytes",
                "KLD ± se",
                "measured change",
                "predicted change",
                "measured / predicted",
            ],
            table,
            align="lrrrrr",
        ),
        "\nThe tensors of each group:\n\n" + swaps + "\n",
    ]
    write_text("".join(md), ROOT / "bench" / "plan_miss.md")
    print("".join(md))


if __name__ == "__main__":
    main()
