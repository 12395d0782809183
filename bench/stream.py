#!/usr/bin/env python3
"""Plain mmap vs `run --memory` (expert streaming) under a memory cap and a storage speed -> bench/stream.{md,json,png}

usage: .venv/bin/python bench/stream.py --model skewed=PATH [--model uniform=PATH] [--caps 25,50,75,100,125]
           [--storage 80MB,300MB,1.5GB] [--modes mmap,stream,llama] [--tokens 24] [--threads 1]
           [--points skewed:1.5GB:50[:llama+mmap+stream],...] [--timeout 400] [--out bench/stream]

Each point runs one fresh process inside two child cgroups of this process's own (cgroup v1, see /proc/self/cgroup):
  - memory: memory.limit_in_bytes = runtime baseline + CAP% of the GGUF's size; the limit counts page cache, so the
    file's mapped pages compete with everything else as they would on a board with that much RAM;
  - blkio: blkio.throttle.read_bps_device on the disk holding the GGUF, to emulate a board's storage
    (SD card ~80 MB/s, eMMC ~300 MB/s, UFS/NVMe ~1.5 GB/s).
The GGUF's pages are dropped from the page cache (posix_fadvise DONTNEED) before each run. Modes:
  - mmap:   today's `run`, weight repacking off (repacked weights are anonymous copies: they cannot live under a cap
            below the model at all), the kernel paging the file in and out;
  - stream: `run --memory CAP` (the same bytes as the cgroup's limit); stream-prefetch: the same with
            EDGEMOE_STREAM_PREFETCH=1 (read the next layer's predicted experts while this one computes);
            stream-latecache: with EDGEMOE_STREAM_DROP_LATE=0 (the expert ranges' pages llama.cpp's load read
            ahead and that arrived after binding are left in the page cache: what dropping them is worth);
            stream-free: with EDGEMOE_STREAM_RECYCLE=0 (an evicted expert's pages freed and new ones faulted in,
            instead of moved under the next read);
  - llama:  llama.cpp's own `llama-completion --no-repack` (mmap), for reference.
Reported per point: generation tok/s, the cgroup's peak usage (memory.max_usage_in_bytes) against its limit, OOM
kills, bytes the cgroup read from the disk per generated token (blkio), the expert cache's hit rate, the greedy text
(identical across modes when streaming is lossless), and the load average when the point ran.
Without writable cgroups the script says so and exits 0 (nothing measured).
The runtime baseline is the peak anonymous memory (RssAnon, sampled per token) of an unconstrained plain run:
interpreter, llama.cpp's compute buffers, the KV cache pages in use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgemoe_cli.report import markdown_table  # noqa: E402
from edgemoe_cli.units import parse_size  # noqa: E402

PROMPT = "What is 51 - 29?"
STORAGE = {"80MB": "SD card", "300MB": "eMMC", "1.5GB": "UFS/NVMe"}
TABLE_BEGIN, TABLE_END = "<!-- bench/stream.py table: begin -->", "<!-- bench/stream.py table: end -->"

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
# this checkout's edgemoe, not the one a venv's .pth hook imported at start-up (edgemoe-llama-lib.pth)
for name in [m for m in sys.modules if m == "edgemoe_cli" or m.startswith("edgemoe_cli.")]:
    del sys.modules[name]
from edgemoe_cli import generate, stream
model, mode, memory, prompt = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[7]
warm = sys.argv[8] or None
tokens, threads = int(sys.argv[5]), int(sys.argv[6])
peak_anon = [0]
def sample(kind, text):  # anonymous memory while generating: after run() returns the model is freed
    peak_anon[0] = max(peak_anon[0], stream.anonymous_rss())
start = time.perf_counter()
r = generate.run(model, prompt, max_tokens=tokens, threads=threads, temp=0, on_text=sample,
                 memory=int(memory) if mode == "stream" else None, repack=False, warm=warm)
# the expert ranges' pages left in the page cache (counted against the cgroup's limit), after the run
from edgemoe_cli.gguffile import open_gguf
experts = [(t.file_offset, t.file_offset + t.nbytes) for t in stream.expert_tensors(open_gguf(model))]
cached = stream.page_cache_bytes(model, experts)
print(json.dumps({"gen_tps": r.gen_tps, "expert_page_cache_bytes": cached, "raw": r.raw,
                  "completion_tokens": r.completion_tokens,
                  "prompt_tokens": r.prompt_tokens, "ttft_s": r.ttft_s, "wall_s": time.perf_counter() - start,
                  "peak_rss_bytes": r.peak_rss_bytes, "anon_rss_bytes": peak_anon[0],
                  "streaming": r.streaming}))
"""


