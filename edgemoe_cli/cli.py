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
from .units import human_bytes, parse_size

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


def say_choice(choice) -> None:
    """Tell on stderr which store GGUF a model name resolved to, and why that one (nothing for a path)."""
    if choice.by_name:
        err_console.print(f"[dim]model {choice.ref} ({choice.path}): {choice.why}[/]", highlight=False, soft_wrap=True)


def run_model(text: str) -> Path:
    """The GGUF a command runs or measures: a path, NAME or NAME:TAG (models.resolve_gguf), said on stderr."""
    from .models import resolve_gguf

    choice = resolve_gguf(text)
    say_choice(choice)
    return choice.path


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


# ---- convert ----


@app.command()
def convert(
    src: str = typer.Argument(..., help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.model), or a model name from `edgemoe models` (pulled or local)."),
    out: Path = typer.Option(..., "--out", "-o", help="GGUF file to write (written as OUT.part, renamed when complete)."),
    outtype: str = typer.Option("f16", "--outtype", help="Weight type: f32, f16, bf16 or q8_0."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of a summary."),
) -> None:
    """Convert an ERNIE-4.5 checkpoint (MoE or dense) from Hugging Face layout to GGUF, without torch.

    SRC is a checkpoint directory or the name of a pulled model. Reads
    config.json, model.safetensors or its shards (with
    model.safetensors.index.json), tokenizer.model, tokenizer_config.json and
    generation_config.json, and writes the same file llama.cpp's
    convert_hf_to_gguf.py would, byte for byte: a layer's experts stacked into
    blk.N.ffn_{gate,up,down}_exps, norms, router and score bias in f32, the
    SentencePiece vocabulary, special tokens and the chat template.

    The conversion streams a block of rows at a time, so memory stays around
    100-200 MB whatever the model. OUT is written as OUT.part and renamed
    when complete; on any error nothing is left under OUT.

    Example: edgemoe convert ernie-4.5-21b-a3b-pt --out pt.gguf --outtype bf16
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from .convert import convert as run_convert
    from .models import checkpoint_dir

    with Progress(
        TextColumn("[bold]convert[/]"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TextColumn("{task.fields[tensors]}"), TimeRemainingColumn(),
        console=err_console, transient=True, disable=as_json,
    ) as bar:
        task = bar.add_task("convert", total=None, tensors="")

        def progress(done: int, total: int, n_done: int, n_total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, tensors=f"{n_done}/{n_total} tensors {name}")

        result = run_convert(checkpoint_dir(src), out, outtype, progress=progress)
    if as_json:
        emit_json(result)
        return
    console.print(
        f"wrote [bold]{result.out}[/] ({result.arch}, {result.outtype}, {result.n_tensors} tensors, "
        f"{result.n_params / 1e6:.1f}M params, {result.n_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s"
    )


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
    if rep.build_smoke:
        t.add_row("  smoke test", rep.build_smoke.get("summary", ""))
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
    model: str = typer.Argument(..., help="A GGUF file, or NAME[:TAG] from `edgemoe list` (NAME alone: the GGUF you made last, else the pulled one)."),
    prompt: Optional[list[str]] = typer.Option(None, "-p", "--prompt", help="The user message."),
    prompt_file: Optional[Path] = typer.Option(None, "-f", "--file", help="Read the user message from FILE (- = stdin)."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message, placed as the chat template says."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Stop after this many generated tokens."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: the physical cores this process may use)."),
    ctx: int = typer.Option(4096, "--ctx", "-c", min=0, help="Context length in tokens (0 = the model's own)."),
    temp: float = typer.Option(0.8, "--temp", min=0.0, help="Sampling temperature; 0 = greedy and deterministic."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed, for repeatable runs at --temp > 0."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print the library loaded and its system_info."),
    as_json: bool = typer.Option(False, "--json", help="No streaming; one JSON document with the reply and timings."),
    workers: Optional[str] = typer.Option(None, "--workers", help="HOST:PORT,... of `edgemoe worker`s: split the "
                                          "model's layers across them and this machine by free memory."),
) -> None:
    """Ask a GGUF model one question, with its own chat template, and stream the reply.

    The prompt is rendered with the chat template stored in the GGUF
    (tokenizer.chat_template): a PT model gets `User: ...\\nAssistant: `, a
    Thinking model `<|im_start|>user ... <|im_start|>assistant\\n<think>\\n`.
    A Thinking reply is split into its reasoning (shown dimmed) and its
    answer (shown plain); the `</think>` and `<response>` tags are not shown.
    Generation stops at end-of-sequence (`</s>`, `<|end_of_sentence|>`,
    `<|im_end|>`) or after --max-tokens.

    The reply goes to stdout, one line of timings to stderr: prompt tokens
    and prompt tokens/s, generated tokens and generation tokens/s (decode
    steps after the first token, as llama-bench counts them), time to first
    token, and peak resident memory.

    --json prints {reasoning, answer, raw, prompt_tokens, completion_tokens,
    ttft_s, prompt_tps, gen_tps, peak_rss_bytes, tool_call, finish_reason,
    library} instead of streaming.

    Examples: edgemoe run model.gguf -p "What is 51 - 29?" --temp 0
              edgemoe run model.gguf -f question.txt --system "Be brief." --json
    """
    from . import cluster, generate

    if prompt and len(prompt) > 1:
        raise EdgeMoEError(f"run asks one question, and -p was given {len(prompt)} times",
                           "ask them one run at a time, or all at once with `edgemoe compare -p A -p B`")
    text = _read_prompt(prompt[0] if prompt else None, prompt_file)
    worker_list = cluster.parse_workers(workers) if workers is not None else None
    if worker_list and not cluster.supervised():  # the child does the run; this process names a worker that dies
        raise typer.Exit(cluster.supervise(sys.argv[1:], worker_list))
    model_path = run_model(model)
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
        err_console.print(
            f"[dim]libllama: {info.library} ({info.source})\n{info.system_info}[/]", highlight=False, soft_wrap=True
        )
    split = None
    if worker_list:
        result, split = cluster.run_split(model_path, text, worker_list, system=system, max_tokens=max_tokens,
                                          threads=threads, ctx=ctx, temp=temp, seed=seed, on_text=on_text)
    else:
        result = generate.run(
            model_path, text, system=system, max_tokens=max_tokens, threads=threads, ctx=ctx, temp=temp, seed=seed,
            on_text=on_text,
        )
    if as_json:
        emit_json({**asdict(result), "split": asdict(split)} if split else result)
        return
    sys.stdout.write("\n")
    gen = f"{result.gen_tps:.1f} tok/s" if result.gen_tps is not None else "-"
    cut = " [yellow](stopped at --max-tokens)[/]" if result.finish_reason == "length" else ""
    err_console.print(
        f"[dim]prompt {result.prompt_tokens} tok @ {result.prompt_tps:.1f} tok/s · "
        f"generated {result.completion_tokens} tok @ {gen} · TTFT {result.ttft_s:.3f} s · "
        f"peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB[/]{cut}",
        highlight=False,
        soft_wrap=True,
    )
    if split:
        err_console.print("[dim]layers: " + ", ".join(f"{p.device} {p.layers}" for p in split.parts) + "[/]",
                          highlight=False)


# ---- serve ----


@app.command()
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
    from . import cluster
    from . import serve as serving

    worker_list = cluster.parse_workers(workers) if workers is not None else None
    if worker_list and not install_systemd and not cluster.supervised():
        raise typer.Exit(cluster.supervise(sys.argv[1:], worker_list))
    from .models import resolve_gguf

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


# ---- worker ----


@app.command()
def worker(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. WARNING: ggml-rpc-server has NO "
                             "authentication; give a private-network address only, never a public one."),
    port: int = typer.Option(50052, "--port", help="TCP port."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Memory this worker offers (e.g. 6GiB); "
                                         "default: what is free. Printed into the address the others use."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: the "
                                          "physical cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the ready line as JSON."),
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
    from . import cluster

    w = cluster.Worker(host=host, port=port, memory=memory, threads=threads)
    if w.info.public:
        err_console.print(f"[bold yellow]warning:[/] listening on {w.info.listen}: {cluster.NO_AUTH_WARNING}",
                          highlight=False, soft_wrap=True)
    if as_json:
        emit_json(w.info)
    else:
        console.print(f"worker ready on {w.info.listen} ({w.info.threads} threads, "
                      f"{human_bytes(w.info.memory_bytes or w.info.free_bytes)} offered); on the other board:\n"
                      f"  edgemoe run MODEL --workers {w.info.address} ...", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    code = w.wait()
    if code not in (0, -15, 143):  # killed by our own SIGTERM is the normal end
        raise EdgeMoEError(f"ggml-rpc-server exited with {code}", "run it again; its output is above")


# ---- build ----


@app.command()
def build(
    source: str = typer.Option("vendored", "--source", help="`vendored` (the llama.cpp inside the pinned "
                               "llama-cpp-python sdist, the binding's own commit) or a llama.cpp checkout DIR."),
    target: str = typer.Option("native", "--target", help="`native` (this machine) or `aarch64` (cross-compile "
                               "with aarch64-linux-gnu-gcc from an x86 host)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="GGML_CPU_ARM_ARCH (-march), e.g. "
                                       "armv9-a+sve2+i8mm+dotprod. Default: from this CPU's features (native) or "
                                       "armv9-a+sve2+i8mm+bf16+dotprod (aarch64)."),
    kleidiai: Optional[bool] = typer.Option(None, "--kleidiai/--no-kleidiai", help="Arm's KleidiAI matmul "
                                            "kernels (default: on for Arm targets)."),
    kleidiai_src: Optional[Path] = typer.Option(None, "--kleidiai-src", help="Extracted KleidiAI source for "
                                                "boards without network (else CMake downloads it)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Parallel compile jobs (default: all CPUs)."),
    activate: bool = typer.Option(True, "--activate/--no-activate", help="Make a native build the one the binding "
                                  "and tools use (builds/native-current). --no-activate builds for comparison only."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the cmake lines (and generated files); build nothing."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Build llama.cpp's tools and libraries for this board (or for aarch64).

    Compiles llama-cli, llama-server, llama-quantize, llama-imatrix,
    llama-perplexity, llama-bench, llama-gguf-split (and llama-completion,
    llama-simple, llama-tokenize) with shared libllama/libggml into
    <store>/builds/<key>/{bin,lib}. The key hashes the source, target,
    flags and compiler: the same build again is a cache hit, instant.

    On Arm the flags come from the CPU: the GGML_CPU_ARM_ARCH that
    `edgemoe doctor` recommends (only extensions every core has),
    GGML_NATIVE off, KleidiAI on. On x86 it is a -march=native build.

    Every build proves itself before it is used: a smoke test quantizes the
    shipped tiny ERNIE fixture with the build's own llama-quantize to F16,
    Q8_0, Q4_0, Q4_K_M, Q6_K and IQ4_NL and runs each in a child process
    (the tools, and for native builds the Python binding), comparing with
    the F16 run; cross builds run it under qemu-aarch64 when it is
    installed. A build that crashes or computes wrong is not activated;
    where a known-bad CPU feature explains it (AMX on some x86 hosts) it is
    rebuilt without that feature, and the output says so. The result is in
    build.json, `build --json` and `edgemoe doctor`.

    A native build becomes builds/native-current once it has passed and
    llama-cpp-python has loaded its libllama; from then on `edgemoe run`,
    the other commands and the C++ tools all use this one build.

    KleidiAI is downloaded by CMake at configure time; offline, pass
    --kleidiai-src DIR (an extracted kleidiai-<tag>-src.tar.gz). With GCC 12
    one KleidiAI file is compiled without loop vectorization (GCC 12.2
    crashes on it at -O3); the output says so.

    Examples:

      edgemoe build

      edgemoe build --target aarch64 --dry-run

      edgemoe build --arch armv8-a --no-kleidiai --no-activate
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .build import command_lines, load_manifest, plan_build, run_build, sve_warning

    plan = plan_build(source=source, target=target, arch=arch, kleidiai=kleidiai,
                      kleidiai_src=str(kleidiai_src) if kleidiai_src else None, jobs=jobs)
    warning = sve_warning(plan)
    if dry_run:
        if as_json:
            emit_json(plan)
            return
        # plain stdout, never wrapped: these lines are meant to be copied into a shell
        for name, text in ((plan.toolchain_file, plan.toolchain_text), (plan.kleidiai_fix_file, plan.kleidiai_fix_text)):
            if name:
                sys.stdout.write(f"# ---- {name}\n{text}")
        sys.stdout.write("\n".join(command_lines(plan)) + "\n")
        for note in plan.notes + ([warning] if warning else []):
            err_console.print(f"[yellow]note:[/] {note}", highlight=False)
        return
    if not as_json and load_manifest(plan.out_dir) is None:
        err_console.print(f"building llama.cpp [bold]{plan.key}[/] ({plan.target}, arch {plan.arch}, "
                          f"KleidiAI {'on' if plan.kleidiai else 'off'}, -j{plan.jobs}) - log in {plan.work_dir}/build.log",
                          highlight=False)
        for note in plan.notes:
            err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    with Progress(TextColumn("[bold]build[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=err_console, transient=True, disable=as_json) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total or None, description=what[-60:])

        result = run_build(plan, progress=progress, make_current=activate)
    if as_json:
        emit_json(result)
        return
    state = "cached" if result.cached else f"built in {result.seconds / 60:.1f} min"
    console.print(f"llama.cpp [bold]{result.key}[/] {state}: {result.path}", highlight=False)
    if result.system_info:
        console.print(f"system_info: {result.system_info}", highlight=False, markup=False)
    if result.smoke:
        from .smoke import SmokeResult

        console.print(f"smoke test: {SmokeResult.from_dict(result.smoke).summary()}", highlight=False, markup=False)
    if result.current:
        console.print("the Python binding and the llama.cpp tools use this build (builds/native-current)")
    for note in result.notes + ([warning] if warning else []):
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)


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

    from .hub import PullProgress
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
                  f"({human_bytes(result.total_bytes)}; {state}), sha256 verified", highlight=False)
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
    """List what the local store holds, as you type it: NAME for a pulled checkpoint, NAME:TAG for each GGUF.

    Every command that takes a model accepts these: `edgemoe run NAME:edge-balanced`, `edgemoe quantize NAME`. States: pulled (a verified pull manifest; files in the Hugging Face cache), converted (gguf/NAME/*.gguf from `edgemoe convert`), quantized (a GGUF whose manifest names a recipe), pruned (from `edgemoe prune`). The store is $EDGEMOE_HOME (default ~/.cache/edgemoe).
    """
    from rich.table import Table

    from .models import store_items

    items = store_items()
    if as_json:
        emit_json([asdict(i) for i in items])
        return
    if not items:
        console.print("the store is empty — try `edgemoe pull NAME` (see `edgemoe models`)")
        return
    table = Table("model", "state", "size", "detail", "path", box=None, header_style="bold")
    table.columns[0].no_wrap = True
    for it in items:
        table.add_row(it.ref, it.state, human_bytes(it.size), it.detail, it.path)
    console.print(table)


@app.command("rm")
def rm(
    model: str = typer.Argument(..., help="NAME (everything the store holds for it) or NAME:TAG (one GGUF), as `edgemoe list` shows."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before deleting."),
    as_json: bool = typer.Option(False, "--json", help="Print what was deleted as JSON (needs --yes)."),
) -> None:
    """Free disk: delete a model (or one of its GGUFs) from the store.

    Only files inside the store are deleted. A pulled checkpoint's files live in the Hugging Face cache, which other tools share: rm forgets the pull (its manifest) and names those files; `hf cache delete` removes them.
    """
    from .models import plan_removal, remove

    removal = plan_removal(model)
    if not yes:
        if as_json or not sys.stdin.isatty():
            raise EdgeMoEError(f"rm {model} would delete {len(removal.paths)} path(s); not asking without a terminal",
                               "add --yes")
        for path in removal.paths:
            console.print(f"  {path}", highlight=False)
        if not typer.confirm(f"delete these ({human_bytes(removal.bytes)})?", default=False):
            raise typer.Exit(1)
    remove(removal)
    if as_json:
        emit_json(removal)
        return
    console.print(f"removed {removal.ref} ({human_bytes(removal.bytes)} freed)", highlight=False)
    for path in removal.kept:
        console.print(f"[dim]kept (outside the store): {path}[/]", highlight=False)


# ---- recipe / quantize / imatrix / eval / plan ----

recipe_app = typer.Typer(help="Quantization recipes: ordered `pattern -> type` rules over GGUF tensor names.",
                         no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


def _print_problems(problems) -> None:
    for p in problems:
        style = "red" if p.severity == "error" else "yellow"
        err_console.print(f"[{style}]{p.severity}:[/] {p.message}", highlight=False, soft_wrap=True)


@recipe_app.command("list")
def recipe_list(as_json: bool = typer.Option(False, "--json", help="Print the recipes as JSON.")) -> None:
    """The built-in recipes (configs/recipes/*.toml) and what each is for."""
    from .recipe import builtin_names, load_recipe

    recipes = [load_recipe(n) for n in builtin_names()]
    if as_json:
        emit_json([{"name": r.name, "description": r.description, "source": r.source} for r in recipes])
        return
    for r in recipes:
        console.print(f"[bold]{r.name}[/]  {r.description}", highlight=False)


@recipe_app.command("show")
def recipe_show(
    name: str = typer.Argument(..., help="A built-in recipe name (`edgemoe recipe list`) or a recipe .toml file."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="A GGUF to apply it to (f32/f16/bf16)."),
    imatrix: bool = typer.Option(True, "--imatrix/--no-imatrix", help="Whether you will quantize with an imatrix (IQ2/IQ1 types need one)."),
    all_tensors: bool = typer.Option(False, "--all", help="Also list tensors llama.cpp never quantizes (norms, router)."),
    as_json: bool = typer.Option(False, "--json", help="Print the explanation as JSON."),
) -> None:
    """Explain a recipe: its rules, and with --model what every tensor becomes and why.

    Rules are regular expressions searched in GGUF tensor names (blk.N.ffn_down_exps.weight, blk.N.attn_q.weight,
    token_embd.weight, ...); the first rule that matches a tensor decides its type, as in llama-quantize's
    --tensor-type. The token_embedding and output keys take precedence over rules. With --model you get, per
    tensor, the rule that decided, the type, bytes and bits per weight; a summary per group (routed experts, shared
    experts, dense FFN, attention, embeddings, other) and the predicted file size. Problems are reported before any
    quantization: unknown types, rules matching nothing, rows that are not a multiple of the type's block size
    (llama.cpp would silently fall back to another type), very low-bit types without an imatrix, requantizing.
    Exit code 2 when the recipe has errors for this model.

    Example: edgemoe recipe show edge-balanced --model ernie-thinking-bf16.gguf
    """
    from .recipe import explain, load_recipe

    recipe = load_recipe(name)
    if model is None:
        if as_json:
            emit_json(recipe)
            return
        console.print(f"[bold]{recipe.name}[/] ({recipe.source})\n{recipe.description}", highlight=False)
        console.print(f"default {recipe.default}, token_embedding {recipe.token_embedding}, output {recipe.output}")
        for i, r in enumerate(recipe.rules, 1):
            console.print(f"  rule {i}: {r.pattern!s:40} -> {r.type}", highlight=False)
        return
    ex = explain(recipe, model, have_imatrix=imatrix)
    if as_json:
        emit_json(ex)
    else:
        from rich.table import Table

        table = Table(title=f"{recipe.name} on {model.name}")
        for col in ("tensor", "shape", "type", "decided by", "bytes", "bpw"):
            table.add_column(col, justify="right" if col in ("bytes", "bpw") else "left")
        for t in ex.tensors:
            if all_tensors or t.rule != "not quantized":
                table.add_row(t.name, "x".join(map(str, t.shape)), t.type, t.rule, f"{t.bytes:,}", f"{t.bpw:.2f}")
        console.print(table)
        groups = Table(title="by group")
        for col in ("group", "tensors", "params", "size", "bpw"):
            groups.add_column(col, justify="right")
        for g in ex.groups:
            groups.add_row(g.group, str(g.tensors), f"{g.params:,}", human_bytes(g.bytes), f"{g.bpw:.2f}")
        groups.add_row("total (file)", "", "", human_bytes(ex.total_bytes), f"{ex.bpw:.2f}")
        console.print(groups)
    _print_problems(ex.problems)
    if ex.errors:
        raise typer.Exit(2)


def _counter(bar, label: str, unit: str = ""):
    """A progress callback (done, total) that drives a new task of `bar`."""
    task = bar.add_task(label, total=None, name=unit)
    return lambda done, total: bar.update(task, completed=done, total=total)


def step_progress(bar):
    """The rich side of progress.Progress: one task of `bar` per step, moved as the stage reports."""
    tasks: dict[str, int] = {}

    def progress(step: str, done: int, total: int | None, detail: str = "") -> None:
        if step not in tasks:
            tasks[step] = bar.add_task(step, total=total, name=detail)
        bar.update(tasks[step], completed=done, total=total, name=detail)

    return progress


def source_model(text: str, bar) -> Path:
    """The unquantized GGUF quantize/plan/imatrix start from (models.source_gguf), said on stderr; a name whose
    store has only the pulled checkpoint is converted first, as a step of `bar`."""
    from .models import source_gguf

    choice = source_gguf(text, progress=step_progress(bar))
    say_choice(choice)
    return choice.path


def _quantize_bar(disable: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[name]}"), TimeElapsedColumn(), console=err_console, transient=True,
                    disable=disable)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="The f32/f16/bf16 GGUF to quantize, or a model NAME (its pulled checkpoint is converted into the store first when needed)."),
    recipe: str = typer.Option("edge-balanced", "--recipe", "-r", help="Recipe name, recipe .toml file, or stock:FTYPE (llama.cpp's own mix, e.g. stock:Q4_K_M)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix from `edgemoe imatrix` (strongly advised below 5 bits)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output GGUF (default: <store>/gguf/<model>/<recipe>.gguf)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="Quantization threads (default: all CPUs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Quantize a GGUF with a recipe through llama.cpp, then verify every tensor got the recipe's type.

    The recipe is resolved to one explicit type per tensor first (`edgemoe recipe show` prints the same table);
    any problem stops here, before quantizing. llama.cpp's quantizer then runs in-process (llama_model_quantize
    with one anchored pattern per tensor, `pure`, and the imatrix), writing OUT.part; the result is read back with
    gguf's GGUFReader and any tensor whose type differs from the recipe fails the command — no silent fallback.
    A manifest (OUT.manifest.json: source, recipe, imatrix, sha256, types, versions) is written beside the file.

    MODEL may be a name: `edgemoe quantize ernie-4.5-21b-a3b-thinking --recipe edge-balanced` converts the pulled checkpoint into the store (gguf/NAME/bf16.gguf) when it is not there yet, then writes gguf/NAME/edge-balanced.gguf, which `edgemoe run NAME` then takes.

    Example: edgemoe quantize ernie-thinking-bf16.gguf --recipe edge-balanced --imatrix ernie.imatrix.gguf
    """
    from .quantize import quantize as run_quantize

    with _quantize_bar(as_json) as bar:
        source = source_model(model, bar)
        task = bar.add_task("quantize", total=None, name="")
        result = run_quantize(source, recipe, out=out, imatrix=imatrix, threads=threads,
                              progress=lambda i, n, name: bar.update(task, completed=i, total=n, name=name))
    if as_json:
        emit_json(result)
        return
    types = ", ".join(f"{n} {t}" for t, n in sorted(result.types.items(), key=lambda kv: -kv[1]))
    console.print(f"wrote [bold]{result.out}[/] ({human_bytes(result.bytes)}, {result.bpw:.2f} bpw; {types}) "
                  f"in {result.seconds:.1f} s; verified every tensor's type", highlight=False)
    for w in result.warnings:
        err_console.print(f"[yellow]llama.cpp:[/] {w}", highlight=False)


@app.command("imatrix")
def imatrix_cmd(
    model: str = typer.Argument(..., help="The GGUF to measure (f32/f16/bf16 or Q8_0), or a model NAME[:TAG]."),
    text: Optional[Path] = typer.Option(None, "--text", help="Calibration text (default: edgemoe's own data/calib/calibration.txt)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output imatrix (default: MODEL.imatrix.gguf beside the model)."),
    ctx: int = typer.Option(512, "--ctx", min=32, help="Tokens per chunk."),
    chunks: Optional[int] = typer.Option(None, "--chunks", min=1, help="Use at most this many chunks of the text."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Compute an importance matrix with llama-imatrix (GGUF format, per-expert token counts kept).

    For every weight matrix the sum of squared input activations per column is accumulated over the text, per
    routed expert, with the number of tokens routed to each expert. `quantize --imatrix` uses it to spend
    precision where activations are large; `plan` uses it to weight quantization errors; the per-expert counts
    are a routing profile (imatrix.expert_usage). The default text mixes English and Chinese prose, Python and shell,
    and step-by-step arithmetic. Needs `edgemoe build` (for llama-imatrix).

    Example: edgemoe imatrix ernie-thinking-bf16.gguf --out ernie.imatrix.gguf
    """
    from .imatrix import compute_imatrix

    with _quantize_bar(as_json) as bar:
        result = compute_imatrix(source_model(model, bar), text, out, ctx=ctx, threads=threads, chunks=chunks,
                                 progress=_counter(bar, "imatrix", "chunks"))
    if as_json:
        emit_json(result)
        return
    console.print(f"wrote [bold]{result.out}[/] ({result.tensors} tensors, {result.chunks} chunks of "
                  f"{result.chunk_size} tokens) in {result.seconds:.1f} s", highlight=False)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="The GGUF to judge (e.g. a quantization), or NAME[:TAG]."),
    base: str = typer.Option(..., "--base", help="The reference GGUF (the unquantized model), or a model NAME (its unquantized GGUF)."),
    text: Path = typer.Option(..., "--text", help="Evaluation text; keep it disjoint from the imatrix's calibration text."),
    ctx: int = typer.Option(512, "--ctx", min=16, help="Chunk length in tokens; the second half of each chunk is scored."),
    chunks: Optional[int] = typer.Option(None, "--chunks", min=1, help="Use at most this many chunks."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Perplexity, KL divergence to the base model (mean, median, p99, max) and top-1 agreement.

    Both models read the same chunks of the text (llama-perplexity's protocol: chunks of --ctx tokens starting with
    BOS, second half scored). The base model's log-probabilities are cached in the store, so comparing many
    quantizations against one base runs the base once. KLD is in nats per token; top-1 agreement is the share of
    positions where both models' most likely next token is the same.

    Example: edgemoe eval ernie-q4.gguf --base ernie-bf16.gguf --text data/calib/evaluation.txt
    """
    from .evaluate import evaluate

    with _quantize_bar(as_json) as bar:
        model_path, base_path = run_model(model), source_model(base, bar)
        result = evaluate(model_path, base_path, text, ctx=ctx, threads=threads, max_chunks=chunks,
                          progress=_counter(bar, "eval", "chunks"))
    if as_json:
        emit_json(result)
        return
    console.print(
        f"{model_path.name} vs {base_path.name} on {result.tokens_scored} tokens ({result.chunks} chunks of {ctx}):\n"
        f"  PPL {result.ppl:.4f} (base {result.base_ppl:.4f})\n"
        f"  KLD mean {result.kld_mean:.6f} ± {result.kld_stderr:.6f}, median {result.kld_median:.6f}, "
        f"p99 {result.kld_p99:.6f}, max {result.kld_max:.4f}\n"
        f"  top-1 agreement {result.top1_agreement:.2%}", highlight=False)


@app.command("plan")
def plan_cmd(
    model: str = typer.Argument(..., help="The f32/f16/bf16 GGUF to plan for, or a model NAME."),
    budget: Optional[str] = typer.Option(None, "--budget", help="RAM budget, e.g. 12GiB (KV cache and reserve are subtracted)."),
    board: bool = typer.Option(False, "--board", help="Use this machine's RAM (as `edgemoe doctor` detects it) as the budget."),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Budget the file size directly (no KV/reserve subtracted)."),
    ctx: int = typer.Option(4096, "--ctx", min=1, help="Context length to keep KV cache room for."),
    reserve: Optional[str] = typer.Option(None, "--reserve", help="Runtime reserve (default: doctor's, 1 GiB)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (default: computed with `edgemoe imatrix` on --text)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Calibration text for the imatrix and the KLD measurements (default: data/calib/calibration.txt)."),
    arm_fast: bool = typer.Option(False, "--arm-fast", help="Only Q4_0, IQ4_NL and Q8_0 (fast Arm kernels)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the plan as a recipe TOML here."),
    do_quantize: bool = typer.Option(False, "--quantize", help="Apply the plan: quantize MODEL with it."),
    gguf_out: Optional[Path] = typer.Option(None, "--gguf-out", help="With --quantize: the output GGUF."),
    chunks: int = typer.Option(16, "--chunks", min=1, help="Chunks of --text per KLD calibration measurement."),
    min_every_token: str = typer.Option("q4_k", "--min-every-token", help="Lowest type for tensors every token uses (attention, shared experts, dense FFN, embedding); `none` for no floor."),
    reference: str = typer.Option("source", "--reference", help="Measure gains against the model as given (source) or at Q8_0 (q8_0: half the RAM, for 21B on a 32 GB machine)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Choose a quantization type per tensor that fits a memory budget with the least predicted quality loss.

    File budget = RAM budget - KV cache for --ctx tokens (f16 K and V) - runtime reserve (1 GiB, as doctor).
    Prediction, measured on this model: every tensor is quantized to every candidate type (Q2_K, Q3_K, IQ4_XS,
    Q4_K, Q5_K, Q6_K, Q8_0; with --arm-fast Q4_0, IQ4_NL, Q8_0) and its imatrix-weighted output error computed;
    one KL-divergence gain per tensor role (attn_q, ffn_down_exps, token_embd, ...) is measured by lowering only
    that role and evaluating against the unquantized model. Predicted KLD of a mix = sum over tensors of gain x
    error; an exact knapsack picks the mix. The lowered models are assembled by copying tensors out of the
    whole-model quantizations (no re-quantizing), so measuring costs one quantization per candidate type plus one
    KLD eval per role, per layer and for the Q8_0 floor (README: the cost at 21B).
    Measurements are cached: a second plan for another budget is instant.
    The plan is a recipe TOML (one rule per role and type, layers listed) you can read, edit and reuse.

    Example: edgemoe plan ernie-thinking-bf16.gguf --budget 16GiB --ctx 8192 --out my16.toml --quantize
    """
    from . import plan as stage
    from .imatrix import compute_imatrix, default_calibration_text

    if sum(x is not None and x is not False for x in (budget, max_size, board or None)) != 1:
        raise EdgeMoEError("give exactly one of --budget, --board or --max-size", "e.g. --budget 12GiB")
    ram = parse_size(budget) if budget else None
    size = parse_size(max_size) if max_size else None
    reserve_bytes = parse_size(reserve) if reserve else None
    text = text or default_calibration_text()
    with _quantize_bar(as_json) as bar:
        model = source_model(model, bar)
        if imatrix is None:
            imatrix = model.with_name(model.stem + ".imatrix.gguf")
            if not imatrix.is_file():
                compute_imatrix(model, text, imatrix, threads=threads, progress=_counter(bar, "imatrix", "chunks"))
        tasks = {}

        def progress(step, done, total):
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total, name="")
            bar.update(tasks[step], completed=done, total=total)

        result = stage.plan(model, imatrix, text, ram=ram, ctx=ctx, max_size=size, reserve=reserve_bytes,
                            arm_fast=arm_fast, out=out,
                            threads=threads, max_chunks=chunks, progress=progress, reference=reference,
                            min_every_token=None if min_every_token.lower() == "none" else min_every_token)
        if do_quantize:
            from .quantize import quantize as run_quantize
            from .recipe import load_recipe, parse_recipe
            from .tomlfile import load_toml

            recipe = load_recipe(out) if out else parse_recipe(load_toml(result.recipe_toml, "plan's recipe"), "plan")
            task = bar.add_task("quantize", total=None, name="")
            q = run_quantize(model, recipe, out=gguf_out, imatrix=imatrix, threads=threads,
                             progress=lambda i, n, name: bar.update(task, completed=i, total=n, name=name))
            result.quantized = q.out
    if as_json:
        emit_json(result)
        return
    from collections import Counter

    console.print(f"file budget {human_bytes(result.budget_bytes)} = {result.budget_formula}", highlight=False)
    console.print(f"plan: {human_bytes(result.predicted_bytes)}, predicted mean KLD {result.predicted_kld:.5f}; types: "
                  + ", ".join(f"{n} {t}" for t, n in Counter(c.type for c in result.choices).most_common()),
                  highlight=False)
    if not out:
        console.print(result.recipe_toml, highlight=False, markup=False)
    else:
        console.print(f"wrote [bold]{result.out}[/]", highlight=False)
    if result.quantized:
        console.print(f"quantized to [bold]{result.quantized}[/]", highlight=False)


# ---- profile / prune ----


def _bar_progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err_console, transient=True)


@app.command()
def profile(
    model: str = typer.Argument(..., help="An ERNIE-4.5 MoE GGUF (any quantization), or NAME[:TAG]."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text to route through the model (your workload)."),
    out: Path = typer.Option(Path("profile"), "--out", "-o", help="Directory for profile.json and expert-usage.png."),
    max_tokens: int = typer.Option(8192, "--max-tokens", "-n", min=1, help="Route at most this many tokens of the text."),
    ctx: int = typer.Option(512, "--ctx", min=16, help="Window length: the text is evaluated in windows this long."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: physical cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of tables."),
) -> None:
    """Which routed experts a text really uses, layer by layer, measured inside llama.cpp.

    The text runs through the model in llama.cpp; a callback reads every MoE layer's router decision (the experts
    picked per token, with the score-correction bias, exactly as at run time), the normalized gate weights and the
    picked experts' outputs. From that:

    - a heatmap PNG of layers x experts (share of each layer's tokens routed to each expert),

    - per layer: entropy of expert usage, the effective number of experts (2**entropy), the share of routed tokens
    the top-k experts take (k = experts per token), experts never used,

    - whether usage against rank follows a power law (as the EdgeMoE paper reports) or an exponential: both are
    fitted and the better R^2 is named,

    - profile.json with all of it plus the raw counts and REAP scores (`edgemoe prune --usage` reads it).

    Example: edgemoe profile ernie-thinking-q4_0.gguf --text my-prompts.txt --out profile/
    """
    from . import profile as stage

    with _bar_progress() as bar:
        task = bar.add_task("routing", total=None)
        result = stage.profile(run_model(model), text, out, max_tokens=max_tokens, ctx=ctx, threads=threads,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        emit_json(result)
        return
    from rich.table import Table

    table = Table(title=f"expert usage over {result.n_tokens} tokens ({result.n_expert} experts, top-{result.n_expert_used})")
    for col in ("layer", "entropy bits", "effective experts", f"top-{result.n_expert_used} share", "top-half share",
                "unused", "power-law α", "R² power", "R² exp"):
        table.add_column(col, justify="right")
    for u in result.layers:
        table.add_row(str(u.layer), f"{u.entropy_bits:.2f}", f"{u.effective_experts:.1f}", f"{u.top_k_share:.1%}",
                      f"{u.half_share:.1%}", str(u.unused), f"{u.power_law_alpha:.2f}", f"{u.power_law_r2:.3f}",
                      f"{u.exponential_r2:.3f}")
    console.print(table)
    console.print(f"all layers: {result.power_law['verdict']}")
    console.print(f"wrote {result.outputs['json']}, {result.outputs['heatmap']} and {result.outputs['rank_plot']}",
                  highlight=False)


@app.command()
def prune(
    model: str = typer.Argument(..., help="An ERNIE-4.5 MoE GGUF (any quantization), or NAME[:TAG]."),
    keep: Optional[str] = typer.Option(None, "--keep", help="Experts to keep per MoE layer: a count (48) or a share (75%)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Keep as many experts as fit this file size (12G, 900M)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Score experts by REAP on this text (recommended)."),
    usage: Optional[Path] = typer.Option(None, "--usage", help="Score experts by usage counts from `edgemoe profile`'s profile.json."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output GGUF (default: MODEL.keepN.gguf beside MODEL)."),
    max_tokens: int = typer.Option(8192, "--max-tokens", "-n", min=1, help="With --text: route at most this many tokens."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: physical cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Drop the least important routed experts of every MoE layer; the result runs in stock llama.cpp.

    Each MoE layer keeps its own N best experts (llama.cpp needs the same count in every layer): the expert
    tensors, the router's rows and the score-correction bias are sliced consistently and expert_count is set to N.
    Experts per token (top-k) stay as they were, so N must be at least k. Works on any quantization.

    Importance, per layer: with --text, REAP (mean of gate weight x expert output norm over the tokens routed to the
    expert, measured in llama.cpp); with --usage, how often `edgemoe profile` saw the expert picked; with neither, a
    data-free proxy (router row norm x down-projection norm) that is usually worse.

    --budget SIZE picks the largest N whose file fits SIZE. A manifest (OUT.manifest.json) records which original
    experts each layer kept. Measure what pruning costs with `edgemoe eval` before you trust it.

    Examples:

        edgemoe prune ernie-q4_0.gguf --keep 75% --text workload.txt

        edgemoe prune ernie-q4_0.gguf --budget 9G --usage profile/profile.json --out ernie-q4_0-9g.gguf
    """
    from . import prune as stage

    with _bar_progress() as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task("routing text" if phase == "route" else "writing", total=total)
            bar.update(tasks[phase], completed=done, total=total)

        result = stage.prune(run_model(model), keep=keep, budget=budget, text=text, usage=usage, out=out,
                             max_tokens=max_tokens, threads=threads, progress=progress)
    if as_json:
        emit_json(result)
        return
    console.print(
        f"kept {result.n_expert_after} of {result.n_expert_before} experts per layer (score: {result.score}); "
        f"{result.bytes_before / 2**20:.1f} MiB -> {result.bytes_after / 2**20:.1f} MiB\nwrote {result.out}",
        highlight=False,
    )


# ---- compare ----


@app.command()
def compare(
    thinking: Optional[str] = typer.Option(None, "--thinking", help="The Thinking model: a GGUF or NAME[:TAG]."),
    pt: Optional[str] = typer.Option(None, "--pt", help="The PT model: a GGUF or NAME[:TAG]."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file: TOML [[prompt]] tables or JSON Lines {q, answer} (default: configs/prompts/compare.toml)."),
    prompt: Optional[list[str]] = typer.Option(None, "-p", "--prompt", help="A prompt instead of a file; repeat -p to ask several."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use only the first N prompts of the file."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Stop each reply after this many tokens."),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="Sampling temperature (default 0: greedy, deterministic)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed, for repeatable runs at --temp > 0."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message for both variants."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: physical cores)."),
    ctx: int = typer.Option(4096, "--ctx", "-c", min=0, help="Context length in tokens."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write a Markdown report here (and its .json twin)."),
    show: int = typer.Option(8, "--show", min=0, help="Side-by-side panels for at most this many prompts."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole comparison as JSON."),
) -> None:
    """Ask ERNIE-4.5 PT and Thinking the same prompts and put the answers, timings and accuracy side by side.

    The variants run one after the other, each in its own process, so only one model is in memory at a time and
    each peak RSS is that model's own. Replies come from the same generator as `edgemoe run` (greedy by default).

    The terminal shows, per prompt, a PT panel (the answer) beside a Thinking panel (the reasoning folded to one
    line, then the answer), then a metrics table: prompt and completion tokens, reasoning vs answer tokens, time to
    first token, generation tokens/s, wall time, load time, peak RSS and accuracy where prompts have expected
    answers (see configs/prompts/compare.toml for the format and the checks). --out writes everything, both
    replies in full, as Markdown plus JSON.

    Examples:

        edgemoe compare --pt ernie-pt-q4_0.gguf --thinking ernie-thinking-q4_0.gguf --out compare.md

        edgemoe compare --pt pt.gguf --thinking thinking.gguf --prompts arith-dev.jsonl --limit 50 --max-tokens 256
    """
    from rich.columns import Columns
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from . import compare as stage

    with _bar_progress() as bar:
        tasks: dict[str, int] = {}

        def progress(variant: str, done: int, total: int) -> None:
            if variant not in tasks:
                tasks[variant] = bar.add_task("Thinking" if variant == "thinking" else "PT", total=total)
            bar.update(tasks[variant], completed=done)

        thinking_path = run_model(thinking) if thinking is not None else None
        pt_path = run_model(pt) if pt is not None else None
        result = stage.compare(thinking_path, pt_path, prompts_file=prompts, prompt=prompt or None, limit=limit, max_tokens=max_tokens,
                               temp=temp, seed=seed, system=system, threads=threads, ctx=ctx, out=out,
                               progress=progress)
    if as_json:
        emit_json(result)
        return
    mark = {True: " [green]✓[/]", False: " [red]✗[/]", None: ""}
    width = max(30, (console.width - 4) // 2)
    for n, it in enumerate(result.items[:show], 1):
        console.rule(f"{n}. {it.prompt.text.splitlines()[0][:console.width - 10]}", align="left", style="dim")
        folded = Text()
        if it.thinking.reasoning:
            first = " ".join(it.thinking.reasoning.split())
            cut = first if len(first) <= width - 20 else first[: width - 21] + "…"
            folded.append(f"▸ {cut} ({it.thinking.reasoning_tokens} tok)\n", style="dim")
        folded.append(it.thinking.answer or "(no answer)")
        console.print(Columns([
            Panel(Text(it.pt.answer or "(no answer)"), title="PT" + mark[it.pt.correct], width=width),
            Panel(folded, title="Thinking" + mark[it.thinking.correct], width=width),
        ]))
    if len(result.items) > show:
        console.print(f"[dim]… {len(result.items) - show} more prompts" + (" in the report" if out else "") + "[/]")
    headers, rows = stage.metrics_rows(result)
    # metrics down, variants across: two value columns fit any terminal width
    table = Table(title="PT vs Thinking (means per prompt; wall and load are totals)")
    table.add_column("metric")
    for row in rows:
        table.add_column("PT" if row[0] == "pt" else "Thinking", justify="right")
    for i, h in enumerate(headers[1:], 1):
        table.add_row(h, *[f"{row[i]:.2f}" if isinstance(row[i], float) else ("–" if row[i] is None else str(row[i]))
                           for row in rows])
    console.print(table)
    if result.outputs:
        console.print(f"wrote {result.outputs['markdown']} and {result.outputs['json']}", highlight=False)


# ---- bench ----


@app.command()
def bench(
    models: Optional[list[str]] = typer.Argument(None, help="GGUF models to measure (e.g. one per recipe): paths or NAME[:TAG]."),
    models_opt: Optional[str] = typer.Option(None, "--models", help="The models as one comma-separated list (instead of, or with, the arguments)."),
    builds: Optional[str] = typer.Option(None, "--builds", help="Comma-separated build directories or names in the build cache (default: the current build)."),
    threads: str = typer.Option("1,2,4,8", "--threads", "-t", help="Comma-separated thread counts."),
    reps: int = typer.Option(3, "--reps", "-r", min=1, help="Repetitions of each test (mean and stddev over them)."),
    n_prompt: int = typer.Option(512, "--n-prompt", "-p", min=1, help="Prompt-processing test length (ppN)."),
    n_gen: int = typer.Option(128, "--n-gen", "-n", min=1, help="Text-generation test length (tgN)."),
    pg: str = typer.Option("128,128", "--pg", help="The combined prompt+generation test, PP,TG."),
    out: Optional[Path] = typer.Option(Path("bench"), "--out", "-o", help="Directory for bench.json, bench.md and the PNG plots."),
    no_bandwidth: bool = typer.Option(False, "--no-bandwidth", help="Skip the copy-bandwidth measurement and the tg ceiling."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    workers: Optional[str] = typer.Option(None, "--workers", help="HOST:PORT,... of `edgemoe worker`s: split each "
                                          "model across them and this machine by memory, as run does."),
) -> None:
    """Measure prompt and generation speed with llama-bench over models x builds x thread counts.

    For every build (e.g. a plain one and an Armv9+KleidiAI one from `edgemoe build`) and every model (one per
    recipe), one `llama-bench -o json` run covers all thread counts and three tests: ppN (prompt processing),
    tgN (generation) and PP+TG combined, each repeated --reps times. The results go to bench.json and bench.md
    (tokens/s, mean ± stddev) with PNG plots: tokens/s vs threads per build, and tokens/s vs file size per recipe.

    It also measures this machine's memory copy bandwidth and, from each GGUF's tensor sizes, the bytes of
    weights one generated token reads (routed experts at top-k of n): their ratio is the ceiling for tg, and each
    model's best tg is shown as a share of it.

    The Arm Learning Path's Orion O6 numbers (ERNIE-4.5-21B-A3B-Thinking Q4_0, 8 threads: pp512 14.96 -> 38.51,
    tg128 12.03 -> 15.96 tok/s, plain build -> armv9-a+i8mm+dotprod+sve with KleidiAI) are shown as a labelled
    external reference, never mixed with these measurements.

    Examples:

        edgemoe bench ernie-q4_0.gguf --threads 4,8 --out bench/

        edgemoe bench q4_0.gguf q4_k_m.gguf q8_0.gguf --builds plain-key,kleidiai-key --threads 1,2,4,8
    """
    from . import bench as stage
    from . import cluster

    worker_list = cluster.parse_workers(workers) if workers is not None else None
    try:
        pp, tg = (int(v) for v in pg.split(","))
    except ValueError:
        raise EdgeMoEError(f"--pg {pg!r} is not PP,TG", "write it like 128,128") from None
    with _bar_progress() as bar:
        task = bar.add_task("llama-bench", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        listed = [m.strip() for m in (models_opt or "").split(",") if m.strip()]
        result = stage.bench([run_model(m) for m in (*(models or []), *listed)], builds=[b for b in (builds or "").split(",") if b.strip()] or None,
                             threads=stage.parse_threads(threads), reps=reps, n_prompt=n_prompt, n_gen=n_gen,
                             pg=(pp, tg), out_dir=out, bandwidth=not no_bandwidth, progress=progress,
                             workers=worker_list)
    if as_json:
        emit_json(result)
        return
    from rich.table import Table

    table = Table(title="llama-bench (measured here)")
    for col in ("build", "model", "recipe", "size", "test", "threads", "tok/s", "± sd"):
        table.add_column(col, justify="right" if col in ("size", "threads", "tok/s", "± sd") else "left",
                         no_wrap=col in ("size", "test"))
    for r in result.rows:
        table.add_row(r.build, Path(r.model).name, r.recipe, human_bytes(r.model_bytes), r.test, str(r.threads),
                      f"{r.mean_tps:.2f}", f"{r.stddev_tps:.2f}")
    console.print(table)
    for c in result.ceilings:
        share = f" — best tg {c.best_tg_tps:.2f} tok/s is {c.share_of_ceiling:.0%} of it" if c.best_tg_tps else ""
        console.print(f"tg ceiling for {Path(c.model).name}: {human_bytes(c.active_bytes_per_token)} read per token at "
                      f"{c.copy_gbs:.1f} GB/s copy bandwidth -> {c.tg_ceiling_tps:.1f} tok/s{share}", highlight=False)
    ext = "; ".join(f"{e['build']}: pp512 {e['pp512_tps']}, tg128 {e['tg128_tps']}" for e in result.external)
    console.print(f"[dim]external reference, not measured here — Arm Learning Path, Orion O6, ERNIE-4.5-21B-A3B-"
                  f"Thinking Q4_0, 8 threads: {ext}[/]", highlight=False)
    for model, parts in result.splits.items():
        console.print(f"{Path(model).name} layers: " + ", ".join(f"{p['device']} {p['layers']}" for p in parts),
                      highlight=False)
    if result.outputs:
        console.print(f"wrote {result.outputs['markdown']}, {result.outputs['json']} and the plots", highlight=False)


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
