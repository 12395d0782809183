#!/usr/bin/env bash
# What `make demo` runs: convert the two tiny ERNIE-4.5 MoE fixtures to GGUF, then ask PT and Thinking the same
# two-digit arithmetic question, greedy, and print both answers (Thinking's with its reasoning, dimmed on a tty).
set -eu

usage() {
    cat <<'EOF'
usage: scripts/demo.sh [--help]

Converts data/fixtures/tiny-ernie-{pt,thinking} (copies of the project's trained fixtures) with
`edgemoe convert`, then runs `edgemoe run --temp 0` on each with the same question.

Environment:
  EDGEMOE            the edgemoe command        (default: .venv/bin/edgemoe, else edgemoe on PATH)
  DEMO_OUT           where the GGUFs go         (default: out/demo in the repository; inputs are never written)
  DEMO_QUESTION      the question               (default: "What is 51 - 29?", which both fixtures answer)
  DEMO_OUTTYPE       GGUF weight type           (default: f16)
  DEMO_THREADS       CPU threads for generation (default: 1. A 14M-parameter model decodes a token in about
                     2 ms on one core; more threads mostly add synchronisation, and when other processes
                     keep the cores busy, llama.cpp's spinning OpenMP threads fall to a few tokens/s)
EOF
}
case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) usage >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${EDGEMOE:-}" ]; then
    if [ -x "$root/.venv/bin/edgemoe" ]; then EDGEMOE=$root/.venv/bin/edgemoe; else EDGEMOE=edgemoe; fi
fi
out=${DEMO_OUT:-$root/out/demo}
question=${DEMO_QUESTION:-What is 51 - 29?}
outtype=${DEMO_OUTTYPE:-f16}
threads=${DEMO_THREADS:-1}

bold=""; reset=""
if [ -t 1 ]; then bold=$(printf '\033[1m'); reset=$(printf '\033[0m'); fi

mkdir -p "$out"
for variant in pt thinking; do
    "$EDGEMOE" convert "$root/data/fixtures/tiny-ernie-$variant" --out "$out/tiny-ernie-$variant-$outtype.gguf" \
        --outtype "$outtype"
done

for variant in pt thinking; do
    printf '\n%s== tiny-ernie-%s: %s%s\n' "$bold" "$variant" "$question" "$reset"
    "$EDGEMOE" run "$out/tiny-ernie-$variant-$outtype.gguf" -p "$question" --temp 0 --max-tokens 256 \
        --threads "$threads"
done
