#!/usr/bin/env bash
# Set up edgemoe on a fresh Debian/Ubuntu arm64 board: apt packages, the virtualenv, edgemoe, doctor, build.
# Safe to run again: every step is skipped or a cache hit when already done.
set -eu

usage() {
    cat <<'USAGE'
Usage: scripts/board-setup.sh [--venv DIR] [--no-apt] [--kleidiai-src DIR] [--jobs N]

On a fresh Debian/Ubuntu board (arm64; x86 works too) this
  1. installs the build tools with apt (python3-venv, cmake, ninja-build, g++, git, curl),
  2. creates the virtualenv (default: .venv in this checkout) and installs edgemoe into it
     (the Python binding without its own llama.cpp: `make setup`),
  3. runs `edgemoe doctor` (CPU features, RAM, what fits),
  4. runs `edgemoe build`: llama.cpp with this CPU's Armv9 flags and KleidiAI, used by the
     binding and the tools. On a 4-8 core board this takes about 5-15 minutes the first time.

Options:
  --venv DIR           virtualenv to use (default: .venv beside this script's checkout)
  --no-apt             skip the apt step (packages already there, or no root)
  --kleidiai-src DIR   extracted KleidiAI source for boards without internet access
  --jobs N             parallel compile jobs (default: all cores)
  -h, --help           this text
USAGE
}

VENV=""
APT=1
BUILD_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) VENV=$2; shift 2 ;;
        --no-apt) APT=0; shift ;;
        --kleidiai-src) BUILD_ARGS+=(--kleidiai-src "$2"); shift 2 ;;
        --jobs) BUILD_ARGS+=(--jobs "$2"); shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "board-setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-$ROOT/.venv}

PACKAGES="python3 python3-venv python3-dev cmake ninja-build build-essential git curl ca-certificates"
if [ "$APT" = 1 ]; then
    missing=""
    for p in $PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        SUDO=""
        [ "$(id -u)" = 0 ] || SUDO=sudo
        echo "==> apt-get install$missing"
        $SUDO apt-get update -q
        # shellcheck disable=SC2086  # word splitting of the package list is intended
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing
    else
        echo "==> apt packages already installed"
    fi
fi

echo "==> virtualenv $VENV and edgemoe (make setup)"
# make setup installs the binding without compiling and then runs `edgemoe build` (a cache hit when done before)
make setup VENV="$VENV" PYTHON=python3 EDGEMOE_BUILD_ARGS="${BUILD_ARGS[*]:-}"

echo "==> edgemoe doctor"
"$VENV/bin/edgemoe" doctor

echo "==> edgemoe build"
"$VENV/bin/edgemoe" build "${BUILD_ARGS[@]}"

echo "==> done: $VENV/bin/edgemoe is ready (try scripts/run-ernie.sh --help)"
