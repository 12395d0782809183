"""`edgemoe run` on the tiny fixtures: exact prompt tokens, the Thinking split, greedy determinism, stops, errors."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_FIXTURES, SHARED_SOURCE, SHIPPED_FIXTURES

from edgemoe_cli import generate
from edgemoe_cli.cli import main
from edgemoe_cli.errors import EdgeMoEError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = SHIPPED_FIXTURES
DEMO_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "reference/logits.npz",
    "reference/README.txt",
)
JSON_KEYS = {
    "reasoning",
    "answer",
    "raw",
    "prompt_tokens",
    "completion_tokens",
    "ttft_s",
    "prompt_tps",
    "gen_tps",
    "peak_rss_bytes",
    "tool_call",
    "finish_reason",
    "library",
    "streaming",
}
QUESTION = "What is 93 + 16?"


@pytest.fixture(scope="module")
def models(tiny_gguf):
    loaded = {v: generate.load_model(tiny_gguf(v), ctx=512, threads=2) for v in ("pt", "thinking")}
    yield loaded
    for llm in loaded.values():
        llm.close()


@pytest.fixture
def edgemoe(monkeypatch, capsys):
    """Run the CLI's main() in this process (no interpreter start-up per call); returns (exit code, stdout, stderr)."""

    def call(*args: str) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["edgemoe", *args])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return call


@pytest.mark.parametrize("variant", ["pt", "thinking"])
def test_shipped_fixture_copies_match_shared(variant):
    """data/fixtures is what a user's clone tests with: it must be the project's fixtures, byte for byte."""
    shared = SHARED_SOURCE / f"tiny-ernie-{variant}"
    if not shared.is_dir():
        pytest.skip(f"{shared} not present (it sits beside the repo only on the project's machines)")
    for name in DEMO_FILES:
        assert filecmp.cmp(SHIPPED / f"tiny-ernie-{variant}" / name, shared / name, shallow=False), name
    for name in ("calib.txt", "arith-dev.jsonl"):
        assert filecmp.cmp(SHIPPED / name, SHARED_SOURCE / name, shallow=False), name


@pytest.mark.parametrize("variant, first", [("pt", "<|begin_of_sentence|>"), ("thinking", "<|im_start|>")])
def test_prompt_tokens_start_with_the_template_no_bos_no_space(models, variant, first):
    llm = models[variant]
    text, thinking = generate.chat_prompt(llm, QUESTION)
    assert thinking == (variant == "thinking")
    tokens = generate.tokenize_prompt(llm, text)
    assert tokens[0] == llm.tokenize(first.encode(), add_bos=False, special=True)[0]
    assert llm.token_bos() not in tokens
    assert llm.detokenize(tokens, special=True).decode() == text  # special tokens parsed, nothing added or lost


@pytest.mark.parametrize("variant", ["pt", "thinking"])
def test_prompt_tokens_match_transformers_reference(models, variant):
    """reference/logits.npz seq3 is transformers' tokenization of the chat prompt for "What is 47 + 38?".

    transformers' legacy SentencePiece tokenizer puts a lone '▁' before the first special token; the fixture README
    says the model was trained without it, and llama.cpp (add_space_prefix false) does not add it.
    """
    npz = SHARED_FIXTURES / f"tiny-ernie-{variant}" / "reference" / "logits.npz"
    if not npz.exists():
        pytest.skip(f"{npz} not present")
    seq3 = np.load(npz)["seq3"].tolist()
    llm = models[variant]
    text, _ = generate.chat_prompt(llm, "What is 47 + 38?")
    assert generate.tokenize_prompt(llm, text) == seq3[1:]


def test_gguf_without_chat_template_gets_plain_text():
    from types import SimpleNamespace

    llm = SimpleNamespace(metadata={})
    assert generate.chat_prompt(llm, "The Debian") == ("The Debian", False)
    assert generate.chat_prompt(llm, "q", system="s") == ("s\nq", False)


