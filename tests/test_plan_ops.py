"""plan as an operation (issue 14): an interrupted plan resumes from the steps it finished, --dry-run prices the
same steps with this machine's rates, progress shows an ETA, and the result says plan's peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgemoe_cli import evaluate as evaluate_module
from edgemoe_cli import plan
from edgemoe_cli.memwatch import MemoryWatch

sys.path.insert(0, str(Path(__file__).parent))
from test_quantize import write_imatrix  # noqa: E402

TEXT = Path(__file__).resolve().parents[1] / "data" / "calib" / "calibration.txt"
# the --arm-fast candidates (3 types, calibration Q4_0) and one chunk: a whole measurement in ~20 s on the fixture
# with the floor (opt-in): every kind of step is interrupted and resumed
KNOBS = dict(
    types=plan.ARM_FAST_TYPES, calibration_type=plan.ARM_FAST_CALIBRATION_TYPE, max_chunks=1, threads=2, floor=True
)


class Interrupted(Exception):
    """What Ctrl-C is to the plan: an exception out of the middle of a step loop."""


def _counting_evals(monkeypatch) -> list[str]:
    """Record every eval plan runs (the real function, called through)."""
    calls: list[str] = []
    real = evaluate_module.evaluate

    def counted(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        calls.append(str(model))
        return result

    monkeypatch.setattr(evaluate_module, "evaluate", counted)
    return calls


def test_an_interrupted_plan_resumes_and_equals_an_uninterrupted_one(tiny_gguf, tmp_path, monkeypatch):
    model = tiny_gguf("thinking")
    im = write_imatrix(tmp_path / "im.gguf", model)
    evals = _counting_evals(monkeypatch)

    monkeypatch.setenv("EDGEMOE_HOME", str(tmp_path / "whole"))
    with MemoryWatch() as watch:
        whole = plan.measure(model, im, TEXT, **KNOBS)
    runs = len(evals)
    assert runs == whole.work["runs"] and whole.work["cached_steps"] == 0
    # every stage's peak, split into anonymous memory and mapped file pages: an eval maps the model it evaluates
    stages = {"errors", "quantize q4_0", "quantize q8_0", "reference", "calibration model", "calibration runs"}
    assert stages <= set(watch.peaks)
    assert all(watch.peaks[s].anon_bytes > 20 * 2**20 for s in stages)
    assert watch.peaks["calibration runs"].file_bytes > model.stat().st_size // 2

    # the same plan in another store, stopped during its sixth calibration step
    monkeypatch.setenv("EDGEMOE_HOME", str(tmp_path / "stopped"))
    evals.clear()
    seen = []

    def stop(step, done, total, detail="", unit=""):
        seen.append(step)
        if seen.count("calibrate") == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        plan.measure(model, im, TEXT, progress=stop, **KNOBS)
    finished_runs = len(evals)
    assert 0 < finished_runs < runs
    # one kept run damaged (as a disk error or another version could leave it): measured again, not trusted
    kept = [json.loads(p.read_text()) | {"path": p} for p in (tmp_path / "stopped" / "cache/plan/steps").iterdir()]
    damaged = next(k for k in kept if k["step"].startswith("role "))
    damaged["path"].write_text(json.dumps({"step": damaged["step"], "result": {"kld": "0.1"}}))
    finished_runs -= 1

    # --dry-run sees what was kept: those steps cost nothing, and its pending steps are what the resume runs
    prediction = plan.dry_run(model, im, TEXT, arm_fast=True, max_chunks=1, probe=False, floor=True)
    cached = {s.name for s in prediction.steps if s.cached}
    assert "errors" in cached
    assert sum(s.name.startswith(("role ", "layer ")) or s.name == "floor" for s in prediction.steps if s.cached) == (
        finished_runs
    )

    evals.clear()
    resumed = plan.measure(model, im, TEXT, **KNOBS)
    assert len(evals) == runs - finished_runs == resumed.work["runs"]  # no finished run was evaluated again
    assert resumed.work["cached_steps"] == prediction.cached_steps
    assert resumed.work["scored_weights"] == 0  # the errors were kept before the stop
    assert resumed.errors == whole.errors
    for got, want in (
        (resumed.calibration_kld, whole.calibration_kld),
        (resumed.layer_kld, whole.layer_kld),
        (resumed.gains, whole.gains),
    ):
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-12) for k in want)
    assert resumed.floor_kld == pytest.approx(whole.floor_kld, rel=1e-6, abs=1e-12)

    # the uninterrupted plan left its rates: a dry-run prices from them (no probe), and a plan solved again from
    # the cache reports its peak memory
    monkeypatch.setenv("EDGEMOE_HOME", str(tmp_path / "whole"))
    rates = plan.dry_run(model, im, TEXT, arm_fast=True, max_chunks=1, probe=False, floor=True)
    assert {r.source for r in rates.rates.values()} == {"measured"} and set(rates.rates) == set(plan.STAGES)
    assert rates.pending_steps == 0 and rates.seconds == 0
    result = plan.plan(model, im, TEXT, max_size=20_000_000, arm_fast=True, max_chunks=1, threads=2, floor=True)
    assert result.measured_from_cache and result.peak_rss_bytes >= result.peak_rss_self_bytes > 50 * 2**20
    assert 20 * 2**20 < result.peak_anon_bytes < result.peak_rss_bytes and result.peak_file_bytes > 0
    assert set(result.stage_memory) == {"read inputs", "solve"}  # measured long ago: only the choice was made


def test_a_changed_input_reuses_no_step(tiny_gguf, tmp_path):
    """Keys are content: another imatrix changes every step's key, another --chunks only the evals'."""
    from edgemoe_cli.qerror import DEFAULT_FRACTION

    model = tiny_gguf("thinking")
    im = write_imatrix(tmp_path / "im.gguf", model)
    other = tmp_path / "other.gguf"
    other.write_bytes(im.read_bytes() + b"\0")
    tensors, _ = plan.read_tensors(model)

    def keys(imatrix, chunks):
        steps = plan.measure_steps(
            model, tensors, imatrix, TEXT, ("q4_0", "q8_0"), "q4_0", 512, chunks, "source", DEFAULT_FRACTION
        )
        return {s.name: s.key for s in steps if s.key}

    a, b, c = keys(im, 1), keys(other, 1), keys(im, 2)
    assert a.keys() == b.keys() == c.keys() and not set(a.values()) & set(b.values())
    assert a["errors"] == c["errors"] and all(a[n] != c[n] for n in a if n != "errors")


def test_the_floor_is_opt_in_and_its_steps_are_the_only_difference(tiny_gguf, tmp_path):
    """Without the floor plan skips the whole-model Q8_0 quantization and the floor eval, nothing else; the other
    steps keep their keys (a run kept by one serves the other), the measurement's cache key does not."""
    from edgemoe_cli.qerror import DEFAULT_FRACTION

    model = tiny_gguf("thinking")
    im = write_imatrix(tmp_path / "im.gguf", model)
    tensors, _ = plan.read_tensors(model)

    def steps(reference, floor):
        args = (model, tensors, im, TEXT, plan.DEFAULT_TYPES, "q3_k", 512, 1, reference, DEFAULT_FRACTION, 4)
        return {s.name: s.key for s in plan.measure_steps(*args, floor=floor)}

    with_floor, without = steps("source", True), steps("source", False)
    assert set(with_floor) - set(without) == {"quantize q8_0", "floor"}
    assert all(without[n] == with_floor[n] for n in without)
    # against a Q8_0 reference there is no floor either way, and the Q8_0 quantization is the reference
    assert steps("q8_0", True) == steps("q8_0", False) and "quantize q8_0" in steps("q8_0", False)

    def cache(reference, floor):
        return plan._cache_path(model, im, TEXT, plan.DEFAULT_TYPES, "q3_k", 1, reference, floor=floor)

    assert cache("source", True) == plan._cache_path(model, im, TEXT, plan.DEFAULT_TYPES, "q3_k", 1, "source")
    assert cache("source", False) != cache("source", True) and cache("q8_0", False) == cache("q8_0", True)


