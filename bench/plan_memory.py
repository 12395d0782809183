#!/usr/bin/env python3
"""`edgemoe plan` inside a memory cap of max(2 GB, the budget it plans for) -> bench/plan_memory.{md,json}

usage: flock /work/bench.lock .venv/bin/python bench/plan_memory.py MODEL.gguf --max-size 1.8GB --text TEXT
           [--imatrix IM] [--chunks 2] [--cap SIZE] [--threads N] [--timeout 3600] [--out bench/plan_memory]

Runs the same plan twice, each a fresh process with a fresh store (nothing kept from an earlier plan) in a child
cgroup (v1) of this process's own: once without a limit, once with memory.limit_in_bytes = the cap. The limit counts
page cache, so the GGUFs plan maps, reads and writes compete for the cap with everything else, as on a board with
that much RAM. The model's pages are dropped from the page cache before each run. Recorded per run: completed or
not (exit code, OOM kills), wall time, the cgroup's peak usage (memory.max_usage_in_bytes, page cache included) and
failcnt (times usage hit the limit and the kernel had to reclaim), and plan's own report: the kernel's peak RSS and
memwatch's per-stage peaks of anonymous memory and mapped file pages.
Each run computes its imatrix as `edgemoe plan MODEL` does when none is given (llama-imatrix, a child process
inside the same cgroup; MODEL.imatrix.gguf beside the model is deleted before each run); --imatrix IM passes one
instead (then that stage is not measured). Without writable cgroups the script says so and exits 0 (nothing
measured).
--eval-model M (a model at the 21B's vocabulary, 103424, e.g. make_wide_ernie.py --layers 2 with the default vocab):
plan's eval path (the reference's log-probs, then one eval against them; repacking off) in a child process,
uncapped, with its anonymous and file-backed peaks: what the logits cost at the real vocabulary, which the test
model's 8192 does not show. --render JSON rewrites the Markdown from a JSON this script wrote, measuring nothing.
The Markdown's measured part goes between the two marker lines of an existing bench/plan_memory.md (the prose
around it is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from stream import Cgroups, device_of, drop_cache, writable_cgroups  # noqa: E402  (bench/stream.py)

from edgemoe_cli.imatrix import imatrix_beside  # noqa: E402
from edgemoe_cli.report import markdown_table  # noqa: E402
from edgemoe_cli.units import parse_size  # noqa: E402

GB = 1e9
BEGIN, END = "<!-- bench/plan_memory.py: begin -->", "<!-- bench/plan_memory.py: end -->"

EVAL_CHILD = r"""
import json, sys
from pathlib import Path
from edgemoe_cli import memwatch
from edgemoe_cli.evaluate import base_logprobs, evaluate
model, text, chunks = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
with memwatch.MemoryWatch(first_stage="reference") as watch:
    base_logprobs(model, text, 512, 2, chunks, spread=True, repack=False)
    memwatch.stage("eval")
    evaluate(model, model, text, ctx=512, threads=2, max_chunks=chunks, spread=True, repack=False)