def test_bos_is_never_doubled(tiny_gguf):
    # a GGUF that asks for BOS, given a prompt whose template already wrote it
    llm = generate.import_binding().Llama(
        str(tiny_gguf("pt")), n_ctx=64, verbose=False, kv_overrides={"tokenizer.ggml.add_bos_token": True}
    )
    try:
        bos = llm.token_bos()
        assert llm.tokenize(b"<s>User: hi", add_bos=True, special=True)[:2] == [bos, bos]
        tokens = generate.tokenize_prompt(llm, "<s>User: hi")
        assert tokens[0] == bos and tokens[1] != bos
        assert generate.tokenize_prompt(llm, "User: hi")[0] == bos
    finally:
        llm.close()


def test_thinking_reply_is_split_and_streamed(models):
    streamed: list[tuple[str, str]] = []
    r = generate.chat_reply(models["thinking"], QUESTION, max_tokens=200, on_text=lambda k, t: streamed.append((k, t)))
    assert r.finish_reason == "stop" and r.completion_tokens < 200
    assert "</think>" in r.raw and "<response>" in r.raw and "<think>" not in r.raw
    assert r.reasoning and r.answer.startswith("The answer is")
    assert "".join(t for k, t in streamed if k == "reasoning") == r.reasoning
    assert "".join(t for k, t in streamed if k == "answer") == r.answer
    assert r.prompt_tokens > 0 and r.ttft_s > 0 and r.prompt_tps > 0 and r.gen_tps > 0
    assert r.peak_rss_bytes > 0


def test_pt_reply_is_all_answer(models):
    r = generate.chat_reply(models["pt"], QUESTION, max_tokens=64)
    assert r.finish_reason == "stop"
    assert r.reasoning == "" and r.answer == r.raw.strip() and r.answer.startswith("The answer is")


def test_stops_at_eos_and_end_of_sentence(models):
    llm = models["pt"]
    end_of_sentence = llm.tokenize(b"<|end_of_sentence|>", add_bos=False, special=True)
    assert end_of_sentence == [4] and llm.token_eos() == 2
    assert {2, 4} <= generate._stop_tokens(llm)


def test_greedy_is_deterministic(models, tiny_gguf):
    first = generate.chat_reply(models["thinking"], QUESTION, max_tokens=80, temp=0)
    again = generate.chat_reply(models["thinking"], QUESTION, max_tokens=80, temp=0)
    fresh = generate.run(tiny_gguf("thinking"), QUESTION, max_tokens=80, temp=0, threads=1)
    assert first.raw == again.raw == fresh.raw
    assert first.completion_tokens == again.completion_tokens == fresh.completion_tokens


def test_greedy_picks_what_llama_cpp_greedy_sampler_picks(models):
    llm = models["thinking"]
    ours = generate.chat_reply(llm, QUESTION, max_tokens=40, temp=0)
    text, _ = generate.chat_prompt(llm, QUESTION)
    reference = []
    for token in llm.generate(generate.tokenize_prompt(llm, text), temp=0.0, reset=True):  # llama.cpp's greedy
        if len(reference) == ours.completion_tokens:
            break
        reference.append(token)
    assert llm.detokenize(reference).decode() == ours.raw


def test_seeded_sampling_repeats(models):
    a = generate.chat_reply(models["pt"], "The Debian", max_tokens=24, temp=1.0, seed=7)
    b = generate.chat_reply(models["pt"], "The Debian", max_tokens=24, temp=1.0, seed=7)
    assert a.raw == b.raw


def test_cut_off_mid_reasoning(models):
    r = generate.chat_reply(models["thinking"], QUESTION, max_tokens=5)
    assert r.finish_reason == "length" and r.completion_tokens == 5
    assert r.reasoning and r.answer == "" and "</think>" not in r.raw


def test_prompt_longer_than_context_is_a_user_error(tiny_gguf):
    llm = generate.load_model(tiny_gguf("pt"), ctx=32, threads=1)
    try:
        with pytest.raises(EdgeMoEError, match="context"):
            generate.chat_reply(llm, "word " * 1000)  # llama.cpp rounds n_ctx up to 256
    finally:
        llm.close()


