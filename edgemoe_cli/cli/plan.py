"""`edgemoe plan`: a per-tensor quantization that fits a memory budget (stage: plan.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import memwatch
from ..memwatch import MemoryWatch
from ..units import human_bytes
from .common import console, ctx_option, emit_json, json_option, progress_bars, source_model, threads_option

# plan.DEFAULT_CHUNKS and plan.DEFAULT_LAYER_STRIDE (test_plan checks they agree): importing plan here would load
# numpy for every command's start-up
DEFAULT_CHUNKS = 4
DEFAULT_LAYER_STRIDE = 4

ModelArg = Annotated[str, typer.Argument(help="The f32/f16/bf16 GGUF to plan for, or a model NAME.")]
BudgetOpt = Annotated[
    Optional[str], typer.Option("--budget", help="RAM budget, e.g. 12GiB (KV cache and reserve are subtracted).")
]
BoardOpt = Annotated[
    Optional[str],
    typer.Option(
        "--board",
        help="A board's RAM as the budget: a profile from configs/boards/ (e.g. radxa-orion-o6), a "
        ".toml file, or `this` (this machine's, as doctor detects it).",
    ),
]
MaxSizeOpt = Annotated[
    Optional[str], typer.Option("--max-size", help="Budget the file size directly (no KV/reserve subtracted).")
]
ReserveOpt = Annotated[Optional[str], typer.Option("--reserve", help="Runtime reserve (default: doctor's, 1 GiB).")]
ImatrixOpt = Annotated[
    Optional[Path],
    typer.Option("--imatrix", help="Importance matrix (default: computed with `edgemoe imatrix` on --text)."),
]
TextOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--text",
        help="Calibration text for the imatrix and the KLD measurements (default: data/calib/calibration.txt).",
    ),
]
ArmFastOpt = Annotated[bool, typer.Option("--arm-fast", help="Only Q4_0, IQ4_NL and Q8_0 (fast Arm kernels).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the plan as a recipe TOML here.")]
DoQuantizeOpt = Annotated[bool, typer.Option("--quantize", help="Apply the plan: quantize MODEL with it.")]
GgufOutOpt = Annotated[Optional[Path], typer.Option("--gguf-out", help="With --quantize: the output GGUF.")]
ChunksOpt = Annotated[
    int,
    typer.Option(
        "--chunks",
        min=1,
        help="Chunks of 512 tokens of --text per KLD calibration eval, spaced evenly over the text (eval time is "
        "linear in it; bench/quality.md: 4 plan within 10% of 16 x every layer, as 8 and 16 do).",
    ),
]
LayerStrideOpt = Annotated[
    int,
    typer.Option(
        "--layer-stride",
        min=1,
        help="Measure the depth factor of every k-th layer (plus the dense ones, the first MoE layer and the last) "
        "and interpolate the others; 1 measures every layer (at 21B: 9 layer evals instead of 28 with 4).",
    ),
]
MinEveryTokenOpt = Annotated[
    str,
    typer.Option(
        "--min-every-token",
        help="Lowest type for tensors every token uses (attention, shared experts, dense FFN, "
        "embedding); `none` for no floor.",
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print the steps plan would run and its predicted time on this machine (rates from earlier plans "
        "here, else a probe of a few seconds), then exit.",
    ),
]
ReferenceOpt = Annotated[
    str,
    typer.Option(
        "--reference",
        help="Measure gains against the model as given (source) or at Q8_0 (q8_0: half the bytes each eval "
        "reads, for a machine the source does not fit; bench/quality.md: plan's quality kept). auto: the source "
        "if it fits in the free memory with 2 GiB to spare, else q8_0.",
    ),
]
FloorOpt = Annotated[
    bool,
    typer.Option(
        "--floor",
        help="Also measure the all-Q8_0 floor (a whole-model Q8_0 quantization and one eval): the predicted KLD "
        "becomes absolute; no choice changes (bench/plan_cost.md: what it costs).",
    ),
]
ErrorSampleOpt = Annotated[
    Optional[float],
    typer.Option(
        "--error-sample",
        min=0.0,
        max=1.0,
        help="Fraction of each tensor's rows its quantization error is measured on (default 1/64, at least 512 "
        "rows a tensor, every expert; 1 = every row). bench/qerror_convergence.md: the estimate's error.",
    ),
]


def plan_cmd(
    model: ModelArg,
    budget: BudgetOpt = None,
    board: BoardOpt = None,
    max_size: MaxSizeOpt = None,
    ctx: int = ctx_option(4096, "Context length to keep KV cache room for."),
    reserve: ReserveOpt = None,
    imatrix: ImatrixOpt = None,
    text: TextOpt = None,
    arm_fast: ArmFastOpt = False,
    out: OutOpt = None,
    do_quantize: DoQuantizeOpt = False,
    gguf_out: GgufOutOpt = None,
    chunks: ChunksOpt = DEFAULT_CHUNKS,
    layer_stride: LayerStrideOpt = DEFAULT_LAYER_STRIDE,
    min_every_token: MinEveryTokenOpt = "q4_k",
    reference: ReferenceOpt = "auto",
    error_sample: ErrorSampleOpt = None,
    floor: FloorOpt = False,
    dry_run: DryRunOpt = False,
    threads: Optional[int] = threads_option("all CPUs"),
    as_json: bool = json_option("the plan"),
) -> None:
    """Choose a quantization type per tensor that fits a memory budget with the least predicted quality loss.

    File budget = RAM - KV cache for --ctx tokens - runtime reserve (1 GiB). Loss: each tensor's imatrix-weighted error
    per candidate type (on a row sample) times KLD gains measured per role and layer; an exact knapsack picks the mix
    (README "quantize and plan"). Steps are kept: a stopped plan resumes, another budget is instant. Gives a recipe.

    Example: edgemoe plan ernie-thinking-bf16.gguf --budget 16GiB --ctx 8192 --out my16.toml --quantize
    """
    from .. import plan as stage
    from ..imatrix import default_calibration_text

    budget_args = _budget_args(budget, board, max_size, reserve)
    stage.check_error_sample(error_sample)
    text = text or default_calibration_text()
    # what plan measures with: the same for its run and its --dry-run's prediction
    knobs = dict(max_chunks=chunks, reference=reference, error_sample=error_sample, layer_stride=layer_stride)
    knobs.update(floor=floor, threads=threads)
    if dry_run:
        return _dry_run(model, imatrix, text, arm_fast, as_json, knobs)
    # plan's peak memory per stage, the imatrix and --quantize included (memwatch)
    with progress_bars(as_json) as progress, MemoryWatch(first_stage="convert"):
        model, imatrix = _model_and_imatrix(model, imatrix, text, threads, progress)
        result = stage.plan(
            model,
            imatrix,
            text,
            ctx=ctx,
            arm_fast=arm_fast,
            out=out,
            progress=progress,
            min_every_token=None if min_every_token.lower() == "none" else min_every_token,
            **knobs,
            **budget_args,
        )
        if do_quantize:
            _quantize(result, model, stage.plan_recipe(result, out), gguf_out, imatrix, threads, progress)
    emit_json(result) if as_json else _print_plan(result, out)


def _budget_args(budget, board, max_size, reserve) -> dict:
    """--budget/--board/--max-size/--reserve as stage.plan's keyword arguments."""
    from ..plan import budget_options

    ram, size, reserve_bytes, ram_source = budget_options(budget, board, max_size, reserve)
    return dict(ram=ram, max_size=size, reserve=reserve_bytes, ram_source=ram_source)