# ---- cgroups (v1) ----


def own_cgroup(controller: str) -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controller / rel.lstrip("/")
    return None


class Cgroups:
    """A memory and a blkio child cgroup of this process's own, made for one run and removed after it."""

    def __init__(self, tag: str, limit: int | None, device: str, read_bps: int | None):
        self.dirs = {}
        for controller in ("memory", "blkio"):
            parent = own_cgroup(controller)
            if parent is None:
                raise PermissionError(f"no cgroup v1 {controller} controller for this process")
            d = parent / f"edgemoe-bench-{os.getpid()}-{tag}"
            d.mkdir()
            self.dirs[controller] = d
        if limit is not None:
            (self.dirs["memory"] / "memory.limit_in_bytes").write_text(str(limit))
        if read_bps is not None:
            (self.dirs["blkio"] / "blkio.throttle.read_bps_device").write_text(f"{device} {read_bps}")

    def join(self) -> None:
        """In the child, before exec: move itself into both groups."""
        for d in self.dirs.values():
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def memory(self) -> dict:
        d = self.dirs["memory"]
        oom = dict(line.split() for line in (d / "memory.oom_control").read_text().splitlines())
        return {
            "peak_bytes": int((d / "memory.max_usage_in_bytes").read_text()),
            "limit_bytes": int((d / "memory.limit_in_bytes").read_text()),
            "failcnt": int((d / "memory.failcnt").read_text()),
            "oom_kills": int(oom.get("oom_kill", 0)),
        }

    def bytes_read(self, device: str) -> int:
        text = (self.dirs["blkio"] / "blkio.throttle.io_service_bytes").read_text()
        m = re.search(rf"^{re.escape(device)} Read (\d+)$", text, re.M)
        return int(m.group(1)) if m else 0

    def remove(self) -> None:
        for d in self.dirs.values():
            for _ in range(50):  # the last task may take a moment to leave after it exited
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def writable_cgroups() -> str | None:
    """None if child cgroups can be made here, else why not."""
    try:
        probe = Cgroups("probe", None, "0:0", None)
        probe.remove()
        return None
    except (OSError, PermissionError) as e:
        return str(e)


def device_of(path: Path) -> str:
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    # a partition's throttle goes on its whole disk: /sys/dev/block/M:m/../dev when it is a partition
    sysdev = Path(f"/sys/dev/block/{major}:{minor}")
    if (sysdev / "partition").exists():
        return (sysdev.resolve().parent / "dev").read_text().strip()
    return f"{major}:{minor}"


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---- one point ----


def llama_completion_cmd(model: Path, tokens: int, threads: int) -> list[str] | None:
    from edgemoe_cli.llamacpp import native_build_dir

    build = native_build_dir()
    tool = build / "bin" / "llama-completion" if build else None
    if tool is None or not tool.exists():
        return None
    return [
        str(tool),
        "-m",
        str(model),
        "-p",
        PROMPT,
        "-n",
        str(tokens),
        "--temp",
        "0",
        "-t",
        str(threads),
        "--no-repack",
        "-no-cnv",
        "--no-warmup",
        "--seed",
        "0",
        "-c",
        "4096",
    ]