print(json.dumps({k: vars(v) for k, v in watch.peaks.items()}))
"""


def edgemoe() -> str:
    return str(Path(sys.executable).with_name("edgemoe"))


def environment(home: Path) -> dict:
    from edgemoe_cli.store import builds_dir

    # a private store (no kept steps, no cached log-probs) that still finds this machine's llama.cpp build
    return {**os.environ, "EDGEMOE_HOME": str(home), "EDGEMOE_BUILDS": str(builds_dir())}


def run_plan(args, cap: int | None, tag: str, work: Path) -> dict:
    home = work / f"home-{tag}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    cmd = [
        edgemoe(),
        "plan",
        str(args.model),
        "--max-size",
        args.max_size,
        "--text",
        str(args.text),
        "--chunks",
        str(args.chunks),
        "--json",
    ]
    if args.imatrix:
        cmd += ["--imatrix", str(args.imatrix)]
    else:
        imatrix_beside(args.model).unlink(missing_ok=True)  # plan computes it, in the cgroup
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    drop_cache(args.model)
    load_before = os.getloadavg()
    cg = Cgroups(tag, cap, device_of(args.model), None)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=environment(home), preexec_fn=cg.join, capture_output=True, text=True, timeout=args.timeout
        )
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", e.stdout or "", e.stderr or ""
    wall = time.perf_counter() - t0
    memory = cg.memory()
    cg.remove()
    shutil.rmtree(home, ignore_errors=True)  # its work directory and kept results: gigabytes
    point = {
        "tag": tag,
        "cap_bytes": cap,
        "returncode": rc,
        "wall_s": round(wall, 1),
        "cgroup": memory,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "command": cmd,
    }
    try:
        result = json.loads(out)
    except ValueError:
        point["stderr_tail"] = (err if isinstance(err, str) else err.decode("utf-8", "replace"))[-2000:]
        return point
    for key in (
        "peak_rss_bytes",
        "peak_anon_bytes",
        "peak_file_bytes",
        "stage_memory",
        "measure_seconds",
        "predicted_bytes",
        "budget_bytes",
        "reference",
        "reference_why",
    ):
        point[key] = result.get(key)
    point["choices"] = {c["tensor"]: c["type"] for c in result.get("choices", [])}
    return point


def eval_at_vocab(args, work: Path) -> dict:
    from edgemoe_cli.gguffile import check_gguf

    home = work / "home-eval"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    check_gguf(args.eval_model)
    out = subprocess.run(
        [sys.executable, "-c", EVAL_CHILD, str(args.eval_model), str(args.text), str(args.chunks)],
        env=environment(home),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shutil.rmtree(home, ignore_errors=True)
    import gguf

    vocab = len(gguf.GGUFReader(str(args.eval_model)).get_field("tokenizer.ggml.tokens").data)
    return {
        "model": args.eval_model.name,
        "bytes": args.eval_model.stat().st_size,
        "vocab": vocab,
        "stages": json.loads(out.splitlines()[-1]),
    }


def markdown(points: list[dict], args, cap: int, at_vocab: dict | None, argv: list[str], model_bytes: int) -> str:
    rows = []
    for p in points:
        done = "yes" if p["returncode"] == 0 else f"no ({p['returncode']})"
        rows.append(
            [
                "uncapped" if p["cap_bytes"] is None else f"{p['cap_bytes'] / GB:.2f} GB",
                done,
                f"{p['wall_s']:.0f}",
                f"{p['cgroup']['peak_bytes'] / GB:.2f}",
                str(p["cgroup"]["failcnt"]),
                str(p["cgroup"]["oom_kills"]),
                f"{p['peak_rss_bytes'] / GB:.2f}" if p.get("peak_rss_bytes") else "-",
                f"{p['peak_anon_bytes'] / GB:.2f}" if p.get("peak_anon_bytes") else "-",
                f"{p['peak_file_bytes'] / GB:.2f}" if p.get("peak_file_bytes") else "-",
            ]
        )
    table = markdown_table(
        [
            "cap",
            "completed",
            "wall s",
            "cgroup peak GB (page cache incl.)",
            "failcnt",
            "OOM kills",
            "plan's peak RSS GB (kernel)",
            "peak anonymous GB",
            "peak mapped file GB",
        ],
        rows,
    )
    stages = list(dict.fromkeys(s for p in points for s in (p.get("stage_memory") or {})))  # in the order they ran
    stage_rows = []
    for s in stages:
        row = [s]
        for p in points:
            m = (p.get("stage_memory") or {}).get(s)
            row.append(f"{m['anon_bytes'] / GB:.2f} / {m['file_bytes'] / GB:.2f}" if m else "-")
        stage_rows.append(row)
    heads = ["stage"] + [
        ("uncapped" if p["cap_bytes"] is None else f"cap {p['cap_bytes'] / GB:.2f} GB") + ": anonymous / mapped file GB"
        for p in points
    ]
    same = len(points) == 2 and points[0].get("choices") and points[0].get("choices") == points[1].get("choices")

    def recipe_note(points) -> str:
        """Why two recipes differ when plan's --reference auto measured them against different references."""
        if len(points) != 2 or points[0].get("reference") == points[1].get("reference"):
            return ""
        a, b = (p.get("choices") or {} for p in points)
        moved = sum(a.get(t) != b.get(t) for t in a)
        return (
            " (`--reference auto`: "
            + "; ".join(
                f"{'uncapped' if p['cap_bytes'] is None else 'capped'} against {p.get('reference')}, "
                f"{p.get('reference_why', '')}"
                for p in points
            )
            + f"; {moved} of {len(a)} tensors' types differ)"
        )

    seconds = "; ".join(
        f"{'uncapped' if p['cap_bytes'] is None else 'capped'}: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in (p.get("measure_seconds") or {}).items())
        for p in points
    )
    imatrix_note = "imatrix given" if args.imatrix else "its imatrix computed by plan (llama-imatrix, in the cgroup)"
    return "\n".join(
        [
            "# `edgemoe plan` under a memory cap (issue 14: peak memory bounded and reported)",
            "",
            f"Written by `bench/plan_memory.py` (`{' '.join(argv)}`). Model: {args.model.name} "
            f"({model_bytes / GB:.2f} GB); plan `--max-size {args.max_size} --chunks {args.chunks}` "
            f"({args.chunks} chunks a calibration eval instead of the default 4, to keep the runs short; the "
            f"memory per eval is the same), {imatrix_note}. Cap = max(2 GB, the budget) = {cap / GB:.2f} GB as a "
            "cgroup v1 memory.limit_in_bytes (page cache counts against it). Each run: a fresh process and store, "
            "the model dropped from the page cache first. Load average before/after: "
            + "; ".join(
                f"{' '.join(f'{x:.2f}' for x in p['load_before'])} / {' '.join(f'{x:.2f}' for x in p['load_after'])}"
                for p in points
            )
            + ".",
            "",
            table,
            "",
            "Per stage, memwatch's sampled peaks (this process and its children; anonymous = RssAnon + RssShmem, "
            "what cannot be reclaimed without swap; mapped file = RssFile, page cache the kernel drops under the cap):",
            "",
            markdown_table(heads, stage_rows),
            "",
            f"Seconds per measurement stage ({seconds}).",
            f"Same recipe capped and uncapped: {'yes' if same else 'no'}" + recipe_note(points) + ".",
            "",
        ]
        + (
            [
                f"Plan's eval path at the 21B's vocabulary ({at_vocab['model']}: {at_vocab['bytes'] / GB:.2f} GB, "
                f"vocab {at_vocab['vocab']}; `--eval-model`, uncapped, {args.chunks} chunks): "
                + "; ".join(
                    f"{k}: {v['anon_bytes'] / GB:.2f} GB anonymous, {v['file_bytes'] / GB:.2f} GB mapped file"
                    for k, v in at_vocab["stages"].items()
                )
                + ".",
                "",
            ]
            if at_vocab
            else []
        )
    )


