# shellcheck shell=bash
# Shared by the board scripts (sourced, not run): locate edgemoe and its Python, pull a GGUF and print its path.

# Sets ROOT (the checkout), EDGEMOE (env, else .venv/bin/edgemoe, else PATH) and PY (the Python beside edgemoe).
edgemoe_env() {
    ROOT=$(cd "$(dirname "$0")/.." && pwd)
    if [ -z "${EDGEMOE:-}" ]; then
        if [ -x "$ROOT/.venv/bin/edgemoe" ]; then EDGEMOE=$ROOT/.venv/bin/edgemoe; else EDGEMOE=edgemoe; fi
    fi
    PY=$(dirname "$(command -v "$EDGEMOE")")/python
    [ -x "$PY" ] || PY=python3
}

# pull_gguf NAME QUANT -> prints the path of the pulled GGUF (a split model's first shard, the one llama.cpp opens)
pull_gguf() {
    "$EDGEMOE" pull "$1" --format gguf --quant "$2" --json | "$PY" -c '
import json, os, sys
r = json.load(sys.stdin)
files = sorted(f["name"] for f in r["files"] if f["name"].endswith(".gguf"))
if not files:
    sys.exit("the pull returned no .gguf file")
print(os.path.join(r["path"], files[0]))
'
}
