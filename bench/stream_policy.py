#!/usr/bin/env python3
"""How good is the expert cache's eviction order, and does warming it from a profile help? -> bench/stream_policy.md

usage: .venv/bin/python bench/stream_policy.py MODEL.gguf --memory 968MiB [--tokens 129] [--warm profile.json]
           [--out bench/stream_policy.md]

1. Runs `generate.run(MODEL, ..., memory=M)` once (no cgroup: hit rates do not depend on the storage's speed) and
   records every routing decision the streamer served (ExpertStreamer.ensure: step, layer, experts).
2. Replays that trace through a cache of the same number of (layer, expert) sets under three eviction orders:
   LRU, least often used with recency among equals (what stream.py does), and Belady's clairvoyant optimum (evict
   the set used again furthest in the future): an upper bound no online order reaches.
3. With --warm: the run's decode hit rate with and without `warm=profile.json` (16 and `--tokens` generated tokens).
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgemoe_cli import generate, stream  # noqa: E402
from edgemoe_cli.units import parse_size  # noqa: E402

PROMPT = "What is 51 - 29?"  # bench/stream.py's


def record(model: str, memory: int, tokens: int) -> tuple[list, int, float]:
    """(trace [(step, layer, experts)], cache sets, the run's own decode hit rate)."""
    trace = []
    ensure = stream.ExpertStreamer.ensure

    def recording(self, layer, experts):
        trace.append((self.steps, layer, list(experts)))
        return ensure(self, layer, experts)

    stream.ExpertStreamer.ensure = recording
    try:
        r = generate.run(model, PROMPT, max_tokens=tokens, threads=1, temp=0, memory=memory, repack=False)
    finally:
        stream.ExpertStreamer.ensure = ensure
    return trace, r.streaming["cache_experts"], r.streaming["decode_hit_rate"]


def replay(trace: list, sets: int, order: str) -> float:
    """Decode hit rate of `trace` through a cache of `sets` under `order` (lru | lfu | belady)."""
    keys = [(layer, e) for _, layer, experts in trace for e in experts]
    next_use, last = [0] * len(keys), {}
    for i in range(len(keys) - 1, -1, -1):
        next_use[i], last[keys[i]] = last.get(keys[i], 10**12), i
    cache: OrderedDict = OrderedDict()
    uses: dict = defaultdict(int)
    upcoming: dict = {}
    hits = lookups = i = 0
    for step, layer, experts in trace:
        pinned = {(layer, e) for e in experts}
        for e in experts:
            key, decode = (layer, e), step > 1  # step 1: the prompt
            uses[key] += 1
            if key in cache:
                hits += decode
                cache.move_to_end(key)
            else:
                while len(cache) >= sets:
                    free = [k for k in cache if k not in pinned]
                    if order == "lru":
                        victim = free[0]
                    elif order == "lfu":
                        victim = min(free, key=lambda k: uses[k])  # first of the fewest: least recent
                    else:
                        victim = max(free, key=lambda k: upcoming.get(k, 10**12))
                    del cache[victim]
                cache[key] = True
            upcoming[key] = next_use[i]
            lookups += decode
            i += 1
    return hits / max(lookups, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--memory", default="968MiB")
    ap.add_argument("--tokens", type=int, default=129)
    ap.add_argument("--warm", help="a profile.json of the model (edgemoe profile)")
    ap.add_argument("--out", default=str(REPO / "bench" / "stream_policy.md"))
    a = ap.parse_args()
    memory = parse_size(a.memory)
    trace, sets, own = record(a.model, memory, a.tokens)
    rows = [f"| {o} | {replay(trace, sets, o):.1%} |" for o in ("lru", "lfu", "belady")]
    lines = [
        "# Expert cache: eviction orders and warming",
        "",
        f"Written by `bench/stream_policy.py {Path(a.model).name} --memory {a.memory} --tokens {a.tokens}"
        + (f" --warm {Path(a.warm).name}" if a.warm else "")
        + f"` (its docstring says how). Cache: {sets} (layer, expert) sets; {a.tokens - 1} generated tokens, greedy,"
        f" the prompt of bench/stream.py. The run itself hit {own:.1%} of its decode lookups.",
        "",
        "| eviction order | decode hit rate (replayed trace) |",
        "|---|---:|",
        *rows,
        "",
        "lfu is stream.py's order (least often routed first, least recently used among equals); belady is the",
        "clairvoyant optimum for this trace, an upper bound.",
    ]
    if a.warm:
        lines += ["", "| generated tokens | cold cache | warmed from the profile |", "|---:|---:|---:|"]
        for n in sorted({17, a.tokens}):
            rates = []
            for warm in (None, a.warm):
                r = generate.run(
                    a.model, PROMPT, max_tokens=n, threads=1, temp=0, memory=memory, repack=False, warm=warm
                )
                rates.append(r.streaming["decode_hit_rate"])
            lines.append(f"| {n - 1} | {rates[0]:.1%} | {rates[1]:.1%} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
