"""`edgemoe bench`: llama-bench over models x builds x threads (stage: bench.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..units import human_bytes
from .common import console, emit_json, json_option, progress_bars, run_model

ModelsArg = Annotated[
    Optional[list[str]], typer.Argument(help="GGUF models to measure (e.g. one per recipe): paths or NAME[:TAG].")
]
ModelsOptOpt = Annotated[
    Optional[list[str]],
    typer.Option("--models", help="Models as a comma-separated list, instead of or with the arguments (repeatable)."),
]
BuildsOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--builds",
        help="Build directories or names in the build cache, comma-separated or repeated (default: the current build).",
    ),
]
ThreadsOpt = Annotated[
    list[str], typer.Option("--threads", "-t", help="Thread counts, comma-separated or repeated (-t 1 -t 4).")
]
RepsOpt = Annotated[
    int, typer.Option("--reps", "-r", min=1, help="Repetitions of each test (mean and stddev over them).")
]
NPromptOpt = Annotated[int, typer.Option("--n-prompt", "-p", min=1, help="Prompt-processing test length (ppN).")]
NGenOpt = Annotated[int, typer.Option("--n-gen", "-n", min=1, help="Text-generation test length (tgN).")]
PgOpt = Annotated[str, typer.Option("--pg", help="The combined prompt+generation test, PP,TG.")]
OutOpt = Annotated[
    Optional[Path], typer.Option("--out", "-o", help="Directory for bench.json, bench.md and the PNG plots.")
]
NoBandwidthOpt = Annotated[
    bool, typer.Option("--no-bandwidth", help="Skip the copy-bandwidth measurement and the tg ceiling.")
]


WorkersOpt = Annotated[
    Optional[str],
    typer.Option(
        "--workers",
        help="HOST:PORT,... of `edgemoe worker`s: split each "
        "model across them and this machine by memory, as run does.",
    ),
]


def bench(
    models: ModelsArg = None,
    models_opt: ModelsOptOpt = None,
    builds: BuildsOpt = None,
    threads: ThreadsOpt = ["1,2,4,8"],
    reps: RepsOpt = 3,
    n_prompt: NPromptOpt = 512,
    n_gen: NGenOpt = 128,
    pg: PgOpt = "128,128",
    out: OutOpt = Path("bench"),
    no_bandwidth: NoBandwidthOpt = False,
    as_json: bool = json_option("the results"),
    workers: WorkersOpt = None,
) -> None:
    """Measure prompt and generation speed with llama-bench over models x builds x thread counts.

    For every build (e.g. a plain one and an Armv9+KleidiAI one from `edgemoe build`) and every model (one per
    recipe), one `llama-bench -o json` run covers all thread counts and three tests: ppN (prompt processing), tgN
    (generation) and PP+TG combined, each repeated --reps times. The results go to bench.json and bench.md
    (tokens/s, mean ± stddev) with PNG plots: tokens/s vs threads per build, and tokens/s vs file size per recipe.

    It also measures this machine's memory copy bandwidth and, from each GGUF's tensor sizes, the bytes of weights
    one generated token reads (routed experts at top-k of n): their ratio is the ceiling for tg, and each model's
    best tg is shown as a share of it.

    The Arm Learning Path's Orion O6 numbers (ERNIE-4.5-21B-A3B-Thinking Q4_0, 8 threads: pp512 14.96 -> 38.51,
    tg128 12.03 -> 15.96 tok/s, plain build -> armv9-a+i8mm+dotprod+sve with KleidiAI) are shown as a labelled
    external reference, never mixed with these measurements.

    Examples:

        edgemoe bench ernie-q4_0.gguf --threads 4,8 --out bench/

        edgemoe bench q4_0.gguf q4_k_m.gguf q8_0.gguf --builds plain-key,kleidiai-key --threads 1,2,4,8
    """
    from .. import bench as stage
    from .. import cluster

    worker_list = cluster.parse_workers(workers) if workers is not None else None
    pg_lengths = stage.parse_pg(pg)
    with progress_bars(as_json) as progress:
        result = stage.bench(
            [run_model(m) for m in (*(models or []), *stage.split_list(models_opt))],
            builds=stage.split_list(builds) or None,
            threads=stage.parse_threads(",".join(threads)),
            reps=reps,
            n_prompt=n_prompt,
            n_gen=n_gen,
            pg=pg_lengths,
            out_dir=out,
            bandwidth=not no_bandwidth,
            progress=progress,
            workers=worker_list,
        )
    if as_json:
        emit_json(result)
        return
    _print_bench(result)


def _print_bench(result) -> None:
    from rich.table import Table

    table = Table(title="llama-bench (measured here)")
    for col in ("build", "model", "recipe", "size", "test", "threads", "tok/s", "± sd"):
        table.add_column(
            col,
            justify="right" if col in ("size", "threads", "tok/s", "± sd") else "left",
            no_wrap=col in ("size", "test"),
        )
    for r in result.rows:
        table.add_row(
            r.build,
            Path(r.model).name,
            r.recipe,
            human_bytes(r.model_bytes),
            r.test,
            str(r.threads),
            f"{r.mean_tps:.2f}",
            f"{r.stddev_tps:.2f}",
        )
    console.print(table)
    for c in result.ceilings:
        share = f" — best tg {c.best_tg_tps:.2f} tok/s is {c.share_of_ceiling:.0%} of it" if c.best_tg_tps else ""
        console.print(
            f"tg ceiling for {Path(c.model).name}: {human_bytes(c.active_bytes_per_token)} read per token at "
            f"{c.copy_gbs:.1f} GB/s copy bandwidth -> {c.tg_ceiling_tps:.1f} tok/s{share}",
            highlight=False,
        )
    ext = "; ".join(f"{e['build']}: pp512 {e['pp512_tps']}, tg128 {e['tg128_tps']}" for e in result.external)
    console.print(
        f"[dim]external reference, not measured here — Arm Learning Path, Orion O6, ERNIE-4.5-21B-A3B-"
        f"Thinking Q4_0, 8 threads: {ext}[/]",
        highlight=False,
    )
    for model, parts in result.splits.items():
        console.print(
            f"{Path(model).name} layers: " + ", ".join(f"{p['device']} {p['layers']}" for p in parts), highlight=False
        )
    if result.outputs:
        console.print(f"wrote {result.outputs['markdown']}, {result.outputs['json']} and the plots", highlight=False)
