"""The `edgemoe` command line: parse, call one stage function, render its result. No logic lives here.

Every command lives in its own section below; a stage's logic lives in its module. User mistakes arrive as
EdgeMoEError and leave as one red line on stderr with exit code 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import __version__
from .errors import EdgeMoEError

app = typer.Typer(
    name="edgemoe",
    help="ERNIE-4.5-21B-A3B (Thinking and PT) from the Hugging Face Hub onto Armv9 boards with llama.cpp.\n\n"
    "pull -> convert -> plan -> quantize -> build -> run / compare / bench; doctor tells what the board can do.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def emit_json(result) -> None:
    """Machine output for --json: a dataclass (or dict) as one JSON document on stdout."""
    data = asdict(result) if is_dataclass(result) else result
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _version(value: bool) -> None:
    if value:
        console.print(f"edgemoe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


# ---- commands (one section each; keep each section's logic in its stage module) ----


# ---- doctor ----


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


@app.command()
def doctor(
    ctx: int = typer.Option(4096, "--ctx", min=1, help="Context length the memory-fit check assumes (f16 KV cache)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout instead of tables."),
) -> None:
    """What this machine can do for ERNIE-4.5-21B-A3B, and how to build llama.cpp for it.

    Reports the OS, CPU model, core types (big/little where the kernel's cpu_capacity tells), the ISA features
    ggml uses (aarch64: asimddp, i8mm, bf16, sve, sve2, sme; x86: the AVX family), the SVE vector length, RAM
    total/available, free disk where models are stored, and llama.cpp's own system_info from the library the
    Python binding loads (or why it could not be loaded).

    Recommends the GGML_CPU_ARM_ARCH string `edgemoe build` will use, and whether the model fits at Q4_0, Q4_K_M
    and Q8_0: need = weights + KV cache (2 x 28 layers x 4 KV heads x 128 x 2 bytes x ctx) + 1 GiB runtime reserve.
    """
    from . import board

    rep = board.doctor(ctx)
    if as_json:
        emit_json(rep)
        return
    from rich.table import Table

    t = Table(title="edgemoe doctor", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("OS", f"{rep.os} ({rep.arch})")
    t.add_row("CPU", f"{rep.cpu_model} — {rep.n_cpus} CPUs")
    for g in rep.cores:
        cap = f", capacity {g.capacity}" if g.capacity is not None else ""
        t.add_row("  cores", f"{g.count}x {g.name} ({g.kind}{cap}) cpus {','.join(map(str, g.cpus))}")
    t.add_row("ISA", " ".join(rep.features) or "-")
    t.add_row("SVE vector", f"{rep.sve_vector_bits} bits" if rep.sve_vector_bits else "-")
    t.add_row("RAM", f"{_gib(rep.ram_total_bytes)} total, {_gib(rep.ram_available_bytes)} available")
    t.add_row("disk", f"{_gib(rep.disk_free_bytes)} free at {rep.store}")
    if rep.llama_system_info:
        t.add_row("llama.cpp", rep.llama_system_info)
        t.add_row("  library", rep.llama_library or "(inside llama-cpp-python's wheel)")
    else:
        t.add_row("llama.cpp", f"[red]binding not loaded:[/] {rep.llama_error}")
    t.add_row("native build", rep.native_build or "none (run `edgemoe build`)")
    if rep.ggml_cpu_arm_arch:
        t.add_row("GGML_CPU_ARM_ARCH", rep.ggml_cpu_arm_arch)
    console.print(t)
    f = Table(title=f"ERNIE-4.5-21B-A3B at ctx {rep.ctx} in {_gib(rep.ram_total_bytes)}", title_justify="left")
    for col in ("type", "weights", "KV cache", "reserve", "need", "fits"):
        f.add_column(col, justify="right" if col != "type" else "left")
    for m in rep.fits:
        verdict = f"[green]yes[/] (+{_gib(m.headroom_bytes)})" if m.fits else f"[red]no[/] ({_gib(m.headroom_bytes)})"
        f.add_row(m.ftype, _gib(m.weights_bytes), _gib(m.kv_bytes), _gib(m.reserve_bytes), _gib(m.need_bytes), verdict)
    console.print(f)
    for r in rep.recommendations:
        console.print(f"• {r}", highlight=False)


def main() -> None:
    try:
        app(standalone_mode=False)
    except EdgeMoEError as e:
        hint = f" — {e.hint}" if e.hint else ""
        err_console.print(f"[bold red]error:[/] {e.message}{hint}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("[red]aborted[/]")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # click usage errors come here in non-standalone mode
        import click

        # typer >= 0.2x raises its own vendored copy of click's exceptions (typer._click), not click's
        typer_click = getattr(getattr(typer, "_click", None), "exceptions", click.exceptions)
        if isinstance(e, (click.exceptions.UsageError, typer_click.UsageError)):
            e.show()
            sys.exit(2)
        if isinstance(e, (click.exceptions.ClickException, typer_click.ClickException)):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
