"""`edgemoe compare`: the same prompts through ERNIE-4.5 PT and Thinking, with timings and accuracy.

The variants run one after the other, each in a fresh child process, so only one model is in RAM at a time (a board
holds one 21B model, not two) and each variant's peak RSS is its own. Generation is generate.chat_reply — the same
token loop, chat template and Thinking parser as `edgemoe run` — greedy unless a temperature is given.
"""

from __future__ import annotations

import ast
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import EdgeMoEError
from .progress import Progress
from .tomlfile import load_toml

VARIANTS = ("pt", "thinking")
CHECKS = ("number", "contains", "regex", "python")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Prompt:
    id: str
    text: str
    kind: str = ""
    expected: str | None = None
    check: str | None = None  # one of CHECKS; None when `expected` is None


@dataclass
class Answer:
    """One variant's reply to one prompt: generate.RunResult's fields plus what compare adds."""

    reasoning: str
    answer: str
    raw: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int  # the reasoning text re-tokenized (tags excluded)
    answer_tokens: int  # the answer text re-tokenized
    ttft_s: float
    prompt_tps: float
    gen_tps: float | None
    wall_s: float  # the whole request: template, prompt, generation, parsing
    finish_reason: str
    correct: bool | None  # None when the prompt has no expected answer


@dataclass
class VariantSummary:
    variant: str
    model: str
    model_bytes: int
    scored: int
    correct: int
    accuracy: float | None
    mean_completion_tokens: float
    mean_reasoning_tokens: float
    mean_answer_tokens: float
    mean_ttft_s: float
    mean_gen_tps: float | None
    total_wall_s: float
    load_s: float
    peak_rss_bytes: int  # of the child process that held this variant: one model's footprint
    library: str


@dataclass
class CompareItem:
    prompt: Prompt
    pt: Answer
    thinking: Answer


@dataclass
class CompareResult:
    prompts_file: str
    settings: dict
    summary: dict[str, VariantSummary]
    items: list[CompareItem]
    accuracy_by_kind: dict[str, dict[str, str]] = field(default_factory=dict)  # kind -> variant -> "c/n"
    outputs: dict[str, str] = field(default_factory=dict)


# ---- prompts ----


def default_prompts_file() -> Path:
    from .store import configs_dir

    return configs_dir() / "prompts" / "compare.toml"


def _prompt(entry: dict, where: str) -> Prompt:
    text = entry.get("text")
    if not isinstance(text, str) or not text.strip():
        raise EdgeMoEError(f"{where} has no text", 'give every prompt a non-empty text = "..."')
    expected = entry.get("expected")
    if expected is not None:
        expected = str(expected)
    check = entry.get("check")
    if check is not None and check not in CHECKS:
        raise EdgeMoEError(f"{where}: unknown check {check!r}", f"use one of {', '.join(CHECKS)}")
    if expected is not None and check is None:
        check = "number" if _NUMBER.fullmatch(expected.strip()) else "contains"
    if expected is None:
        check = None
    if check == "number" and not _NUMBER.fullmatch(expected.strip()):
        # checked here, not when scoring: scoring comes after both models have answered every prompt
        raise EdgeMoEError(
            f'{where}: expected {expected!r} is not a number, as check = "number" needs',
            'write a number like 42 or -3.5, or use check = "contains"',
        )
    if check == "regex":
        try:
            re.compile(expected)
        except re.error as e:
            raise EdgeMoEError(f"{where}: expected is not a valid regular expression ({e})", "fix the pattern") from e
    return Prompt(
        id=str(entry.get("id", "")),
        text=text.strip("\n"),
        kind=str(entry.get("kind", "")),
        expected=expected,
        check=check,
    )


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """Prompts from a TOML file ([[prompt]] tables) or JSON Lines ({"q", "answer"} or {"text", "expected"})."""
    from .profile import read_text

    path = Path(path) if path is not None else default_prompts_file()
    raw = read_text(path, "give a UTF-8 .toml or .jsonl prompt file (see configs/prompts/compare.toml)")
    prompts: list[Prompt] = []
    if path.suffix in (".jsonl", ".json"):
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as e:
                raise EdgeMoEError(f"{path}:{n} is not valid JSON ({e.args[0]})", "one JSON object a line") from e
            if not isinstance(entry, dict):
                raise EdgeMoEError(f"{path}:{n} is not a JSON object", 'write {"q": "...", "answer": "..."}')
            entry = {
                "id": entry.get("id", f"{path.stem}-{n}"),
                "kind": entry.get("kind", path.stem),
                "text": entry.get("text", entry.get("q")),
                "expected": entry.get("expected", entry.get("answer")),
                "check": entry.get("check"),
            }
            prompts.append(_prompt(entry, f"{path}:{n}"))
    else:
        data = load_toml(raw, f"prompt file {path}", "fix the file; see configs/prompts/compare.toml")
        entries = data.get("prompt")
        if not isinstance(entries, list) or not entries:
            raise EdgeMoEError(f"prompt file {path} has no [[prompt]] tables", "see configs/prompts/compare.toml")
        for i, entry in enumerate(entries, 1):
            if not isinstance(entry, dict):
                raise EdgeMoEError(f"{path}: prompt {i} is not a table", "write each prompt as a [[prompt]] table")
            prompts.append(_prompt({"id": f"prompt-{i}", **entry}, f"{path}: prompt {i}"))
    if not prompts:
        raise EdgeMoEError(f"prompt file {path} holds no prompts", "add at least one prompt")
    return prompts[:limit] if limit else prompts


