#!/usr/bin/env bash
# Pull ERNIE-4.5-21B-A3B (Thinking and PT) as ready-made GGUF and ask both the same question.
set -eu

usage() {
    cat <<'USAGE'
Usage: scripts/run-ernie.sh [-p PROMPT] [--quant Q] [--max-tokens N] [--threads N] [--variants "thinking pt"]

Pulls each variant with `edgemoe pull NAME --format gguf --quant Q` (resumable; a second run finds the
files in the Hugging Face cache) and runs the same prompt through both with `edgemoe run --temp 0`:
the Thinking model's reasoning is shown dimmed, then its answer; the PT model answers directly.

Options:
  -p, --prompt TEXT    the question (default: a two-step arithmetic word problem)
  --quant Q            GGUF quantization to pull (default: Q4_0, ~12 GB each; see `edgemoe models`)
  --max-tokens N       generation limit per answer (default: 1024; Thinking needs room to reason)
  --threads N          CPU threads (default: edgemoe's choice, the physical cores)
  --variants LIST      which variants, space separated (default: "thinking pt")
  -h, --help           this text
Environment: EDGEMOE (default: .venv/bin/edgemoe of this checkout, else `edgemoe` on PATH), HF_TOKEN, HF_HOME.
USAGE
}

PROMPT="A train leaves at 9:40 and the trip takes 2 hours 35 minutes. When does it arrive? Answer briefly."
QUANT=Q4_0
MAX_TOKENS=1024
THREADS=""
VARIANTS="thinking pt"
while [ $# -gt 0 ]; do
    case "$1" in
        -p|--prompt) PROMPT=$2; shift 2 ;;
        --quant) QUANT=$2; shift 2 ;;
        --max-tokens) MAX_TOKENS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --variants) VARIANTS=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run-ernie.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
edgemoe_env

RUN_ARGS=(--temp 0 --max-tokens "$MAX_TOKENS")
[ -z "$THREADS" ] || RUN_ARGS+=(--threads "$THREADS")

for variant in $VARIANTS; do
    name="ernie-4.5-21b-a3b-$variant"
    echo "==> $name: edgemoe pull --format gguf --quant $QUANT"
    gguf=$(pull_gguf "$name" "$QUANT")
    echo "==> $name ($QUANT): $gguf"
    "$EDGEMOE" run "$gguf" -p "$PROMPT" "${RUN_ARGS[@]}"
    echo
done
