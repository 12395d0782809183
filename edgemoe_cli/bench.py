"""`edgemoe bench`: llama-bench over models (recipes) x builds x thread counts, with plots and a bandwidth ceiling.

One `llama-bench -o json` run per (build, model) covers every thread count and test: pp (prompt processing), tg
(text generation) and a pp+tg run, each repeated `reps` times; llama-bench reports the mean and standard deviation.

Text generation on a CPU is bound by memory bandwidth: every generated token reads all weights it uses once. For
a MoE model that is every tensor except the routed experts, plus top-k of n of those (the token embedding only one
row when the output head is a separate tensor). That many bytes per token against a measured copy bandwidth gives
the tg ceiling; the report puts each measured tg next to it.

The Arm Learning Path's numbers for the Radxa Orion O6 are carried as a labelled external reference, kept apart
from our measurements (never in the same table or plot).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import EdgeMoEError
from .progress import Progress

# Arm Learning Path "Run ERNIE-4.5 Mixture of Experts model on Armv9 with llama.cpp" (Radxa Orion O6, CIX P1):
# ERNIE-4.5-21B-A3B-Thinking Q4_0, `llama-bench -pg 128,128 -t 8`, before and after rebuilding with
# -DGGML_CPU_ARM_ARCH=armv9-a+i8mm+dotprod+sve and KleidiAI. Quoted, not measured here.
EXTERNAL_ORION_O6 = [
    {
        "source": "Arm Learning Path (external, not measured by edgemoe)",
        "board": "Radxa Orion O6 (CIX P1)",
        "model": "ERNIE-4.5-21B-A3B-Thinking Q4_0",
        "threads": 8,
        "build": "plain (no Arm flags)",
        "pp512_tps": 14.96,
        "tg128_tps": 12.03,
    },
    {
        "source": "Arm Learning Path (external, not measured by edgemoe)",
        "board": "Radxa Orion O6 (CIX P1)",
        "model": "ERNIE-4.5-21B-A3B-Thinking Q4_0",
        "threads": 8,
        "build": "armv9-a+i8mm+dotprod+sve + KleidiAI",
        "pp512_tps": 38.51,
        "tg128_tps": 15.96,
    },
]


@dataclass
class Build:
    label: str
    dir: str
    tool: str  # its llama-bench


@dataclass
class BenchRow:
    build: str
    model: str
    recipe: str  # the recipe in the model's manifest, else the file name's stem
    model_bytes: int
    test: str  # pp512, tg128, pp128+tg128
    threads: int
    reps: int
    mean_tps: float
    stddev_tps: float
    samples_tps: list[float]


@dataclass
class Ceiling:
    model: str
    active_bytes_per_token: int
    copy_gbs: float  # measured copy bandwidth, GB/s (bytes read + written per second, as STREAM's Copy)
    copy_threads: int
    tg_ceiling_tps: float  # copy bandwidth / active bytes per token
    best_tg_tps: float | None  # our best tg on this model
    share_of_ceiling: float | None


@dataclass
class BenchResult:
    machine: dict
    builds: list[Build]
    threads: list[int]
    reps: int
    tests: list[str]
    rows: list[BenchRow]
    ceilings: list[Ceiling]
    external: list[dict] = field(default_factory=lambda: [dict(r) for r in EXTERNAL_ORION_O6])
    outputs: dict[str, str] = field(default_factory=dict)
    splits: dict[str, list] = field(default_factory=dict)  # with --workers: model -> [{device, memory_bytes, layers}]


# ---- inputs ----


def resolve_builds(builds: Sequence[str] | None) -> list[Build]:
    """Build directories (with bin/llama-bench) from paths or names under the build cache; default: the current one."""
    from .llamacpp import find_tool
    from .store import builds_dir

    if not builds:
        tool = find_tool("llama-bench")
        root = tool.parent.parent
        return [Build(label=_build_label(root), dir=str(root), tool=str(tool))]
    out = []
    for b in builds:
        root = Path(b).expanduser()
        if not root.is_dir():
            root = builds_dir() / b
        tool = root / "bin" / "llama-bench"
        if not tool.is_file():
            raise EdgeMoEError(
                f"build {b} has no bin/llama-bench ({tool})",
                "give a build directory from `edgemoe build` (see `ls $EDGEMOE_BUILDS`)",
            )
        out.append(Build(label=_build_label(root), dir=str(root.resolve()), tool=str(tool)))
    labels = [b.label for b in out]
    for b in out:  # two builds of the same flags still need distinct names in tables and plots
        if labels.count(b.label) > 1:
            b.label = f"{b.label} ({Path(b.dir).name})"
    return out


def _build_label(root: Path) -> str:
    try:
        m = json.loads((root / "build.json").read_text())
    except (OSError, ValueError):
        return root.resolve().name
    label = m.get("arch") or m.get("target") or root.resolve().name
    return f"{label}+KleidiAI" if m.get("kleidiai") else str(label)


def recipe_of(model: Path) -> str:
    """The recipe a GGUF was made with, from its manifest (`edgemoe quantize` / `prune` write one), else its stem."""
    manifest = model.with_name(model.name + ".manifest.json")
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return model.stem
    label = str(m.get("recipe") or m.get("stage") or model.stem)
    if m.get("stage") == "prune":
        label = f"pruned keep {m.get('expert_count')}"
    return label


def split_list(values: str | Sequence[str] | None) -> list[str]:
    """A comma-separated option (--models, --builds), given once or repeated, as its non-empty items."""
    values = [values] if isinstance(values, str) else values or []
    return [item.strip() for text in values for item in text.split(",") if item.strip()]


def parse_pg(text: str) -> tuple[int, int]:
    """--pg PP,TG: the combined prompt+generation test's two lengths."""
    try:
        pp, tg = (int(v) for v in text.split(","))
    except ValueError:
        raise EdgeMoEError(f"--pg {text!r} is not PP,TG", "write it like 128,128") from None
    return pp, tg


