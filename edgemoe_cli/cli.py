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

    Reports the OS, CPU model, core types (big/little where the kernel's
    cpu_capacity tells), the ISA features ggml uses (aarch64: asimddp, i8mm,
    bf16, sve, sve2, sme; x86: the AVX family), the SVE vector length, RAM
    total and available, free disk where models are stored, and llama.cpp's
    own system_info from the library the Python binding loads (or why it
    could not be loaded).

    Recommends the GGML_CPU_ARM_ARCH string `edgemoe build` uses and says
    whether the model fits at Q4_0, Q4_K_M and Q8_0 in this machine's RAM:
    need = weights + KV cache + 1 GiB runtime reserve, where the f16 KV
    cache is 2 x 28 layers x 4 KV heads x 128 x 2 bytes x ctx.

    Example: edgemoe doctor --ctx 32768 --json
    """
    from . import board

    rep = board.doctor(ctx)
    if as_json:
        emit_json(rep)
        return
    from rich.table import Table

    t = Table(title="edgemoe doctor", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("OS", f"{rep.os} ({rep.arch})")
    t.add_row("CPU", f"{rep.cpu_model} — {rep.n_cpus} CPUs")
    for g in rep.cores:
        cap = f", capacity {g.capacity}" if g.capacity is not None else ""
        t.add_row("  cores", f"{g.count}x {g.name} ({g.kind}{cap}) cpus {','.join(map(str, g.cpus))}")
    t.add_row("ISA", " ".join(rep.features) or "-")
    t.add_row("SVE vector", f"{rep.sve_vector_bits} bits" if rep.sve_vector_bits else "-")
    t.add_row("RAM", f"{_gib(rep.ram_total_bytes)} total, {_gib(rep.ram_available_bytes)} available")
    t.add_row("disk", f"{_gib(rep.disk_free_bytes)} free at {rep.store}")
    if rep.binding is not None:
        t.add_row("llama.cpp", rep.binding.system_info)
        t.add_row("  library", f"{rep.binding.library} ({rep.binding.source})")
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


# ---- run ----


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if prompt is not None and prompt_file is not None:
        raise EdgeMoEError("give the prompt once: -p TEXT or -f FILE, not both", "drop one of -p / -f")
    if prompt_file is not None:
        try:
            text = sys.stdin.read() if str(prompt_file) == "-" else prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeMoEError(f"cannot read prompt file {prompt_file}: {e}", "give a readable UTF-8 text file") from e
        if not text.strip():
            raise EdgeMoEError(f"prompt file {prompt_file} is empty", "write the question into it, or use -p TEXT")
        return text.strip("\n")
    if prompt is None or not prompt.strip():
        raise EdgeMoEError("no prompt given", "ask with -p 'What is 51 - 29?' or -f question.txt")
    return prompt


@app.command()
def run(
    model: Path = typer.Argument(..., help="The GGUF model file (from `edgemoe convert` or `edgemoe quantize`)."),
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="The user message."),
    prompt_file: Optional[Path] = typer.Option(None, "-f", "--file", help="Read the user message from FILE (- = stdin)."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message, placed as the chat template says."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Stop after this many generated tokens."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: the physical cores this process may use)."),
    ctx: int = typer.Option(4096, "--ctx", "-c", min=0, help="Context length in tokens (0 = the model's own)."),
    temp: float = typer.Option(0.8, "--temp", min=0.0, help="Sampling temperature; 0 = greedy and deterministic."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed, for repeatable runs at --temp > 0."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print the library loaded and its system_info."),
    as_json: bool = typer.Option(False, "--json", help="No streaming; one JSON document with the reply and timings."),
) -> None:
    """Ask a GGUF model one question, with its own chat template, and stream the reply.

    The prompt is rendered with the chat template stored in the GGUF (tokenizer.chat_template): PT models get
    `User: ...\\nAssistant: `, Thinking models `<|im_start|>user ... <|im_start|>assistant\\n<think>\\n`.
    A Thinking reply is split into its reasoning (shown dimmed) and its answer (shown plain); the `</think>` and
    `<response>` tags are not shown. Generation stops at end-of-sequence (`</s>`, `<|end_of_sentence|>`,
    `<|im_end|>`) or after --max-tokens.

    The reply goes to stdout; a line of timings goes to stderr: prompt tokens and prompt tokens/s, generated
    tokens and generation tokens/s (decode steps after the first token, as llama-bench counts them), time to first
    token, and peak resident memory.

    --json prints {reasoning, answer, raw, prompt_tokens, completion_tokens, ttft_s, prompt_tps, gen_tps,
    peak_rss_bytes, tool_call, finish_reason, library} instead.

    Examples:

        edgemoe run model.gguf -p "What is 51 - 29?" --temp 0

        edgemoe run model.gguf -f question.txt --system "Answer briefly." --json
    """
    from . import generate

    text = _read_prompt(prompt, prompt_file)
    on_text = None
    if not as_json:
        out = sys.stdout
        styled = console.is_terminal and not console.no_color
        last_kind = [None]

        # plain writes, not rich: a console.print per token would cost a visible share of tokens/s
        def on_text(kind: str, piece: str) -> None:
            if last_kind[0] == "reasoning" and kind == "answer":
                out.write("\n\n")
            last_kind[0] = kind
            out.write(f"\x1b[2m{piece}\x1b[0m" if styled and kind == "reasoning" else piece)
            out.flush()

    if verbose and not as_json:
        info = generate.binding_info()
        err_console.print(f"[dim]libllama: {info.library} ({info.source})\n{info.system_info}[/]", highlight=False)
    result = generate.run(
        model, text, system=system, max_tokens=max_tokens, threads=threads, ctx=ctx, temp=temp, seed=seed,
        on_text=on_text,
    )
    if as_json:
        emit_json(result)
        return
    sys.stdout.write("\n")
    gen = f"{result.gen_tps:.1f} tok/s" if result.gen_tps is not None else "-"
    cut = " [yellow](stopped at --max-tokens)[/]" if result.finish_reason == "length" else ""
    err_console.print(
        f"[dim]prompt {result.prompt_tokens} tok @ {result.prompt_tps:.1f} tok/s · "
        f"generated {result.completion_tokens} tok @ {gen} · TTFT {result.ttft_s:.3f} s · "
        f"peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB[/]{cut}",
        highlight=False,
    )


# ---- pull / models / list ----


@app.command()
def pull(
    name: str = typer.Argument(..., help="A model name from `edgemoe models`, e.g. ernie-4.5-21b-a3b-thinking."),
    revision: Optional[str] = typer.Option(None, "--revision", "-r", help="Branch, tag or commit (default: the registry's pin)."),
    fmt: str = typer.Option("safetensors", "--format", help="safetensors (to convert yourself) or gguf (ready-made)."),
    quant: Optional[str] = typer.Option(None, "--quant", "-q", help="With --format gguf: which quant, e.g. Q4_0, Q4_K_M."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Hugging Face cache directory to use instead of $HF_HOME/hub."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token for gated/private repos (default: $HF_TOKEN)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (commit, files, sizes, sha256) as JSON."),
) -> None:
    """Download a model from the Hugging Face Hub, resumably, and verify every byte.

    The files land in huggingface_hub's cache ($HF_HOME/hub, or --dest) in its usual layout, so other tools share
    them; a manifest (repo, resolved commit, files, sizes, sha256) goes to the edgemoe store
    (models/NAME/manifest.json), and later commands accept NAME instead of a path.

    Before the first byte, the sizes from the Hub are checked against free disk (keeping EDGEMOE_DISK_RESERVE,
    default 512M, free). An interrupted pull resumes where it stopped when you run the same command again.
    Every LFS file's sha256 (and every small file's git id) is checked against the Hub; a mismatching file is
    deleted and named. With HF_HUB_OFFLINE=1 the pull resolves from the cache and lists what is missing.
    Honours HF_ENDPOINT, HF_TOKEN, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE.

    Examples:
      edgemoe pull ernie-4.5-21b-a3b-thinking
      edgemoe pull ernie-4.5-21b-a3b-pt --format gguf --quant Q4_0     # one ~12 GB file instead of ~44 GB
    """
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from .hub import PullProgress, human
    from .hub import pull as run_pull

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True, disable=as_json) as bars:

        class Bars(PullProgress):
            def begin(self, files, total, done):
                self.all = bars.add_task(f"[bold]{name}[/] ({len(files)} files)", total=total, completed=done)

            def file_begin(self, fname, size, initial):
                self.one = bars.add_task(f"  {fname}", total=size, completed=initial)

            def advance(self, n):
                bars.advance(self.all, n)
                bars.advance(self.one, n)

            def file_end(self, fname):
                bars.remove_task(self.one)

        result = run_pull(name, fmt=fmt, quant=quant, revision=revision, dest=dest, token=token, progress=Bars())
    if as_json:
        emit_json(result)
        return
    fresh = sum(f.status != "cached" for f in result.files)
    state = "from the cache (offline)" if result.offline else f"{fresh} downloaded, {len(result.files) - fresh} cached"
    console.print(f"[bold]{result.name}[/]: {result.repo}@{result.commit[:12]}, {len(result.files)} files "
                  f"({human(result.total_bytes)}; {state}), sha256 verified", highlight=False)
    console.print(f"  files:    {result.path}\n  manifest: {result.manifest}", highlight=False)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON.")) -> None:
    """List the models edgemoe knows by name (configs/models.toml): repo, pinned revision, variant, formats.

    Any of these names works where a command takes a model: `edgemoe pull NAME`, `edgemoe convert NAME`.
    """
    from rich.table import Table

    from . import registry

    entries = list(registry.load().values())
    if as_json:
        emit_json([asdict(e) for e in entries])
        return
    table = Table("name", "variant", "from", "revision", "gguf (default quant)", box=None, header_style="bold")
    table.columns[0].no_wrap = True
    for e in entries:
        table.add_row(e.name, e.variant, e.repo if e.source == "hub" else f"local: {e.path}", (e.revision or "")[:12],
                      f"{e.gguf.repo} ({e.gguf.default_quant})" if e.gguf else "")
    console.print(table)


@app.command("list")
def list_store(as_json: bool = typer.Option(False, "--json", help="Print the store contents as JSON.")) -> None:
    """List what the local store holds: pulled models, converted and quantized GGUFs, with sizes and states.

    States: pulled (a verified pull manifest; files in the Hugging Face cache), converted (gguf/NAME/*.gguf from
    `edgemoe convert`), quantized (a GGUF whose manifest names a recipe). The store is $EDGEMOE_HOME
    (default ~/.cache/edgemoe).
    """
    from rich.table import Table

    from .hub import human
    from .registry import store_items

    items = store_items()
    if as_json:
        emit_json([asdict(i) for i in items])
        return
    if not items:
        console.print("the store is empty — try `edgemoe pull NAME` (see `edgemoe models`)")
        return
    table = Table("name", "state", "size", "detail", "path", box=None, header_style="bold")
    for it in items:
        table.add_row(it.name, it.state, human(it.size), it.detail, it.path)
    console.print(table)


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
