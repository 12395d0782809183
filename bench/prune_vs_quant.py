#!/usr/bin/env python3
"""Pruning experts vs quantizing lower, on the tiny ERNIE fixture -> bench/prune.md.

usage: .venv/bin/python bench/prune_vs_quant.py [--variant thinking|pt] [--recipe stock:Q8_0] [--out bench/prune.md]

1. Convert the fixture to f32: the reference every KLD is measured against.
2. Quantize it with --recipe (the "same recipe"), then prune that file to keep 75% and 50% of each layer's experts,
   scored by REAP on the first part of calib.txt (and, for comparison, by the data-free weight proxy).
3. Quantize the f32 model lower with stock llama.cpp types, to land near the pruned files' sizes.
4. `edgemoe eval` machinery (evaluate.evaluate): PPL and KLD(f32 || model) on the held-out rest of calib.txt,
   which neither the REAP scores nor anything else has seen.
Every number in the report is produced by this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgemoe_cli import evaluate, prune, quantize  # noqa: E402
from edgemoe_cli.convert import convert  # noqa: E402
from edgemoe_cli.report import markdown_table  # noqa: E402
from edgemoe_cli.units import human_bytes  # noqa: E402

FIXTURES = Path(os.environ.get("EDGEMOE_SHARED_FIXTURES", REPO.parent / "shared" / "fixtures"))
LOWER = ("stock:Q6_K", "stock:Q5_K_M", "stock:Q5_0", "stock:Q4_K_M", "stock:Q4_0", "stock:Q3_K_M", "stock:Q2_K")
CALIB_SHARE = 0.6  # first 60% of calib.txt scores experts; the rest is the evaluation text


def split_text(src: Path, work: Path) -> tuple[Path, Path]:
    text = src.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * CALIB_SHARE)) + 1
    calib, held_out = work / "calib-part.txt", work / "eval-part.txt"
    calib.write_text(text[:cut], encoding="utf-8")
    held_out.write_text(text[cut:], encoding="utf-8")
    return calib, held_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="thinking", choices=("thinking", "pt"))
    ap.add_argument("--recipe", default="stock:Q8_0", help="the recipe the pruned models keep")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "prune.md")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=40, help="evaluation windows of 512 tokens (at most)")
    args = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib, held_out = split_text(FIXTURES / "calib.txt", work)
        f32 = work / "f32.gguf"
        convert(FIXTURES / f"tiny-ernie-{args.variant}", f32, "f32")
        same = work / "same-recipe.gguf"
        quantize.quantize(f32, args.recipe, out=same, threads=args.threads, manifest=False)
        models: list[tuple[str, str, Path]] = [("unpruned", args.recipe, same)]
        for keep in ("75%", "50%"):
            for score, kw in (("reap", {"text": calib}), ("weights", {})):
                out = work / f"keep{keep[:-1]}-{score}.gguf"
                r = prune.prune(same, keep=keep, out=out, threads=args.threads, **kw)
                models.append((f"pruned keep {r.n_expert_after}/{r.n_expert_before} ({score})", args.recipe, out))
        for recipe in LOWER:
            out = work / f"{recipe.split(':')[1]}.gguf"
            quantize.quantize(f32, recipe, out=out, threads=args.threads, manifest=False)
            models.append(("quantized lower", recipe, out))
        rows = []
        for what, recipe, path in models:
            e = evaluate.evaluate(path, f32, held_out, ctx=512, threads=args.threads, max_chunks=args.chunks)
            rows.append(
                {
                    "what": what,
                    "recipe": recipe,
                    "bytes": path.stat().st_size,
                    "ppl": e.ppl,
                    "base_ppl": e.base_ppl,
                    "kld": e.kld_mean,
                    "kld_p99": e.kld_p99,
                    "top1": e.top1_agreement,
                    "tokens": e.tokens_scored,
                }
            )
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    write_report(args, rows, time.time() - t0)


def verdicts(rows: list[dict]) -> list[str]:
    """For each REAP-pruned model, the lower quantization nearest in size (not larger) and which is closer to f32."""
    lower = [r for r in rows if r["what"] == "quantized lower"]
    lines = []
    for p in (r for r in rows if "(reap)" in r["what"]):
        fits = [q for q in lower if q["bytes"] <= p["bytes"]]
        if not fits:
            lines.append(f"- {p['what']}: no lower quantization is as small ({human_bytes(p['bytes'])}).")
            continue
        q = max(fits, key=lambda r: r["bytes"])
        winner = "pruning" if p["kld"] < q["kld"] else "quantizing lower"
        lines.append(
            f"- {p['what']}, {human_bytes(p['bytes'])}: KLD {p['kld']:.4f}, PPL {p['ppl']:.2f} — vs {q['recipe']} "
            f"at {human_bytes(q['bytes'])} (smaller or equal): KLD {q['kld']:.4f}, PPL {q['ppl']:.2f}. "
            f"**{winner.capitalize()} wins** at this size."
        )
    return lines


def write_report(args, rows: list[dict], seconds: float) -> None:
    base = rows[0]
    table = markdown_table(
        ["model", "recipe", "size", "vs unpruned", "PPL", "KLD mean", "KLD p99", "top-1 agree"],
        [
            [
                r["what"],
                r["recipe"],
                human_bytes(r["bytes"]),
                f"{r['bytes'] / base['bytes']:.0%}",
                round(r["ppl"], 3),
                round(r["kld"], 5),
                round(r["kld_p99"], 4),
                f"{r['top1']:.1%}",
            ]
            for r in sorted(rows, key=lambda r: -r["bytes"])
        ],
        align="llrrrrrr",
    )
    text = f"""# Pruning experts vs quantizing lower (tiny ERNIE fixture, {args.variant})