def test_dry_run_cli_prints_the_steps_and_a_probed_time(tiny_gguf, tmp_path):
    model = tiny_gguf("thinking")
    im = write_imatrix(tmp_path / "im.gguf", model)
    args = [sys.executable, "-m", "edgemoe_cli.cli", "plan", str(model), "--max-size", "20MB", "--imatrix", str(im)]
    out = subprocess.run(args + ["--chunks", "1", "--dry-run", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    names = [s["name"] for s in p["steps"]]
    assert names[:2] == ["errors", "quantize q3_k"] and "layer 0" in names
    assert "quantize q8_0" not in names and "floor" not in names  # opt-in: --floor
    floored = subprocess.run(args + ["--chunks", "1", "--dry-run", "--json", "--floor"], capture_output=True, text=True)
    names = [s["name"] for s in json.loads(floored.stdout)["steps"]]
    assert names[:3] == ["errors", "quantize q3_k", "quantize q8_0"] and names[-1] == "floor"
    assert {r["source"] for r in p["rates"].values()} == {"probe"} and p["seconds"] > 0 and p["cached_steps"] == 0
    assert all(s["tokens"] == 512 for s in p["steps"] if s["name"].startswith(("role ", "layer ")))
    text = subprocess.run(args + ["--chunks", "1", "--dry-run"], capture_output=True, text=True)
    assert text.returncode == 0 and "predicted" in text.stdout and "(probe:" in text.stdout
    # nothing was measured: the store keeps no step and no rate
    assert not (Path(os.environ["EDGEMOE_HOME"]) / "cache" / "plan" / "steps").exists()
    assert not (Path(os.environ["EDGEMOE_HOME"]) / "cache" / "plan" / "rates.json").exists()


def test_progress_eta_comes_from_the_steps_own_rate_in_this_run():
    from rich.progress import Progress as Bars

    from edgemoe_cli.cli.common import _Eta

    bars = Bars(disable=True)
    # 5 steps kept by an interrupted run: they say nothing about this run's rate
    task_id = bars.add_task("calibrate", total=20, completed=5, first_done=5)
    assert str(_Eta().render(bars.tasks[0])) == ""
    time.sleep(0.05)
    bars.update(task_id, completed=6)
    eta = str(_Eta().render(bars.tasks[0]))
    assert eta.startswith("ETA ")


def test_a_killed_plans_work_directory_is_removed_by_the_next_plan(tmp_path):
    """A kill skips measure's cleanup; the next plan deletes a directory whose owner process is gone, and nothing
    else (a live plan's, another host's, a file that is not a run's)."""
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names no process now
    host = socket.gethostname()
    dirs = {}
    for name, owner in (
        ("killed", f"{host} {gone.pid}"),
        ("alive", f"{host} {os.getpid()}"),
        ("other", f"x {gone.pid}"),
    ):
        dirs[name] = tmp_path / f"m.{name}"
        dirs[name].mkdir()
        (dirs[name] / plan.OWNER_FILE).write_text(owner)
        (dirs[name] / "m.q3_k.gguf").write_bytes(b"a whole-model quantization")
    (tmp_path / "m.q8_0.gguf").write_bytes(b"not a run's directory")
    assert plan.remove_abandoned_work(tmp_path) == [dirs["killed"]]
    assert not dirs["killed"].exists() and dirs["alive"].exists() and dirs["other"].exists()
    assert (tmp_path / "m.q8_0.gguf").exists()


def test_reference_auto_takes_the_source_only_where_it_fits(tiny_gguf, tmp_path):
    """--reference auto (the CLI's default) measures against the source when its file fits in the free memory with
    the eval's headroom to spare, else against the model at Q8_0; an explicit reference is kept, an unknown one is
    refused; the dry run names the one it priced."""
    from edgemoe_cli.errors import EdgeMoEError

    model = tiny_gguf("thinking")
    size = model.stat().st_size
    fits = size + plan.EVAL_HEADROOM
    assert plan.resolve_reference(model, "auto", available=fits)[0] == "source"
    ref, why = plan.resolve_reference(model, "auto", available=fits - 1)
    assert ref == "q8_0" and "does not fit" in why
    assert plan.resolve_reference(model, "source", available=0) == ("source", "--reference source")
    assert plan.resolve_reference(model, "auto")[0] == "source"  # a tiny model fits any machine that runs the tests
    with pytest.raises(EdgeMoEError, match="unknown reference"):
        plan._check_inputs(model, None, TEXT, "bf16")
    p = plan.dry_run(model, None, TEXT, reference="auto", probe=False)
    assert any(n.startswith("reference source (auto: the source") for n in p.notes)
