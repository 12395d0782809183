"""Is `edgemoe run` as fast as llama.cpp itself?  Generation tokens/s of `edgemoe run --json` against llama-bench's
text-generation test on the same GGUF, the same libllama build and the same thread count.

    .venv/bin/python bench/run_vs_llama_bench.py MODEL.gguf [--threads N] [--reps R] [--out bench/run-vs-llama-bench.md]

The two are interleaved rep by rep so that load from other processes hits both alike; the table reports medians.
llama-bench generates `-n` tokens from an empty context; `run` answers a question (its prompt is processed first),
and its gen_tps counts decode steps after the first token, as llama-bench's tg does. llama-bench runs with flash
attention set as `run` sets it (off), so the two do the same arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgemoe_cli.generate import default_threads  # noqa: E402
from edgemoe_cli.llamacpp import find_tool  # noqa: E402


def llama_bench(bench: Path, model: Path, threads: int, n: int) -> dict:
    cmd = [str(bench), "-m", str(model), "-p", "0", "-n", str(n), "-t", str(threads), "-r", "1", "-fa", "0",
           "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def edgemoe_run(model: Path, threads: int, question: str, max_tokens: int) -> dict:
    edgemoe = Path(sys.executable).with_name("edgemoe")
    cmd = [str(edgemoe), "run", str(model), "-p", question, "--temp", "0", "--threads", str(threads),
           "--max-tokens", str(max_tokens), "--json"]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64, help="llama-bench -n, and run's --max-tokens")
    ap.add_argument("--question", default="What is 51 - 29?")
    ap.add_argument("--out", type=Path, help="append the Markdown table to this file")
    args = ap.parse_args()

    bench = find_tool("llama-bench")
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    bench_tps, run_tps, run_tokens = [], [], []
    for _ in range(args.reps):
        b = llama_bench(bench, args.model, args.threads, args.tokens)
        r = edgemoe_run(args.model, args.threads, args.question, args.tokens)
        bench_tps.append(b["avg_ts"])
        run_tps.append(r["gen_tps"])
        run_tokens.append(r["completion_tokens"])
    b_med, r_med = statistics.median(bench_tps), statistics.median(run_tps)
    lines = [
        f"### {args.model.name}, {args.threads} threads, {platform.machine()}",
        "",
        f"- load average before / after: {load_before} / {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} CPUs (other processes share this machine)",
        f"- llama-bench: `{bench}` (build {b['build_commit']}, {b['cpu_info']}), `-p 0 -n {args.tokens} -fa 0`",
        f"- edgemoe run: libllama `{r['library']}`, question {args.question!r}, "
        f"{min(run_tokens)}-{max(run_tokens)} tokens generated",
        f"- command: `.venv/bin/python bench/run_vs_llama_bench.py {args.model} --threads {args.threads} "
        f"--reps {args.reps} --tokens {args.tokens}`",
        "",
        "| | median tok/s | all reps (tok/s) |",
        "|---|---|---|",
        f"| llama-bench tg{args.tokens} | {b_med:.1f} | {', '.join(f'{x:.0f}' for x in bench_tps)} |",
        f"| edgemoe run gen_tps | {r_med:.1f} | {', '.join(f'{x:.0f}' for x in run_tps)} |",
        f"| ratio run / llama-bench | **{r_med / b_med:.3f}** | target >= 0.95 |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
