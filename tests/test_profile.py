"""`edgemoe profile` on the tiny fixtures: routing traced inside llama.cpp, usage statistics, heatmap, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import SHARED_FIXTURES
from test_bench import native_build  # noqa: F401  (the cached `edgemoe build`, for llama-imatrix)

from edgemoe_cli import profile

CALIB = SHARED_FIXTURES / "calib.txt"


def edgemoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe_cli.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def profiled(tiny_gguf, tmp_path_factory):
    if not CALIB.is_file():
        pytest.skip(f"{CALIB} not present")
    out = tmp_path_factory.mktemp("profile")
    proc = edgemoe(
        "profile",
        str(tiny_gguf("thinking", "f16")),
        "--text",
        str(CALIB),
        "--out",
        str(out),
        "--max-tokens",
        "600",
        "--ctx",
        "256",
        "--threads",
        "2",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_every_token_is_routed_to_top_k_distinct_experts(profiled):
    _, result = profiled
    counts = np.array(result["counts"])
    assert result["n_tokens"] == 600 and counts.shape == (3, 16)
    # each token picks exactly top-k (4) experts per layer: a layer's counts add up to tokens x k
    assert (counts.sum(axis=1) == 600 * result["n_expert_used"]).all()
    assert (np.array(result["reap"]) >= 0).all()


def test_trace_gate_weights_are_normalized_per_token(tiny_gguf):
    trace = profile.trace_routing(tiny_gguf("thinking", "f16"), CALIB, max_tokens=300, ctx=128, threads=2)
    # ERNIE normalizes the k picked gate weights to sum to 1: summed over experts, each layer gets one per token
    np.testing.assert_allclose(trace.gate_sum.sum(axis=1), trace.n_tokens, rtol=1e-4)
    assert trace.layers == [1, 2, 3]


def test_statistics_and_files(profiled):
    out, result = profiled
    for png in ("expert-usage.png", "usage-vs-rank.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "profile.json").read_text())["counts"] == result["counts"]
    for layer, counts in zip(result["layers"], result["counts"]):
        p = np.array(counts) / sum(counts)
        nz = p[p > 0]
        assert layer["entropy_bits"] == pytest.approx(-(nz * np.log2(nz)).sum(), abs=1e-3)
        assert 1 <= layer["effective_experts"] <= 16
        assert layer["top_k_share"] == pytest.approx(np.sort(p)[::-1][:4].sum(), abs=1e-3)
    assert result["power_law"]["verdict"]


def test_power_law_fit_recovers_alpha():
    usage = 1000 * np.arange(1, 33, dtype=np.float64) ** -1.3
    alpha, r2_power, r2_exp = profile.rank_fits(usage)
    assert alpha == pytest.approx(1.3, abs=1e-6) and r2_power == pytest.approx(1.0) and r2_power > r2_exp
    geometric = 1000 * 0.8 ** np.arange(32)
    _, r2_power, r2_exp = profile.rank_fits(geometric)
    assert r2_exp == pytest.approx(1.0) and r2_exp > r2_power


def test_errors(tmp_path, tiny_gguf):
    out = tmp_path / "prof"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for args, message in [
        ([str(tiny_gguf("pt", "f16")), "--text", str(empty)], "is empty"),
        ([str(tiny_gguf("pt", "f16")), "--text", str(tmp_path / "missing.txt")], "no such file"),
        ([str(CALIB), "--text", str(CALIB)], "not a GGUF"),
    ]:
        proc = edgemoe("profile", *args, "--out", str(out))
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists()


@pytest.mark.slow
def test_routing_agrees_with_llama_imatrix_expert_counts(native_build, tiny_gguf, tmp_path):  # noqa: F811
    """llama-imatrix counts the tokens each expert's matmul received: an independent reading of the same routing."""
    from edgemoe_cli.imatrix import compute_imatrix, expert_usage

    text = tmp_path / "text.txt"
    text.write_text(CALIB.read_text(encoding="utf-8")[:12000], encoding="utf-8")
    model = tiny_gguf("thinking", "f16")
    im = compute_imatrix(model, text, tmp_path / "t.imatrix.gguf", ctx=256, threads=2)
    theirs = expert_usage(im.out)[1:]  # row = block index; block 0 is dense
    trace = profile.trace_routing(model, text, max_tokens=im.chunks * 256, ctx=256, threads=2)
    ours = trace.counts / trace.counts.sum(axis=1, keepdims=True)
    assert np.abs(ours - theirs).max() < 0.01