def write_md(md: Path, measured: str) -> None:
    """The measured part between the markers of an existing page (its prose kept), else a page of only that."""
    block = f"{BEGIN}\n{measured}\n{END}\n"
    text = md.read_text() if md.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        block = head + block + ("\n" + tail if tail else "")
    md.write_text(block)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("--max-size")
    ap.add_argument("--text", type=Path)
    ap.add_argument("--imatrix", type=Path)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--cap", help="memory cap (default: max(2 GB, --max-size))")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--work", type=Path, help="where the runs' stores go (default: beside the model)")
    ap.add_argument("--skip-uncapped", action="store_true")
    ap.add_argument("--eval-model", type=Path, help="also measure plan's eval path on this model (21B vocab)")
    ap.add_argument("--render", type=Path, help="only rewrite the Markdown from this JSON")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "plan_memory")
    args = ap.parse_args()
    if args.render:  # with the measured run's own arguments
        saved, out = json.loads(args.render.read_text()), args.out
        args = ap.parse_args(saved["argv"][1:])
        cap = parse_size(args.cap) if args.cap else max(int(2 * GB), parse_size(args.max_size))
        write_md(
            out.with_suffix(".md"),
            markdown(saved["points"], args, cap, saved.get("eval_at_vocab"), saved["argv"], saved["model_bytes"]),
        )
        return 0
    if not (args.model and args.max_size and args.text):
        ap.error("MODEL, --max-size and --text are needed to measure")
    cap = parse_size(args.cap) if args.cap else max(int(2 * GB), parse_size(args.max_size))
    why = writable_cgroups()
    if why:
        print(f"cgroups are not writable here ({why}): nothing measured")
        return 0
    args.model = args.model.resolve()
    work = (args.work or args.model.parent / "plan-memory-work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    points = []
    if not args.skip_uncapped:
        points.append(run_plan(args, None, "uncapped", work))
    points.append(run_plan(args, cap, "capped", work))
    for p in points:
        print(json.dumps({k: v for k, v in p.items() if k not in ("choices", "command")}), flush=True)
    at_vocab = eval_at_vocab(args, work) if args.eval_model else None
    saved = {
        "model": str(args.model),
        "model_bytes": args.model.stat().st_size,
        "argv": sys.argv,
        "points": points,
        "eval_at_vocab": at_vocab,
    }
    args.out.with_suffix(".json").write_text(json.dumps(saved, indent=1) + "\n")
    write_md(args.out.with_suffix(".md"), markdown(points, args, cap, at_vocab, sys.argv, saved["model_bytes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