def parse_threads(text: str) -> list[int]:
    try:
        threads = sorted({int(t) for t in str(text).split(",") if t.strip()})
    except ValueError:
        raise EdgeMoEError(f"--threads {text!r} is not a list of numbers", "write it like 1,2,4,8") from None
    if not threads or threads[0] < 1:
        raise EdgeMoEError(f"--threads {text!r} needs counts of at least 1", "write it like 1,2,4,8")
    return threads


# ---- bandwidth ceiling ----


def active_bytes_per_token(model: str | Path) -> int:
    """Bytes of weights one generated token reads: routed experts count top-k/n, the embedding one row if untied."""
    from .gguffile import moe_shape, open_gguf

    reader = open_gguf(model)
    _, n_expert, n_used, _ = moe_shape(reader, model)
    names = {t.name for t in reader.tensors}
    total = 0.0
    for t in reader.tensors:
        n = int(t.n_bytes)
        if "_exps." in t.name:
            total += n * n_used / n_expert
        elif t.name == "token_embd.weight" and "output.weight" in names:
            total += n / int(t.shape[-1])  # get_rows reads one row; the separate output head is counted itself
        else:
            total += n
    return int(total)


def copy_bandwidth(threads: int = 1, megabytes: int = 256, repeats: int = 5) -> float:
    """Best-of-`repeats` memcpy bandwidth in GB/s over a buffer far larger than caches, split across `threads`.

    Counted as STREAM's Copy counts (bytes read + bytes written); numpy releases the GIL while copying.
    """
    from concurrent.futures import ThreadPoolExecutor

    n = megabytes * 2**20 // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)
    parts = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: np.copyto(*p), parts))  # touch every page first
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(lambda p: np.copyto(*p), parts))
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


# ---- running llama-bench ----


def test_name(n_prompt: int, n_gen: int) -> str:
    if n_prompt and n_gen:
        return f"pp{n_prompt}+tg{n_gen}"
    return f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"


def parse_llama_bench(text: str, build: str, model: Path, recipe: str) -> list[BenchRow]:
    """Rows from `llama-bench -o json` output (a JSON array of test results)."""
    start = text.find("[")
    try:
        records = json.loads(text[start:]) if start >= 0 else None
    except ValueError:
        records = None
    if not isinstance(records, list):
        raise EdgeMoEError(
            f"llama-bench printed no JSON results for {model.name}", "run it by hand with -o json to see why"
        )
    rows = []
    for r in records:
        samples = [float(s) for s in r.get("samples_ts", [])]
        rows.append(
            BenchRow(
                build=build,
                model=str(model),
                recipe=recipe,
                model_bytes=model.stat().st_size,
                test=test_name(int(r["n_prompt"]), int(r["n_gen"])),
                threads=int(r["n_threads"]),
                reps=len(samples),
                mean_tps=round(float(r["avg_ts"]), 3),
                stddev_tps=round(float(r["stddev_ts"]), 3),
                samples_tps=[round(s, 3) for s in samples],
            )
        )
    return rows


def llama_bench_args(
    model: Path, threads: list[int], reps: int, n_prompt: int, n_gen: int, pg: tuple[int, int]
) -> list[str]:
    return [
        "-m",
        str(model),
        "-t",
        ",".join(map(str, threads)),
        "-p",
        str(n_prompt),
        "-n",
        str(n_gen),
        "-pg",
        f"{pg[0]},{pg[1]}",
        "-r",
        str(reps),
        "-o",
        "json",
    ]


