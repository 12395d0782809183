"""Does sampling the error change the plan? plan with every row's error (--error-sample 1) vs the default sample.

On each tiny trained fixture (bf16, imatrix on data/calib/calibration.txt): plan.measure at both fractions, the
plan at stock Q4_K_M's file size (same imatrix) from each, both quantized and evaluated (KLD vs the bf16 model,
8 x 512 tokens of the same text; in-sample, this is an A/B of the two plans, not a quality claim), and which
tensors' types differ.

Run:  .venv/bin/python bench/qerror_plan_ab.py --work /tmp/qerror-ab
Writes bench/qerror_plan_ab.json and bench/qerror_plan_ab.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(variant: str, work: Path, fixtures: Path) -> dict:
    from edgemoe_cli import plan, qerror
    from edgemoe_cli.convert import convert
    from edgemoe_cli.evaluate import evaluate
    from edgemoe_cli.imatrix import compute_imatrix
    from edgemoe_cli.quantize import quantize
    from edgemoe_cli.recipe import read_tensors

    w = work / variant
    w.mkdir(parents=True, exist_ok=True)
    model, im = w / "bf16.gguf", w / "bf16.imatrix.gguf"
    text = ROOT / "data" / "calib" / "calibration.txt"
    if not model.is_file():
        convert(fixtures / f"tiny-ernie-{variant}", model, "bf16")
    if not im.is_file():
        compute_imatrix(model, text, im, threads=2)
    q4km = quantize(model, "stock:Q4_K_M", out=w / "q4km.gguf", imatrix=im, threads=2, manifest=False)
    tensors, overhead = read_tensors(model)
    out = {"q4km_bytes": q4km.bytes}
    out["q4km_kld"] = evaluate(w / "q4km.gguf", model, text, ctx=512, max_chunks=8, threads=2).kld_mean
    for frac in (1.0, qerror.DEFAULT_FRACTION):
        m = plan.measure(model, im, text, max_chunks=4, threads=2, error_sample=frac, floor=True)  # as measured
        p = plan.plan_from_measurements(m, tensors, overhead, q4km.bytes, "", "ab")
        recipe = w / f"plan-{frac:g}.toml"
        recipe.write_text(p.recipe_toml)
        q = quantize(model, recipe, out=w / f"plan-{frac:g}.gguf", imatrix=im, threads=2, manifest=False)
        e = evaluate(w / f"plan-{frac:g}.gguf", model, text, ctx=512, max_chunks=8, threads=2)
        out[f"{frac:g}"] = {
            "choices": {c.tensor: c.type for c in p.choices},
            "predicted_kld": p.predicted_kld,
            "kld": e.kld_mean,
            "bytes": q.bytes,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--fixtures", default=str(ROOT.parent / "shared" / "fixtures"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "qerror_plan_ab.md"))
    args = ap.parse_args()
    from edgemoe_cli.store import builds_dir

    os.environ.setdefault("EDGEMOE_BUILDS", str(builds_dir()))  # the machine's build, a private store for caches
    os.environ["EDGEMOE_HOME"] = str(Path(args.work) / "home")
    from edgemoe_cli.qerror import DEFAULT_FRACTION, MIN_ROWS

    results = {v: run(v, Path(args.work), Path(args.fixtures)) for v in ("thinking", "pt")}
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    f = f"{DEFAULT_FRACTION:g}"
    lines = [
        "# plan with sampled vs exact errors (issue 14)",
        "",
        f"Written by `bench/qerror_plan_ab.py`. plan at stock Q4_K_M's file size from errors on every row "
        f"(`--error-sample 1`) and on the default sample ({f} of the rows, >= {MIN_ROWS} a tensor). KLD: the "
        "quantized plan against the bf16 model, 8 x 512 tokens of the calibration text.",
        "",
        "| fixture | Q4_K_M KLD | plan (every row): KLD, predicted | plan (sample): KLD, predicted | tensors whose "
        "type differs |",
        "|---|---:|---:|---:|---:|",
    ]
    for v, r in results.items():
        a, b = r["1"], r[f]
        differ = [f"{n}: {t} -> {b['choices'][n]}" for n, t in a["choices"].items() if t != b["choices"][n]]
        lines.append(
            f"| tiny-ernie-{v} | {r['q4km_kld']:.5f} | {a['kld']:.5f}, {a['predicted_kld']:.5f} | "
            f"{b['kld']:.5f}, {b['predicted_kld']:.5f} | {len(differ)} of {len(a['choices'])}"
            + (f" ({', '.join(differ)})" if differ else "")
            + " |"
        )
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
