"""`edgemoe worker`: lend this board to a model run elsewhere, over llama.cpp's RPC (stage: cluster.py)."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from ..errors import EdgeMoEError
from ..units import human_bytes
from .common import console, emit_json, err_console, json_option, threads_option

HostOpt = Annotated[
    str,
    typer.Option(
        "--host",
        help="Address to bind. WARNING: ggml-rpc-server has NO "
        "authentication; give a private-network address only, never a public one.",
    ),
]
PortOpt = Annotated[int, typer.Option("--port", help="TCP port.")]
MemoryOpt = Annotated[
    Optional[str],
    typer.Option(
        "--memory",
        help="Memory this worker offers (e.g. 6GiB); default: what is free. Printed into the address the others use.",
    ),
]


def worker(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 50052,
    memory: MemoryOpt = None,
    threads: Optional[int] = threads_option("the physical cores"),
    as_json: bool = json_option("the ready line"),
) -> None:
    """Lend this board's CPU and memory to a model run elsewhere (llama.cpp's RPC backend).

    Starts the build's ggml-rpc-server and prints the address to give to
    `edgemoe run/serve --workers`; runs until SIGTERM or Ctrl-C.

    SECURITY: ggml-rpc-server has NO authentication and no encryption. Anyone
    who can reach the port can use this machine's memory and CPU through it.
    It binds to 127.0.0.1 unless --host says otherwise: give the board's
    address on a private network you trust, never a public one.

    Examples: edgemoe worker                          # this machine only
              edgemoe worker --host 192.168.1.21 --memory 6GiB
    """
    from .. import cluster

    w = cluster.Worker(host=host, port=port, memory=memory, threads=threads)
    if w.info.public:
        err_console.print(
            f"[bold yellow]warning:[/] listening on {w.info.listen}: {cluster.NO_AUTH_WARNING}",
            highlight=False,
            soft_wrap=True,
        )
    if as_json:
        emit_json(w.info)
    else:
        console.print(
            f"worker ready on {w.info.listen} ({w.info.threads} threads, "
            f"{human_bytes(w.info.memory_bytes or w.info.free_bytes)} offered); on the other board:\n"
            f"  edgemoe run MODEL --workers {w.info.address} ...",
            highlight=False,
            soft_wrap=True,
        )
    sys.stdout.flush()
    code = w.wait()
    if code not in (0, -15, 143):  # killed by our own SIGTERM is the normal end
        raise EdgeMoEError(f"ggml-rpc-server exited with {code}", "run it again; its output is above")