def is_correct(prompt: Prompt, answer: str) -> bool | None:
    """Score an answer against the prompt's expectation; None when the prompt has none."""
    if prompt.expected is None:
        return None
    expected = prompt.expected.strip()
    if prompt.check == "number":
        numbers = _NUMBER.findall(answer.replace(",", ""))
        return bool(numbers) and float(numbers[-1]) == float(expected)
    if prompt.check == "regex":
        return re.search(expected, answer) is not None
    if prompt.check == "python":
        blocks = re.findall(r"```(?:python|py)?\n(.*?)```", answer, re.S) or [answer]
        for code in blocks:
            try:
                tree = ast.parse(code)
            except SyntaxError:
                continue
            if any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == expected for n in ast.walk(tree)):
                return True
        return False
    return expected.lower() in answer.lower()


# ---- models ----


def check_variant(variant: str, model: str | Path | None) -> Path:
    """The GGUF for one variant (a path or a registry name), checked to be ERNIE with that variant's chat template."""
    from . import chat
    from .gguffile import ERNIE_MOE_ARCH, find_gguf, moe_shape, open_gguf

    flag = f"--{variant}"
    if model is None:
        raise EdgeMoEError(
            f"no {variant.capitalize() if variant == 'thinking' else 'PT'} model given",
            f"pass {flag} MODEL.gguf (compare needs both --pt and --thinking)",
        )
    path = find_gguf(model)
    reader = open_gguf(path)
    field = reader.get_field("general.architecture")
    arch = str(field.contents()) if field is not None else ""
    if arch == ERNIE_MOE_ARCH or not arch.startswith("ernie4_5"):
        moe_shape(reader, path)  # MoE: its expert keys; not ERNIE: the error. Dense ERNIE-4.5 compares as is.
    template = reader.get_field("tokenizer.chat_template")
    thinking = chat.is_thinking_template(template.contents() if template is not None else None)
    if thinking != (variant == "thinking"):
        kind = "Thinking" if thinking else "PT"
        raise EdgeMoEError(
            f"{flag} {path} has a {kind} chat template",
            "pass the PT model with --pt and the Thinking model with --thinking",
        )
    return path


def _run_variant(model: str, prompts: list[dict], settings: dict, queue) -> None:
    """Child process: load one model, answer every prompt, send results (or the error) back through `queue`."""
    try:
        from . import generate

        t0 = time.perf_counter()
        ctx, batch = settings["ctx"], None
        if settings.get("memory") is not None:  # planned for the longest prompt's reply, as `run` plans for its one
            texts = [p["text"] for p in prompts]
            ctx, batch = generate.reply_context(model, texts, settings["system"], settings["max_tokens"], ctx)
        llm, streamer = generate.load_within(
            model, settings.get("memory"), ctx=ctx, threads=settings["threads"], batch=batch
        )
        load_s = time.perf_counter() - t0

        def count(text: str) -> int:
            return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else 0

        answers = []
        try:
            for i, p in enumerate(prompts):
                t = time.perf_counter()
                r = generate.chat_reply(
                    llm,
                    p["text"],
                    system=settings["system"],
                    max_tokens=settings["max_tokens"],
                    temp=settings["temp"],
                    seed=settings["seed"],
                )
                if streamer is not None:
                    streamer.check()
                wall = time.perf_counter() - t
                answers.append(
                    {
                        **asdict(r),
                        "wall_s": round(wall, 6),
                        "reasoning_tokens": count(r.reasoning),
                        "answer_tokens": count(r.answer),
                    }
                )
                queue.put(("progress", i + 1))
        finally:
            llm.close()
            if streamer is not None:
                streamer.close()
        queue.put(("done", answers, load_s, generate.peak_rss_bytes(), generate.binding_info().library))
    except EdgeMoEError as e:
        queue.put(("error", e.message, e.hint))
    except Exception as e:  # an unexpected failure still comes back as a message, not a hung parent
        queue.put(("error", f"{type(e).__name__}: {e}", "rerun with the same arguments; report it if it persists"))