def run_point(
    model: Path,
    mode: str,
    limit: int | None,
    read_bps: int | None,
    device: str,
    tokens: int,
    threads: int,
    timeout: float,
    tag: str,
    warm: str | None = None,
) -> dict:
    drop_cache(model)
    groups = Cgroups(tag, limit, device, read_bps)
    point = {"mode": mode, "limit_bytes": limit, "read_bps": read_bps, "load_avg": round(os.getloadavg()[0], 2)}
    try:
        if mode == "llama":
            cmd = llama_completion_cmd(model, tokens, threads)
            if cmd is None:
                return {**point, "error": "llama-completion not built"}
        else:
            cmd = [
                sys.executable,
                "-c",
                CHILD,
                str(REPO),
                str(model),
                mode.split("-")[0],
                str(limit or 0),
                str(tokens),
                str(threads),
                PROMPT,
                warm if mode.endswith("-warm") and warm else "",
            ]
        start = time.perf_counter()
        # stream-prefetch: streaming with the next-layer prefetcher (off by default); stream-warm: the cache filled
        # from `edgemoe profile`'s profile.json of the model (--warm) before the first token
        # stream-free: evicted experts' pages freed and faulted in anew, as before pages were moved (mremap)
        env = {
            **os.environ,
            "EDGEMOE_STREAM_PREFETCH": "1" if mode.endswith("-prefetch") else "0",
            "EDGEMOE_STREAM_RECYCLE": "0" if mode.endswith("-free") else "1",
            "EDGEMOE_STREAM_DROP_LATE": "0" if mode.endswith("-latecache") else "1",
        }
        try:
            # a random-weight model's text may cut a UTF-8 sequence in two
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                encoding="utf-8",
                errors="replace",
                timeout=timeout,
                preexec_fn=groups.join,
                env=env,
            )
        except subprocess.TimeoutExpired:
            return {
                **point,
                "error": f"timeout after {timeout:.0f} s",
                **groups.memory(),
                "disk_read_bytes": groups.bytes_read(device),
            }
        point["wall_s"] = round(time.perf_counter() - start, 2)
        point.update(groups.memory())
        point["disk_read_bytes"] = groups.bytes_read(device)
        if done.returncode != 0:
            return {**point, "error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
        if mode == "llama":
            m = re.search(r"eval time =.*?\(\s*[\d.]+ ms per token,\s*([\d.]+) tokens per second\)", done.stderr)
            point["gen_tps"] = float(m.group(1)) if m else None
            point["raw"] = done.stdout
            return point
        point.update(json.loads(done.stdout.strip().splitlines()[-1]))
        return point
    finally:
        groups.remove()


# ---- report ----


def pair_ratios(points: list[dict]) -> dict[tuple, list[float]]:
    """{(routing, storage, cap %): stream tok/s / llama tok/s} of each llama run and the stream run that follows it
    at the same point (the alternating pairs of --points P,P,...; each point runs its modes in the order given)."""
    ratios: dict[tuple, list[float]] = {}
    llama: dict[tuple, float] = {}
    for p in points:
        where = (p["skew"], p["storage"], p["cap_pct"])
        if p["mode"] == "llama" and p.get("gen_tps"):
            llama[where] = p["gen_tps"]
        elif p["mode"] == "stream" and p.get("gen_tps") and where in llama:
            ratios.setdefault(where, []).append(p["gen_tps"] / llama.pop(where))
    return ratios


def summarize(points: list[dict], gguf: dict[str, int], baseline: int) -> str:
    rows = []
    for p in points:
        s = p.get("streaming") or {}
        gen = max((p.get("completion_tokens") or 0) - 1, 1)
        rows.append(
            [
                p["skew"],
                STORAGE.get(p["storage"], p["storage"]),
                f"{p['cap_pct']}%",
                f"{p['limit_bytes'] / 2**20:.0f}" if p.get("limit_bytes") else "-",
                p["mode"],
                f"{p['gen_tps']:.2f}" if p.get("gen_tps") else p.get("error", "-"),
                f"{p['peak_bytes'] / 2**20:.0f}" if p.get("peak_bytes") else "-",
                f"{p['anon_rss_bytes'] / 2**20:.0f}" if p.get("anon_rss_bytes") else "-",
                str(p.get("oom_kills", "-")),
                # llama.cpp's mmap loader populates the whole file once at load (MAP_POPULATE): not per token
                f"{max(p['disk_read_bytes'] - gguf[p['skew']], 0) / (p['prompt_tokens'] + gen) / 2**20:.1f}"
                if p.get("disk_read_bytes") and p.get("prompt_tokens")
                else "-",
                f"{s['bytes_read_per_token'] / 2**20:.1f}" if s else "-",
                f"{s['decode_hit_rate']:.0%}" if s else "-",
                f"{s['cache_bytes'] / 2**20:.0f}" if s else "-",
                f"{s['decode_read_wait_s'] * 1000 / max(s['decode_tokens'], 1):.1f}" if s else "-",
                f"{s['decode_cpu_ms_per_token']:.1f}" if s.get("decode_cpu_ms_per_token") else "-",
                f"{s['decode_page_faults_per_token']:.0f}" if "decode_page_faults_per_token" in s else "-",
                f"{p['expert_page_cache_bytes'] / 2**20:.0f}" if "expert_page_cache_bytes" in p else "-",
                f"{p['load_avg']:.1f}",
            ]
        )
    header = [
        "routing",
        "storage",
        "cap",
        "limit MiB",
        "mode",
        "gen tok/s",
        "cgroup peak MiB",
        "RssAnon MiB",
        "OOM",
        "disk MiB/tok",
        "expert MiB/tok (gen)",
        "hits (gen)",
        "cache MiB",
        "read wait ms/tok",
        "CPU ms/tok",
        "page faults/tok",
        "expert ranges in page cache MiB",
        "load",
    ]
    sizes = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in gguf.items())
    pairs = "".join(
        f"\n\nstream / llama at {skew}, {STORAGE.get(storage, storage)}, {cap}%, pair by pair: "
        f"{', '.join(f'{r:.2f}x' for r in ratios)}; median {statistics.median(ratios):.2f}x, "
        f"{sum(r >= 3 for r in ratios)} of {len(ratios)} at 3x or more."
        for (skew, storage, cap), ratios in pair_ratios(points).items()
    )
    return (
        f"GGUF sizes: {sizes}; runtime baseline (RssAnon of an unconstrained plain run) {baseline / 2**20:.0f} MiB; "
        f"limit = baseline + cap x GGUF. disk MiB/tok: what the cgroup read from the disk beyond the one pass over "
        f"the file llama.cpp's loader makes (MAP_POPULATE), per prompt and generated token; RssAnon: peak "
        f"anonymous memory sampled per token (what cannot be given back); hits, expert MiB/tok, read wait (time the "
        f"compute thread waited for expert reads), CPU (the whole process: compute, reader threads, kernel) and "
        f"minor page faults: per generated token; expert ranges in page cache: the GGUF's expert bytes in the page "
        f"cache after the run (mincore; they count against the limit).\n\n" + markdown_table(header, rows) + pairs
    )


