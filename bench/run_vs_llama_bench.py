"""Is `edgemoe run` as fast as llama.cpp itself?  Generation tokens/s of `edgemoe run --json` against llama-bench's
text-generation test on the same GGUF, the same libllama build and the same thread count.

    .venv/bin/python bench/run_vs_llama_bench.py MODEL.gguf [--threads N] [--reps R] [--out bench/run-vs-llama-bench.md]

The two are interleaved rep by rep so that load from other processes hits both alike; the table reports medians.
llama-bench's tg test decodes one token over and over from an empty context; `run` decodes its real reply after
the prompt (its gen_tps counts decode steps after the first token, as tg does). A second table, measured in one
process with paired ratios, splits the difference into what run's Python loop adds to libllama's decode time and
what the workload itself changes (on a MoE, a repeated token keeps hitting the same experts). llama-bench runs
with flash attention off, as `run` does, so both do the same arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
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


def inside_run(model: Path, threads: int, question: str, max_tokens: int, reps: int) -> dict[str, list[float]]:
    """Per rep, in one process, so that load from other processes cancels out of the ratios:

    - gen_tps of run's loop, and libllama's own decode tokens/s for the same generation (llama_perf_context):
      what the Python loop (sampling, detokenizing) adds to decoding;
    - pure decode of the reply's real tokens after its prompt, against pure decode of one token repeated from an
      empty context, which is what llama-bench's tg test decodes: how much the workload itself differs.
    """
    from edgemoe_cli.generate import chat_prompt, chat_reply, import_binding, load_model, tokenize_prompt

    llama_cpp = import_binding()
    llm = load_model(model, ctx=4096, threads=threads)
    prompt = tokenize_prompt(llm, chat_prompt(llm, question)[0])
    reply = chat_reply(llm, question, max_tokens=max_tokens, temp=0)
    generated = llm.tokenize(reply.raw.encode(), add_bos=False, special=True)
    repeated = [llm.token_bos()] * len(generated)

    def decode_tps(prefix: list[int], tokens: list[int]) -> float:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        if prefix:
            batch = (llama_cpp.llama_token * len(prefix))(*prefix)
            llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(batch, len(prefix)))
        one = (llama_cpp.llama_token * 1)()
        start = time.perf_counter()
        for t in tokens:
            one[0] = t
            llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(one, 1))
        llama_cpp.llama_synchronize(llm.ctx)
        return len(tokens) / (time.perf_counter() - start)

    out: dict[str, list[float]] = {"loop": [], "decode": [], "real": [], "repeated": []}
    for _ in range(reps):
        llama_cpp.llama_perf_context_reset(llm.ctx)
        r = chat_reply(llm, question, max_tokens=max_tokens, temp=0)
        perf = llama_cpp.llama_perf_context(llm.ctx)
        out["loop"].append(r.gen_tps)
        out["decode"].append(perf.n_eval / perf.t_eval_ms * 1000)
        out["repeated"].append(decode_tps([], repeated))
        out["real"].append(decode_tps(prompt, generated))
    llm.close()
    return out


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
    inside = inside_run(args.model, args.threads, args.question, args.tokens, args.reps)

    def row(label: str, key: str) -> str:
        values = inside[key]
        return f"| {label} | {statistics.median(values):.1f} | {', '.join(f'{x:.0f}' for x in values)} |"

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(inside[a], inside[b]))
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
        "Where the difference comes from (one process, reps interleaved, ratios paired per rep):",
        "",
        "| | median tok/s | all reps (tok/s) |",
        "|---|---|---|",
        row("run's loop: decode + sample + detokenize (gen_tps)", "loop"),
        row("libllama's decode time in the same generations (llama_perf_context)", "decode"),
        row("pure decode: the reply's real tokens after its prompt", "real"),
        row("pure decode: one token repeated from an empty context (llama-bench's tg workload)", "repeated"),
        f"| ratio run's loop / its own decode time | **{paired('loop', 'decode'):.3f}** | Python's share |",
        f"| ratio real tokens / repeated token | **{paired('real', 'repeated'):.3f}** | the workload's share |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
