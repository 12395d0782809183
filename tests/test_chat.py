"""Chat templates render the exact trained formats; the Thinking parser handles every shape of reply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgemoe_cli import chat
from edgemoe_cli.errors import EdgeMoEError

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "fixtures"


def template(variant: str) -> str:
    return json.loads((SHIPPED / f"tiny-ernie-{variant}" / "tokenizer_config.json").read_text())["chat_template"]


def test_pt_template_renders_the_pt_format():
    q = "What is 51 - 29?"
    assert chat.render_prompt(template("pt"), chat.build_messages(q)) == f"<|begin_of_sentence|>User: {q}\nAssistant: "
    with_system = chat.render_prompt(template("pt"), chat.build_messages(q, system="Be brief."))
    assert with_system == f"<|begin_of_sentence|>Be brief.\nUser: {q}\nAssistant: "


def test_thinking_template_prefills_think():
    q = "What is 51 - 29?"
    rendered = chat.render_prompt(template("thinking"), chat.build_messages(q))
    assert rendered == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    with_system = chat.render_prompt(template("thinking"), chat.build_messages(q, system="S"))
    assert with_system.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n")


def test_template_kind():
    assert chat.is_thinking_template(template("thinking"))
    assert not chat.is_thinking_template(template("pt"))
    assert not chat.is_thinking_template(None)


def test_broken_template_is_a_user_error():
    with pytest.raises(EdgeMoEError, match="chat template"):
        chat.render_prompt("{{ raise_exception('no system role') }}", chat.build_messages("q"))


@pytest.mark.parametrize(
    "raw, truncated, reasoning, answer, complete",
    [
        # the trained shape: <think> was in the prompt, so only </think> appears
        (
            "Ones: 1 - 9 ...\n</think>\n<response>\nThe answer is 22.\n</response>",
            False,
            "Ones: 1 - 9 ...",
            "The answer is 22.",
            True,
        ),
        # cut off mid-reasoning: everything is reasoning, there is no answer
        ("Ones: 11 - 9 = 2, borrow", True, "Ones: 11 - 9 = 2, borrow", "", False),
        # no tags at all, finished at end-of-sequence: the model answered directly
        ("The answer is 22.", False, "", "The answer is 22.", True),
        # <response> never closed (cut off inside the answer)
        ("steps\n</think>\n<response>\nThe answer", True, "steps", "The answer", False),
        # <response> never closed but generation ended anyway
        ("steps\n</think>\n<response>\nThe answer is 3.", False, "steps", "The answer is 3.", True),
        # </think> then untagged text
        ("steps\n</think>\nThe answer is 3.", False, "steps", "The answer is 3.", True),
        # <response> without </think> before it
        ("steps\n<response>\n42\n</response>", False, "steps", "42", True),
        # a model that repeats the pre-filled <think>
        ("<think>\nsteps\n</think>\n<response>\n42\n</response>", False, "steps", "42", True),
        # empty reasoning
        ("\n</think>\n<response>\n42\n</response>", False, "", "42", True),
    ],
)
def test_parse_thinking_reply(raw, truncated, reasoning, answer, complete):
    reply = chat.parse_reply(raw, thinking=True, truncated=truncated)
    assert (reply.reasoning, reply.answer, reply.complete, reply.tool_call) == (reasoning, answer, complete, None)


def test_parse_tool_call():
    raw = (
        'I need the weather.\n</think>\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    reply = chat.parse_reply(raw, thinking=True)
    assert reply.reasoning == "I need the weather."
    assert json.loads(reply.tool_call) == {"name": "weather", "arguments": {"city": "Paris"}}
    assert reply.answer == reply.tool_call and reply.complete


def test_parse_pt_reply_is_all_answer():
    reply = chat.parse_reply(" The answer is 22.", thinking=False)
    assert (reply.reasoning, reply.answer, reply.complete) == ("", "The answer is 22.", True)
    # PT text is never searched for tags: a PT model writing "</think>" is just text
    assert chat.parse_reply("a </think> b", thinking=False).answer == "a </think> b"
    assert not chat.parse_reply("cut", thinking=False, truncated=True).complete


def stream(pieces, thinking=True):
    splitter = chat.ReplySplitter(thinking)
    out = [seg for p in pieces for seg in splitter.feed(p)] + list(splitter.flush())
    merged: list[list[str]] = []
    for kind, text in out:
        if merged and merged[-1][0] == kind:
            merged[-1][1] += text
        else:
            merged.append([kind, text])
    return [tuple(m) for m in merged]


def test_splitter_follows_the_tags_token_by_token():
    pieces = [
        " Ones",
        ":",
        " 1",
        " -",
        " 9",
        ".",
        "\n",
        "</think>",
        "\n",
        "<response>",
        "\n",
        "The",
        " answer",
        " is",
        " 22",
        ".",
        "\n",
        "</response>",
    ]
    assert stream(pieces) == [("reasoning", "Ones: 1 - 9."), ("answer", "The answer is 22.")]


def test_splitter_waits_for_a_tag_split_across_pieces():
    pieces = ["a < b, so\n</th", "ink>\n<resp", "onse>\nyes\n</response>"]
    assert stream(pieces) == [("reasoning", "a < b, so"), ("answer", "yes")]


def test_splitter_agrees_with_parse_reply():
    raw = "x + y\n</think>\n<response>\nThe answer is 5.\n</response>"
    reply = chat.parse_reply(raw, thinking=True)
    assert stream([raw[i : i + 3] for i in range(0, len(raw), 3)]) == [
        ("reasoning", reply.reasoning),
        ("answer", reply.answer),
    ]


def test_splitter_passes_pt_text_through():
    assert stream([" The", " answer", " <b>", " 7."], thinking=False) == [("answer", "The answer <b> 7.")]


def test_splitter_keeps_an_unfinished_tag_like_text():
    assert stream(["cut at <res"]) == [("reasoning", "cut at <res")]