def plot(points: list[dict], out: Path) -> None:
    """tok/s vs cap, one panel per routing: colour = storage, line = mode; repeated points averaged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"1.5GB": "C0", "300MB": "C1", "80MB": "C2"}
    styles = {
        "stream": ("-", "o"),
        "mmap": ("--", "s"),
        "llama": (":", "x"),
        "stream-prefetch": ("-.", "^"),
        "stream-free": ("-.", "v"),
        "stream-latecache": (":", "P"),
        "stream-warm": ("-", "D"),
    }
    skews = sorted({p["skew"] for p in points})
    fig, axes = plt.subplots(1, len(skews), figsize=(6.5 * len(skews), 4.5), squeeze=False, sharey=True)
    for ax, skew in zip(axes[0], skews):
        for mode, storage in sorted({(p["mode"], p["storage"]) for p in points if p["skew"] == skew}):
            by_cap: dict[int, list[float]] = {}
            for p in points:
                if p["skew"] == skew and p["mode"] == mode and p["storage"] == storage and p.get("gen_tps"):
                    by_cap.setdefault(p["cap_pct"], []).append(p["gen_tps"])
            if by_cap:
                caps = sorted(by_cap)
                line, marker = styles.get(mode, ("-", "o"))
                ax.plot(
                    caps,
                    [sum(by_cap[c]) / len(by_cap[c]) for c in caps],
                    linestyle=line,
                    marker=marker,
                    color=colours.get(storage, "C3"),
                    label=f"{mode} @ {storage}/s",
                )
        ax.set_yscale("log")
        ax.set_title(f"{skew} routing (wide ERNIE, 5 layers, Q4_0, 1.87 GB)")
        ax.set_xlabel("memory cap, % of the GGUF (+ runtime baseline)")
        ax.set_ylabel("generation tok/s (--threads 1)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def write_md(md: Path, table: str) -> None:
    block = f"{TABLE_BEGIN}\n{table}\n{TABLE_END}"
    if md.exists() and TABLE_BEGIN in md.read_text():
        text = md.read_text()
        text = text[: text.index(TABLE_BEGIN)] + block + text[text.index(TABLE_END) + len(TABLE_END) :]
    else:
        text = f"# Expert streaming vs plain mmap under a memory cap\n\n{block}\n"
    md.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="SKEW=PATH, e.g. skewed=wide-skewed-q4_0.gguf")
    ap.add_argument("--caps", default="25,50,75,100,125")
    ap.add_argument("--storage", default="80MB,300MB,1.5GB")
    ap.add_argument("--modes", default="mmap,stream")
    ap.add_argument("--points", help="only these SKEW:STORAGE:CAP[:MODE+MODE] points (comma-separated), in order")
    ap.add_argument("--warm", action="append", default=[], help="SKEW=profile.json for the stream-warm mode")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--out", default=str(REPO / "bench" / "stream"), help="writes OUT.json, OUT.md, OUT.png")
    ap.add_argument("--report-only", action="store_true", help="redo OUT.md's table and OUT.png from OUT.json")
    a = ap.parse_args()

    out = Path(a.out)
    if a.report_only:
        data = json.loads(out.with_suffix(".json").read_text())
        measured = [p for p in data["points"] if isinstance(p["cap_pct"], int)]
        write_md(out.with_suffix(".md"), summarize(measured, data["gguf_bytes"], data["baseline_bytes"]))
        plot(measured, out.with_suffix(".png"))
        return 0

    if (why := writable_cgroups()) is not None:
        print(f"skipped: cannot make child cgroups here ({why})")
        return 0
    models = dict(m.split("=", 1) for m in a.model)
    models = {k: Path(v).resolve() for k, v in models.items()}
    gguf = {k: p.stat().st_size for k, p in models.items()}
    warm = dict(w.split("=", 1) for w in a.warm)
    modes = a.modes.split(",")
    if a.points:  # SKEW:STORAGE:CAP[:MODE+MODE...]
        grid = [
            (f[0], f[1], int(f[2]), f[3].split("+") if len(f) > 3 else modes)
            for f in (x.split(":") for x in a.points.split(","))
        ]
    else:
        grid = [(s, st, int(c), modes) for s in models for st in a.storage.split(",") for c in a.caps.split(",")]

    first = next(iter(models.values()))
    device = device_of(first)
    print(f"disk {device}; measuring the runtime baseline ...", flush=True)
    base = run_point(first, "mmap", None, None, device, a.tokens, a.threads, a.timeout, "baseline")
    baseline = base["anon_rss_bytes"]
    print(f"baseline RssAnon {baseline / 2**20:.0f} MiB, unconstrained plain {base['gen_tps']} tok/s", flush=True)
    points = [{**base, "skew": next(iter(models)), "storage": "page cache", "cap_pct": "none"}]
    for i, (skew, storage, cap, point_modes) in enumerate(grid):
        limit = baseline + gguf[skew] * cap // 100
        for mode in point_modes:
            p = run_point(
                models[skew],
                mode,
                limit,
                parse_size(storage),
                device,
                a.tokens,
                a.threads,
                a.timeout,
                f"{i}-{mode}",
                warm.get(skew),
            )
            p.update(skew=skew, storage=storage, cap_pct=cap)
            points.append(p)
            s = p.get("streaming") or {}
            print(
                f"{skew:8} {storage:6} {cap:4}% {mode:7} {p.get('gen_tps') or p.get('error')} tok/s "
                f"peak {p.get('peak_bytes', 0) / 2**20:.0f}/{limit / 2**20:.0f} MiB oom {p.get('oom_kills')} "
                f"hits {s.get('decode_hit_rate', '-')} load {p['load_avg']}",
                flush=True,
            )
            out.with_suffix(".json").write_text(
                json.dumps({"gguf_bytes": gguf, "baseline_bytes": baseline, "points": points}, indent=1) + "\n"
            )
    measured = [p for p in points if isinstance(p["cap_pct"], int)]
    write_md(out.with_suffix(".md"), summarize(measured, gguf, baseline))
    plot(measured, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
