#!/usr/bin/env python3
"""Tokens/s of `edgemoe run` with 0 (local), 1, 2 and 3 loopback `edgemoe worker`s, and what RPC costs per token
-> bench/cluster.md. A benchmark, not a test.

usage: .venv/bin/python bench/cluster.py [--model M.gguf ...] [--rounds 3] [--out bench/cluster.md]

Default models: the tiny Thinking fixture at f16 (converted here) and, when present, /work/bench-models'
wide-uniform-q4_0.gguf (real ERNIE-4.5 widths, 5 layers). Every process uses 1 thread (the local one and each
rpc-server), so on a shared 2-core box the workers do not fight the local process for cores: a pipeline split runs
one part at a time anyway. Per-token RPC traffic is counted from one rpc-server run with GGML_RPC_DEBUG=1, as the
difference between a 48-token and a 16-token generation (so model load and prompt drop out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgemoe_cli import cluster  # noqa: E402
from edgemoe_cli.convert import convert  # noqa: E402
from edgemoe_cli.llamacpp import find_tool  # noqa: E402
from edgemoe_cli.report import markdown_table  # noqa: E402

FIXTURES = Path(os.environ.get("EDGEMOE_SHARED_FIXTURES", REPO.parent / "shared" / "fixtures"))
WIDE = Path("/work/bench-models/wide-uniform-q4_0.gguf")
QUESTION = "What is 51 - 29?"
EDGEMOE = [sys.executable, "-m", "edgemoe_cli.cli"]
READING = """## Reading it

What RPC costs per token. llama.cpp splits by layers, so one token still runs the layers one after another:
the local process runs its layers, then, per worker in order, sends the worker what its part needs (the
`set_tensor` calls: the hidden state plus positions, mask and KV-cache indices — 8 calls, 5 KB at hidden 256,
36 KB at hidden 2560), asks it to re-run the graph it already holds (`graph_recompute`, 1 call) and reads back
its output (`get_tensor`, 1 call, 32 KB here). Every one of those is a TCP exchange that the next step waits for,
so the cost is latency x exchanges x workers, plus bytes / bandwidth, on top of the same compute — nothing runs
in parallel for one sequence. On loopback that is a fraction of a millisecond per worker per token, inside this
shared machine's noise (the tiny rows vary 2-5x between rounds; its +ms column is noise-dominated). Between
boards on gigabit Ethernet, ~36 KB is ~0.3 ms on the wire plus ~0.1-0.3 ms of round trips per worker per token:
a few percent of a 21B-A3B token on a board (tens of ms). RPC buys memory (a model no single board holds), not
speed.

