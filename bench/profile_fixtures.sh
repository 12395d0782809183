#!/usr/bin/env bash
# Expert usage of both tiny fixtures on the fixtures' calib.txt -> bench/profile/<variant>/ and bench/profile.md
#
# usage: bench/profile_fixtures.sh      (needs `make setup` and ../shared/fixtures)
set -euo pipefail
case "${1:-}" in -h|--help) sed -n 2,4p "$0"; exit 0;; esac
repo="$(cd "$(dirname "$0")/.." && pwd)"
fixtures="${EDGEMOE_SHARED_FIXTURES:-$repo/../shared/fixtures}"
edgemoe="$repo/.venv/bin/edgemoe"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
report="$repo/bench/profile.md"
{
  echo "# Expert usage of the tiny fixtures (edgemoe profile)"
  echo
  echo "Made by \`bench/profile_fixtures.sh\`: each fixture converted to f16, 8192 tokens of \`calib.txt\` routed in"
  echo "windows of 512. Per layer: entropy of usage, effective experts (2^entropy, of 16), share of routed tokens the"
  echo "top-4 and the top-half experts take, and power-law vs exponential fits of usage against rank."
} > "$work/profile.md"
for v in pt thinking; do
  "$edgemoe" convert "$fixtures/tiny-ernie-$v" --out "$work/tiny-ernie-$v-f16.gguf" --outtype f16 >/dev/null
  "$edgemoe" profile "$work/tiny-ernie-$v-f16.gguf" --text "$fixtures/calib.txt" --out "$repo/bench/profile/$v" \
    --threads 2 --json > "$work/$v.json"
  "$repo/.venv/bin/python" - "$work/$v.json" "$v" >> "$work/profile.md" <<'PY'
import json, sys
from edgemoe_cli.report import markdown_table
r = json.load(open(sys.argv[1]))
print(f"\n## {sys.argv[2]}\n")
print(markdown_table(["layer", "entropy bits", "effective experts", "top-4 share", "top-half share", "unused",
                      "power-law alpha", "R2 power", "R2 exponential"],
                     [[u["layer"], u["entropy_bits"], u["effective_experts"], f"{u['top_k_share']:.1%}",
                       f"{u['half_share']:.1%}", u["unused"], u["power_law_alpha"], u["power_law_r2"],
                       u["exponential_r2"]] for u in r["layers"]]))
print(f"All layers pooled: {r['power_law']['verdict']}.\n")
print(f"![heatmap](profile/{sys.argv[2]}/expert-usage.png) ![rank](profile/{sys.argv[2]}/usage-vs-rank.png)")
PY
done
cp "$work/profile.md" "$report"
echo "wrote $report"