def _model_and_imatrix(model, imatrix, text, threads, progress):
    """The GGUF to plan for (a NAME's converted first) and its imatrix (computed on `text` when not given)."""
    from ..imatrix import ensure_imatrix

    model = source_model(model, progress)
    memwatch.stage("imatrix")
    return model, imatrix or ensure_imatrix(model, text, threads=threads, progress=progress)


def _quantize(result, model, recipe, out, imatrix, threads, progress) -> None:
    """Apply the plan (--quantize); the result's peak memory then counts the quantization too."""
    from ..plan import set_peak_rss
    from ..quantize import quantize

    memwatch.stage("quantize (--quantize)")
    result.quantized = quantize(model, recipe, out=out, imatrix=imatrix, threads=threads, progress=progress).out
    set_peak_rss(result, memwatch.running())


def _print_plan(result, out) -> None:
    from collections import Counter

    console.print(f"file budget {human_bytes(result.budget_bytes)} = {result.budget_formula}", highlight=False)
    console.print(
        f"plan: {human_bytes(result.predicted_bytes)}, predicted mean KLD {result.predicted_kld:.5f}"
        + ("" if result.floor_measured else " (without the all-Q8_0 floor, which --floor measures)")
        + "; types: "
        + ", ".join(f"{n} {t}" for t, n in Counter(c.type for c in result.choices).most_common()),
        highlight=False,
    )
    if not out:
        console.print(result.recipe_toml, highlight=False, markup=False)
    else:
        console.print(f"wrote [bold]{result.out}[/]", highlight=False)
    if result.quantized:
        console.print(f"quantized to [bold]{result.quantized}[/]", highlight=False)
    measured = ", ".join(f"{k} {v:.0f} s" for k, v in result.measure_seconds.items() if v)
    console.print(
        ("measurements: from the cache" if result.measured_from_cache else f"measured in {measured or '0 s'}")
        + (f" ({result.cached_steps} steps kept by an earlier plan)" if result.cached_steps else "")
        + f"; against the {'source' if result.reference == 'source' else 'model at Q8_0'} ({result.reference_why})"
        + f"; peak RSS {human_bytes(result.peak_rss_bytes)}",
        highlight=False,
    )
    console.print(_memory_line(result), highlight=False)


