"""`edgemoe serve`: an OpenAI-compatible HTTP API over one GGUF (stage: serve.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .common import console, emit_json, err_console, say_choice


def serve(
    model: str = typer.Argument(..., help="The GGUF model to serve (loaded once): a file, or NAME[:TAG] from `edgemoe list`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 opens it to the network "
                             "(then give --api-key)."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGEMOE_API_KEY",
                                          help="Require `Authorization: Bearer KEY` on /v1/* (env EDGEMOE_API_KEY)."),
    ctx: int = typer.Option(4096, "--ctx", "-c", min=0, help="Context per request (prompt + reply) in tokens; "
                            "each slot holds its own KV cache of this size (0 = the model's own)."),
    parallel: int = typer.Option(1, "--parallel", "-np", min=1, help="Slots: requests generated at the same time."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads in all, split "
                                          "between the slots (default: the physical cores this process may use)."),
    queue: int = typer.Option(16, "--queue", min=0, help="Requests that may wait for a slot; more get 503."),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="The model name clients use (default: the "
                                           "file name without .gguf)."),
    install_systemd: bool = typer.Option(False, "--install-systemd", help="Write a systemd unit that runs this "
                                         "command on boot (not enabled) and exit."),
    unit_path: Optional[Path] = typer.Option(None, "--unit-path", help="Where --install-systemd writes (default: "
                                             "/etc/systemd/system as root, else ~/.config/systemd/user)."),
    as_json: bool = typer.Option(False, "--json", help="Print the ready line (or the unit) as JSON."),
    workers: Optional[str] = typer.Option(None, "--workers", help="HOST:PORT,... of `edgemoe worker`s: split the "
                                          "model's layers across them and this machine by free memory (one slot)."),
) -> None:
    """Serve a GGUF over an OpenAI-compatible HTTP API, ERNIE Thinking parsed right.

    POST /v1/chat/completions (streamed with "stream": true, or not),
    POST /v1/completions (raw text, no template), GET /v1/models,
    GET /health and GET /metrics (Prometheus text: tokens/s, queue depth,
    requests, errors; /health and /metrics need no key).

    Prompts use the chat template stored in the GGUF, as `edgemoe run`
    does. A Thinking model's reply comes back split: the reasoning in
    message.reasoning_content, the answer without tags in message.content
    (streamed as delta.reasoning_content, then delta.content); a
    <tool_call> becomes OpenAI's tool_calls. A PT model's reply is plain
    content.

    Requests wait in one first-come-first-served queue for a slot; a client
    that disconnects stops its generation. SIGTERM or Ctrl-C stops cleanly.

    Examples: edgemoe serve model.gguf --port 8080
              edgemoe serve model.gguf --host 0.0.0.0 --api-key "$KEY" --parallel 2
              edgemoe serve model.gguf --install-systemd
    """
    from .. import cluster
    from .. import serve as serving

    worker_list = cluster.parse_workers(workers) if workers is not None else None
    if worker_list and not install_systemd and not cluster.supervised():
        raise typer.Exit(cluster.supervise(sys.argv[1:], worker_list))
    from ..models import resolve_gguf

    choice = resolve_gguf(model)  # a name serves as NAME:TAG unless --model-id says otherwise
    say_choice(choice)
    opts = serving.ServeOptions(model=choice.path, host=host, port=port, api_key=api_key, ctx=ctx, parallel=parallel,
                                threads=threads, queue=queue, model_id=model_id or choice.ref, workers=worker_list)
    if install_systemd:
        unit = serving.install_systemd(opts, unit_path)
        if as_json:
            emit_json(unit)
            return
        console.print(f"wrote {unit.path} (not enabled); to start it now and on every boot:", highlight=False)
        for line in unit.enable:
            console.print(f"  {line}", highlight=False)
        return

    def on_ready(info) -> None:
        if as_json:
            emit_json(info)
        else:
            kind = "Thinking" if info.thinking else "plain"
            console.print(f"serving {info.model_id} ({kind}) on {info.url}/v1 · {info.slots} slot(s) x "
                          f"{info.threads_per_slot} thread(s) · ctx {info.ctx} · queue {info.queue}"
                          f"{' · API key required' if info.api_key else ''}", highlight=False)
            if info.split:
                console.print("layers: " + ", ".join(f"{p['device']} {p['layers']}" for p in info.split),
                              highlight=False)
        sys.stdout.flush()

    def log(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    summary = serving.serve(opts, on_ready, log)
    err_console.print(f"[dim]stopped: {summary.requests} requests, {summary.errors} errors, {summary.cancelled} "
                      f"cancelled, {summary.completion_tokens} tokens generated[/]", highlight=False)
