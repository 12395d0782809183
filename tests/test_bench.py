"""`edgemoe bench`: active bytes per token, copy bandwidth, llama-bench over a matrix (slow: needs a build), errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_prune import other_arch_gguf

from edgemoe_cli import bench

EDGEMOE = Path(sys.executable).with_name("edgemoe")


def edgemoe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "edgemoe_cli.cli", *args], capture_output=True, text=True, timeout=1800, env=env
    )


def test_active_bytes_count_top_k_of_n_routed_experts(tiny_gguf):
    model = tiny_gguf("thinking", "f16")
    reader = gguf.GGUFReader(model)
    experts = sum(int(t.n_bytes) for t in reader.tensors if "_exps." in t.name)
    rest = sum(int(t.n_bytes) for t in reader.tensors if "_exps." not in t.name)
    # tied embeddings (no output.weight): the output head reads all of token_embd every token
    assert "output.weight" not in {t.name for t in reader.tensors}
    assert bench.active_bytes_per_token(model) == int(rest + experts * 4 / 16)


def test_copy_bandwidth_is_measured():
    assert 0.1 < bench.copy_bandwidth(threads=1, megabytes=32, repeats=2) < 10_000


def test_test_names_follow_llama_bench():
    assert (bench.test_name(512, 0), bench.test_name(0, 128), bench.test_name(128, 128)) == (
        "pp512",
        "tg128",
        "pp128+tg128",
    )


def test_errors_are_one_line_and_write_nothing(tiny_gguf, tmp_path):
    model = str(tiny_gguf("pt", "f16"))
    other = other_arch_gguf(tmp_path / "llama.gguf")
    out = tmp_path / "bench-out"
    for args, message in [
        ([model, "--builds", str(tmp_path / "no-such-build")], "has no bin/llama-bench"),
        ([str(other)], "not ERNIE-4.5 MoE"),
        ([str(tmp_path / "missing.gguf")], "missing.gguf does not exist"),
        ([model, "--threads", "2,x"], "is not a list of numbers"),
        ([model, "--pg", "128"], "is not PP,TG"),
    ]:
        proc = edgemoe("bench", *args, "--out", str(out))
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert not out.exists()


@pytest.fixture(scope="module")
def native_build() -> dict:
    proc = subprocess.run([str(EDGEMOE), "build", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_llama_bench_matrix_reports_and_plots(native_build, tiny_gguf, tmp_path):
    models = [str(tiny_gguf("thinking", "f16")), str(tiny_gguf("thinking", "q8_0"))]
    out = tmp_path / "bench"
    proc = edgemoe(
        "bench",
        *models,
        "--threads",
        "1,2",
        "--reps",
        "2",
        "--n-prompt",
        "64",
        "--n-gen",
        "16",
        "--pg",
        "16,16",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "bench.json").read_text())
    cells = {(Path(r["model"]).name, r["test"], r["threads"]) for r in data["rows"]}
    assert len(cells) == 2 * 3 * 2 == len(data["rows"])
    for r in data["rows"]:
        assert r["reps"] == 2 and len(r["samples_tps"]) == 2 and r["mean_tps"] > 0 and r["stddev_tps"] >= 0
        assert r["mean_tps"] == pytest.approx(np.mean(r["samples_tps"]), rel=1e-2)
    for c in data["ceilings"]:
        assert c["tg_ceiling_tps"] > 0 and c["best_tg_tps"] > 0
    markdown = (out / "bench.md").read_text()
    results, external = markdown.split("## External reference (not measured here)")
    assert "38.51" in external and "15.96" in external and "38.51" not in results
    for png in ("tps-vs-threads.png", "tps-vs-size.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "tg ceiling" in proc.stdout and "external reference" in proc.stdout
