#!/usr/bin/env bash
# Thinking vs PT accuracy on the fixtures' 200 arithmetic prompts (arith-dev.jsonl) -> bench/compare-arith.md
#
# usage: bench/compare_arith.sh [--limit N]     (run from anywhere; needs `make setup` and ../shared/fixtures)
# Converts both tiny fixtures to f16 GGUF in a scratch directory and runs `edgemoe compare` greedily on them.
# One thread: greedy answers do not depend on it, and on a busy 2-core machine 2-thread decoding crawls.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n 2,6p "$0"; exit 0;; esac
repo="$(cd "$(dirname "$0")/.." && pwd)"
fixtures="${EDGEMOE_SHARED_FIXTURES:-$repo/../shared/fixtures}"
edgemoe="$repo/.venv/bin/edgemoe"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
for v in pt thinking; do
  "$edgemoe" convert "$fixtures/tiny-ernie-$v" --out "tiny-ernie-$v-f16.gguf" --outtype f16 >/dev/null
done
cp "$fixtures/arith-dev.jsonl" .
"$edgemoe" compare --pt tiny-ernie-pt-f16.gguf --thinking tiny-ernie-thinking-f16.gguf \
  --prompts arith-dev.jsonl --max-tokens 160 --threads 1 --show 3 --out compare-arith.md "$@"
cp compare-arith.md "$repo/bench/compare-arith.md"
echo "wrote $repo/bench/compare-arith.md"
