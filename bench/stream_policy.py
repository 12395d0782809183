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
4. The next-layer guess (what EDGEMOE_STREAM_PREFETCH reads ahead): at every generated token's routing of a MoE
   layer, the FFN input there is run through the next MoE layer's router (stream._Router). Reported: how many of the
   next layer's experts its top 6 name, how often a guess of rank r that the LFU cache lacks at that moment is
   routed, and the replay of "LFU + read the top m guesses the cache lacks" (demand misses and wasted reads per
   token: a read-ahead only pays where it overlaps computing and replaces a demand miss).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgemoe_cli import generate, stream  # noqa: E402
from edgemoe_cli.units import parse_size  # noqa: E402

PROMPT = "What is 51 - 29?"  # bench/stream.py's


def record(model: str, memory: int, tokens: int) -> tuple[list, dict, int, float]:
    """(trace [(step, layer, experts, tokens that chose each)], guesses {(step, layer): next layer's experts ranked
    by its router on this layer's FFN input}, cache sets, the run's own decode hit rate)."""
    trace, guesses = [], {}
    ensure, predict = stream.ExpertStreamer.ensure, stream.ExpertStreamer._predict_next

    def recording(self, layer, experts, routed=None):
        trace.append((self.steps, layer, list(experts), list(routed or [1] * len(experts))))
        return ensure(self, layer, experts, routed)

    def guessing(self, node, layer):  # called at each generated token's routing result, when routers are loaded
        nxt = self.next_layer.get(layer)
        hidden = stream._find_input(node, b"ffn_inp-%d" % layer, self._struct)
        if nxt in self.routers and hidden is not None:
            guesses[(self.steps, nxt)] = self.routers[nxt].ranked(hidden)

    stream.ExpertStreamer.ensure, stream.ExpertStreamer._predict_next = recording, guessing
    os.environ["EDGEMOE_STREAM_PREFETCH"] = "1"  # loads the routers; guessing() reads nothing ahead
    try:
        r = generate.run(model, PROMPT, max_tokens=tokens, threads=1, temp=0, memory=memory, repack=False)
    finally:
        stream.ExpertStreamer.ensure, stream.ExpertStreamer._predict_next = ensure, predict
        os.environ.pop("EDGEMOE_STREAM_PREFETCH")
    return trace, guesses, r.streaming["cache_experts"], r.streaming["decode_hit_rate"]


def replay_guesses(
    trace: list, guesses: dict, sets: int, m: int, ranks: list | None = None
) -> tuple[float, float, float]:
    """LFU (stream.py's order) over `trace` where, after each layer's routing, the top `m` guesses for the next
    layer that the cache lacks are read ahead (first in line for eviction). Returns (demand misses, read-aheads,
    wasted read-aheads) per generated token; `ranks` (if given) collects [asked, routed] per guess rank for guesses the
    cache lacked."""
    cache: dict = {}  # key -> last use (clock); a read-ahead starts at -1: evicted first among equal counts
    uses: dict = defaultdict(int)
    ahead: set = set()
    routed = {(step, layer): set(experts) for step, layer, experts, _ in trace}
    misses = read_ahead = wasted = clock = 0
    steps = {step for step, *_ in trace if step > 1}

    def make_room(pinned):
        nonlocal wasted
        while len(cache) >= sets:
            victim = min((k for k in cache if k not in pinned), key=lambda k: (uses[k], cache[k]))
            del cache[victim]
            if victim in ahead:
                ahead.discard(victim)
                wasted += 1

    for step, layer, experts, counts in trace:
        pinned = {(layer, e) for e in experts}
        for e, n in zip(experts, counts):
            key = (layer, e)
            clock += 1
            uses[key] += n
            if key in cache:
                ahead.discard(key)
            else:
                misses += step > 1
                make_room(pinned)
            cache[key] = clock
        for rank, e in enumerate(guesses.get((step, layer + 1), [])[:m] if step > 1 else []):
            key = (layer + 1, e)
            if key in cache:
                continue
            if ranks is not None:
                ranks[rank][0] += 1
                ranks[rank][1] += e in routed.get((step, layer + 1), set())
            make_room(pinned)
            cache[key] = -1
            ahead.add(key)
            read_ahead += 1
    n = max(len(steps), 1)
    return misses / n, read_ahead / n, wasted / n


def replay(trace: list, sets: int, order: str) -> float:
    """Decode hit rate of `trace` through a cache of `sets` under `order` (lru | lfu | belady)."""
    keys = [(layer, e) for _, layer, experts, _ in trace for e in experts]
    next_use, last = [0] * len(keys), {}
    for i in range(len(keys) - 1, -1, -1):
        next_use[i], last[keys[i]] = last.get(keys[i], 10**12), i
    cache: OrderedDict = OrderedDict()
    uses: dict = defaultdict(int)
    upcoming: dict = {}
    hits = lookups = i = 0
    for step, layer, experts, counts in trace:
        pinned = {(layer, e) for e in experts}
        for e, n in zip(experts, counts):
            key, decode = (layer, e), step > 1  # step 1: the prompt
            uses[key] += n  # the tokens that chose it: a prompt's batch counts each, as stream.py does
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
    trace, guesses, sets, own = record(a.model, memory, a.tokens)
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
    # the next-layer guess: how much of the next layer it names, and what reading it ahead would change
    named = [
        len(set(g[:6]) & set(next(x for s, layer, x, _ in trace if (s, layer) == key))) / 6
        for key, g in guesses.items()
        if any((s, layer) == key for s, layer, *_ in trace)
    ]
    ranks = [[0, 0] for _ in range(4)]
    rows = []
    for m in (0, 1, 2, 4):
        misses, ahead, wasted = replay_guesses(trace, guesses, sets, m, ranks if m == 4 else None)
        rows.append(f"| {m} | {misses:.2f} | {ahead:.2f} | {wasted:.2f} | {misses + ahead:.2f} |")
    precision = ", ".join(f"rank {r + 1}: {b / a:.0%} of {a}" for r, (a, b) in enumerate(ranks) if a)
    lines += [
        "",
        f"Next-layer guess (the next MoE layer's router on this layer's FFN input, at each generated token): its top 6"
        f" name {sum(named) / max(len(named), 1):.0%} of the next layer's routed experts ({len(named)} guesses). Of"
        f" the guesses the LFU cache lacked when they were made, routed: {precision}.",
        "",
        "| read ahead: top m uncached guesses | demand misses / token | read-aheads / token | of them wasted | sets"
        " read / token |",
        "|---:|---:|---:|---:|---:|",
        *rows,
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
