#!/usr/bin/env python3
"""What building plan's calibration models costs at ERNIE-4.5-21B-A3B's real tensor widths: a whole-model copy per
run (plan.assemble, before issue 14) vs the split model whose shards are written once (plan.CalibrationModel)
-> bench/plan_assembly.md

usage: .venv/bin/python bench/plan_assembly.py REFERENCE.gguf Q3_K.gguf [--work DIR] [--threads 2]

REFERENCE is the bf16 GGUF of a `make_wide_ernie.py` model (real 21B widths), Q3_K the same model quantized to
Q3_K (every quantizable tensor); bench/plan_cost.py leaves both in its --work. For the same two runs plan makes (a
role: ffn_down_exps in every layer; a layer: blk.1), it times both ways of making the calibration model, checks that
llama.cpp evaluates the two models identically (one chunk), and predicts the 21B's assembly time for plan's runs.
Run it under `flock /work/bench.lock`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgemoe_cli import plan  # noqa: E402
from edgemoe_cli.evaluate import evaluate  # noqa: E402
from edgemoe_cli.recipe import read_tensors  # noqa: E402
from edgemoe_cli.report import markdown_table, write_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path)
    ap.add_argument("lowered", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgemoe-bench-assembly"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", type=Path, default=REPO / "data" / "calib" / "calibration.txt")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tensors, _ = read_tensors(args.reference)
    low = {t.name for t in read_tensors(args.lowered)[0] if t.type not in ("f32", "f16", "bf16")}
    runs = {
        "role ffn_down_exps": [t.name for t in tensors if plan.role(t.name) == "ffn_down_exps" and t.name in low],
        "layer blk.1": [t.name for t in tensors if plan.layer(t.name) == "1" and t.name in low],
    }
    rows, out = [], {}
    readers: dict = {}
    assembled = args.work / "assembled.gguf"
    for what, members in runs.items():
        t0 = time.perf_counter()
        n = plan.assemble(args.reference, {m: args.lowered for m in members}, assembled, readers)
        out[f"assemble/{what}"] = {"seconds": time.perf_counter() - t0, "bytes": n}
    t0 = time.perf_counter()
    cm = plan.CalibrationModel(args.reference, args.lowered, args.work, readers)
    out["shards/once"] = {"seconds": time.perf_counter() - t0, "bytes": cm.written}
    kld = {}
    for what, members in runs.items():
        t0 = time.perf_counter()
        n = cm.set(members)
        out[f"shards/{what}"] = {"seconds": time.perf_counter() - t0, "bytes": n}
        plan.assemble(args.reference, {m: args.lowered for m in members}, assembled, readers)
        e_split = evaluate(cm.path, args.reference, args.text, ctx=512, threads=args.threads, max_chunks=1)
        e_whole = evaluate(assembled, args.reference, args.text, ctx=512, threads=args.threads, max_chunks=1)
        kld[what] = (e_split.kld_mean, e_whole.kld_mean)
    assembled.unlink(missing_ok=True)
    shutil.rmtree(cm.dir, ignore_errors=True)

    for key, r in out.items():
        rate = r["bytes"] / r["seconds"] / 1e6
        rows.append([key, f"{r['bytes'] / 1e6:,.1f} MB", f"{r['seconds']:.2f}", f"{rate:.0f}"])
    # 21B: plan's runs (14 roles + the measured layers; the floor evaluates the kept Q8_0 file itself)
    ref_21b = 43_650_875_776  # bytes of the bf16 21B GGUF (bench/plan_cost.md)
    q3_21b = ref_21b * args.lowered.stat().st_size / args.reference.stat().st_size
    copy_rate = out["assemble/role ffn_down_exps"]["bytes"] / out["assemble/role ffn_down_exps"]["seconds"]
    shard_rate = out["shards/once"]["bytes"] / out["shards/once"]["seconds"]
    first = max(out[f"shards/{w}"]["seconds"] for w in runs)  # per run; the 21B's first shard is ~25 MB more
    lines = []
    for stride in (1, 4):
        n_runs = 14 + len(plan.measured_layers(list(range(28)), stride, 1))
        old = n_runs * ref_21b / copy_rate
        new = (ref_21b + q3_21b) / shard_rate + n_runs * first
        lines.append([f"{n_runs} runs (layer stride {stride})", f"{old / 60:.1f} min", f"{new / 60:.1f} min"])
    md = [
        "# plan's calibration models at real widths: a copy per run vs shards written once\n\n",
        f"Made by `bench/plan_assembly.py {args.reference} {args.lowered}` (page cache warm, 2-core x86 box, under "
        "/work/bench.lock). assemble: the whole model written per run, as plan did before; shards: "
        "plan.CalibrationModel, each lowerable tensor written once as reference and as Q3_K, then per run the first "
        "shard (keys, norms, routers) rewritten and the other shards re-pointed.\n\n",
        markdown_table(["step", "tensor bytes written", "seconds", "MB/s"], rows, align="lrrr"),
        "\nllama.cpp evaluates both the same (mean KLD vs the reference, 1 chunk of 512 tokens): "
        + "; ".join(f"{w}: split {a:.6g}, assembled {b:.6g}" for w, (a, b) in kld.items())
        + ".\n\n",
        f"At ERNIE-4.5-21B-A3B (bf16 reference 43.7 GB, its Q3_K {q3_21b / 1e9:.1f} GB), at these rates:\n\n",
        markdown_table(["plan's runs", "a copy per run", "shards once + per-run first shard"], lines, align="lrr"),
    ]
    write_text("".join(md), REPO / "bench" / "plan_assembly.md")
    (REPO / "bench" / "plan_assembly.json").write_text(json.dumps({"steps": out, "kld": kld}, indent=1))
    print("".join(md))


if __name__ == "__main__":
    main()
