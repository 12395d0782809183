"""plan's measurement as a list of steps: one list drives the run, its resume and its predicted time.

plan.measure_steps says what a measurement does, step by step (the error pass over a row sample, a whole-model
quantization, the reference's log-probs, a calibration run, the floor), and for each step:
- its work, in the unit of each stage's rate it spends time in (STAGES: quantize and errors count weights, assemble
  bytes of tensor data written, eval weight-tokens = tokens x weights each token multiplies, so a rate measured on
  one model predicts another of other widths);
- the steps whose files it reads (`needs`);
- a content key when its result is kept (errors of a type, the KLD of a run): the hash of what the result depends
  on (the model file, the imatrix's and the text's sha256, the knobs, the tensors lowered), so a kept result is
  reused by any later plan that would compute the same thing, and a changed input never reuses a stale one.
A step without a key writes a file into the run's private directory and is redone when a pending step needs it.

plan._measure runs `pending(steps, cache)` and keeps each kept result the moment it is finished
(StepCache.put: an atomic write), so a plan stopped by Ctrl-C or a kill resumes where it stopped. predict() prices
the same pending steps with this machine's rates: those the last plan measured (record_rates, when a measurement
finishes), else a short probe (plan.probe_rates).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .store import atomic_output, home

# stage -> the unit its rate counts per second
STAGES = {"quantize": "weights", "errors": "weights", "assemble": "bytes", "eval": "weight-tokens"}


@dataclass
class Step:
    name: str  # "errors", "quantize q3_k", "reference", "role attn_q", "layer 3", "floor"
    group: str  # the progress line it advances ("errors", "quantize", "calibrate", "layers")
    work: dict[str, int]  # stage -> units of work (STAGES)
    needs: list[str] = field(default_factory=list)  # names of the steps whose files it reads
    key: str = ""  # content key of its kept result; "" for a step that writes a file into the run's directory
    type: str = ""  # the type it quantizes, scores or lowers to
    members: list[str] = field(default_factory=list)  # the tensors it quantizes, scores or lowers
    tokens: int = 0  # tokens it evaluates (its eval work is these x the weights a token multiplies)


def content_key(*parts) -> str:
    """A short hash of what a result depends on."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:24]


class StepCache:
    """Kept step results, one small JSON file per content key in <store>/cache/plan/steps/."""

    def __init__(self, root: str | Path | None = None, read: bool = True):
        self.root = Path(root) if root else home() / "cache" / "plan" / "steps"
        self.read = read  # False: measure everything again (results are still kept)

    def get(self, step: Step):
        """The kept result of `step`, or None (never kept, damaged, or reading turned off)."""
        if not (self.read and step.key):
            return None
        try:
            data = json.loads((self.root / f"{step.key}.json").read_text())
        except (OSError, ValueError):
            return None
        # a damaged entry (or one of another shape) is measured again and replaced
        if not isinstance(data, dict) or data.get("step") != step.name or not _well_formed(step, data.get("result")):
            return None
        return data["result"]

    def put(self, step: Step, result) -> None:
        with atomic_output(self.root / f"{step.key}.json") as part:
            part.write_text(json.dumps({"step": step.name, "result": result}))


def _well_formed(step: Step, result) -> bool:
    """A kept result has the shape its step gives: errors of each member tensor, or a run's KLD."""
    if not isinstance(result, dict):
        return False
    if step.name == "errors":  # tensor -> type -> E
        return set(result) == set(step.members) and all(
            isinstance(v, dict) and all(type(e) is float for e in v.values()) for v in result.values()
        )
    return type(result.get("kld")) is float


def pending(steps: list[Step], cache: StepCache) -> list[Step]:
    """The steps a run still has to do, in order: each kept step whose result the cache lacks, and each file step
    a pending step needs (a kept quantization is redone only when a calibration run still has to read it)."""
    needed: set[str] = set()
    todo = []
    for s in reversed(steps):
        if (s.key and cache.get(s) is None) or (not s.key and s.name in needed):
            todo.append(s)
            needed.update(s.needs)
    return todo[::-1]


def total_work(steps: list[Step]) -> dict[str, int]:
    out = dict.fromkeys(STAGES, 0)
    for s in steps:
        for stage, n in s.work.items():
            out[stage] += n
    return out


# ---- this machine's rates ----


@dataclass
class Rate:
    stage: str
    per_second: float  # units of STAGES[stage] per second
    unit: str
    source: str  # "measured" (a finished plan on this machine) or "probe"
    how: str  # which plan and when, or what the probe ran


def _rates_path() -> Path:
    return home() / "cache" / "plan" / "rates.json"


def record_rates(seconds: dict[str, float], work: dict[str, int], model: str) -> None:
    """Keep the rates a measurement achieved per stage (the stages it did enough of to time), for predictions."""
    rates = {r.stage: r for r in measured_rates().values()}
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    for stage, unit in STAGES.items():
        s, n = seconds.get(stage, 0.0), work.get(stage, 0)
        if s >= 0.05 and n > 0:
            rates[stage] = Rate(stage, n / s, unit, "measured", f"plan of {Path(model).name} at {when}")
    with atomic_output(_rates_path()) as part:
        part.write_text(json.dumps({k: v.__dict__ for k, v in rates.items()}, indent=1))


def measured_rates() -> dict[str, Rate]:
    """The rates the last plans on this machine measured, per stage (empty when none finished yet)."""
    try:
        data = json.loads(_rates_path().read_text())
        return {k: Rate(**v) for k, v in data.items() if k in STAGES and v["per_second"] > 0}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


# ---- the prediction ----


@dataclass
class PredictedStep:
    name: str
    work: dict[str, int]
    tokens: int
    seconds: float | None  # None when a stage it uses has no rate
    cached: bool  # finished by an earlier (maybe interrupted) plan: costs nothing


@dataclass
class PlanPrediction:
    model: str
    steps: list[PredictedStep]
    rates: dict[str, Rate]
    seconds: float | None  # predicted total of the pending steps on this machine (None: a needed rate is missing)
    stage_seconds: dict[str, float]
    work: dict[str, int]  # pending work per stage
    pending_steps: int
    cached_steps: int
    notes: list[str] = field(default_factory=list)


def predict(model: str, steps: list[Step], cache: StepCache, rates: dict[str, Rate], notes=()) -> PlanPrediction:
    todo = {s.name for s in pending(steps, cache)}
    out, stage_seconds, missing = [], dict.fromkeys(STAGES, 0.0), set()
    for s in steps:
        cached = s.name not in todo
        seconds: float | None = 0.0
        if not cached:
            for stage, n in s.work.items():
                if n and stage not in rates:
                    missing.add(stage)
                    seconds = None
                elif n:
                    stage_seconds[stage] += n / rates[stage].per_second
                    if seconds is not None:
                        seconds += n / rates[stage].per_second
        out.append(PredictedStep(s.name, s.work, s.tokens, None if seconds is None else round(seconds, 3), cached))
    notes = list(notes) + [f"no rate for {stage}: its time is left out" for stage in sorted(missing)]
    total = None if missing else round(sum(stage_seconds.values()), 2)
    return PlanPrediction(
        model,
        out,
        rates,
        total,
        {k: round(v, 2) for k, v in stage_seconds.items()},
        total_work([s for s in steps if s.name in todo]),
        len(todo),
        len(steps) - len(todo),
        notes,
    )
