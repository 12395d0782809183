#!/bin/sh
# Serve ERNIE-4.5-21B-A3B on a board over an OpenAI-compatible API (edgemoe serve), or install it as a service.
set -eu

usage() {
    cat <<'USAGE'
Usage: scripts/serve-ernie.sh [--model FILE.gguf | --variant thinking|pt [--quant Q]] [--host H] [--port P]
                              [--api-key KEY] [--parallel N] [--ctx N] [--threads N] [--install-systemd]

Without --model it pulls the variant's ready-made GGUF (`edgemoe pull NAME --format gguf --quant Q`; resumable,
a second run finds it in the Hugging Face cache), then runs `edgemoe serve` in the foreground (exec: SIGTERM and
Ctrl-C reach it and it stops cleanly). With --install-systemd it writes a systemd unit for the same command
instead (not enabled; the commands to enable it are printed).

Options:
  --model FILE       a GGUF to serve (default: pull one)
  --variant V        thinking (default) or pt
  --quant Q          GGUF quantization to pull (default: Q4_0, ~12 GB; see `edgemoe models`)
  --host H           address to listen on (default: 127.0.0.1; 0.0.0.0 opens it to the network: give --api-key)
  --port P           TCP port (default: 8080)
  --api-key KEY      clients must send Authorization: Bearer KEY (also read from EDGEMOE_API_KEY)
  --parallel N       requests generated at the same time (default: 1)
  --ctx N            context per request in tokens (default: 4096)
  --threads N        CPU threads (default: edgemoe's choice, the physical cores)
  --install-systemd  write the unit instead of serving
  -h, --help         this text
Environment: EDGEMOE (default: .venv/bin/edgemoe of this checkout, else `edgemoe` on PATH), HF_TOKEN, HF_HOME.
Then: curl http://127.0.0.1:8080/v1/models, or any OpenAI client with base_url http://HOST:PORT/v1.
USAGE
}

MODEL=""
VARIANT=thinking
QUANT=Q4_0
SYSTEMD=""
# edgemoe serve's options, collected in "$@" order-independently: set -- is rebuilt at the end
HOST=127.0.0.1
PORT=8080
PARALLEL=1
CTX=4096
THREADS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL=$2; shift 2 ;;
        --variant) VARIANT=$2; shift 2 ;;
        --quant) QUANT=$2; shift 2 ;;
        --host) HOST=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        --api-key) EDGEMOE_API_KEY=$2; export EDGEMOE_API_KEY; shift 2 ;;
        --parallel) PARALLEL=$2; shift 2 ;;
        --ctx) CTX=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --install-systemd) SYSTEMD=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "serve-ernie.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$VARIANT" in
    thinking|pt) ;;
    *) echo "serve-ernie.sh: --variant must be thinking or pt, not $VARIANT" >&2; exit 2 ;;
esac

# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
edgemoe_env

if [ -z "$MODEL" ]; then
    echo "==> edgemoe pull ernie-4.5-21b-a3b-$VARIANT --format gguf --quant $QUANT" >&2
    MODEL=$(pull_gguf "ernie-4.5-21b-a3b-$VARIANT" "$QUANT")
fi

set -- serve "$MODEL" --host "$HOST" --port "$PORT" --parallel "$PARALLEL" --ctx "$CTX"
[ -z "$THREADS" ] || set -- "$@" --threads "$THREADS"
[ -z "$SYSTEMD" ] || set -- "$@" --install-systemd
if [ "$HOST" != "127.0.0.1" ] && [ "$HOST" != "localhost" ] && [ -z "${EDGEMOE_API_KEY:-}" ]; then
    echo "serve-ernie.sh: warning: listening on $HOST without --api-key: anyone who reaches the port can use it" >&2
fi
exec "$EDGEMOE" "$@"
