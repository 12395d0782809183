"""`edgemoe serve`: an OpenAI-compatible HTTP API over one GGUF (stage: serve.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    MemoryOpt,
    WarmOpt,
    console,
    ctx_option,
    emit_json,
    err_console,
    json_option,
    model_choice,
    threads_option,
)

ModelArg = Annotated[
    str, typer.Argument(help="The GGUF model to serve (loaded once): a file, or NAME[:TAG] from `edgemoe list`.")
]
HostOpt = Annotated[
    str, typer.Option("--host", help="Address to listen on; 0.0.0.0 opens it to the network (then give --api-key).")
]
PortOpt = Annotated[int, typer.Option("--port", help="TCP port.")]
ApiKeyOpt = Annotated[
    Optional[str],
    typer.Option(
        "--api-key",
        envvar="EDGEMOE_API_KEY",
        help="Require `Authorization: Bearer KEY` on /v1/* (env EDGEMOE_API_KEY).",
    ),
]
ParallelOpt = Annotated[
    int, typer.Option("--parallel", "-np", min=1, help="Slots: requests generated at the same time.")
]
QueueOpt = Annotated[int, typer.Option("--queue", min=0, help="Requests that may wait for a slot; more get 503.")]
ModelIdOpt = Annotated[
    Optional[str], typer.Option("--model-id", help="The model name clients use (default: the file name without .gguf).")
]
InstallSystemdOpt = Annotated[
    bool,
    typer.Option(
        "--install-systemd", help="Write a systemd unit that runs this command on boot (not enabled) and exit."
    ),
]
UnitPathOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--unit-path",
        help="Where --install-systemd writes (default: /etc/systemd/system as root, else ~/.config/systemd/user).",
    ),
]
WorkersOpt = Annotated[
    Optional[str],
    typer.Option(
        "--workers",
        help="HOST:PORT,... of `edgemoe worker`s: split the "
        "model's layers across them and this machine by free memory (one slot).",
    ),
]


def serve(
    model: ModelArg,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8080,
    api_key: ApiKeyOpt = None,
    ctx: int = ctx_option(
        4096,
        "Context per request (prompt + reply) in tokens; each slot holds its own KV cache of this size "
        "(0 = the model's own).",
        minimum=0,
    ),
    parallel: ParallelOpt = 1,
    threads: Optional[int] = threads_option("the physical cores this process may use, split between the slots"),
    queue: QueueOpt = 16,
    model_id: ModelIdOpt = None,
    install_systemd: InstallSystemdOpt = False,
    unit_path: UnitPathOpt = None,
    as_json: bool = json_option("the ready line (or the unit)"),
    workers: WorkersOpt = None,
    memory: MemoryOpt = None,
    warm: WarmOpt = None,
) -> None:
    """Serve a GGUF over an OpenAI-compatible HTTP API, ERNIE Thinking parsed right.

    POST /v1/chat/completions (streamed with "stream": true, or not),
    POST /v1/completions (raw text, no template), GET /v1/models,
    GET /health and GET /metrics (Prometheus text: tokens/s, queue depth,
    requests, errors; /health and /metrics need no key).

    Prompts use the chat template stored in the GGUF, as `edgemoe run` does. A Thinking model's reply comes back
    split: the reasoning in message.reasoning_content, the answer without tags in message.content (streamed as
    delta.reasoning_content, then delta.content); a <tool_call> becomes OpenAI's tool_calls. A PT model's reply is
    plain content.

    Requests wait in one first-come-first-served queue for a slot; a client that disconnects stops its generation.
    SIGTERM or Ctrl-C stops cleanly. --memory SIZE (--warm) serves a model larger than SIZE as `run` does (one slot).

    Examples: edgemoe serve model.gguf --port 8080
              edgemoe serve model.gguf --host 0.0.0.0 --api-key "$KEY" --parallel 2 (or --install-systemd)
    """
    from .. import cluster
    from .. import serve as serving

    worker_list = cluster.parse_workers(workers) if workers is not None else None
    if worker_list and not install_systemd and not cluster.supervised():
        raise typer.Exit(cluster.supervise(sys.argv[1:], worker_list))
    choice = model_choice(model)  # a name serves as NAME:TAG unless --model-id says otherwise
    network = dict(host=host, port=port, api_key=api_key, queue=queue, model_id=model_id or choice.ref)
    slots = dict(ctx=ctx, parallel=parallel, threads=threads, workers=worker_list, memory=memory, warm=warm)
    opts = serving.ServeOptions(model=choice.path, **slots, **network)
    if install_systemd:
        _install_unit(serving.install_systemd(opts, unit_path), as_json)
        return
    summary = serving.serve(opts, _ready_printer(as_json), _log)
    err_console.print(
        f"[dim]stopped: {summary.requests} requests, {summary.errors} errors, {summary.cancelled} "
        f"cancelled, {summary.completion_tokens} tokens generated[/]",
        highlight=False,
    )


def _install_unit(unit, as_json: bool) -> None:
    if as_json:
        emit_json(unit)
        return
    console.print(f"wrote {unit.path} (not enabled); to start it now and on every boot:", highlight=False)
    for line in unit.enable:
        console.print(f"  {line}", highlight=False)


def _ready_printer(as_json: bool):
    """serve's on_ready: the address, slots and threads once the model is loaded (stdout, flushed for scripts)."""

    def on_ready(info) -> None:
        if as_json:
            emit_json(info)
        else:
            kind = "Thinking" if info.thinking else "plain"
            console.print(
                f"serving {info.model_id} ({kind}) on {info.url}/v1 · {info.slots} slot(s) x "
                f"{info.threads_per_slot} thread(s) · ctx {info.ctx} · queue {info.queue}"
                f"{' · API key required' if info.api_key else ''}",
                highlight=False,
            )
            if info.split:
                console.print(
                    "layers: " + ", ".join(f"{p['device']} {p['layers']}" for p in info.split), highlight=False
                )
        sys.stdout.flush()

    return on_ready


def _log(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
