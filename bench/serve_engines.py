#!/usr/bin/env python3
"""What the pinned llama-server returns for ERNIE Thinking, and how fast it and our own generator are for one
client -> bench/serve_engines.md (the evidence behind `edgemoe serve`'s engine; README's serve section).

usage: .venv/bin/python bench/serve_engines.py [--threads 2] [--rounds 3] [--out bench/serve_engines.md]

Needs `edgemoe build` (llama-server, llama-bench and the binding's libllama from that one build).
1. Output format: llama-server --jinja with --reasoning-format auto|deepseek|none on the tiny Thinking fixture,
   greedy, one arithmetic question, non-streamed and streamed: what lands in message.content and
   message.reasoning_content (or their deltas), tags included or not.
2. Speed for one client, same GGUF, build and threads: llama-bench tg (-n N at the chat's depth), llama-server
   (its own `timings.predicted_per_second`, and tokens over wall time seen by the client), and edgemoe's generator
   (generate.chat_reply's gen_tps), alternated --rounds times; medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgemoe_cli.convert import convert  # noqa: E402
from edgemoe_cli.llamacpp import find_tool  # noqa: E402
from edgemoe_cli.report import markdown_table  # noqa: E402

FIXTURES = Path(os.environ.get("EDGEMOE_SHARED_FIXTURES", REPO.parent / "shared" / "fixtures"))
QUESTION = "What is 51 - 29?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def post_stream(url: str, body: dict, timeout: float = 120) -> list[dict]:
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


class LlamaServer:
    def __init__(self, model: Path, threads: int, extra: list[str]):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [str(find_tool("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
             "-t", str(threads), "-c", "2048", "-np", "1", *extra],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("llama-server did not become healthy in 60 s")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        os.unlink(self.log.name)


def formats(model: Path, threads: int) -> list[dict]:
    rows = []
    chat = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 200}
    for fmt in ("auto", "deepseek", "none"):
        server = LlamaServer(model, threads, ["--jinja", "--reasoning-format", fmt])
        try:
            message = post(server.url + "/v1/chat/completions", chat)["choices"][0]["message"]
            events = post_stream(server.url + "/v1/chat/completions", chat)
        finally:
            server.close()
        deltas = [e["choices"][0]["delta"] for e in events if e.get("choices")]
        rows.append({
            "reasoning_format": fmt,
            "content": message.get("content"),
            "reasoning_content": message.get("reasoning_content"),
            "stream_content": "".join(d.get("content") or "" for d in deltas),
            "stream_reasoning_content": "".join(d.get("reasoning_content") or "" for d in deltas),
        })
    return rows


def bench_tg(model: Path, threads: int, n_gen: int, depth: int) -> float:
    proc = subprocess.run([str(find_tool("llama-bench")), "-m", str(model), "-t", str(threads), "-p", "0", "-n",
                           str(n_gen), "-d", str(depth), "-fa", "0", "-r", "1", "-o", "json"],
                          capture_output=True, text=True, check=True)
    return float(json.loads(proc.stdout[proc.stdout.find("["):])[0]["avg_ts"])


def server_tg(server: LlamaServer, n_gen: int) -> tuple[float, float]:
    """One streamed chat of exactly n_gen tokens (ignore_eos): (server's own tokens/s, client-side tokens/s
    after the first token)."""
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": n_gen,
            "ignore_eos": True, "stream": True, "timings_per_token": False}
    req = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    first = last = None
    timings = None
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            now = time.perf_counter()
            first = first or now
            last = now
            timings = event.get("timings", timings)
    n = timings["predicted_n"]
    return timings["predicted_per_second"], (n - 1) / (last - first)


def own_tg(model: Path, threads: int, n_gen: int) -> list[float]:
    """generate.chat_reply's gen_tps in a child process, for n_gen tokens of plain continuation (no EOS stop is
    possible before n_gen on this prompt? not guaranteed, so the tokens actually generated are returned too)."""
    code = (
        "import json,sys\n"
        "from edgemoe_cli import generate\n"
        f"llm = generate.load_model({str(model)!r}, ctx=2048, threads={threads})\n"
        "out = []\n"
        "for _ in range(2):\n"
        f"    r = generate.chat_reply(llm, {QUESTION!r}, max_tokens={n_gen})\n"
        "    out.append([r.gen_tps, r.completion_tokens, r.prompt_tokens])\n"
        "print(json.dumps(out[-1]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "serve_engines.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-engines-"))
    model = work / "tiny-ernie-thinking-f16.gguf"
    convert(FIXTURES / "tiny-ernie-thinking", model, "f16")

    rows = formats(model, args.threads)
    for r in rows:
        print(json.dumps(r, ensure_ascii=False))

    own, server_own, server_client, bench = [], [], [], []
    server = LlamaServer(model, args.threads, ["--jinja", "--reasoning-format", "none"])
    try:
        for _ in range(args.rounds):
            gen_tps, n_gen, depth = own_tg(model, args.threads, 128)
            own.append(gen_tps)
            s_own, s_client = server_tg(server, n_gen)
            server_own.append(s_own)
            server_client.append(s_client)
            bench.append(bench_tg(model, args.threads, n_gen, depth))
            print(f"round: own {gen_tps:.1f} ({n_gen} tok at depth {depth}), llama-server {s_own:.1f} / client "
                  f"{s_client:.1f}, llama-bench {bench[-1]:.1f}", flush=True)
    finally:
        server.close()

    def cell(v: str | None) -> str:
        return "`" + (v or "").replace("\n", "\\n").replace("|", "\\|") + "`" if v is not None else "(absent)"

    tb = statistics.median(bench)
    speed = [
        ["llama-bench tg (same N and depth, fa off)", f"{tb:.1f}", "1.00"],
        ["llama-server, its own timings", f"{statistics.median(server_own):.1f}",
         f"{statistics.median(server_own) / tb:.2f}"],
        ["llama-server, client-side SSE", f"{statistics.median(server_client):.1f}",
         f"{statistics.median(server_client) / tb:.2f}"],
        ["edgemoe generator (chat_reply)", f"{statistics.median(own):.1f}", f"{statistics.median(own) / tb:.2f}"],
    ]
    text = [
        "# llama-server vs edgemoe's generator for `edgemoe serve`",
        "",
        f"`bench/serve_engines.py --threads {args.threads} --rounds {args.rounds}`; tiny Thinking fixture at f16, "
        f"greedy, question `{QUESTION}`; llama-server from `edgemoe build` (the pinned llama.cpp).",
        "",
        "## What llama-server returns (`--jinja --reasoning-format X`)",
        "",
        markdown_table(["--reasoning-format", "message.reasoning_content", "message.content",
                        "streamed reasoning_content", "streamed content"],
                       [[r["reasoning_format"], cell(r["reasoning_content"]), cell(r["content"]),
                         cell(r["stream_reasoning_content"]), cell(r["stream_content"])] for r in rows]),
        "",
        "## Generation speed, one client (tokens/s, median)",
        "",
        markdown_table(["engine", "tokens/s", "vs llama-bench"], speed),
        "",
        "Per round: " + "; ".join(f"bench {b:.0f}, server {s:.0f}/{c:.0f}, own {o:.0f}"
                                  for b, s, c, o in zip(bench, server_own, server_client, own)),
        "",
    ]
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
