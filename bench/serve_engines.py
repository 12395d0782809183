#!/usr/bin/env python3
"""What the pinned llama-server returns for ERNIE Thinking, and how fast it and our own generator are for one
client -> bench/serve_engines.md (the evidence behind `edgemoe serve`'s engine; README's serve section).

usage: .venv/bin/python bench/serve_engines.py [--threads 2] [--rounds 3] [--out bench/serve_engines.md]

Needs `edgemoe build` (llama-server, llama-bench and the binding's libllama from that one build).
1. Output format: llama-server --jinja with --reasoning-format auto|deepseek|none on the tiny Thinking fixture,
   greedy, one arithmetic question, non-streamed and streamed: what lands in message.content and
   message.reasoning_content (or their deltas), tags included or not.
2. Speed for one client, same GGUF, build and threads: llama-bench tg (-n 128 at the chat prompt's depth) against
   one streamed chat of 128 tokens (ignore_eos) through `edgemoe serve` and through llama-server, timed by the
   client; alternated --rounds times, medians reported.
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
    req = urllib.request.Request(
        url, json.dumps({**body, "stream": True}).encode(), {"Content-Type": "application/json"}
    )
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
            [
                str(find_tool("llama-server")),
                "-m",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "-t",
                str(threads),
                "-c",
                "2048",
                "-np",
                "1",
                *extra,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
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
        rows.append(
            {
                "reasoning_format": fmt,
                "content": message.get("content"),
                "reasoning_content": message.get("reasoning_content"),
                "stream_content": "".join(d.get("content") or "" for d in deltas),
                "stream_reasoning_content": "".join(d.get("reasoning_content") or "" for d in deltas),
            }
        )
    return rows


def bench_tg(model: Path, threads: int, n_gen: int, depth: int) -> float:
    proc = subprocess.run(
        [
            str(find_tool("llama-bench")),
            "-m",
            str(model),
            "-t",
            str(threads),
            "-p",
            "0",
            "-n",
            str(n_gen),
            "-d",
            str(depth),
            "-fa",
            "0",
            "-r",
            "1",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(proc.stdout[proc.stdout.find("[") :])[0]["avg_ts"])


def stream_tg(url: str, n_gen: int, headers: dict | None = None) -> tuple[float, float]:
    """One streamed chat of exactly n_gen tokens (ignore_eos, greedy) as the client sees it: tokens/s from the first
    streamed piece to the closing events (llama-bench's tg also leaves out the first token's prompt processing).
    After an end-of-sequence token the model may write tokens without visible text, so the end is the last event,
    not the last piece of text."""
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": n_gen,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
    )
    first = last = None
    generated = server_tps = None
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            now = time.perf_counter()
            if event.get("usage"):
                generated = event["usage"]["completion_tokens"]
            if event.get("timings"):  # llama-server's own count
                server_tps = event["timings"]["predicted_per_second"]
            delta = (event.get("choices") or [{}])[0].get("delta", {})
            if first is None and (delta.get("content") or delta.get("reasoning_content")):
                first = now
            last = now  # the closing events come right after the last token, whether or not it had visible text
    if generated != n_gen:
        raise RuntimeError(f"{url} generated {generated} tokens, not {n_gen}: ignore_eos not honoured?")
    if server_tps is None:  # edgemoe serve's own count: decode steps/s of the last request, in /metrics
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            server_tps = next(
                float(line.split()[1])
                for line in r.read().decode().splitlines()
                if line.startswith("edgemoe_tokens_per_second ")
            )
    return (n_gen - 1) / (last - first), server_tps


class EdgemoeServe:
    def __init__(self, model: Path, threads: int):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("edgemoe")),
                "serve",
                str(model),
                "--port",
                str(self.port),
                "--threads",
                str(threads),
                "--ctx",
                "2048",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.proc.stdout.readline()  # the ready line
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


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

    n_gen, depth = 128, 22  # depth: the chat prompt's tokens (the same template for both servers)
    ours, theirs, bench, ours_own, theirs_own = [], [], [], [], []
    llama_server = LlamaServer(model, args.threads, ["--jinja", "--reasoning-format", "none"])
    edgemoe_serve = EdgemoeServe(model, args.threads)
    try:
        for _ in range(args.rounds):  # alternated, so both see the same background load
            client, own = stream_tg(edgemoe_serve.url, n_gen)
            ours.append(client)
            ours_own.append(own)
            client, own = stream_tg(llama_server.url, n_gen)
            theirs.append(client)
            theirs_own.append(own)
            bench.append(bench_tg(model, args.threads, n_gen, depth))
            print(
                f"round: edgemoe serve {ours[-1]:.1f} (own {ours_own[-1]:.1f}), llama-server {theirs[-1]:.1f} "
                f"(own {theirs_own[-1]:.1f}), llama-bench {bench[-1]:.1f}",
                flush=True,
            )
    finally:
        llama_server.close()
        edgemoe_serve.close()

    def cell(v: str | None) -> str:
        return "`" + (v or "").replace("\n", "\\n").replace("|", "\\|") + "`" if v is not None else "(absent)"

    tb = statistics.median(bench)
    speed = [
        [f"llama-bench tg{n_gen} at depth {depth} (fa off)", f"{tb:.1f}", "1.00"],
        ["edgemoe serve, client-side SSE", f"{statistics.median(ours):.1f}", f"{statistics.median(ours) / tb:.2f}"],
        [
            "edgemoe serve, its own count (/metrics)",
            f"{statistics.median(ours_own):.1f}",
            f"{statistics.median(ours_own) / tb:.2f}",
        ],
        ["llama-server, client-side SSE", f"{statistics.median(theirs):.1f}", f"{statistics.median(theirs) / tb:.2f}"],
        [
            "llama-server, its own count (timings)",
            f"{statistics.median(theirs_own):.1f}",
            f"{statistics.median(theirs_own) / tb:.2f}",
        ],
    ]
    text = [
        "# llama-server vs edgemoe's generator for `edgemoe serve`",
        "",
        f"`bench/serve_engines.py --threads {args.threads} --rounds {args.rounds}`; tiny Thinking fixture at f16, "
        f"greedy, question `{QUESTION}`; llama-server from `edgemoe build` (the pinned llama.cpp).",
        "",
        "## What llama-server returns (`--jinja --reasoning-format X`)",
        "",
        markdown_table(
            [
                "--reasoning-format",
                "message.reasoning_content",
                "message.content",
                "streamed reasoning_content",
                "streamed content",
            ],
            [
                [
                    r["reasoning_format"],
                    cell(r["reasoning_content"]),
                    cell(r["content"]),
                    cell(r["stream_reasoning_content"]),
                    cell(r["stream_content"]),
                ]
                for r in rows
            ],
        ),
        "",
        "## Generation speed, one client (tokens/s, median)",
        "",
        markdown_table(["engine", "tokens/s", "vs llama-bench"], speed),
        "",
        f"One streamed chat request of {n_gen} tokens (ignore_eos), greedy, {args.threads} threads; tokens/s after "
        "the first streamed piece, as the client sees them, and each server's own decode rate. Per round "
        "(llama-bench / edgemoe serve client, own / llama-server client, own): "
        + "; ".join(
            f"{b:.0f} / {o:.0f}, {oo:.0f} / {t:.0f}, {to:.0f}"
            for b, o, oo, t, to in zip(bench, ours, ours_own, theirs, theirs_own)
        ),
        "",
        f"Load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.",
        "",
    ]
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