def run_variant(model: Path, prompts: list[Prompt], settings: dict, progress: Callable[[int], None] | None = None):
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")  # a fresh process: no model of the other variant, its own peak RSS
    q = ctx.Queue()
    proc = ctx.Process(target=_run_variant, args=(str(model), [asdict(p) for p in prompts], settings, q), daemon=True)
    proc.start()
    try:
        while True:
            try:
                msg = q.get(timeout=1.0)
            except queue_mod.Empty:
                if not proc.is_alive():
                    raise EdgeMoEError(
                        f"the process running {model} died (exit code {proc.exitcode})",
                        "check free memory: a board holds one model at a time",
                    ) from None
                continue
            if msg[0] == "progress":
                if progress is not None:
                    progress(msg[1])
            elif msg[0] == "error":
                raise EdgeMoEError(msg[1], msg[2])
            else:
                return msg[1:]
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 3) if values else None


def compare(
    thinking: str | Path | None,
    pt: str | Path | None,
    prompts_file: str | Path | None = None,
    prompt: str | Sequence[str] | None = None,
    limit: int | None = None,
    max_tokens: int = 512,
    temp: float = 0.0,
    seed: int | None = None,
    system: str | None = None,
    threads: int | None = None,
    ctx: int = 4096,
    out: str | Path | None = None,
    progress: Progress | None = None,
    memory: str | None = None,
) -> CompareResult:
    """Answer the prompts with PT then Thinking; if `out` is given, write `out` (Markdown) and its .json twin.

    `progress` (progress.Progress) gets one step per variant ("PT", "Thinking") as its prompts complete.
    """
    if out is not None and Path(out).suffix.lower() == ".json":
        raise EdgeMoEError(
            f"--out {out} is where the Markdown report goes, and its JSON twin would be the same file",
            f"pass --out {Path(out).with_suffix('.md')}: the JSON is written beside it",
        )
    models = {"pt": check_variant("pt", pt), "thinking": check_variant("thinking", thinking)}
    if prompt is not None and prompts_file is not None:
        raise EdgeMoEError("give -p PROMPT or --prompts FILE, not both", "drop one of them")
    if prompt is not None:
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not texts or not all(t.strip() for t in texts):
            raise EdgeMoEError("the prompt is empty", "give a question with -p TEXT")
        ids = ["prompt"] if len(texts) == 1 else [f"prompt-{i}" for i in range(1, len(texts) + 1)]
        prompts, source = [Prompt(id=i, text=t) for i, t in zip(ids, texts)], "-p"
    else:
        prompts = load_prompts(prompts_file, limit)
        source = str(prompts_file or default_prompts_file())
    settings = {"max_tokens": max_tokens, "temp": temp, "seed": seed, "system": system, "threads": threads, "ctx": ctx}
    if memory is not None:  # read here, before either model runs (each child plans for its own model)
        from .stream import parse_memory

        settings["memory"] = parse_memory(memory)

    answers: dict[str, list[Answer]] = {}
    summary: dict[str, VariantSummary] = {}
    for variant in VARIANTS:
        label = "Thinking" if variant == "thinking" else "PT"
        cb = (lambda done, v=label: progress(v, done, len(prompts), "prompts")) if progress else None
        raw, load_s, peak, library = run_variant(models[variant], prompts, settings, cb)
        rows = []
        for p, r in zip(prompts, raw):
            rows.append(
                Answer(
                    reasoning=r["reasoning"],
                    answer=r["answer"],
                    raw=r["raw"],
                    prompt_tokens=r["prompt_tokens"],
                    completion_tokens=r["completion_tokens"],
                    reasoning_tokens=r["reasoning_tokens"],
                    answer_tokens=r["answer_tokens"],
                    ttft_s=r["ttft_s"],
                    prompt_tps=r["prompt_tps"],
                    gen_tps=r["gen_tps"],
                    wall_s=r["wall_s"],
                    finish_reason=r["finish_reason"],
                    correct=is_correct(p, r["answer"]),
                )
            )
        answers[variant] = rows
        scored = [a.correct for a in rows if a.correct is not None]
        summary[variant] = VariantSummary(
            variant=variant,
            model=str(models[variant]),
            model_bytes=models[variant].stat().st_size,
            scored=len(scored),
            correct=sum(scored),
            accuracy=round(sum(scored) / len(scored), 4) if scored else None,
            mean_completion_tokens=_mean(a.completion_tokens for a in rows),
            mean_reasoning_tokens=_mean(a.reasoning_tokens for a in rows),
            mean_answer_tokens=_mean(a.answer_tokens for a in rows),
            mean_ttft_s=_mean(a.ttft_s for a in rows),
            mean_gen_tps=_mean(a.gen_tps for a in rows),
            total_wall_s=round(sum(a.wall_s for a in rows), 3),
            load_s=round(load_s, 3),
            peak_rss_bytes=peak,
            library=library,
        )
    items = [CompareItem(prompt=p, pt=a, thinking=b) for p, a, b in zip(prompts, answers["pt"], answers["thinking"])]
    by_kind: dict[str, dict[str, str]] = {}
    for kind in dict.fromkeys(p.kind for p in prompts if p.expected is not None):
        by_kind[kind] = {}
        for variant in VARIANTS:
            marks = [
                getattr(it, variant).correct
                for it in items
                if it.prompt.kind == kind and it.prompt.expected is not None
            ]
            by_kind[kind][variant] = f"{sum(marks)}/{len(marks)}"
    result = CompareResult(
        prompts_file=source, settings=settings, summary=summary, items=items, accuracy_by_kind=by_kind
    )
    if out is not None:
        write_report(result, Path(out))
    return result


