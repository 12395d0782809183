"""`edgemoe build`: compile llama.cpp for this board or for aarch64 (stage: build.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, emit_json, err_console, json_option

SourceOpt = Annotated[
    str,
    typer.Option(
        "--source",
        help="`vendored` (the llama.cpp inside the pinned "
        "llama-cpp-python sdist, the binding's own commit) or a llama.cpp checkout DIR.",
    ),
]
TargetOpt = Annotated[
    str,
    typer.Option(
        "--target",
        help="`native` (this machine) or `aarch64` (cross-compile with aarch64-linux-gnu-gcc from an x86 host).",
    ),
]
BoardOpt = Annotated[
    Optional[str],
    typer.Option(
        "--board",
        help="Build for a board profile (configs/boards/NAME.toml, or a .toml file): its flags, "
        "cross-compiled from a non-Arm host.",
    ),
]
ArchOpt = Annotated[
    Optional[str],
    typer.Option(
        "--arch",
        help="GGML_CPU_ARM_ARCH (-march), e.g. "
        "armv9-a+sve2+i8mm+dotprod. Default: from this CPU's features (native) or "
        "armv9-a+sve2+i8mm+bf16+dotprod (aarch64).",
    ),
]
KleidiaiOpt = Annotated[
    Optional[bool],
    typer.Option("--kleidiai/--no-kleidiai", help="Arm's KleidiAI matmul kernels (default: on for Arm targets)."),
]
KleidiaiSrcOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--kleidiai-src", help="Extracted KleidiAI source for boards without network (else CMake downloads it)."
    ),
]
JobsOpt = Annotated[
    Optional[int], typer.Option("--jobs", "-j", min=1, help="Parallel compile jobs (default: all CPUs).")
]
ActivateOpt = Annotated[
    bool,
    typer.Option(
        "--activate/--no-activate",
        help="Make a native build the one the binding "
        "and tools use (builds/native-current). --no-activate builds for comparison only.",
    ),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the cmake lines (and generated files); build nothing.")
]


def build(
    source: SourceOpt = "vendored",
    target: TargetOpt = "native",
    board: BoardOpt = None,
    arch: ArchOpt = None,
    kleidiai: KleidiaiOpt = None,
    kleidiai_src: KleidiaiSrcOpt = None,
    jobs: JobsOpt = None,
    activate: ActivateOpt = True,
    dry_run: DryRunOpt = False,
    as_json: bool = json_option("the build (or with --dry-run the plan)"),
) -> None:
    """Build llama.cpp's tools and libraries for this board (or for aarch64).

    Compiles llama-cli, llama-server, llama-quantize, llama-imatrix, llama-perplexity, llama-bench, llama-gguf-split
    (and llama-completion, llama-simple, llama-tokenize) with shared libllama/libggml into
    <store>/builds/<key>/{bin,lib}. The key hashes the source, target, flags and compiler: the same build again is a
    cache hit, instant.

    On Arm the flags come from the CPU: the GGML_CPU_ARM_ARCH that `edgemoe doctor` recommends (only extensions
    every core has), GGML_NATIVE off, KleidiAI on. On x86 it is a -march=native build.

    Every build proves itself before it is used: a smoke test quantizes the shipped tiny ERNIE fixture with the
    build's own llama-quantize to F16, Q8_0, Q4_0, Q4_K_M, Q6_K and IQ4_NL and runs each in a child process (the
    tools, and for native builds the Python binding), comparing with the F16 run; cross builds run it under
    qemu-aarch64 when it is installed. A build that crashes or computes wrong is not activated; where a known-bad
    CPU feature explains it (AMX on some x86 hosts) it is rebuilt without that feature, and the output says so. The
    result is in build.json, `build --json` and `edgemoe doctor`.

    A native build becomes builds/native-current once it has passed and llama-cpp-python has loaded its libllama;
    from then on `edgemoe run`, the other commands and the C++ tools all use this one build.

    KleidiAI is downloaded by CMake at configure time; offline, pass --kleidiai-src DIR (an extracted
    kleidiai-<tag>-src.tar.gz). With GCC 12 one KleidiAI file is compiled without loop vectorization (GCC 12.2
    crashes on it at -O3); the output says so.

    Examples:

      edgemoe build
      edgemoe build --target aarch64 --dry-run
      edgemoe build --arch armv8-a --no-kleidiai --no-activate
    """
    from ..build import load_manifest

    plan = _plan(board, source, target, arch, kleidiai, kleidiai_src, jobs)
    if dry_run:
        emit_json(plan) if as_json else _print_dry_run(plan)
        return
    if not as_json and load_manifest(plan.out_dir) is None:
        _announce(plan)
    result = _run_with_bar(plan, activate, disable=as_json)
    emit_json(result) if as_json else _print_built(result, plan)


def _plan(board: str | None, source, target, arch, kleidiai, kleidiai_src, jobs):
    """build.plan_build from the options; --board NAME supplies the target and flags (board.build_options)."""
    from ..board import build_options
    from ..build import plan_build

    notes: list[str] = []
    if board is not None:
        target, arch, notes = build_options(board, arch)
    plan = plan_build(
        source=source,
        target=target,
        arch=arch,
        kleidiai=kleidiai,
        kleidiai_src=str(kleidiai_src) if kleidiai_src else None,
        jobs=jobs,
    )
    plan.notes += notes
    return plan


def _run_with_bar(plan, activate: bool, disable: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..build import run_build

    with Progress(
        TextColumn("[bold]build[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=err_console,
        transient=True,
        disable=disable,
    ) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total or None, description=what[-60:])

        return run_build(plan, progress=progress, make_current=activate)


def _announce(plan) -> None:
    err_console.print(
        f"building llama.cpp [bold]{plan.key}[/] ({plan.target}, arch {plan.arch}, "
        f"KleidiAI {'on' if plan.kleidiai else 'off'}, -j{plan.jobs}) - log in {plan.work_dir}/build.log",
        highlight=False,
    )
    _print_notes(plan.notes)


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)


def _print_dry_run(plan) -> None:
    from ..build import command_lines, sve_warning

    warning = sve_warning(plan)
    # plain stdout, never wrapped: these lines are meant to be copied into a shell
    for name, text in ((plan.toolchain_file, plan.toolchain_text), (plan.kleidiai_fix_file, plan.kleidiai_fix_text)):
        if name:
            sys.stdout.write(f"# ---- {name}\n{text}")
    sys.stdout.write("\n".join(command_lines(plan)) + "\n")
    _print_notes(plan.notes + ([warning] if warning else []))


def _print_built(result, plan) -> None:
    from ..build import sve_warning

    warning = sve_warning(plan)
    state = "cached" if result.cached else f"built in {result.seconds / 60:.1f} min"
    console.print(f"llama.cpp [bold]{result.key}[/] {state}: {result.path}", highlight=False)
    if result.system_info:
        console.print(f"system_info: {result.system_info}", highlight=False, markup=False)
    if result.smoke:
        from ..smoke import SmokeResult

        console.print(f"smoke test: {SmokeResult.from_dict(result.smoke).summary()}", highlight=False, markup=False)
    if result.current:
        console.print("the Python binding and the llama.cpp tools use this build (builds/native-current)")
    _print_notes(result.notes + ([warning] if warning else []))
