#!/usr/bin/env python3
"""Benchmark `edgemoe convert` against llama.cpp's convert_hf_to_gguf.py on a real-width ERNIE-4.5 checkpoint.

usage: bench/convert_bench.py [--src DIR] [--outtypes bf16,f16] [--out-dirs /tmp,/dev/shm] [--report bench/convert.md]

Without --src, a random-weight checkpoint with the real widths of ERNIE-4.5-21B-A3B and 3 layers (3.9 GB) is made
with ../shared/tools/make_wide_ernie.py under /tmp and deleted afterwards. The reference converter runs from the
venv and sdist that tests/test_convert_reference.py caches (~/.cache/edgemoe/refconvert-venv and
llama-cpp-python-0.3.36-src); run that test once first, or pass --reference-python/--reference-script.

Each converter runs as its own process, after `sync` and with the checkpoint in the page cache (read once before
the first run), so both start from the same state. Wall time is measured around the process; peak RSS is the
kernel's high-water mark of the process's resident set (ru_maxrss from wait4), which counts every page it touched,
anonymous or file-backed (mmap'd checkpoint pages included). Both outputs are compared byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgemoe"
MAKE_WIDE = REPO.parent / "shared" / "tools" / "make_wide_ernie.py"
FIXTURE_TOKENIZER = REPO.parent / "shared" / "fixtures" / "tiny-ernie-pt" / "tokenizer.model"


def measure(cmd: list[str]) -> dict:
    """Run cmd; wall seconds, CPU seconds and peak RSS (bytes) of that process."""
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024}


def warm(src: Path) -> None:
    for f in sorted(src.iterdir()):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 1024**2
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average at start {load} (the cores are shared)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="checkpoint to convert (default: make a 3-layer real-width one)")
    ap.add_argument("--outtypes", default="bf16,f16")
    ap.add_argument(
        "--out-dirs",
        default="/tmp",
        help="comma-separated directories both write their output to, "
        "e.g. /tmp,/dev/shm to see the disk's share (tmpfs takes the disk's write-back out)",
    )
    ap.add_argument("--report", type=Path, default=REPO / "bench" / "convert.md")
    ap.add_argument("--reference-python", type=Path, default=CACHE / "refconvert-venv" / "bin" / "python")
    ap.add_argument(
        "--reference-script",
        type=Path,
        default=CACHE / "llama-cpp-python-0.3.36-src" / "llama.cpp" / "convert_hf_to_gguf.py",
    )
    args = ap.parse_args()
    for p in (args.reference_python, args.reference_script):
        if not p.exists():
            sys.exit(f"{p} missing: run `pytest -m slow tests/test_convert_reference.py` once, or pass its path")

    made = None
    src = args.src
    if src is None:
        made = src = Path("/tmp/edgemoe-bench-wide-ernie")
        subprocess.run(
            [sys.executable, str(MAKE_WIDE), str(src), "--layers", "3", "--tokenizer", str(FIXTURE_TOKENIZER)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    size = sum(f.stat().st_size for f in src.iterdir())
    header = machine()
    rows = []
    try:
        warm(src)
        for out_dir, outtype in ((Path(d), t) for d in args.out_dirs.split(",") for t in args.outtypes.split(",")):
            ours_out, ref_out = out_dir / f"bench-ours-{outtype}.gguf", out_dir / f"bench-ref-{outtype}.gguf"
            ours_cmd = [
                sys.executable,
                "-m",
                "edgemoe_cli.cli",
                "convert",
                str(src),
                "--out",
                str(ours_out),
                "--outtype",
                outtype,
                "--json",
            ]
            ref_cmd = [
                str(args.reference_python),
                str(args.reference_script),
                str(src),
                "--outfile",
                str(ref_out),
                "--outtype",
                outtype,
            ]
            ours = measure(ours_cmd)
            ref = measure(ref_cmd)
            same = filecmp.cmp(ours_out, ref_out, shallow=False)
            out_size = ours_out.stat().st_size
            ours_out.unlink()
            ref_out.unlink()
            rows.append((out_dir, outtype, ours, ref, same, out_size))
            print(out_dir, outtype, ours, ref, "identical" if same else "DIFFERENT", flush=True)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)

    lines = [
        "# convert: edgemoe vs llama.cpp's convert_hf_to_gguf.py",
        "",
        f"Made by `python bench/convert_bench.py {' '.join(sys.argv[1:])}`".rstrip() + ".",
        "",
        f"- Machine: {header}.",
        f"- Input: {src.name if args.src else 'make_wide_ernie.py --layers 3'} "
        f"({size / 1e9:.2f} GB bf16, real ERNIE-4.5-21B-A3B widths: 64 experts x 1536, hidden 2560, vocab 103424).",
        "- Page cache warm for the input; `sync` before each run; outputs deleted after each pair.",
        "- Peak RSS: ru_maxrss of the converter process (wait4), i.e. the kernel's high-water mark of its resident",
        "  set, file-backed pages included. Wall: around the process, imports included.",
        f"- edgemoe: `{sys.executable} -m edgemoe_cli.cli convert SRC --out OUT --outtype T --json`",
        f"- llama.cpp: `{args.reference_python} convert_hf_to_gguf.py SRC --outfile OUT --outtype T` "
        "(llama-cpp-python 0.3.36's vendored copy, torch 2.13.0 CPU, transformers 4.57.6)",
        "",
        "| output to | outtype | output | edgemoe wall | llama.cpp wall | time ratio | edgemoe CPU | llama.cpp CPU "
        "| edgemoe peak RSS | llama.cpp peak RSS | RSS ratio | same bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for out_dir, outtype, ours, ref, same, out_size in rows:
        lines.append(
            f"| {out_dir} | {outtype} | {out_size / 1e9:.2f} GB | {ours['wall']:.1f} s | {ref['wall']:.1f} s | "
            f"{ours['wall'] / ref['wall']:.2f} | {ours['cpu']:.1f} s | {ref['cpu']:.1f} s | "
            f"{ours['rss'] / 1e9:.3f} GB | {ref['rss'] / 1e9:.2f} GB | {ours['rss'] / ref['rss']:.3f} | "
            f"{'yes' if same else 'NO'} |"
        )
    args.report.write_text("\n".join(lines) + "\n")
    print("wrote", args.report)


if __name__ == "__main__":
    main()
