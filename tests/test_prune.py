"""`edgemoe prune` on the tiny fixtures: consistent slicing, a GGUF stock llama.cpp runs, budgets, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import SHARED_FIXTURES

from edgemoe_cli import generate, prune
from edgemoe_cli.errors import EdgeMoEError
from edgemoe_cli.units import parse_size

CALIB = SHARED_FIXTURES / "calib.txt"


def edgemoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe_cli.cli", *args], capture_output=True, text=True, timeout=300)


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def field(path: Path, key: str):
    return gguf.GGUFReader(path).get_field(key).contents()


@pytest.fixture(scope="module")
def pruned_reap(tiny_gguf, tmp_path_factory):
    if not CALIB.is_file():
        pytest.skip(f"{CALIB} not present")
    src = tiny_gguf("thinking", "f16")
    out = tmp_path_factory.mktemp("prune") / "keep12.gguf"
    return src, prune.prune(src, keep=12, text=CALIB, out=out, max_tokens=512, threads=2)


def test_slices_every_expert_tensor_consistently(pruned_reap):
    src, result = pruned_reap
    out = Path(result.out)
    assert result.score == "reap" and result.n_expert_after == 12
    assert field(out, "ernie4_5-moe.expert_count") == 12
    assert field(out, "ernie4_5-moe.expert_used_count") == field(src, "ernie4_5-moe.expert_used_count")
    before, after = tensors(src), tensors(out)
    assert set(before) == set(after)
    for il, kept in result.kept.items():
        assert len(kept) == 12 and kept == sorted(set(kept))
        for proj in ("gate", "up", "down"):
            name = f"blk.{il}.ffn_{proj}_exps.weight"
            assert list(after[name].shape) == list(before[name].shape[:2]) + [12]
            np.testing.assert_array_equal(after[name].data, before[name].data[kept])
        np.testing.assert_array_equal(
            after[f"blk.{il}.ffn_gate_inp.weight"].data, before[f"blk.{il}.ffn_gate_inp.weight"].data[kept]
        )
        np.testing.assert_array_equal(
            after[f"blk.{il}.exp_probs_b.bias"].data, before[f"blk.{il}.exp_probs_b.bias"].data[..., kept]
        )
    for name, t in before.items():  # everything that is not per-expert is copied byte for byte
        if "exps" not in name and "gate_inp" not in name and "exp_probs_b" not in name:
            np.testing.assert_array_equal(after[name].data, t.data)


def test_kept_experts_are_the_highest_reap_scores(tiny_gguf, pruned_reap):
    src, result = pruned_reap
    from edgemoe_cli.profile import trace_routing

    trace = trace_routing(src, CALIB, max_tokens=512, threads=2)
    scores = trace.reap()
    for row, il in enumerate(trace.layers):
        kept = result.kept[str(il)]
        dropped = sorted(set(range(16)) - set(kept))
        assert scores[row, kept].min() >= scores[row, dropped].max()


def test_pruned_model_runs_in_llama_cpp(pruned_reap):
    _, result = pruned_reap
    reply = generate.run(result.out, "What is 51 - 29?", max_tokens=48, ctx=256, threads=2, temp=0)
    assert reply.completion_tokens > 0 and reply.raw.strip()
    manifest = json.loads(Path(result.manifest).read_text())
    assert manifest["expert_count"] == 12 and manifest["kept_experts"] == result.kept


def test_quantized_model_prunes_and_runs(tiny_gguf, tmp_path):
    src = tiny_gguf("pt", "q8_0")
    result = prune.prune(src, keep="50%", out=tmp_path / "half.gguf")
    assert result.score == "weights" and result.n_expert_after == 8
    t = tensors(Path(result.out))["blk.2.ffn_down_exps.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and t.shape[-1] == 8
    reply = generate.run(result.out, "What is 93 + 16?", max_tokens=16, ctx=256, threads=2, temp=0)
    assert reply.completion_tokens > 0


def test_budget_picks_the_largest_count_that_fits(tiny_gguf, tmp_path):
    src = tiny_gguf("pt", "f16")
    size = src.stat().st_size
    budget = size * 3 // 4
    result = prune.prune(src, budget=budget, out=tmp_path / "fit.gguf")
    assert result.bytes_after <= budget
    reader = gguf.GGUFReader(src)
    predicted = prune.predicted_bytes(reader, 16, result.n_expert_after)
    assert predicted - 32 < result.bytes_after <= predicted  # exact up to the header's alignment padding
    assert prune.predicted_bytes(reader, 16, result.n_expert_after + 1) > budget


def test_usage_scores_from_a_profile(tiny_gguf, tmp_path):
    src = tiny_gguf("pt", "f16")
    counts = np.arange(48).reshape(3, 16) % 16  # expert e used e times: the top experts are 11..15 in every layer
    (tmp_path / "profile.json").write_text(
        json.dumps({"counts": counts.tolist(), "layers": [{"layer": il} for il in (1, 2, 3)]})
    )
    result = prune.prune(src, keep=5, usage=tmp_path / "profile.json", out=tmp_path / "u.gguf")
    assert result.score == "usage" and all(k == [11, 12, 13, 14, 15] for k in result.kept.values())


@pytest.mark.parametrize(
    "text, expected", [("12G", 12 * 2**30), ("900M", 900 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("4096", 4096)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def other_arch_gguf(path: Path) -> Path:
    """A valid GGUF of another architecture (llama), for the 'not ERNIE' errors of prune, compare and bench."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--keep", "17"], "more than the 16 experts"),
        (["--keep", "3"], "fewer than the 4 experts"),
        (["--keep", "16"], "nothing to prune"),
        (["--budget", "1M"], "fewer than the 4 used per token"),
        (["--keep", "8", "--budget", "10M"], "exactly one of --keep and --budget"),
    ],
)
def test_errors_are_one_line_and_write_nothing(tiny_gguf, tmp_path, args, message):
    out = tmp_path / "out.gguf"
    proc = edgemoe("prune", str(tiny_gguf("pt", "f16")), *args, "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_non_ernie_gguf_is_refused(tmp_path):
    other = other_arch_gguf(tmp_path / "llama.gguf")
    out = tmp_path / "out.gguf"
    proc = edgemoe("prune", str(other), "--keep", "2", "--out", str(out))
    assert proc.returncode == 2 and "not ERNIE-4.5 MoE" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not out.with_name("out.gguf.part").exists()
    with pytest.raises(EdgeMoEError, match="not a GGUF"):
        prune.prune(CALIB, keep=2)