def run_llama_bench(build: Build, model: Path, args: list[str], timeout: float | None = None) -> str:
    from .llamacpp import run_tool
    from .store import home

    log = home() / "logs" / f"llama-bench-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    # run_tool takes the tool by absolute path here: each build of the matrix brings its own llama-bench
    return run_tool(build.tool, args, log=log, timeout=timeout).stdout


def machine_info() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "cpu model", "hardware")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "physical_cpus": psutil.cpu_count(logical=False),
        "ram_bytes": psutil.virtual_memory().total,
        "available_bytes": psutil.virtual_memory().available,
    }


def bench(
    models: Sequence[str | Path],
    builds: Sequence[str] | None = None,
    threads: Sequence[int] = (1, 2, 4, 8),
    reps: int = 3,
    n_prompt: int = 512,
    n_gen: int = 128,
    pg: tuple[int, int] = (128, 128),
    out_dir: str | Path | None = None,
    bandwidth: bool = True,
    progress: Progress | None = None,
    workers: list | None = None,
) -> BenchResult:
    """Benchmark every model with every build at every thread count; write JSON, Markdown and PNGs to `out_dir`.

    `workers` (cluster.WorkerAddress list): each model's layers split across them and this machine by memory, as
    `run --workers` does, passed to llama-bench as -rpc/-ngl/-ts.
    """
    from .gguffile import find_gguf, gguf_moe_shape

    if not models:
        raise EdgeMoEError("no model given", "pass one or more GGUF files: edgemoe bench a.gguf b.gguf")
    paths = [find_gguf(m) for m in models]
    for p in paths:
        gguf_moe_shape(p)
    if reps < 1:
        raise EdgeMoEError(f"--reps {reps} must be at least 1", "use --reps 3 or more for a stddev")
    resolved = resolve_builds(builds)
    threads = sorted(set(threads))
    cells = [(b, p) for b in resolved for p in paths]
    rows: list[BenchRow] = []
    splits: dict[str, list] = {}
    for i, (b, p) in enumerate(cells):
        if progress:
            progress("llama-bench", i, len(cells), f"{b.label} · {p.name}")
        args = llama_bench_args(p, threads, reps, n_prompt, n_gen, pg)
        if workers:
            from . import cluster

            split = cluster.plan_split(
                cluster.gguf_layers(p), machine_info()["available_bytes"], cluster.worker_memory(workers)
            )
            splits[str(p)] = [asdict(part) for part in split.parts]
            args += cluster.llama_tool_args(split, workers)
        text = run_llama_bench(b, p, args)
        rows += parse_llama_bench(text, b.label, p, recipe_of(p))
    if progress:
        progress("llama-bench", len(cells), len(cells), "memory bandwidth")
    ceilings = []
    if bandwidth:
        copy_threads = max(threads)
        gbs = copy_bandwidth(copy_threads)
        for p in paths:
            active = active_bytes_per_token(p)
            tg = [r.mean_tps for r in rows if r.model == str(p) and r.test == f"tg{n_gen}"]
            ceiling = gbs * 1e9 / active
            best = max(tg) if tg else None
            ceilings.append(
                Ceiling(
                    model=str(p),
                    active_bytes_per_token=active,
                    copy_gbs=round(gbs, 3),
                    copy_threads=copy_threads,
                    tg_ceiling_tps=round(ceiling, 2),
                    best_tg_tps=best,
                    share_of_ceiling=round(best / ceiling, 4) if best else None,
                )
            )
    result = BenchResult(
        machine=machine_info(),
        builds=resolved,
        threads=threads,
        reps=reps,
        tests=[f"pp{n_prompt}", f"tg{n_gen}", test_name(*pg)],
        rows=rows,
        ceilings=ceilings,
        splits=splits,
    )
    if out_dir is not None:
        write_reports(result, Path(out_dir))
    return result


# ---- reports ----