def _memory_line(result) -> str:
    """The peak split into what must fit in RAM and what is page cache, with the stage that held the most."""
    line = (
        f"peak anonymous memory {human_bytes(result.peak_anon_bytes)} (must fit in RAM), peak mapped file pages "
        f"{human_bytes(result.peak_file_bytes)} (page cache: reclaimable)"
    )
    if result.stage_memory:
        name, peak = max(result.stage_memory.items(), key=lambda kv: kv[1].anon_bytes)
        line += f"; most anonymous in {name}: {human_bytes(peak.anon_bytes)}"
    return line


def _dry_run(model, imatrix, text, arm_fast, as_json, knobs: dict) -> None:
    from .. import plan as stage
    from ..imatrix import imatrix_beside
    from ..models import source_gguf

    model = source_gguf(model, convert=False).path
    if imatrix is None and imatrix_beside(model).is_file():
        imatrix = imatrix_beside(model)
    prediction = stage.dry_run(model, imatrix, text, arm_fast, **knobs)
    if as_json:
        emit_json(prediction)
        return
    _print_prediction(prediction)


def _print_prediction(p) -> None:
    from rich.table import Table

    from ..units import human_duration

    table = Table("step", "work", "predicted", box=None, pad_edge=False)
    what = {"quantize": "{:,} weights quantized", "errors": "{:,} weights scored", "assemble": "{} assembled"}
    for s in p.steps:
        work = ", ".join(
            f"{s.tokens:,} tokens evaluated"
            if k == "eval"
            else what[k].format(human_bytes(n) if k == "assemble" else n)
            for k, n in s.work.items()
        )
        when = "cached" if s.cached else ("?" if s.seconds is None else human_duration(s.seconds))
        table.add_row(s.name, work, when)
    console.print(table)
    for r in p.rates.values():
        console.print(f"rate {r.stage}: {r.per_second:,.3g} {r.unit}/s ({r.source}: {r.how})", highlight=False)
    for note in p.notes:
        console.print(f"[yellow]{note}[/]", highlight=False)
    known = human_duration(sum(p.stage_seconds.values()))
    total = f"at least {known} (the stages with a rate)" if p.seconds is None else human_duration(p.seconds)
    console.print(
        f"[bold]predicted {total}[/] on this machine for {p.pending_steps} steps"
        + (f" ({p.cached_steps} already done)" if p.cached_steps else ""),
        highlight=False,
    )