def test_binding_info_names_the_library():
    info = generate.binding_info()
    assert Path(info.library).name.startswith("libllama")
    assert info.source in ("edgemoe build", "LLAMA_CPP_LIB_PATH", "llama-cpp-python wheel")
    assert "CPU" in info.system_info and info.llama_cpp_python


def test_cli_json(edgemoe, tiny_gguf):
    p = edgemoe("run", str(tiny_gguf("thinking")), "-p", QUESTION, "--temp", "0", "--threads", "1", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(out) == JSON_KEYS
    assert out["answer"].startswith("The answer is") and out["reasoning"]


def test_cli_streams_reasoning_then_answer(edgemoe, tiny_gguf, tmp_path):
    question = tmp_path / "q.txt"
    question.write_text(QUESTION + "\n")
    p = edgemoe("run", str(tiny_gguf("thinking")), "-f", str(question), "--temp", "0", "-t", "1")
    assert p.returncode == 0, p.stderr
    reasoning, answer = p.stdout.strip().split("\n\n")
    assert answer.startswith("The answer is") and "</think>" not in p.stdout and "<response>" not in p.stdout
    assert "tok/s" in p.stderr and "TTFT" in p.stderr


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0]


def test_cli_missing_file(edgemoe, tmp_path):
    one_line_error(edgemoe("run", str(tmp_path / "nope.gguf"), "-p", "hi"), "nope.gguf", "no such file")


def test_cli_not_a_gguf(edgemoe, tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    one_line_error(edgemoe("run", str(bogus), "-p", "hi"), "model.safetensors", "not a GGUF")


def test_cli_gguf_that_is_not_a_language_model(edgemoe, tmp_path):
    import gguf

    path = tmp_path / "imatrix.gguf"
    writer = gguf.GGUFWriter(str(path), "imatrix")
    writer.add_tensor("blk.0.ffn_up.in_sum2", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    one_line_error(edgemoe("run", str(path), "-p", "hi"), "imatrix.gguf", "cannot load", "'imatrix'")


def test_cli_empty_prompt_file(edgemoe, tiny_gguf, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    one_line_error(edgemoe("run", str(tiny_gguf("pt")), "-f", str(empty)), "empty.txt", "empty")


def test_cli_missing_prompt_file(edgemoe, tiny_gguf, tmp_path):
    one_line_error(edgemoe("run", str(tiny_gguf("pt")), "-f", str(tmp_path / "q.txt")), "q.txt")


def test_cli_no_prompt_and_two_prompts(edgemoe, tiny_gguf, tmp_path):
    one_line_error(edgemoe("run", str(tiny_gguf("pt"))), "no prompt")
    q = tmp_path / "q.txt"
    q.write_text("hi")
    one_line_error(edgemoe("run", str(tiny_gguf("pt")), "-p", "hi", "-f", str(q)), "not both")


@pytest.mark.slow
def test_make_demo_answers_with_both_fixtures(tmp_path):
    """scripts/demo.sh end to end (converts both fixtures, ~20 s): both models answer, Thinking shows its steps."""
    exe = Path(sys.executable).with_name("edgemoe")
    if not exe.exists():
        pytest.skip(f"{exe} not installed (pip install -e .)")
    env = {**os.environ, "EDGEMOE": str(exe), "DEMO_OUT": str(tmp_path), "DEMO_THREADS": "1"}
    p = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True, env=env, timeout=600
    )
    assert p.returncode == 0, p.stderr
    pt, thinking = p.stdout.split("== tiny-ernie-thinking")
    assert "The answer is 22." in pt and "The answer is 22." in thinking
    assert "51 - 29 = 22" in thinking  # the reasoning is printed, before the answer
    assert sorted(f.name for f in tmp_path.iterdir()) == ["tiny-ernie-pt-f16.gguf", "tiny-ernie-thinking-f16.gguf"]