Made by `.venv/bin/python bench/prune_vs_quant.py --variant {args.variant} --recipe {args.recipe}` ({seconds:.0f} s).
The fixture `tiny-ernie-{args.variant}` (16 routed experts, top-4, 3 MoE layers) converted to f32 is the reference.
Pruned models are the `{args.recipe}` file with 12 or 8 experts kept per layer: REAP scores measured on the first
{CALIB_SHARE:.0%} of `calib.txt`, or the data-free weight proxy. Everything is evaluated on the held-out last
{1 - CALIB_SHARE:.0%} of `calib.txt` ({base["tokens"]} scored tokens, windows of 512): perplexity, and KL divergence
of each model's next-token distribution from the f32 model's (f32 PPL {base["base_ppl"]:.3f}).

{table}
## Which wins at the same bytes

{chr(10).join(verdicts(rows))}

On this fixture the experts take {expert_share_note(rows)}. {conclusion(rows)}
Pruning removes whole experts: every token the router would have sent to a dropped expert loses that expert's
contribution. Quantizing lower keeps every expert and adds rounding noise to all weights. On the real 64-expert
model, whose usage differs, the balance can differ too: measure it there with the same steps (`edgemoe prune`,
`edgemoe quantize`, `edgemoe eval`).
"""
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


def conclusion(rows: list[dict]) -> str:
    lines = verdicts(rows)
    pruning = sum("**Pruning wins**" in v for v in lines)
    lower = sum("**Quantizing lower wins**" in v for v in lines)
    if pruning and not lower:
        return "Measured here, pruning beats quantizing lower at equal size in every case."
    if lower and not pruning:
        return "Measured here, quantizing lower beats pruning at equal size in every case."
    return f"Measured here, the result is mixed: pruning wins {pruning}, quantizing lower wins {lower}."


def expert_share_note(rows: list[dict]) -> str:
    base = rows[0]
    p50 = next(r for r in rows if "8/16 (reap)" in r["what"])
    share = 2 * (base["bytes"] - p50["bytes"]) / base["bytes"]
    return f"{share:.0%} of the file's bytes (halving them saves {1 - p50['bytes'] / base['bytes']:.0%})"


if __name__ == "__main__":
    main()