Why the wide model is faster with workers than alone here (most likely; not isolated): `run` is a fresh process per
question, and alone it
maps the 1.8 GB GGUF and faults its pages in during the first tokens it generates (llama-bench, which warms up
first, gives 50-70 tokens/s on this file at 1 thread); a worker receives its layers by copy while the model loads,
before any token is timed. So the wide rows compare a cold local run with pre-loaded workers — do not read them as
RPC being free. The text was the single-process greedy text in every configuration.
"""


def run(model: Path, workers: list[str], max_tokens: int = 64) -> dict:
    args = [
        *EDGEMOE,
        "run",
        str(model),
        "-p",
        QUESTION,
        "--temp",
        "0",
        "--threads",
        "1",
        "--ctx",
        "512",
        "--max-tokens",
        str(max_tokens),
        "--json",
    ]
    if workers:
        args += ["--workers", ",".join(workers)]
    proc = subprocess.run(args, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(proc.stdout)


def speeds(model: Path, rounds: int) -> list[dict]:
    rows = []
    for n in range(4):
        workers = [cluster.Worker(port=port, threads=1) for port in range(50160, 50160 + n)]
        try:
            results = [run(model, [w.info.address for w in workers]) for _ in range(rounds)]
        finally:
            for w in workers:
                w.stop()
        tps = statistics.median(r["gen_tps"] for r in results)
        rows.append(
            {
                "workers": n,
                "gen_tps": tps,
                "prompt_tps": statistics.median(r["prompt_tps"] for r in results),
                "tokens": results[0]["completion_tokens"],
                "raw": results[0]["raw"],
                "split": results[0].get("split", {}).get("parts"),
                "all": [r["gen_tps"] for r in results],
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "raw"}), flush=True)
    return rows


def rpc_traffic(model: Path) -> dict:
    """RPC commands and payload bytes per generated token with one worker (48-token run minus 16-token run)."""
    counts = {}
    for n_tokens in (16, 48):
        log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        port = 50170
        server = subprocess.Popen(
            [str(find_tool("ggml-rpc-server")), "--port", str(port), "--threads", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GGML_RPC_DEBUG": "1"},
        )
        try:
            for _ in range(100):
                if cluster.reachable(cluster.WorkerAddress("127.0.0.1", port), timeout=1) is None:
                    break
                time.sleep(0.1)
            generated = run(model, [f"127.0.0.1:{port}"], max_tokens=n_tokens)["completion_tokens"]
        finally:
            server.terminate()
            server.wait(timeout=30)
        text = Path(log.name).read_text(errors="replace")
        os.unlink(log.name)
        calls = Counter(re.findall(r"^\[(\w+)\]", text, re.M))
        sizes = Counter()
        for name, size in re.findall(r"^\[(\w+)\].*?size: (\d+)", text, re.M):
            sizes[name] += int(size)
        counts[n_tokens] = (generated, calls, sizes)
    (g0, c0, s0), (g1, c1, s1) = counts[16], counts[48]
    tokens = g1 - g0
    return {
        "tokens": tokens,
        "calls": {k: (c1[k] - c0[k]) / tokens for k in sorted(set(c0) | set(c1)) if c1[k] != c0[k]},
        "bytes": {k: (s1[k] - s0[k]) / tokens for k in sorted(set(s0) | set(s1)) if s1[k] != s0[k]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "cluster.md")
    args = parser.parse_args()
    models = args.model
    if not models:
        tiny = Path(tempfile.mkdtemp(prefix="cluster-bench-")) / "tiny-ernie-thinking-f16.gguf"
        convert(FIXTURES / "tiny-ernie-thinking", tiny, "f16")
        models = [tiny] + ([WIDE] if WIDE.exists() else [])

    text = [
        "# `edgemoe run --workers`: loopback workers vs local",
        "",
        f"`bench/cluster.py --rounds {args.rounds}`: greedy, `{QUESTION}`, up to 64 tokens, 1 thread in every "
        "process (local and each ggml-rpc-server), all on this one machine over loopback TCP; median of the "
        "rounds. Every split gave the single-process greedy text (checked below).",
        "",
    ]
    for model in models:
        rows = speeds(model, args.rounds)
        traffic = rpc_traffic(model)
        local = rows[0]["gen_tps"]
        table = []
        for r in rows:
            overhead = (1 / r["gen_tps"] - 1 / local) * 1000
            split = ", ".join(
                f"{'local' if p['device'] == 'local' else 'w' + str(i)} {p['layers']}"
                for i, p in enumerate(r["split"] or [{"device": "local", "layers": "all"}])
            )
            table.append(
                [
                    r["workers"],
                    split,
                    f"{r['gen_tps']:.1f}",
                    f"{r['gen_tps'] / local:.2f}",
                    f"{overhead:+.2f}" if r["workers"] else "-",
                    f"{r['prompt_tps']:.0f}",
                    "yes" if r["raw"] == rows[0]["raw"] else "NO",
                ]
            )
        text += [
            f"## {model.name} ({model.stat().st_size / 2**20:.0f} MiB)",
            "",
            markdown_table(
                [
                    "workers",
                    "layers (local, w1..)",
                    "gen tok/s",
                    "vs local",
                    "ms/token added",
                    "prompt tok/s",
                    "same text",
                ],
                table,
            ),
            "",
            "Rounds (gen tok/s): "
            + "; ".join(f"{r['workers']} workers: " + ", ".join(f"{t:.0f}" for t in r["all"]) for r in rows),
            "",
            f"RPC traffic per generated token with one worker ({traffic['tokens']} tokens counted): "
            + ", ".join(f"{k} {v:.1f}x" for k, v in traffic["calls"].items())
            + "; payload "
            + (", ".join(f"{k} {v:.0f} B" for k, v in traffic["bytes"].items()) or "n/a"),
            "",
        ]
    text.append(f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.")
    text += ["", READING]
    args.out.write_text("\n".join(text) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