def to_markdown(result: BenchResult) -> str:
    from .report import markdown_table
    from .units import human_bytes

    m = result.machine
    lines = [
        "# edgemoe bench\n",
        f"Machine: {m['cpu']} ({m['machine']}, {m['physical_cpus']} cores / {m['logical_cpus']} threads, "
        f"{human_bytes(m['ram_bytes'])} RAM). llama-bench, {result.reps} repetitions per cell; tokens/s as mean ± "
        "standard deviation.\n",
        "## Builds\n",
        markdown_table(["build", "directory"], [[b.label, f"`{b.dir}`"] for b in result.builds], align="ll"),
        "## Results (measured here)\n",
        markdown_table(
            ["build", "model", "recipe", "size", "test", "threads", "tok/s", "± sd"],
            [
                [
                    r.build,
                    Path(r.model).name,
                    r.recipe,
                    human_bytes(r.model_bytes),
                    r.test,
                    r.threads,
                    r.mean_tps,
                    r.stddev_tps,
                ]
                for r in result.rows
            ],
            align="lllrlrrr",
        ),
    ]
    if result.ceilings:
        lines += [
            "## Memory-bandwidth ceiling for text generation\n",
            "Active bytes per token = every weight a generated token reads (routed experts at top-k/n). Ceiling = "
            "measured copy bandwidth / active bytes. Real decoding also reads the KV cache and pays compute, so "
            "the ceiling is an upper bound.\n",
            markdown_table(
                [
                    "model",
                    "active bytes/token",
                    "copy GB/s (threads)",
                    "tg ceiling tok/s",
                    "best tg tok/s",
                    "of ceiling",
                ],
                [
                    [
                        Path(c.model).name,
                        human_bytes(c.active_bytes_per_token),
                        f"{c.copy_gbs:.2f} ({c.copy_threads})",
                        c.tg_ceiling_tps,
                        c.best_tg_tps,
                        f"{c.share_of_ceiling:.0%}" if c.share_of_ceiling else "–",
                    ]
                    for c in result.ceilings
                ],
                align="lrrrrr",
            ),
        ]
    lines += [
        "## External reference (not measured here)\n",
        "Arm Learning Path, Radxa Orion O6: ERNIE-4.5-21B-A3B-Thinking Q4_0, `llama-bench -pg 128,128 -t 8`, a plain "
        "build vs one with `GGML_CPU_ARM_ARCH=armv9-a+i8mm+dotprod+sve` and KleidiAI. Quoted for scale only: a "
        "different machine and model size from the rows above.\n",
        markdown_table(
            ["board", "model", "build", "threads", "pp512 tok/s", "tg128 tok/s"],
            [
                [e["board"], e["model"], e["build"], e["threads"], e["pp512_tps"], e["tg128_tps"]]
                for e in result.external
            ],
            align="lllrrr",
        ),
    ]
    if result.outputs:
        lines.append("## Plots\n")
        lines += [f"![{name}]({Path(path).name})\n" for name, path in result.outputs.items() if path.endswith(".png")]
    return "\n".join(lines)


def write_reports(result: BenchResult, out_dir: Path) -> None:
    from . import report

    outputs = {"json": str(out_dir / "bench.json"), "markdown": str(out_dir / "bench.md")}
    tests = list(dict.fromkeys(r.test for r in result.rows))
    # tok/s vs threads: a panel per test, a line per (build, model)
    by_threads: dict = {t: {} for t in tests}
    for r in result.rows:
        x, y, e = by_threads[r.test].setdefault(f"{r.build} · {Path(r.model).stem}", ([], [], []))
        x.append(r.threads), y.append(r.mean_tps), e.append(r.stddev_tps)
    tg = next((t for t in tests if t.startswith("tg")), None)
    ceilings = {tg: {f"tg ceiling, {Path(c.model).stem}": c.tg_ceiling_tps for c in result.ceilings}} if tg else {}
    if len(result.threads) > 1 or len(result.builds) > 1:
        outputs["tok/s vs threads"] = str(
            report.line_plot(
                by_threads,
                out_dir / "tps-vs-threads.png",
                "tokens/s vs threads, per build (measured here)",
                "threads",
                "tokens/s",
                xticks=result.threads,
                hlines=ceilings,
            )
        )
    # tok/s vs file size at the most threads: a panel per test, a line per build, a point per recipe
    top = max(result.threads)
    by_size: dict = {t: {} for t in tests}
    recipes: dict = {t: {} for t in tests}
    for r in sorted(result.rows, key=lambda r: r.model_bytes):
        if r.threads == top:
            x, y, e = by_size[r.test].setdefault(r.build, ([], [], []))
            x.append(r.model_bytes / 2**20), y.append(r.mean_tps), e.append(r.stddev_tps)
            recipes[r.test].setdefault(r.build, []).append(r.recipe)
    if len({r.model for r in result.rows}) > 1:
        outputs["tok/s vs size"] = str(
            report.line_plot(
                by_size,
                out_dir / "tps-vs-size.png",
                f"tokens/s vs model file size at {top} threads (one point per recipe)",
                "file size (MiB)",
                "tokens/s",
                point_labels=recipes,
            )
        )
    result.outputs = outputs
    report.write_json(result, outputs["json"])
    report.write_text(to_markdown(result), outputs["markdown"])
