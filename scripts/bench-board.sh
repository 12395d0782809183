#!/usr/bin/env bash
# The Arm Learning Path comparison on this board: a plain llama.cpp build against the Armv9 + KleidiAI build,
# same model, same llama-bench settings. Both builds come from `edgemoe build` (cached).
set -eu

usage() {
    cat <<'USAGE'
Usage: scripts/bench-board.sh [--model FILE.gguf | --name NAME --quant Q] [--threads N] [--out FILE.md]
                              [--plain-arch ARCH] [--reps N] [--pg PP,TG]

Builds llama.cpp twice with edgemoe (each a cache hit after the first time):
  plain:  edgemoe build --arch PLAIN_ARCH --no-kleidiai --no-activate   (default PLAIN_ARCH: armv8-a,
          generic NEON, what a distribution binary targets)
  tuned:  edgemoe build                                                  (this CPU's GGML_CPU_ARM_ARCH,
          e.g. armv9-a+sve2+i8mm+bf16+dotprod, and KleidiAI)
then runs the same `llama-bench -p 512 -n 128 -pg 128,128 -t THREADS` of each on the model and writes a
Markdown table with both builds' tokens/s and the speed-up (pp512 and tg128 are what the Learning Path for
ERNIE-4.5-21B-A3B reports).

Options:
  --model FILE      a GGUF to bench (default: pull ERNIE-4.5-21B-A3B-Thinking as GGUF --quant Q)
  --name NAME       registry name to pull when --model is not given (default: ernie-4.5-21b-a3b-thinking)
  --quant Q         quant to pull (default: Q4_0)
  --threads N       llama-bench threads (default: 8, as the Learning Path, capped at the CPU count)
  --plain-arch A    -march of the plain build (default: armv8-a)
  --reps N          llama-bench repetitions (default: 3)
  --pg PP,TG        the prompt+generation test (default: 128,128)
  --out FILE        where the Markdown report goes (default: bench/board-<hostname>.md)
  -h, --help        this text
Environment: EDGEMOE (default: .venv/bin/edgemoe of this checkout, else `edgemoe` on PATH).
USAGE
}

MODEL=""
NAME=ernie-4.5-21b-a3b-thinking
QUANT=Q4_0
NCPU=$(nproc 2>/dev/null || echo 1)
THREADS=$(( NCPU < 8 ? NCPU : 8 ))
PLAIN_ARCH=armv8-a
REPS=3
PG=128,128
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL=$2; shift 2 ;;
        --name) NAME=$2; shift 2 ;;
        --quant) QUANT=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --plain-arch) PLAIN_ARCH=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --pg) PG=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench-board.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
edgemoe_env
OUT=${OUT:-$ROOT/bench/board-$(hostname).md}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

json_field() {  # json_field FILE KEY -> the value of a top-level key
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}

case "$(uname -m)" in
    aarch64|arm64) ;;
    *) echo "bench-board.sh: this compares Arm builds; $(uname -m) has no --arch/KleidiAI to compare" >&2; exit 2 ;;
esac

if [ -z "$MODEL" ]; then
    echo "==> edgemoe pull $NAME --format gguf --quant $QUANT"
    MODEL=$(pull_gguf "$NAME" "$QUANT")
fi
[ -f "$MODEL" ] || { echo "bench-board.sh: model $MODEL not found" >&2; exit 2; }

echo "==> plain build (--arch $PLAIN_ARCH, no KleidiAI)"
"$EDGEMOE" build --arch "$PLAIN_ARCH" --no-kleidiai --no-activate --json > "$WORK/plain.json"
echo "==> tuned build (this CPU's flags, KleidiAI)"
"$EDGEMOE" build --json > "$WORK/tuned.json"

for b in plain tuned; do
    bin=$(json_field "$WORK/$b.json" bin_dir)
    echo "==> llama-bench ($b): $(json_field "$WORK/$b.json" arch), KleidiAI $(json_field "$WORK/$b.json" kleidiai)"
    "$bin/llama-bench" -m "$MODEL" -p 512 -n 128 -pg "$PG" -t "$THREADS" -r "$REPS" -o json > "$WORK/bench-$b.json"
done

mkdir -p "$(dirname "$OUT")"
"$PY" - "$WORK" "$MODEL" "$THREADS" "$OUT" <<'PYEOF'
import json, os, platform, sys, time
work, model, threads, out = sys.argv[1:5]
builds = {b: json.load(open(os.path.join(work, f"{b}.json"))) for b in ("plain", "tuned")}
bench = {b: json.load(open(os.path.join(work, f"bench-{b}.json"))) for b in ("plain", "tuned")}

def name(r):
    p, n = r.get("n_prompt", 0), r.get("n_gen", 0)
    return f"pp{p}" if not n else f"tg{n}" if not p else f"pp{p}+tg{n}"

rows = {b: {name(r): (r["avg_ts"], r["stddev_ts"]) for r in bench[b]} for b in bench}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.lower().startswith(("model name", "hardware"))), platform.machine())
lines = [
    f"# llama-bench on {platform.node()}: plain vs Armv9 + KleidiAI build",
    "",
    f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {cpu}; {os.cpu_count()} CPUs; threads: {threads}",
    f"- model: `{os.path.basename(model)}` ({os.path.getsize(model) / 1e9:.2f} GB)",
    *(f"- {b}: `{builds[b]['arch']}`, KleidiAI {'on' if builds[b]['kleidiai'] else 'off'} (build {builds[b]['key']})" for b in builds),
    "- produced by: `scripts/bench-board.sh` (llama-bench -o json, mean +- stddev over the repetitions)",
    "",
    "| test | plain t/s | Armv9+KleidiAI t/s | speed-up |",
    "|---|---:|---:|---:|",
]
for test in rows["plain"]:
    (p, ps), (t, ts) = rows["plain"][test], rows["tuned"].get(test, (float("nan"), 0.0))
    lines.append(f"| {test} | {p:.2f} +- {ps:.2f} | {t:.2f} +- {ts:.2f} | {t / p:.2f}x |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
echo "==> report: $OUT"
