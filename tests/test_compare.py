"""`edgemoe compare` on the tiny fixtures: both variants, full replies, metrics, accuracy; prompt files; errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_FIXTURES, streaming_cap
from test_prune import other_arch_gguf

from edgemoe_cli import compare
from edgemoe_cli.errors import EdgeMoEError

ARITH = SHARED_FIXTURES / "arith-dev.jsonl"


def edgemoe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160"}  # wide enough for the metrics table's headers on one line
    return subprocess.run(
        [sys.executable, "-m", "edgemoe_cli.cli", *args], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.fixture(scope="module")
def compared(tiny_gguf, tmp_path_factory):
    if not ARITH.is_file():
        pytest.skip(f"{ARITH} not present")
    out = tmp_path_factory.mktemp("compare") / "report.md"
    proc = edgemoe(
        "compare",
        "--pt",
        str(tiny_gguf("pt", "f16")),
        "--thinking",
        str(tiny_gguf("thinking", "f16")),
        "--prompts",
        str(ARITH),
        "--limit",
        "4",
        "--max-tokens",
        "100",
        "--threads",
        "2",
        "--out",
        str(out),
        "--show",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(out.with_suffix(".json").read_text()), proc.stdout


def test_report_holds_both_replies_in_full_and_scores_them(compared):
    out, data, _ = compared
    markdown = out.read_text()
    assert len(data["items"]) == 4
    for it in data["items"]:
        assert it["pt"]["reasoning"] == "" and it["pt"]["answer"]
        assert it["thinking"]["reasoning"], "the Thinking fixture reasons before answering"
        assert it["thinking"]["answer"] in markdown and it["thinking"]["reasoning"] in markdown
        assert it["pt"]["answer"] in markdown
        for variant in ("pt", "thinking"):
            a = it[variant]
            assert a["correct"] == compare.is_correct(compare.Prompt(**it["prompt"]), a["answer"])
    for variant in ("pt", "thinking"):
        s = data["summary"][variant]
        assert s["scored"] == 4 and 0 <= s["correct"] <= 4
        assert s["peak_rss_bytes"] > Path(s["model"]).stat().st_size // 2
    assert data["accuracy_by_kind"]["arith-dev"]["thinking"] == f"{data['summary']['thinking']['correct']}/4"
    assert "## Accuracy by kind of task" in markdown and "<details><summary>reasoning" in markdown


def test_thinking_spends_tokens_on_reasoning(compared):
    _, data, _ = compared
    s = data["summary"]
    assert s["thinking"]["mean_reasoning_tokens"] > s["thinking"]["mean_answer_tokens"]
    assert s["pt"]["mean_reasoning_tokens"] == 0


def test_terminal_shows_panels_and_metrics(compared):
    _, _, stdout = compared
    assert "PT" in stdout and "Thinking" in stdout and "gen tok/s" in stdout and "2 more prompts" in stdout


@pytest.mark.parametrize(
    "expected, check, answer, ok",
    [
        ("22", "number", "The answer is 22.", True),
        ("22", "number", "22 - 1 = 21, so 21", False),
        ("1,250", "contains", "about 1,250 units", True),
        ("专家", "contains", "混合专家模型", True),
        (r"\bYES\b", "regex", "YES it is", True),
        ("is_prime", "python", "```python\ndef is_prime(n):\n    return n > 1\n```", True),
        ("is_prime", "python", "def is_prime(n) return", False),
        (None, None, "anything", None),
    ],
)
def test_checks(expected, check, answer, ok):
    assert compare.is_correct(compare.Prompt(id="x", text="q", expected=expected, check=check), answer) is ok


def test_default_prompts_cover_the_learning_path_tasks():
    prompts = compare.load_prompts()
    kinds = " ".join(p.kind for p in prompts)
    for kind in ("business strategy", "Chinese", "arithmetic", "code"):
        assert kind in kinds
    assert any(p.check == "number" for p in prompts) and any(p.expected is None for p in prompts)


def test_errors_are_one_line_and_write_nothing(tiny_gguf, tmp_path):
    pt, thinking = str(tiny_gguf("pt", "f16")), str(tiny_gguf("thinking", "f16"))
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[[prompt]]\ntext = 'unterminated\n")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"q": "What is 1 + 1?", "answer": "2"}\n{"q": \n')
    other = str(other_arch_gguf(tmp_path / "llama.gguf"))
    out = tmp_path / "out" / "report.md"
    cases = [
        (["--pt", pt], "no Thinking model given"),
        (["--thinking", thinking], "no PT model given"),
        (["--pt", pt, "--thinking", str(tmp_path / "missing.gguf")], "missing.gguf does not exist"),
        (["--pt", other, "--thinking", thinking], "not ERNIE-4.5"),
        (["--pt", thinking, "--thinking", pt], "has a Thinking chat template"),
        (["--pt", pt, "--thinking", thinking, "--prompts", str(bad_toml)], "is not valid TOML"),
        (["--pt", pt, "--thinking", thinking, "--prompts", str(bad_jsonl)], "bad.jsonl:2 is not valid JSON"),
    ]
    for args, message in cases:
        proc = edgemoe("compare", *args, "--out", str(out))
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not out.parent.exists()


def test_toml_prompt_without_text_is_refused(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[[prompt]]\nid = "a"\nexpected = "1"\n')
    with pytest.raises(EdgeMoEError, match="has no text"):
        compare.load_prompts(path)


def test_memory_streams_each_variant_and_keeps_the_answers(tiny_gguf):
    """compare --memory: each variant streams its experts under the cap and answers as it does resident."""
    models = {v: tiny_gguf(v, "f16") for v in ("pt", "thinking")}
    cap = max(streaming_cap(m, 0.25, 512)[0] for m in models.values())
    kwargs = dict(prompt=["What is 51 - 29?", "What is 17 + 25?"], max_tokens=32, threads=1, ctx=512)
    resident = compare.compare(models["thinking"], models["pt"], **kwargs)
    streamed = compare.compare(models["thinking"], models["pt"], memory=str(cap), **kwargs)
    assert [(i.pt.raw, i.thinking.raw) for i in streamed.items] == [(i.pt.raw, i.thinking.raw) for i in resident.items]