# ---- report ----


def metrics_rows(result: CompareResult) -> tuple[list[str], list[list]]:
    """The summary metrics table (one row per variant), shared by the terminal and the Markdown report."""
    from .units import human_bytes

    headers = [
        "variant",
        "accuracy",
        "prompt tok",
        "completion tok",
        "reasoning tok",
        "answer tok",
        "TTFT s",
        "gen tok/s",
        "wall s",
        "load s",
        "peak RSS",
    ]
    rows = []
    for variant in VARIANTS:
        s = result.summary[variant]
        prompt_tok = _mean(getattr(it, variant).prompt_tokens for it in result.items)
        acc = f"{s.correct}/{s.scored} ({s.accuracy:.0%})" if s.accuracy is not None else "–"
        rows.append(
            [
                variant,
                acc,
                prompt_tok,
                s.mean_completion_tokens,
                s.mean_reasoning_tokens,
                s.mean_answer_tokens,
                s.mean_ttft_s,
                s.mean_gen_tps,
                s.total_wall_s,
                s.load_s,
                human_bytes(s.peak_rss_bytes),
            ]
        )
    return headers, rows


def to_markdown(result: CompareResult) -> str:
    from .report import fenced, markdown_table
    from .units import human_bytes

    s = result.settings
    lines = [
        "# edgemoe compare: ERNIE-4.5 PT vs Thinking\n",
        f"Prompts: `{result.prompts_file}` ({len(result.items)}). Greedy: {s['temp'] == 0} (temp {s['temp']}), "
        f"max tokens {s['max_tokens']}, threads {s['threads'] or 'default'}, ctx {s['ctx']}. Each variant ran alone "
        "in its own process (peak RSS is that process's).\n",
        markdown_table(
            ["variant", "model", "size", "libllama"],
            [
                [
                    v,
                    f"`{result.summary[v].model}`",
                    human_bytes(result.summary[v].model_bytes),
                    f"`{result.summary[v].library}`",
                ]
                for v in VARIANTS
            ],
            align="llrl",
        ),
        "## Metrics (means per prompt; wall is the sum)\n",
        markdown_table(*metrics_rows(result)),
    ]
    if result.accuracy_by_kind:
        lines += [
            "## Accuracy by kind of task\n",
            markdown_table(
                ["kind", "PT", "Thinking"],
                [[k, v["pt"], v["thinking"]] for k, v in result.accuracy_by_kind.items()],
                align="lrr",
            ),
        ]
    lines.append("## Prompts and replies\n")
    mark = {True: "✓ correct", False: "✗ wrong", None: "not scored"}
    for n, it in enumerate(result.items, 1):
        p = it.prompt
        head = f"### {n}. {p.id}" + (f" ({p.kind})" if p.kind else "")
        lines += [head + "\n", fenced(p.text)]
        if p.expected is not None:
            lines.append(f"Expected ({p.check}): `{p.expected}`\n")
        for variant, a in (("PT", it.pt), ("Thinking", it.thinking)):
            lines.append(
                f"**{variant}** — {mark[a.correct]} · {a.completion_tokens} tokens "
                f"({a.reasoning_tokens} reasoning, {a.answer_tokens} answer) · TTFT {a.ttft_s:.3f} s · "
                f"{a.gen_tps if a.gen_tps is not None else '–'} tok/s · {a.finish_reason}\n"
            )
            if a.reasoning:
                lines.append(
                    f"<details><summary>reasoning ({a.reasoning_tokens} "
                    f"tokens)</summary>\n\n{fenced(a.reasoning)}\n</details>\n"
                )
            lines.append(fenced(a.answer or "(no answer)"))
    return "\n".join(lines)


def write_report(result: CompareResult, out: Path) -> None:
    from .report import write_json, write_text

    json_path = out.with_suffix(".json")
    result.outputs = {"markdown": str(out), "json": str(json_path)}
    write_json(result, json_path)
    write_text(to_markdown(result), out)
